"""torch.compile for the decoder layers in training steps (the `torch_compile` setting, off by default).

Eager PyTorch runs a layer's norms, rotary embedding, activation, LoRA scaling and residual adds as
separate passes over memory, together about a sixth of a step on the CPU; compiled, they fuse. The first
step pays for the compile (about 55 s more for the benchmark's model on 2 CPU cores, 12 s once torch's on-disk
cache holds it), so it pays on runs of a few hundred steps, not on short ones; hence an option.

Only forwards that record gradients run compiled. Validation (no gradients) and generation (with a cache)
would each be another graph to compile, for a few calls. Attention by example (attention.py) stays out of
the graph: its Python loop over the examples would be unrolled, and each batch's lengths a new graph.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from pipelines.llm.model import builtin_base


def compile_layers(model: torch.nn.Module, device: torch.device, log: Callable[[str], None]) -> list[torch.nn.Module]:
    """The model's decoder layers, each set up to compile on its first call (lengths vary from batch to
    batch, hence dynamic shapes) and left eager until `compiled` turns them on; none where torch cannot
    compile (no C++ compiler for the CPU, no triton for the GPU)."""
    try:  # a tiny compile first: it fails in seconds, and with one clear line, where compiling cannot work
        torch.compile(lambda x: x * 2)(torch.ones(2, device=device))
    except Exception as err:  # noqa: BLE001 - torch raises many kinds here, each meaning the same to the user
        log(f"Not compiling: torch.compile does not work here ({str(err).strip().splitlines()[0][:200]}). "
            "Training goes on without it.")
        return []
    torch._dynamo.config.suppress_errors = True  # a layer that fails to compile later runs eager
    layers = list(builtin_base(model).model.layers)
    for layer in layers:
        layer.compile(dynamic=True)
        # nn.Module.compile keeps the compiled call here; parked, so the layer stays eager outside `compiled`.
        layer._studio_compiled, layer._compiled_call_impl = layer._compiled_call_impl, None
    log("Compiling the model's layers with torch.compile in the first step.")
    return layers


@contextlib.contextmanager
def compiled(layers: list[torch.nn.Module]) -> Iterator[None]:
    """Inside, the layers run compiled when gradients are recorded."""
    on = bool(layers) and torch.is_grad_enabled()
    for layer in layers if on else ():
        layer._compiled_call_impl = layer._studio_compiled
    try:
        yield
    finally:
        for layer in layers if on else ():
            layer._compiled_call_impl = None
