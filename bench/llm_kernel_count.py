"""How many operations one training step of the GPU benchmark's model dispatches, per batch layout: on a GPU
each is a kernel launch, and at bench/llm.py's CUDA size (0.6 B parameters, batch 8) a step is bound by how
fast the CPU issues them (MFU 4% on an H200), so their count matters more than the FLOPs saved by packing.

    python bench/llm_kernel_count.py

Counted on the CPU (no GPU needed), with a TorchDispatchMode over forward and backward, on the CUDA model's
shape (24 layers, 12 query and 4 key/value heads, LoRA on q/k/v/o) at a tiny width, with the benchmark's
batches of 8 examples (30-505 tokens):
- padded: the Trainer recipe's layout (one row per example, sdpa with a padding mask);
- loop: one packed row, attention example by example (the studio on a CPU, and on a GPU before 2026-12-07);
- one call: the same row, the examples in one call of torch's variable-length flash kernel (the studio on a
  GPU with flash attention). The kernel runs only on a GPU: here a stand-in of the same shape takes its place,
  one operation forward and three backward.
"launches" leaves out views and allocations, which start no kernel.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench.llm import HYPER, MODELS, TARGETS, TOKENIZER, encoded_rows  # noqa: E402

NO_KERNEL = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
             torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.launches += not (func.is_view or func in NO_KERNEL)
        return func(*args, **(kwargs or {}))


class StandIn(torch.autograd.Function):
    """The variable-length kernel's shapes: [tokens, heads, dim] in and out, gradients for all three inputs."""

    @staticmethod
    def forward(ctx, query, key, value):
        return query.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clone(), grad.clone(), grad.clone()


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipelines.llm import attention
    from pipelines.llm.tokenize import collate

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    shape = dict(MODELS["cuda"], hidden_size=96, intermediate_size=256)  # 12 heads of 8: layers as on the GPU
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024,
                                        tie_word_embeddings=True, attn_implementation="sdpa", **shape))
    model = get_peft_model(base, LoraConfig(r=HYPER["lora_rank"], lora_alpha=HYPER["lora_alpha"],
                                            target_modules=TARGETS, task_type="CAUSAL_LM"))
    encoded = encoded_rows(8 * 3, tokenizer)
    groups = [encoded[i:i + 8] for i in range(0, len(encoded), 8)]
    pad = tokenizer.pad_token_id

    def one_call(query, key, value, offsets, *_, **__):
        return StandIn.apply(query, key, value)

    layouts = {"padded": (False, None), "loop": (True, None), "one call": (True, one_call)}
    print(f"{'layout':<9} {'operations':>11} {'launches':>9}  per training step (forward + backward), mean of 3")
    counts, real = {}, (attention.varlen_attn, attention.one_call)
    for layout, (packed, kernel) in layouts.items():
        attention.varlen_attn, attention.one_call = (kernel, lambda *_: True) if kernel else real
        totals = collections.Counter()
        for group in groups:
            batch = (attention.with_example_lengths(collate(group, pad, True, sys.maxsize)) if packed
                     else collate(group, pad, False))
            with (attention.each_example(model) if packed else contextlib.nullcontext()), Count() as count:
                model(**batch, use_cache=False).loss.backward()
            totals.update(ops=count.ops, launches=count.launches)
            model.zero_grad(set_to_none=True)
        counts[layout] = {k: v / len(groups) for k, v in totals.items()}
        print(f"{layout:<9} {counts[layout]['ops']:>11.0f} {counts[layout]['launches']:>9.0f}", flush=True)
    padded = counts["padded"]["launches"]
    print(f"RESULT loop_launches={counts['loop']['launches'] / padded:.3f} "
          f"one_call_launches={counts['one call']['launches'] / padded:.3f} (over padded)")


if __name__ == "__main__":
    main()
