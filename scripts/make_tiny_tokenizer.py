"""Build the tiny preset's tokenizer (assets/tiny-llama-tokenizer/) from text in the repository.

Run once when the sample data changes: `python scripts/make_tiny_tokenizer.py`. The result is committed,
so the studio never needs the network for it. Byte-level BPE: every possible input still tokenizes.
"""

import glob
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipelines.llm.model import DEFAULT_CHAT_TEMPLATE

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "assets" / "tiny-llama-tokenizer"
ENGLISH = (
    "The quick brown fox jumps over the lazy dog. What is the answer? Who wrote it, where and when? "
    "How many are there? This is a question and that is an answer. Please write a short summary of the text. "
    "Translate the following sentence. Explain why the sky is blue. Give three examples of each."
)


def corpus() -> list[str]:
    texts = [ENGLISH]
    for path in sorted(glob.glob(str(ROOT / "assets" / "llm" / "*.csv"))) + [str(ROOT / "README.md")]:
        if Path(path).exists():
            texts.append(Path(path).read_text(encoding="utf-8"))
    texts.append("### Instruction:\n### Input:\n### Response:\n")
    return texts


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=1024)
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    print(f"wrote {OUT} (vocab {len(fast)})")


if __name__ == "__main__":
    main()
