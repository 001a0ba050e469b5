"""The language model's training loss without its logits tensor.

A causal LM's own forward computes the output layer for every position and upcasts the result to float32:
[tokens, vocabulary] floats, kept for the backward pass, with another of the same size for their gradient.
With the vocabularies of Llama 3 (128k) or Qwen2.5 (152k) that is gigabytes per batch, most of a small
model's training memory, and the output layer's matrix product alone outweighs the rest of a 0.5 B model.
Only the positions whose next token the loss counts (the replies, not the prompts or the padding) matter.

So `reply_loss` runs the model's body, keeps the hidden states of those positions, and computes the output
layer and cross-entropy over them in chunks (a fused linear cross-entropy, as Liger's and Unsloth's): each
chunk's gradient for its hidden states is worked out in the forward pass, so no chunk's logits outlive it.
Same mean over the same tokens as the model's own loss.
"""

from __future__ import annotations

import torch

from pipelines.llm.model import builtin_base
from pipelines.llm.tokenize import counted

# Model types whose logits are exactly lm_head(body(...).last_hidden_state): no soft-capping or scaling
# after the output layer (Gemma 2/3, Cohere, Granite have some, and keep the model's own forward).
PLAIN_OUTPUT_LAYER = {"llama", "mistral", "qwen2", "qwen3", "stablelm", "phi3", "gemma", "olmo", "olmo2",
                      "smollm3"}
CHUNK_ELEMENTS = 2 ** 25  # logits per chunk (128 MB of float32): about 260 positions of a 128k vocabulary


def output_layer(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(the model's body, its output layer) when reply_loss computes this model's loss exactly, else None:
    another architecture, or an output layer that trains (LoRA or modules_to_save on lm_head). (Under
    DeepSpeed ZeRO-3, which splits lm_head between the processes, the pipeline does not ask.)"""
    base = builtin_base(model)
    if base is None:
        return None
    body, head = getattr(base, "model", None), getattr(base, "lm_head", None)
    if (base.config.model_type not in PLAIN_OUTPUT_LAYER or body is None or type(head) is not torch.nn.Linear
            or head.weight.requires_grad):
        return None
    return body, head


def with_reply_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch plus where its counted tokens are, found on the CPU before the batch goes to the device
    (finding them there would make the CPU wait for the GPU's queue at every batch)."""
    return {**batch, "reply_positions": counted(batch).flatten().nonzero().squeeze(1)}


def reply_loss(body: torch.nn.Module, head: torch.nn.Linear, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean cross-entropy of the tokens whose label counts (labels shift by one, as in the model), for a
    batch that went through with_reply_positions."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "reply_positions")}
    hidden = body(**inputs, use_cache=False).last_hidden_state
    where = batch["reply_positions"]
    predicting = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, where)
    return LinearCrossEntropy.apply(predicting, head.weight, head.bias, batch["labels"][:, 1:].flatten()[where])


class LinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(hidden @ weight.T + bias, targets)) with a frozen weight, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        count = max(1, hidden.shape[0])
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        wants_grad = ctx.needs_input_grad[0]
        if torch.is_autocast_enabled(hidden.device.type):  # cast the [vocabulary, hidden] weight once, not per chunk
            weight = weight.to(torch.get_autocast_dtype(hidden.device.type))
            bias = None if bias is None else bias.to(weight.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if wants_grad else None
        for start in range(0, hidden.shape[0], chunk):
            part, wanted = hidden[start:start + chunk], targets[start:start + chunk]
            logits = torch.nn.functional.linear(part, weight, bias).float()  # as the model: its dtype, then float
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, wanted[:, None]).squeeze(1)).sum()
            if wants_grad:  # d(mean)/d(logits) = (softmax - one_hot) / count, then back through the layer
                logits.sub_(log_norm[:, None]).exp_()
                logits[torch.arange(len(wanted), device=logits.device), wanted] -= 1
                grad[start:start + chunk] = (logits / count).to(weight.dtype) @ weight
        if wants_grad:
            ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None
