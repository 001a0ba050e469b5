"""The LLM's reply loss (pipelines/llm/loss.py) against the model's own loss: same value, same adapter
gradients, on packed and padded batches, in float32 and under bf16 autocast, over several chunks."""

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from pipelines.llm import loss as reply
from pipelines.llm.tokenize import IGNORE, collate

VOCAB = 3000


def tiny_llama(**lora) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))


def examples(count: int = 6) -> list[tuple[list[int], list[int]]]:
    """Prompts (not learned) followed by replies (learned), 5 to 40 tokens."""
    rng = random.Random(0)
    pairs = []
    for _ in range(count):
        prompt, answer = rng.randint(2, 20), rng.randint(3, 20)
        ids = [rng.randrange(1, VOCAB) for _ in range(prompt + answer)]
        pairs.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return pairs


def loss_and_grads(model, batch, fused: bool, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = (reply.reply_loss(*reply.output_layer(model), reply.with_reply_positions(batch)) if fused
                else model(**batch, use_cache=False).loss)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_reply_loss_matches_the_models_own_loss_and_gradients(packing, autocast, monkeypatch):
    monkeypatch.setattr(reply, "CHUNK_ELEMENTS", VOCAB * 7)  # 7 positions per chunk: many chunks
    model = tiny_llama(target_modules=["q_proj", "v_proj"])
    batch = collate(examples(), pad_id=0, packing=packing, row_length=64)
    own_loss, own_grads = loss_and_grads(model, batch, fused=False, autocast=autocast)
    loss, grads = loss_and_grads(model, batch, fused=True, autocast=autocast)
    assert own_loss > 1.0  # a real loss of random weights over 3,000 tokens, not an empty mean
    assert loss == pytest.approx(own_loss.item(), rel=1e-2 if autocast else 1e-5)
    assert grads.keys() == own_grads.keys() and grads
    for name, grad in grads.items():
        if autocast:  # bf16 products round differently in chunks: compare directions
            assert torch.nn.functional.cosine_similarity(grad.flatten(), own_grads[name].flatten(), dim=0) > 0.99, name
        else:
            torch.testing.assert_close(grad, own_grads[name], rtol=1e-4, atol=1e-6)


def test_without_gradients_it_only_measures():
    model = tiny_llama(target_modules=["q_proj"])
    batch = collate(examples(), pad_id=0, packing=True, row_length=64)
    with torch.no_grad():
        assert reply.reply_loss(*reply.output_layer(model), reply.with_reply_positions(batch)) == pytest.approx(
            model(**batch, use_cache=False).loss.item(), rel=1e-5)


def test_models_whose_loss_it_cannot_reproduce_keep_their_own():
    assert reply.output_layer(tiny_llama(target_modules=["q_proj"])) is not None
    # An output layer that trains: its weight needs a gradient this loss does not give.
    assert reply.output_layer(tiny_llama(target_modules=["q_proj", "lm_head"])) is None
    assert reply.output_layer(tiny_llama(target_modules=["q_proj"], modules_to_save=["lm_head"])) is None
    # Gemma 2 soft-caps its logits after the output layer.
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    assert reply.output_layer(get_peft_model(gemma, LoraConfig(r=4, target_modules=["q_proj"]))) is None
