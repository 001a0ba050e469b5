"""Where does a language-model step's time go: packed (rows of at most max length, the model's mask; one
row, attention example by example as the studio does on a CPU; on a GPU also the same row in one call of the
variable-length flash kernel, as the studio does there) vs padded batches, with and without bf16 autocast.

    python bench/llm_gpu_probe.py [--device cuda] [--steps 12]

The same model as bench/llm.py (~0.6 B LLaMA on cuda, ~25 M on cpu), the studio's own data encoding,
LoRA and collate(), the same examples in the same batches, in a bare loop (forward, backward, AdamW step,
no events or checkpoints), timed after 3 warm-up steps with the device synchronised. Comparing its rows
with bench/llm.py's figures separates the cost of the batch layout and precision from the cost of the
studio's training loop.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.llm import HYPER, TARGETS, build_model, encoded_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.llm import attention
    from pipelines.llm.tokenize import collate

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), args.device)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device)
    base.config.use_cache = False
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=HYPER["lora_rank"], lora_alpha=HYPER["lora_alpha"],
                                            target_modules=TARGETS, task_type="CAUSAL_LM"))
    encoded = encoded_rows(args.batch_size * (args.steps + 3), tokenizer)
    groups = [encoded[i:i + args.batch_size] for i in range(0, len(encoded), args.batch_size)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"{'layout':<10} {'autocast':<9} {'s/step':>8} {'tokens/step':>12} {'real tok/s':>11}  shape of step 1")
    one_row = [attention.with_example_lengths(collate(g, pad, True, sys.maxsize)) for g in groups]
    layouts = {"packed": [collate(g, pad, True, HYPER["max_length"]) for g in groups], "by example": one_row,
               "padded": [collate(g, pad, False) for g in groups]}
    if device.type == "cuda":
        layouts["one call"] = one_row
    kernel_applies = attention.one_call
    for layout, batches in layouts.items():
        by_example = layout in ("by example", "one call")
        # "by example" is the loop over examples; the attention takes the one call where it applies
        attention.one_call = kernel_applies if layout == "one call" else (lambda *_: False)
        for autocast in (True, False):
            times = []
            for i, batch in enumerate(batches):
                sync()
                t0 = time.perf_counter()
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), \
                        attention.each_example(model) if by_example else contextlib.nullcontext():
                    loss = model(**batch, use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            real = sum(len(ids) for g in groups[3:] for ids, _ in g) / len(times)
            shape = tuple(batches[3]["input_ids"].shape)
            step = sum(times) / len(times)
            print(f"{layout:<10} {str(autocast):<9} {step:>8.4f} "
                  f"{sum(b['input_ids'].numel() for b in batches[3:]) / len(times):>12.0f} {real / step:>11.0f}  {shape}",
                  flush=True)


if __name__ == "__main__":
    main()
