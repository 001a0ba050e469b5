"""Attention example by example (pipelines/llm/attention.py) against the model's own masked attention: the
same loss and adapter gradients for packed batches of each architecture it covers, in one row or several
padded ones, with grouped-query attention and with a sliding window shorter than the examples; and the
model's own attention outside."""

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from pipelines.llm import attention
from pipelines.llm.tokenize import IGNORE, collate

VOCAB = 500


def tiny(model_type: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **extra)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def examples() -> list[tuple[list[int], list[int]]]:
    rng = random.Random(0)
    pairs = []
    for _ in range(6):
        prompt, answer = rng.randint(2, 20), rng.randint(3, 20)
        ids = [rng.randrange(1, VOCAB) for _ in range(prompt + answer)]
        pairs.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return pairs


def loss_and_grads(model, batch, by_example: bool):
    model.zero_grad()
    if by_example:
        with attention.each_example(model):
            loss = model(**attention.with_example_lengths(batch), use_cache=False).loss
    else:
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", sorted(attention.CAUSAL_ATTENTION))
def test_attention_by_example_matches_the_masked_attention_of_each_architecture(model_type):
    check_against_the_mask(tiny(model_type), row_length=10_000)


@pytest.mark.parametrize("model_type, window", [
    ("mistral", {"sliding_window": 8}),
    ("phi3", {"sliding_window": 8}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),  # layer 2 slides
    ("smollm3", {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]})])
@pytest.mark.parametrize("row_length", [10_000, 48])
def test_attention_by_example_honours_a_sliding_window(model_type, window, row_length):
    model = tiny(model_type, **window)
    check_against_the_mask(model, row_length)
    # (the window matters: examples of 5 to 40 tokens, the same model without it has another loss)
    batch = collate(examples(), pad_id=0, packing=True, row_length=row_length)
    assert loss_and_grads(model, batch, False)[0] != loss_and_grads(tiny(model_type), batch, False)[0]


def test_attention_by_example_on_several_padded_rows():
    check_against_the_mask(tiny("llama"), row_length=48)


def check_against_the_mask(model, row_length: int) -> None:
    assert attention.supports(model)
    batch = collate(examples(), pad_id=0, packing=True, row_length=row_length)
    assert (batch["input_ids"].shape[0] == 1) == (row_length == 10_000)  # one row, or several padded ones
    own_loss, own_grads = loss_and_grads(model, batch, by_example=False)
    loss, grads = loss_and_grads(model, batch, by_example=True)
    assert own_loss > 1.0
    assert loss == pytest.approx(own_loss.item(), rel=1e-5)
    assert grads.keys() == own_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, own_grads[name], rtol=1e-4, atol=1e-6)


def test_examples_in_one_row_do_not_see_each_other():
    """Without the mask a packed row would be one long causal sequence: the second example's loss would
    depend on the first. Changing the first example must leave the second's logits as they are."""
    model = tiny("llama")
    first, second = examples()[:2]
    changed = ([t % (VOCAB - 1) + 1 for t in first[0]], first[1])
    logits = []
    for pair in (first, changed):
        batch = attention.with_example_lengths(collate([pair, second], pad_id=0, packing=True, row_length=10_000))
        with torch.no_grad(), attention.each_example(model):
            out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        start = next(i for i, lengths in enumerate(batch["example_lengths"][0]) if lengths == len(second[0]))
        offset = sum(batch["example_lengths"][0][:start])
        logits.append(out[0, offset:offset + len(second[0])])
    assert len(first[0]) != len(second[0])  # (so the lookup above found the second example)
    torch.testing.assert_close(logits[0], logits[1])


def test_the_model_keeps_its_own_attention_outside_the_block():
    model = tiny("llama")
    with attention.each_example(model):
        assert model.config._attn_implementation == attention.NAME
    assert model.config._attn_implementation == "sdpa"
    prompt = torch.tensor([[5, 6, 7]])
    reply = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)  # a cache: the own attention
    assert reply.shape == (1, 6)


def test_models_it_does_not_cover_keep_their_attention():
    model = tiny("llama")
    model.config._attn_implementation = "flash_attention_2"  # handles packed rows itself
    assert not attention.supports(model)
    assert not attention.supports(tiny("stablelm"))  # its decoder layers drop the examples' lengths


def test_a_layer_that_drops_the_lengths_fails_loudly_rather_than_mixing_examples():
    model = tiny("stablelm")
    batch = attention.with_example_lengths(collate(examples(), pad_id=0, packing=True, row_length=10_000))
    with attention.each_example(model), pytest.raises(RuntimeError, match="lengths"):
        model(**batch, use_cache=False)


# ---- torch's variable-length flash kernel (GPUs with flash attention, half precision) -------------------

def examples_end_to_end(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """What varlen_attn computes by its documentation, example by example on the CPU: [tokens, heads, dim] with
    each example from cu_seq[i] to cu_seq[i + 1], causal for window_size (-1, 0)."""
    assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    bounds = cu_seq_q.tolist()
    assert max_q == max(end - start for start, end in zip(bounds, bounds[1:])) and bounds[-1] == query.shape[0]
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(t[start:end].transpose(0, 1) for t in (query, key, value)), is_causal=True, scale=scale).transpose(0, 1)
        for start, end in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("row_length", [10_000, 48])
def test_the_one_call_layout_matches_the_masked_attention(monkeypatch, row_length):
    """The kernel runs only on a GPU; here a CPU stand-in with its documented meaning checks what the studio
    hands it (the rows laid end to end, where each example starts, the longest) and how it reads the result
    back, through a whole model with grouped-query attention, in one row and in several padded ones."""
    monkeypatch.setattr(attention, "varlen_attn", examples_end_to_end)
    monkeypatch.setattr(attention, "one_call", lambda *_: True)
    check_against_the_mask(tiny("llama"), row_length)


def test_the_one_call_takes_what_torch_s_kernel_takes():
    """torch's own kernel on the meta device (its shape functions): the arguments and the shapes agree, forward
    and backward. On the CPU, and in float32 anywhere, the loop over examples is used."""
    assert attention.varlen_attn is not None  # the torch the studio installs has it (2.11 or newer)
    rows, heads, length, dim = 2, 4, 24, 16
    query, key, value = (torch.randn(rows, heads, length, dim, dtype=torch.bfloat16, device="meta", requires_grad=True)
                         for _ in range(3))
    batch = attention.with_example_lengths({"position_ids": torch.tensor([list(range(10)) + list(range(14)),
                                                                          list(range(20)) + list(range(4))])})
    assert batch["example_offsets"].tolist() == [0, 10, 24, 44, 48]
    out = attention.all_examples_at_once(query, key, value, batch["example_offsets"].to("meta"), 20, None)
    assert out.shape == (rows, length, heads, dim) and out.dtype == torch.bfloat16
    out.sum().backward()
    assert query.grad.shape == query.shape and value.grad.shape == value.shape
    cpu_query = torch.zeros(rows, heads, length, dim, dtype=torch.bfloat16)
    assert not attention.one_call(cpu_query, 0.0, None, 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the variable-length kernel needs a CUDA GPU")
def test_the_one_call_on_a_gpu_matches_the_masked_attention(monkeypatch):
    calls, kernel = [], attention.varlen_attn
    monkeypatch.setattr(attention, "varlen_attn", lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    model = tiny("llama").to("cuda", torch.bfloat16)
    batch = collate(examples(), pad_id=0, packing=True, row_length=10_000)
    assert attention.one_call(torch.zeros(1, 4, 8, 16, device="cuda", dtype=torch.bfloat16), 0.0, None, 8)
    on_gpu = {k: v.to("cuda") for k, v in attention.with_example_lengths(batch).items() if isinstance(v, torch.Tensor)}
    own_loss, own_grads = loss_and_grads(model, {k: on_gpu[k] for k in batch}, by_example=False)
    model.zero_grad()
    with attention.each_example(model):
        loss = model(**on_gpu, example_lengths=attention.with_example_lengths(batch)["example_lengths"],
                     use_cache=False).loss
    loss.backward()
    assert len(calls) == 2  # one call for each of the two layers
    assert loss.item() == pytest.approx(own_loss.item(), rel=1e-2)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, own_grads[name], rtol=5e-2, atol=5e-3)
