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


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], reply_follows: bool = False) -> str:
    """A conversation as the chat template writes it (`reply_follows`: ending where the assistant's reply
    starts). Training, the samples and Try it all render through here, so the model is asked as it learned.
    A template that takes no system turn (Gemma's, Mistral-Instruct's raise "System role not supported") gets
    the system text at the start of the first user turn, as those models' authors advise."""
    if takes_no_system_turn(tokenizer) and any(m["role"] == "system" for m in messages):
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        messages = [dict(m) for m in messages if m["role"] != "system"]
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            messages.insert(0, first_user := {"role": "user", "content": ""})
        first_user["content"] = f"{system}\n\n{first_user['content']}".strip()
    return tokenizer.apply_chat_template(messages, add_generation_prompt=reply_follows, tokenize=False)


def takes_no_system_turn(tokenizer: PreTrainedTokenizerBase) -> bool:
    if not hasattr(tokenizer, "_studio_no_system_turn"):  # (asked once per tokenizer)
        try:
            tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                          tokenize=False)
            tokenizer._studio_no_system_turn = False
        except Exception:  # jinja2's TemplateError, raised by the template itself
            tokenizer._studio_no_system_turn = True
    return tokenizer._studio_no_system_turn


def reply_stop_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens a reply ends with: eos, and the special tokens the chat template writes after a reply
    (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>). The tuned model learns to end its reply
    with those; stopped at eos alone, a base model with such a template (Qwen2.5, StableLM 2) answered again
    and again."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    reply = "The reply ends here."
    rendered = render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}])
    if reply not in rendered:  # (a template that rewrites the reply: nothing to tell its end by)
        return eos
    after = rendered[rendered.rfind(reply) + len(reply):]
    # (an end-of-turn token may be special only in the added tokens, not among the named special tokens)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = [i for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in special]
    return list(dict.fromkeys(eos + ids[:1]))


def with_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    """The token ids with the tokenizer's BOS first, where it has one and the text did not start with it: in
    training and in generation alike (training added it and generation did not: Mistral and Llama 2 were asked
    without the token every example had begun with)."""
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, str]], chat: bool = True,
               system: str = "") -> list[int]:
    """The token ids a reply is generated after, as training saw the same conversation up to its reply. A string
    is one user turn (after the `system` turn when there is one); with `chat` off it is plain text to continue."""
    if chat:
        if isinstance(prompt, str):
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt = render(tokenizer, prompt, reply_follows=True)
    return with_bos(tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"])


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
        prompt = render(tokenizer, messages[:i], reply_follows=True)
        full = render(tokenizer, messages[:i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            # A template that rewrites earlier turns: fall back to learning the whole conversation.
            return [(render(tokenizer, messages), True)]
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
    started = with_bos(tokenizer, ids)
    if len(started) > len(ids):
        ids, labels = started, [IGNORE] + labels
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
