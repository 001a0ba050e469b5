"""Start-up times: the server to a served page, and a queued run to its first training step.

    python bench/startup.py [--quick] [--repeats N]

1. `python launch.py --port <free>` until GET / answers HTTP 200 (polled every 0.1 s).
2. `studio train assets/<modality>/config.yaml --detach` until the run's events.jsonl holds its first
   "step" event; the first run of each modality in a fresh workspace also builds the preset model
   ("cold"), the next one reuses it ("warm"). Each run is cancelled once its first step is seen.

Every measurement uses a fresh temporary STUDIO_HOME. The last line is
`RESULT serve_s=<median> first_step_s=<median of the warm LLM runs>`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
STUDIO = [PYTHON, "-c", "import sys; from studio.cli import main; sys.exit(main(sys.argv[1:]))"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(home: Path) -> dict:
    return dict(os.environ, STUDIO_HOME=str(home), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
                STUDIO_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")


def time_serve(timeout: float = 180) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as home:
        port = free_port()
        started = time.perf_counter()
        proc = subprocess.Popen([PYTHON, "launch.py", "--port", str(port)], cwd=ROOT, env=env_for(Path(home)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while time.perf_counter() - started < timeout:
                if proc.poll() is not None:
                    raise SystemExit(f"launch.py exited with {proc.returncode} before serving")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                        if response.status == 200:
                            return time.perf_counter() - started
                except OSError:
                    pass
                time.sleep(0.1)
            raise SystemExit("no HTTP 200 within the timeout")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def time_first_step(home: Path, modality: str, timeout: float = 300) -> float:
    config = ROOT / "assets" / modality / "config.yaml"
    started = time.perf_counter()
    out = subprocess.run([*STUDIO, "train", str(config), "--detach"], cwd=ROOT, env=env_for(home),
                         capture_output=True, text=True, timeout=120)
    match = re.search(r"Run (\S+) ", out.stdout)
    if out.returncode != 0 or not match:
        raise SystemExit(f"studio train failed: {out.stdout}{out.stderr}")
    run_id = match.group(1)
    events = home / "runs" / run_id / "events.jsonl"
    try:
        while time.perf_counter() - started < timeout:
            if events.exists():
                for line in events.read_text().splitlines():
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if event.get("type") == "step":
                        return time.perf_counter() - started
                    if event.get("type") in ("failed", "error"):
                        raise SystemExit(f"run {run_id} failed: {event}")
            time.sleep(0.05)
        raise SystemExit(f"run {run_id}: no step within {timeout} s")
    finally:
        subprocess.run([*STUDIO, "cancel", run_id], cwd=ROOT, env=env_for(home), capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one serve, the LLM tab only")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    modalities = ["llm"] if args.quick else ["llm", "image", "speech"]

    serve = []
    for i in range(repeats):
        serve.append(time_serve())
        print(f"serve {i + 1}: HTTP 200 after {serve[-1]:.1f} s", flush=True)
    steps: dict[str, list[float]] = {}
    for modality in modalities:
        with tempfile.TemporaryDirectory(prefix="bench-run-") as home:
            for i in range(1 + repeats if not args.quick else 2):
                seconds = time_first_step(Path(home), modality)
                kind = "cold" if i == 0 else "warm"
                steps.setdefault(f"{modality} {kind}", []).append(seconds)
                print(f"{modality} run {i + 1} ({kind}): first step after {seconds:.1f} s", flush=True)
    print("\nmedians:")
    print(f"  launch.py -> HTTP 200: {statistics.median(serve):.1f} s")
    for key, values in steps.items():
        print(f"  studio train --detach -> first step ({key}): {statistics.median(values):.1f} s")
    print(f"RESULT serve_s={statistics.median(serve):.2f} first_step_s={statistics.median(steps['llm warm']):.2f}")


if __name__ == "__main__":
    main()
