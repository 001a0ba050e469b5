"""Where the LLM step's time goes: one batch of 8 examples (30-505 tokens) packed into one row with the
model's block-diagonal mask, padded to the longest (the baseline), packed into rows of at most 512 tokens
(first-fit decreasing, rows padded to the longest row), and in one row with attention example by example
(what the studio does, pipelines/llm/attention.py). Same tokens, same loss; forward+backward s per step.

    python bench/llm_packing_probe.py [--threads N]

Why: with sdpa or eager attention (no flash-attention varlen kernel, e.g. on the CPU), transformers turns
the restarting position ids of a packed row into a dense block-diagonal L x L mask, so attention costs
O(L^2) over the whole packed row instead of the sum of each example's own square.
"""
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1)
from bench.llm import build_model, make_rows, TARGETS
tmp = Path(tempfile.mkdtemp()); os.environ["STUDIO_MODEL_DIRS"] = str(tmp); os.environ["STUDIO_HOME"] = str(tmp / "ws")
build_model(tmp / "m", "cpu")
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, get_peft_model
from pipelines.llm.tokenize import collate
tok = AutoTokenizer.from_pretrained(tmp / "m")
rows = make_rows(8, 1)
enc = []
for r in rows:
    msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
    ids = tok.apply_chat_template(msgs, tokenize=False)
    ids = tok(ids, add_special_tokens=False)["input_ids"][:512]
    enc.append((ids, list(ids)))
model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp / "m"), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
print("attn impl", model.config._attn_implementation, "lengths", sorted(len(i) for i, _ in enc))
from pipelines.llm import attention
one_row = collate(enc, tok.pad_token_id, True, sys.maxsize)
cases = {"packed one row, masked": (one_row, False),
         "padded to longest (baseline)": (collate(enc, tok.pad_token_id, False), False),
         "packed into rows of <=512": (collate(enc, tok.pad_token_id, True, 512), False),
         "one row, attention by example": (attention.with_example_lengths(one_row), True)}
def step(batch, by_example):
    with attention.each_example(model) if by_example else contextlib.nullcontext():
        loss = model(**batch, use_cache=False).loss
    loss.backward(); model.zero_grad(); return loss.item()
times = {n: [] for n in cases}; losses = {}
for n, c in cases.items(): losses[n] = step(*c)
for _ in range(3):
    for n, c in cases.items():
        t0 = time.perf_counter(); step(*c); times[n].append(time.perf_counter() - t0)
for n, (b, _) in cases.items():
    print(f"{n:32s} shape {tuple(b['input_ids'].shape)}  best {min(times[n]):.2f} s/step (all {[round(t,2) for t in times[n]]})  loss {losses[n]:.4f}")
