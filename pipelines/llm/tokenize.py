"""Examples to token ids and loss labels, and token ids to batches.

Prompts are rendered with the tokenizer's chat template (or the default one, see model.py). The loss
counts only assistant replies unless the run says `train_on: all`: each assistant turn is found by
rendering the conversation up to it with and without the reply.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from pipelines.llm.config import LLMConfig
from pipelines.llm.data import Example

IGNORE = -100


def _segments(example: Example, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """The rendered text cut into (piece, counts-for-loss) parts."""
    if example.text is not None:
        return [(example.text + (tokenizer.eos_token or ""), True)]
    messages = example.messages
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            # A template that rewrites earlier turns: fall back to learning the whole conversation.
            return [(tokenizer.apply_chat_template(messages, tokenize=False), True)]
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(text, trained) for text, trained in pieces if text]


def encode(example: Example, tokenizer: PreTrainedTokenizerBase, config: LLMConfig,
           truncate: bool = False) -> tuple[list[int], list[int]]:
    """(input ids, labels); labels are IGNORE where the loss does not count."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in _segments(example, tokenizer):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if (trained or config.train_on == "all") else [IGNORE] * len(piece)
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids, labels = [tokenizer.bos_token_id] + ids, [IGNORE] + labels
    if truncate:
        ids, labels = ids[:config.max_length], labels[:config.max_length]
    return ids, labels


def keeps_a_reply(labels: list[int], max_length: int) -> bool:
    """Whether an example cut at max_length still has a token to learn from (the first never counts:
    nothing comes before it to predict it). Training skips those that do not; the data check counts them."""
    return any(label != IGNORE for label in labels[1:max_length])


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int, packing: bool,
            row_length: int = 0) -> dict[str, torch.Tensor]:
    """One forward pass worth of examples.

    packing: the examples are packed into rows of at most `row_length` tokens (first fit, longest first),
    with position ids restarting at each example. The model builds a block-diagonal causal mask from the
    position ids, so examples never attend to each other, and almost no compute goes to padding. Rows are
    bounded because with that mask attention costs grow with the square of the row; where attention runs
    example by example instead (attention.py), the pipeline packs the whole batch into one row.
    Otherwise: one row per example, right-padded to the longest.
    """
    if packing:
        longest = max(len(seq) for seq, _ in encoded)
        capacity = max(row_length, longest)
        rows: list[list[tuple[list[int], list[int]]]] = []
        for pair in sorted(encoded, key=lambda p: -len(p[0])):
            row = next((r for r in rows if sum(len(s) for s, _ in r) + len(pair[0]) <= capacity), None)
            if row is None:
                rows.append([pair])
            else:
                row.append(pair)
        width = max(sum(len(s) for s, _ in row) for row in rows)
        ids, labels, positions = [], [], []
        for row in rows:
            row_ids, row_labels, row_positions = [], [], []
            for seq, lab in row:
                row_ids += seq
                row_labels += [IGNORE] + lab[1:]  # the first token is never predicted from the previous example
                row_positions += list(range(len(seq)))
            pad = width - len(row_ids)  # padding forms its own segment (positions restart) and is never learned
            ids.append(row_ids + [pad_id] * pad)
            labels.append(row_labels + [IGNORE] * pad)
            positions.append(row_positions + list(range(pad)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(positions)}
    longest = max(len(seq) for seq, _ in encoded)
    ids = [seq + [pad_id] * (longest - len(seq)) for seq, _ in encoded]
    labels = [lab + [IGNORE] * (longest - len(lab)) for _, lab in encoded]
    mask = [[1] * len(seq) + [0] * (longest - len(seq)) for seq, _ in encoded]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def counted(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where the loss counts the prediction of the next token (labels are shifted by one inside the model)."""
    return batch["labels"][:, 1:] != IGNORE


def counted_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(counted(batch).sum())
