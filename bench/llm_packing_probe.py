"""Where the LLM step's time goes: one batch of 8 examples (16-512 tokens) as the studio packs it today
(one row), padded to the longest (the baseline), and packed into rows of at most 512 tokens (first-fit
decreasing, rows padded to the longest row). Same tokens, same loss; forward+backward seconds per step.

    python bench/llm_packing_probe.py [--threads N]

Why: with sdpa or eager attention (no flash-attention varlen kernel, e.g. on the CPU), transformers turns
the restarting position ids of a packed row into a dense block-diagonal L x L mask, so attention costs
O(L^2) over the whole packed row instead of the sum of each example's own square.
"""
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
def bins(items, cap=512):
    out = []
    for it in sorted(items, key=lambda p: -len(p[0])):
        for b in out:
            if sum(len(x[0]) for x in b) + len(it[0]) <= cap:
                b.append(it); break
        else:
            out.append([it])
    return out
def packed_bins(items):
    rows_ = [collate(b, tok.pad_token_id, True) for b in bins(items)]
    L = max(r["input_ids"].shape[1] for r in rows_)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, L - t.shape[1]), value=v)
    ids = torch.cat([pad(r["input_ids"], tok.pad_token_id) for r in rows_])
    lab = torch.cat([pad(r["labels"], -100) for r in rows_])
    # padding gets its own position run (a segment of its own) and label -100: it never meets real tokens
    pos = torch.cat([torch.cat([r["position_ids"], torch.arange(L - r["position_ids"].shape[1]).unsqueeze(0)], 1) for r in rows_])
    return {"input_ids": ids, "labels": lab, "position_ids": pos}
cases = {"packed one row (studio)": collate(enc, tok.pad_token_id, True),
         "padded to longest (baseline)": collate(enc, tok.pad_token_id, False),
         "packed into bins of <=512": packed_bins(enc)}
def step(batch):
    loss = model(**batch, use_cache=False).loss; loss.backward(); model.zero_grad(); return loss.item()
times = {n: [] for n in cases}; losses = {}
for n, b in cases.items(): losses[n] = step(b)
for _ in range(3):
    for n, b in cases.items():
        t0 = time.perf_counter(); step(b); times[n].append(time.perf_counter() - t0)
for n, b in cases.items():
    print(f"{n:32s} shape {tuple(b['input_ids'].shape)}  best {min(times[n]):.2f} s/step (all {[round(t,2) for t in times[n]]})  loss {losses[n]:.4f}")
