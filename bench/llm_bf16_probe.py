"""What holding the frozen linear layers in bf16 saves on a CPU with native bf16, at a size where the weights
count: the benchmark's 0.6 B LLaMA (its CUDA model, random weights), LoRA as in bench/llm.py, one row of
1024 tokens per step under bf16 autocast, two ways, each in a fresh process:

  autocast   float32 weights; autocast casts each frozen linear weight to bf16 in every forward (and keeps
             the copy for the backward): what the studio did before
  held       pipelines.llm.pipeline.frozen_linears_to_bf16 first (what the studio's training does now)

    python bench/llm_bf16_probe.py [--threads N] [--steps N]

Prints s/step (best of the steps after a warm-up), peak RSS, and the loss and a LoRA-gradient checksum
(the same in both: the products are the same). Last line: RESULT speedup=<x> memory_ratio=<x>.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import peak_rss_mb  # noqa: E402
from bench.llm import HYPER, TARGETS, build_model  # noqa: E402

WAYS = ("autocast", "held")


def worker(way: str, model_dir: str, steps: int) -> dict:
    import torch
    from pipelines.llm.config import LLMConfig
    from pipelines.llm.model import load_base_model
    from pipelines.llm.pipeline import attach_lora, frozen_linears_to_bf16

    config = LLMConfig(name="probe", base_model=model_dir, target_modules="custom", custom_target_modules=TARGETS,
                       **{k: v for k, v in HYPER.items() if k in ("lora_rank", "lora_alpha", "lora_dropout", "seed")})
    torch.manual_seed(0)
    model = attach_lora(load_base_model(model_dir, torch.device("cpu")), config)
    if way == "held":
        frozen_linears_to_bf16(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0))
    times, loss = [], None
    for _ in range(steps + 1):
        model.zero_grad()
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        times.append(time.perf_counter() - started)
    checksum = sum(p.grad.double().abs().sum().item() for p in model.parameters() if p.requires_grad)
    return {"s_per_step": min(times[1:]), "peak_mb": peak_rss_mb(), "loss": loss.item(), "grad_checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["STUDIO_MODEL_DIRS"] = tmp  # the pipeline loads local folders only from allowed roots
        os.environ["STUDIO_HOME"] = str(Path(tmp) / "workspace")
        params, _ = build_model(Path(tmp) / "model", "cuda")
        print(f"model: {params / 1e9:.2f} B parameters; {args.steps} steps after a warm-up, {args.threads} threads")
        found = {}
        for way in WAYS:
            out = subprocess.run([sys.executable, __file__, "--worker", way, "--model", str(Path(tmp) / "model"),
                                  "--steps", str(args.steps), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True, env=os.environ)
            found[way] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{way:9s} " + ", ".join(f"{k}={v:.6g}" for k, v in found[way].items()))
    speedup = found["autocast"]["s_per_step"] / found["held"]["s_per_step"]
    memory = found["held"]["peak_mb"] / found["autocast"]["peak_mb"]
    same = all(found["held"][k] == found["autocast"][k] for k in ("loss", "grad_checksum"))
    print(f"held / autocast: {speedup:.2f}x the speed, {memory:.2f} of the peak memory; "
          f"loss and gradients {'identical' if same else 'DIFFERENT'}")
    print(f"RESULT speedup={speedup:.3f} memory_ratio={memory:.3f}")


if __name__ == "__main__":
    main()
