"""Language-model LoRA: the studio's training vs a plain transformers Trainer + peft recipe.

    python bench/llm.py [--quick] [--device cpu|cuda] [--rounds N] [--steps N] [--vocab N] [--compile]

Same model (a random-init LLaMA built here from a LlamaConfig with the tiny preset's tokenizer: ~25 M
parameters on CPU, ~0.6 B with --device cuda), same data (deterministic synthetic prompt/completion pairs
of about 30 to 505 tokens, tokenised once by the studio's own encode() so both see identical ids and labels),
same LoRA (q/k/v/o, rank 16, alpha 32, no dropout, same seed so the same initial adapter), same optimizer
(AdamW, lr, cosine, no warm-up, clip 1.0), same batch size, same steps, and the same batches in the same
order (the Trainer's sampler is made sequential over the studio's per-epoch order, so the losses are
comparable step by step).

  studio    pipelines.llm.pipeline.train(LLMConfig) into a temporary run folder: padding-free packing.
  baseline  transformers.Trainer + peft.get_peft_model + DataCollatorForSeq2Seq (padding to the longest
            in each batch), fp32 on CPU, bf16 on CUDA.

Figures per run (each in a fresh process): useful tokens/s (tokens whose label counts, over the training
steps' wall time; also without step 1, which carries the warm-up and any compile), peak memory (RSS
high-water on CPU, torch.cuda.max_memory_allocated on CUDA, taken right after training), final training
loss (mean of the last steps' losses, and a post-training pass over a fixed training subset) and
validation loss (same evaluation function for both ways), and achieved model FLOP/s = 4 * N * real
tokens / s (N = parameters of the matmuls, lm_head included, embeddings not; attention scores not counted;
padding not counted) over a fp32 matmul peak measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (add_loss_tail, alternate, benchmark_parser, apply_threads, matmul_peak_flops,  # noqa: E402
                          peak_rss_mb, ratios, result_line, table, write_result)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "assets" / "tiny-llama-tokenizer"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MODELS = {
    # ~25.6 M parameters: 8 x (4 x 512^2 + 3 x 512 x 1408) + 756 x 512 (tied embeddings).
    "cpu": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8),
    # ~0.6 B parameters.
    "cuda": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=12,
                 num_key_value_heads=4),
}
HYPER = dict(lora_rank=16, lora_alpha=32.0, lora_dropout=0.0, learning_rate=1e-3, warmup_steps=0,
             scheduler="cosine", weight_decay=0.0, max_grad_norm=1.0, max_length=512, seed=1234)

WORDS = ("amber basil cedar delta ember fable garnet harbor iris juniper kestrel lumen meadow nectar onyx pebble "
         "quartz raven saffron thistle umber velvet willow xenon yarrow zephyr anchor beacon canyon drift ".split())


# ---- the data ----------------------------------------------------------------------------------

# About 4.2 tokens a word with the tiny tokenizer, plus ~25 of chat template and prompt: rendered lengths
# spread evenly over about 30 to 505 tokens, none truncated. (Until 2026-12-01 it was 4 to 200 words,
# 39 to 832 tokens, so 39% of the examples were cut to exactly 512.)
MAX_WORDS = 120


def make_rows(count: int, seed: int) -> list[dict]:
    """Prompt/completion pairs whose rendered length spreads evenly over about 30..505 tokens. The
    completion follows a mostly predictable walk through the word list (next word 80% of the time), so
    there is something to learn and the loss falls."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        total_words = int(rng.uniform(2, MAX_WORDS))
        prompt_words = max(2, min(30, total_words // 4))
        prompt = [rng.choice(WORDS) for _ in range(prompt_words)]
        answer, index = [], WORDS.index(prompt[-1])
        for _ in range(max(1, total_words - prompt_words)):
            index = (index + 1) % len(WORDS) if rng.random() < 0.8 else rng.randrange(len(WORDS))
            answer.append(WORDS[index])
        rows.append({"prompt": "Continue: " + " ".join(prompt), "completion": " ".join(answer)})
    return rows


def encoded_rows(count: int, tokenizer) -> list[tuple[list[int], list[int]]]:
    """make_rows(count, 1) as the studio encodes them (chat template, reply labels, the benchmark's max length),
    for the probes that skip the data files."""
    from pipelines.llm.config import LLMConfig
    from pipelines.llm.data import Example
    from pipelines.llm.tokenize import encode
    config = LLMConfig(name="probe", base_model="x", train_files=["x"], max_length=HYPER["max_length"])
    return [encode(Example(messages=[{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": r["completion"]}]),
                   tokenizer, config, truncate=True) for r in make_rows(count, 1)]


def config_for(args, model_dir: str, data_dir: Path):
    from pipelines.llm.config import LLMConfig
    return LLMConfig(name="bench", base_model=model_dir, train_files=[str(data_dir / "train.jsonl")],
                     validation_files=[str(data_dir / "validation.jsonl")], data_format="prompt_completion",
                     target_modules="custom", custom_target_modules=TARGETS, max_steps=args.steps,
                     batch_size=args.batch_size, checkpoint_every=100_000, eval_every=0, sample_every=0,
                     device=args.device, packing=True, torch_compile=args.compile, **HYPER)


def encoded_data(config):
    """(train, validation) as the studio encodes them: lists of (ids, labels)."""
    from pipelines.llm.data import load_examples
    from pipelines.llm.model import load_tokenizer
    from pipelines.llm.tokenize import encode
    _, train, validation = load_examples(config)
    tokenizer = load_tokenizer(config.base_model)
    enc = [encode(e, tokenizer, config, truncate=True) for e in train]
    enc = [p for p in enc if any(label != -100 for label in p[1][1:])]
    return enc, [encode(e, tokenizer, config, truncate=True) for e in validation], tokenizer


def step_batches(encoded, config, steps: int) -> list[list]:
    """The studio's batches, in its order, for `steps` optimizer steps."""
    from pipelines.training import iterate_in_batches, shuffled
    out, epoch = [], 0
    while len(out) < steps:
        out += list(iterate_in_batches(shuffled(encoded, config.seed, epoch), config.batch_size))
        epoch += 1
    return out[:steps]


def token_counts(batches) -> dict:
    useful = sum(sum(1 for label in lab[1:] if label != -100) for group in batches for _, lab in group)
    real = sum(len(ids) for group in batches for ids, _ in group)
    padded = sum(len(group) * max(len(ids) for ids, _ in group) for group in batches)
    return {"useful_tokens": useful, "real_tokens": real, "padded_tokens": padded}


def matmul_params(model) -> int:
    import torch
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            total += module.weight.numel()
    return total


def final_losses(model, train_subset, validation, pad_id, device, batch_size) -> dict:
    """Token-weighted mean loss over fixed sets, padded batches, eval mode: the same function for both ways."""
    import torch
    torch.set_grad_enabled(False)
    from pipelines.llm.tokenize import collate, counted_tokens
    model.eval()
    out = {}
    for key, items in (("train_loss_final", train_subset), ("val_loss", validation)):
        total, tokens = 0.0, 0
        for i in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in collate(items[i:i + batch_size], pad_id, False).items()}
            n = counted_tokens(batch)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                total += model(**batch, use_cache=False).loss.float().item() * n
            tokens += n
        out[key] = total / max(1, tokens)
    return out


def memory_now(device: str) -> float:
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


# ---- the two ways -----------------------------------------------------------------------------

def worker_studio(args, config, encoded, validation, tokenizer) -> dict:
    import torch
    from peft import PeftModel
    from pipelines.llm.model import load_base_model
    from pipelines.llm.pipeline import train
    from pipelines.training import Events, read_events

    peak_flops = matmul_peak_flops(args.device)
    run_dir = Path(tempfile.mkdtemp(prefix="studio-run-"))
    events = Events(run_dir)
    t0 = time.perf_counter()
    status = train(config, run_dir, events, lambda: False, log=lambda m: None)
    wall = time.perf_counter() - t0
    events.close()
    peak = memory_now(args.device)
    assert status == "completed", status
    found, _ = read_events(run_dir)
    steps = [e for e in found if e["type"] == "step"]
    train_s = steps[-1]["elapsed_s"]  # the loop's own clock: from before step 1 to the end of the last step
    useful = sum(e["units"] for e in steps)

    device = torch.device(args.device)
    model = PeftModel.from_pretrained(load_base_model(config.base_model, device), run_dir / "adapter")
    losses = final_losses(model, encoded[:args.eval_rows], validation, tokenizer.pad_token_id, args.device,
                          config.batch_size)
    return {"train_s": train_s, "first_step_s": steps[0]["elapsed_s"], "run_s": wall,
            "useful_tokens_counted": useful, "peak_mb": peak,
            "step_losses": [e["loss"] for e in steps], "matmul_peak": peak_flops,
            "n_matmul": matmul_params(model.get_base_model()), **losses}


def worker_baseline(args, config, encoded, validation, tokenizer) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from pipelines.training import seed_everything
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    peak_flops = matmul_peak_flops(args.device)
    batches = step_batches(encoded, config, args.steps)
    dataset = [{"input_ids": ids, "labels": lab, "attention_mask": [1] * len(ids)}
               for group in batches for ids, lab in group]

    class InOrder(Trainer):  # the studio's order, so both ways see the same batches
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin = self.end = self.first_end = None
            self.losses = []

        def on_train_begin(self, *a, **k):
            self.begin = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.end = time.perf_counter()
            self.first_end = self.first_end or self.end

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    t0 = time.perf_counter()
    seed_everything(config.seed)  # as the studio does before loading: the same initial adapter
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=dtype).to(args.device)
    model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                             lora_dropout=config.lora_dropout, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.config.use_cache = False
    out_dir = tempfile.mkdtemp(prefix="trainer-")
    training_args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=config.batch_size, max_steps=args.steps,
        learning_rate=config.learning_rate, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, optim="adamw_torch",
        logging_steps=1, save_strategy="no", report_to=[], seed=config.seed, data_seed=config.seed,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        bf16=args.device == "cuda", use_cpu=args.device == "cpu")
    clock = Clock()
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    trainer = InOrder(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                      callbacks=[clock])
    trainer.train()
    wall = time.perf_counter() - t0
    peak = memory_now(args.device)
    losses = final_losses(model, encoded[:args.eval_rows], validation, tokenizer.pad_token_id, args.device,
                          config.batch_size)
    return {"train_s": clock.end - clock.begin, "first_step_s": clock.first_end - clock.begin, "run_s": wall,
            "useful_tokens_counted": None, "peak_mb": peak,
            "step_losses": clock.losses, "matmul_peak": peak_flops, "n_matmul": matmul_params(model.get_base_model()),
            **losses}


def worker(args) -> None:
    import torch
    torch.manual_seed(0)
    data_dir = Path(args.data)
    config = config_for(args, args.model, data_dir)
    encoded, validation, tokenizer = encoded_data(config)
    run = worker_studio if args.worker == "studio" else worker_baseline
    result = run(args, config, encoded, validation, tokenizer)
    counts = token_counts(step_batches(encoded, config, args.steps))
    if result.get("useful_tokens_counted") not in (None, counts["useful_tokens"]):
        result["note"] = f"studio counted {result['useful_tokens_counted']} useful tokens, expected {counts['useful_tokens']}"
    result.update(counts)
    losses = add_loss_tail(result)
    result["first_loss"] = losses[0] if losses else None
    result["useful_tok_s"] = counts["useful_tokens"] / result["train_s"]
    # Without step 1, which carries the warm-up (and, with --compile, the studio's compile).
    after_first = counts["useful_tokens"] - token_counts(step_batches(encoded, config, 1))["useful_tokens"]
    result["useful_tok_s_after_step_1"] = after_first / (result["train_s"] - result["first_step_s"])
    processed = counts["real_tokens"] if args.worker == "studio" else counts["padded_tokens"]
    result["processed_tok_s"] = processed / result["train_s"]
    result["model_flop_s"] = 4 * result["n_matmul"] * counts["real_tokens"] / result["train_s"]
    result["mfu_pct"] = 100 * result["model_flop_s"] / result["matmul_peak"]
    result.pop("useful_tokens_counted", None)
    write_result(args.out, result)


# ---- the driver ---------------------------------------------------------------------------------

def build_model(folder: Path, device: str, vocab: int = 0) -> tuple[int, int]:
    """Save the benchmark's model; returns its parameter count and vocabulary size."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(vocab_size=max(vocab, len(tokenizer)), eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
                         bos_token_id=None, max_position_embeddings=1024, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, initializer_range=0.02, **MODELS[device])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()), config.vocab_size


def main() -> None:
    parser = benchmark_parser(__doc__, "optimizer steps per run (default 24, quick 6; on cuda 60, quick 30: a GPU "
                                       "step is short, and the first ones carry the warm-up)", batch_size=8)
    parser.add_argument("--eval-rows", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=0,
                        help="the model's vocabulary size (default the tiny tokenizer's 756; Llama 3 has 128256, "
                             "Qwen2.5 151936): ids past the tokenizer's never occur, but the output layer costs "
                             "what a real vocabulary's does")
    parser.add_argument("--compile", action="store_true",
                        help="the studio with its torch_compile setting on (its compile falls in step 1)")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.device == "cuda":
        args.steps = args.steps or (30 if args.quick else 60)
    else:
        args.steps = args.steps or (6 if args.quick else 24)
    args.eval_rows = args.eval_rows or (16 if args.quick else 32)
    apply_threads(args.threads)
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        tmp = Path(tmp)
        os.environ["STUDIO_MODEL_DIRS"] = str(tmp)
        os.environ["STUDIO_HOME"] = str(tmp / "workspace")
        model_dir, data_dir = tmp / "model", tmp / "data"
        data_dir.mkdir()
        n_params, vocab = build_model(model_dir, args.device, args.vocab)
        train_rows = args.batch_size * max(8, args.steps)  # whole batches: epochs never end on a partial one
        for name, rows in (("train", make_rows(train_rows, 1)), ("validation", make_rows(args.eval_rows, 2))):
            (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"LLM LoRA benchmark on {args.device}: LLaMA {n_params / 1e6:.1f} M parameters (random init, "
              f"vocabulary {vocab:,}), "
              f"{train_rows} training rows of about 30-505 tokens, batch {args.batch_size}, {args.steps} steps, "
              f"LoRA r={HYPER['lora_rank']} on {','.join(TARGETS)}, {args.rounds} round(s), "
              f"{os.cpu_count()} CPU cores visible.", flush=True)
        extra = ["--model", str(model_dir), "--data", str(data_dir), "--device", args.device,
                 "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--eval-rows", str(args.eval_rows),
                 *(["--compile"] if args.compile else [])]
        runs = alternate(__file__, args.rounds, extra)

    # MFU against the best matmul rate seen in any run: a single measurement on a shared machine is noisy.
    peak = max(r["matmul_peak"] for way in runs.values() for r in way)
    for r in (r for way in runs.values() for r in way):
        r["matmul_peak"], r["mfu_pct"] = peak, 100 * r["model_flop_s"] / peak
    first = runs["studio"][0]
    print(f"\nTokens over the {args.steps} steps: useful {first['useful_tokens']}, real {first['real_tokens']}, "
          f"padded to the longest per batch {first['padded_tokens']} "
          f"(padding {100 * (1 - first['real_tokens'] / first['padded_tokens']):.0f}% of the baseline's tokens).")
    print("Medians over the rounds:\n")
    print(table(runs, [("useful_tok_s", "useful tokens/s"),
                       ("useful_tok_s_after_step_1", "useful tokens/s after step 1"),
                       ("processed_tok_s", "tokens through the model/s"),
                       ("train_s", "training wall time (s)"), ("peak_mb", "peak memory (MB)"),
                       ("first_loss", "loss at step 1"), ("train_loss_last", "train loss (last 25% of steps)"),
                       ("train_loss_final", "train loss (after, fixed subset)"), ("val_loss", "validation loss"),
                       ("model_flop_s", "model FLOP/s (4N x real tokens)"), ("matmul_peak", "matmul peak FLOP/s"),
                       ("mfu_pct", "MFU (%)")]))
    speedup, memory, delta = ratios(runs, "useful_tok_s", ["train_loss_final", "val_loss"])
    print(f"\nspeedup (useful tokens/s, median of per-round ratios) {speedup:.2f}x, target >= 2x; "
          f"peak memory ratio {memory:.2f}, target <= 1; loss delta {delta:+.2f}%, target within 2%.")
    after_step_1, _, _ = ratios(runs, "useful_tok_s_after_step_1", [])
    print(f"useful tokens/s after step 1 (its warm-up{' and compile' if args.compile else ''} left out): "
          f"{after_step_1:.2f}x.")
    print(result_line(speedup, memory, delta))


if __name__ == "__main__":
    main()
