"""Attention over packed examples, one example at a time.

A packed row holds several examples whose position ids restart at each one. Without a flash-attention
varlen kernel (any CPU; a GPU without the flash-attn package), transformers turns the restarting
positions into a dense [row, row] block-diagonal mask, and attention is computed over the whole row: the
square of the row's length, where each example's own causal triangle would do, and no kernel can skip the
masked-out blocks. So the studio bounds its rows (tokenize.collate) and still pays for the full squares.

`each_example` instead runs causal attention on each example's slice of the row (the examples' lengths
come with the batch, found on the CPU by `with_example_lengths`), with no mask at all: torch's fused
kernels then skip the future, on the CPU and on a GPU. Same result as the mask; the whole batch can be one
row, and the matrix products around attention see one long row instead of several padded ones.

On a GPU with flash attention (Ampere or newer) in half precision, the examples go to torch's
variable-length flash kernel (`torch.nn.attention.varlen`) in one call per layer instead. There each call
of the loop, one example's heads, fills a fraction of the GPU's cores, one after the other; and a small
model's GPU step is bound by how fast the CPU issues kernels, where the loop issued 11% more of them than a
padded batch and the one call 2% fewer (bench/llm_kernel_count.py, the GPU benchmark's model at batch 8).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
from typing import Iterator

import torch
from transformers import AttentionInterface

from pipelines.llm.model import builtin_base

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.10
    varlen_attn = None
if varlen_attn is not None and "window_size" not in inspect.signature(varlen_attn).parameters:
    varlen_attn = None  # torch 2.10's first version, which said causal another way

NAME = "studio_each_example"
# Decoder-only models whose attention layers call the attention interface with plain causal attention (a
# sliding window, where configured, is honoured below) and whose decoder layers pass the batch's extra
# arguments on to it (StableLM's do not); others keep their own attention. tests/test_llm_attention.py
# checks each against the model's own masked attention.
CAUSAL_ATTENTION = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2", "smollm3"}


def supports(model: torch.nn.Module) -> bool:
    """Whether `each_example` computes this model's attention exactly: a known architecture from
    transformers itself, using sdpa or eager (flash-attention kernels handle packed rows themselves)."""
    base = builtin_base(model)
    return (base is not None and base.config.model_type in CAUSAL_ATTENTION
            and base.config._attn_implementation in ("sdpa", "eager"))


def with_example_lengths(batch: dict[str, torch.Tensor]) -> dict:
    """The batch plus the lengths of the examples in each of its packed rows (each run of position ids that
    starts at 0, the row's padding included), worked out on the CPU before the batch goes to the device, and
    where each example starts in the rows laid end to end (for the variable-length kernel: a tensor, so it
    goes to the device with the batch, not once per layer)."""
    starts = batch["position_ids"] == 0
    lengths = []
    for row in starts:
        begin = row.nonzero().squeeze(1).tolist() + [row.shape[0]]
        lengths.append([end - start for start, end in zip(begin, begin[1:])])
    offsets = torch.tensor([0, *itertools.accumulate(n for row in lengths for n in row)], dtype=torch.int32)
    return {**batch, "example_lengths": lengths, "example_offsets": offsets}


@contextlib.contextmanager
def each_example(model: torch.nn.Module) -> Iterator[None]:
    """Run the forward passes inside with attention example by example; the batches must come from
    with_example_lengths. Only the forward reads the setting (the LLM pipeline recomputes nothing in the
    backward pass), so generation and anything else outside the block keep the model's own attention."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME  # transformers then builds no mask: this function needs none
    try:
        yield
    finally:
        config._attn_implementation = before


@functools.cache
def _flash_capable(device: torch.device) -> bool:
    # NVIDIA's Ampere or newer; ROCm builds also say "cuda", and their varlen support is untested here
    return torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0)


def one_call(query: torch.Tensor, dropout: float, sliding_window: int | None, longest: int) -> bool:
    """Whether torch's variable-length flash kernel computes this attention: on a GPU that has flash attention,
    in half precision, without dropout (the kernel has none) and with no sliding window that would cut an
    example (the loop below honours those)."""
    return (varlen_attn is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and not dropout and not (sliding_window and longest > sliding_window)
            and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256 and _flash_capable(query.device))


def all_examples_at_once(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offsets: torch.Tensor,
                         longest: int, scaling: float | None) -> torch.Tensor:
    """Causal attention within each example, in one call: the rows laid end to end as [tokens, heads, dim],
    each example from offsets[i] to offsets[i + 1]. Returns [rows, length, heads, dim]."""
    rows, heads, length, dim = query.shape

    def end_to_end(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(rows * length, heads, dim)

    out = varlen_attn(end_to_end(query), end_to_end(key), end_to_end(value), offsets, offsets, longest, longest,
                      scale=scaling, window_size=(-1, 0))
    return out.view(rows, length, heads, dim)


@torch.compiler.disable  # eager inside compiled layers (compiled.py): the loop below would make each batch a graph
def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               example_lengths: list[list[int]] | None = None, example_offsets: torch.Tensor | None = None,
               sliding_window: int | None = None, **_):
    """query [rows, heads, length, dim], key and value [rows, kv heads, length, dim] -> [rows, length, heads,
    dim], as transformers' sdpa_attention_forward returns it."""
    if attention_mask is not None or key.shape[2] != query.shape[2]:
        raise RuntimeError("attention example by example is for training forwards: no mask, no cache")
    if example_lengths is None:  # treating the row as one sequence would let its examples see each other
        raise RuntimeError(f"{type(module).__name__} did not pass on the packed examples' lengths")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    longest = max(n for row in example_lengths for n in row)
    if example_offsets is not None and one_call(query, dropout, sliding_window, longest):
        return all_examples_at_once(query, key, value, example_offsets, longest, scaling), None
    out = []
    # split, not slicing: the backward of a split is one concatenation, that of each slice a zero-filled
    # tensor the size of the whole row.
    for q_row, k_row, v_row, row_lengths in zip(query.split(1), key.split(1), value.split(1), example_lengths):
        parts = []
        for q, k, v in zip(q_row.split(row_lengths, 2), k_row.split(row_lengths, 2), v_row.split(row_lengths, 2)):
            n, mask = q.shape[2], None
            if sliding_window and n > sliding_window:  # as transformers: a query sees the last `window` keys
                i = torch.arange(n, device=query.device)
                mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < sliding_window)
            parts.append(torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling))
        out.append(torch.cat(parts, dim=2))
    return torch.cat(out, dim=0).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, _attention)
