"""The studio's speech training with the decoder's cross-attention keys and values kept per clip (the
default, pipelines/speech/cross_cache.py) against projecting them every step, side by side.

    python bench/speech_cross_cache.py [--size tiny|base|small] [--steps N] [--rounds N] [--precision auto|no|bf16]

Same run as bench/speech.py's studio side (its config_for: the 8 sample clips, batch 8, one thread), in a
fresh process per run, alternating. "Off" cuts the speech memory budget (CACHE_BYTES) to exactly the encoder
outputs, which leaves the keys and values no room. Prints clips/s over the steps after the first, the final
loss of both (they should match), and the last line `RESULT speedup=<on / off> loss_match=<True|False>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import argparse, json, sys, tempfile
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
from bench.speech import config_for
import pipelines.speech.pipeline as speech
from pipelines.speech.model import load_base_model
from pipelines.training import Events, read_events
torch.set_num_threads(1)
size, steps, precision, mode = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
config = config_for(argparse.Namespace(size=size, steps=steps, batch_size=8, device="cpu"))
config = config.changed(mixed_precision=precision)
if mode == "off":
    dims = load_base_model(config.base_model, torch.device("cpu")).dims
    speech.CACHE_BYTES = len(list(Path(config.data_path).glob("*.wav"))) * dims.n_audio_ctx * dims.n_audio_state * 4
run_dir = Path(tempfile.mkdtemp())
log = []
speech.train(config, run_dir, Events(run_dir), lambda: False, log=log.append)
steps = [e for e in read_events(run_dir)[0] if e["type"] == "step"]
print(json.dumps({"clips_s": sum(e["units"] for e in steps[1:]) / (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]),
                  "loss": steps[-1]["loss"], "log": [line for line in log if line.startswith(("Cross", "Training in"))]}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["preset", "tiny", "base", "small"], default="base")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", choices=["auto", "no", "bf16"], default="auto")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for round_number in range(args.rounds):
        for mode in runs:
            done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), args.size, str(args.steps), args.precision,
                                   mode], capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                sys.exit(f"the {mode} run failed:\n{done.stderr[-3000:]}")
            runs[mode].append(json.loads(lines[-1]))
            print(f"[round {round_number + 1}] cache {mode}: {runs[mode][-1]}", flush=True)
    on, off = (statistics.median(run["clips_s"] for run in runs[mode]) for mode in ("on", "off"))
    match = all(abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]) for a, b in zip(runs["on"], runs["off"]))
    print(f"\n{args.size}, {args.precision}: clips/s with the keys and values kept {on:.2f}, projected every step "
          f"{off:.2f}; final losses {'match' if match else 'DIFFER'}")
    print(f"RESULT speedup={on / off:.3f} loss_match={match}")


if __name__ == "__main__":
    main()
