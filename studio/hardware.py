"""What this machine has, and rough pre-flight estimates of a run's memory and time.

No torch import here: the UI shows the hardware line before any ML library has loaded.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import psutil


@functools.lru_cache(maxsize=1)
def gpus() -> list[tuple[str, float]]:
    """(name, memory in GiB) of each NVIDIA GPU, from nvidia-smi (empty when there is none)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        try:
            found.append((name.strip(), float(mib) / 1024))
        except ValueError:
            continue
    return found


def hardware_line() -> str:
    memory = psutil.virtual_memory().total / 2**30
    cpu = f"CPU: {os.cpu_count()} cores, {memory:.0f} GiB memory"
    found = gpus()
    if not found:
        return f"{cpu}. No GPU found: training runs on the CPU (fine for the tiny presets)."
    listed = ", ".join(f"{name} ({gib:.0f} GiB)" for name, gib in found)
    return f"{cpu}. GPU: {listed}."


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (AVX512-BF16 or AMX, read from /proc/cpuinfo without torch):
    language-model training there holds the frozen linear layers in bf16."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line.split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_memory_gib(params_billion: float, on_gpu: bool, four_bit: bool = False, batch_tokens: int = 4096,
                        hidden: int | None = None, layers: int | None = None, split: int = 1,
                        bf16_on_cpu: bool = False) -> float:
    """A deliberately rough LoRA estimate for one process: frozen weights (bf16 on a GPU, and on a CPU where
    the run holds them so; else fp32; 4-bit with QLoRA; a 1/split share when a strategy splits them), plus
    activations kept for the backward pass, plus a fixed overhead."""
    bytes_per_weight = 0.55 if four_bit else (2 if on_gpu or bf16_on_cpu else 4)
    weights = params_billion * 1e9 * bytes_per_weight / split
    hidden = hidden or max(64, int((params_billion * 1e9 / 12 / max(1, layers or 24)) ** 0.5))
    layers = layers or max(2, int(params_billion * 16) or 2)
    activations = batch_tokens * hidden * layers * 34 * (2 if on_gpu else 4) / 2
    return (weights + activations) / 2**30 + 0.5


def describe_model(name: str, params_billion: float | None) -> str:
    if params_billion is None:
        return name
    size = f"{params_billion * 1000:.0f}M" if params_billion < 1 else f"{params_billion:.1f}B"
    on_gpu = bool(gpus())
    need = training_memory_gib(params_billion, on_gpu, bf16_on_cpu=cpu_has_bf16())  # mixed_precision auto
    return f"{name} — {size} params, ~{need:.1f} GiB to train on {'GPU' if on_gpu else 'CPU'}"
