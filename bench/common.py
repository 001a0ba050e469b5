"""What the three training benchmarks share: one fresh subprocess per run, alternation, the table, RESULT.

Each benchmark script has two roles. Called normally it is the *driver*: it starts itself again as a
*worker* (`--worker studio|baseline --out FILE`) once per run, alternating studio, baseline, studio,
baseline..., so slow phases of a shared machine hit both ways alike, and each run's peak memory is the
high-water mark of its own fresh process. The worker writes one JSON object; the driver prints a table,
the median of each figure per way, the ratios, and as its last line

    RESULT speedup=<x> memory_ratio=<x> loss_delta_pct=<x>

(always the studio over the baseline: speedup > 1 and memory_ratio < 1 are good; loss_delta_pct is the
studio's final loss minus the baseline's, in percent of the baseline's).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_flops(device: str = "cpu", size: int = 1024, repeats: int = 5) -> float:
    """Best achieved FLOP/s of a square fp32 (CPU) / bf16 (CUDA) matmul: the ceiling the MFU is measured
    against, measured on this machine in this process (so under the same load as the training)."""
    import torch
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if device != "cpu":
        size = 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        seconds = time.perf_counter() - t0
        best = max(best, 2 * size ** 3 / seconds)
    return best


def peak_memory_mb(device: str) -> float:
    """This process's peak memory so far: torch.cuda.max_memory_allocated on CUDA (what the tensors took
    on the GPU), the RSS high-water mark on CPU."""
    if device == "cuda":
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work (before reading a clock); nothing on CPU."""
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def warm_up(device: str) -> None:
    """On CUDA, before a worker's timed part: create the context and the cuBLAS/cuDNN handles (fp32 and
    bf16 matmul, 1-d and 2-d convolution, under autocast too), so neither way's first training step pays
    those one-off costs. Both ways call it at the same point. Nothing on CPU."""
    if device != "cuda":
        return
    import torch
    import torch.nn.functional as F
    for autocast in (False, True):
        a = torch.randn(256, 256, device="cuda", requires_grad=True)
        x1 = torch.randn(2, 8, 64, device="cuda", requires_grad=True)
        x2 = torch.randn(2, 8, 16, 16, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            total = ((a @ a).sum() + F.conv1d(x1, torch.randn(8, 8, 3, device="cuda"), padding=1).sum()
                     + F.conv2d(x2, torch.randn(8, 8, 3, 3, device="cuda"), padding=1).sum())
        total.float().backward()
    torch.cuda.synchronize()


def write_result(path: str | Path, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=2))


THREADS: int | None = None  # set by add_common_arguments' --threads; None = torch's default


def add_common_arguments(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in every run (default: torch's own, one per core). On a "
                             "machine other jobs share, 1 avoids thread oversubscription stalls")


def benchmark_parser(doc: str, steps_help: str, batch_size: int):
    """The options every training benchmark takes (its own extras are added by the caller), including the
    hidden ones its driver passes to the worker runs."""
    import argparse
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of few steps (a few minutes on CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=None, help="studio+baseline pairs (default 3, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help=steps_help)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    add_common_arguments(parser)
    parser.add_argument("--worker", choices=["studio", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def add_loss_tail(result: dict) -> list[float]:
    """Replace a worker result's step_losses by train_loss_last (the mean of the last quarter of the steps);
    returns the losses."""
    losses = result.pop("step_losses")
    tail = max(1, len(losses) // 4)
    result["train_loss_last"] = sum(losses[-tail:]) / tail
    return losses


def apply_threads(threads: int | None) -> None:
    """In a worker: the thread count both ways use."""
    global THREADS
    THREADS = threads
    if threads:
        import torch
        torch.set_num_threads(threads)


def run_worker(script: str, way: str, extra: list[str], timeout: float = 3600) -> dict:
    """Start `script --worker way` in a fresh process and return what it wrote."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   STUDIO_HOME=os.environ.get("STUDIO_HOME", str(Path(tmp) / "workspace")),
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   STUDIO_OFFLINE="1")
        if THREADS:
            env["OMP_NUM_THREADS"] = str(THREADS)
            extra = [*extra, "--threads", str(THREADS)]
        cmd = [PYTHON, script, "--worker", way, "--out", str(out), *extra]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"{way} run failed (exit {proc.returncode})")
        result = json.loads(out.read_text())
        result["process_s"] = time.perf_counter() - started
        return result


def alternate(script: str, rounds: int, extra: list[str], log=print) -> dict[str, list[dict]]:
    """rounds x (studio, baseline), alternating; the first round's order is studio first, the next
    baseline first, and so on, so neither way always runs on a warmer machine."""
    runs: dict[str, list[dict]] = {"studio": [], "baseline": []}
    for r in range(rounds):
        order = ["studio", "baseline"] if r % 2 == 0 else ["baseline", "studio"]
        for way in order:
            log(f"[round {r + 1}/{rounds}] {way} ...", flush=True)
            result = run_worker(script, way, extra)
            runs[way].append(result)
            log(f"    {way}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in result.items() if not isinstance(v, (list, dict))),
                flush=True)
    return runs


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _fmt(value) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def table(runs: dict[str, list[dict]], rows: list[tuple[str, str]]) -> str:
    """rows: (key, label). Medians per way and the studio/baseline ratio."""
    lines = [f"{'figure':<34} {'studio':>14} {'baseline':>14} {'studio/base':>12}",
             "-" * 77]
    for key, label in rows:
        s, b = median(runs["studio"], key), median(runs["baseline"], key)
        ratio = f"{s / b:.3f}" if s is not None and b not in (None, 0) else "-"
        lines.append(f"{label:<34} {_fmt(s) if s is not None else '-':>14} "
                     f"{_fmt(b) if b is not None else '-':>14} {ratio:>12}")
    return "\n".join(lines)


def ratios(runs: dict[str, list[dict]], rate_key: str, loss_keys: list[str]) -> tuple[float, float, float]:
    """(speedup, memory ratio, loss delta %). Speed is the median of the per-round ratios (each round's
    two runs saw the same machine load); memory the ratio of the medians; the loss delta the largest
    in absolute value over loss_keys (each the studio's minus the baseline's, % of the baseline's)."""
    per_round = [s[rate_key] / b[rate_key] for s, b in zip(runs["studio"], runs["baseline"]) if b[rate_key]]
    speedup = statistics.median(per_round)
    memory = median(runs["studio"], "peak_mb") / median(runs["baseline"], "peak_mb")
    deltas = []
    for key in loss_keys:
        s, b = median(runs["studio"], key), median(runs["baseline"], key)
        if s is not None and b:
            deltas.append(100.0 * (s - b) / abs(b))
    delta = max(deltas, key=abs) if deltas else float("nan")
    return speedup, memory, delta


def result_line(speedup: float, memory: float, delta: float) -> str:
    return f"RESULT speedup={speedup:.3f} memory_ratio={memory:.3f} loss_delta_pct={delta:.2f}"
