"""Load benchmark: does the server stay responsive, and training fast, while many browsers use it?

    python bench/load.py [--clients 20] [--seconds 60] [--steps 300]

Starts a studio server on a free loopback port with a fresh workspace, trains the sample language run
once with no load (the baseline), then trains it again while N clients browse the page, poll the run
through the HTTP API and upload small files, all for a fixed time. Prints request latency percentiles,
the error count, and the training throughput with and without the load. Only 127.0.0.1 is contacted.

Last line: RESULT errors=<n> p50_ms=<x> p95_ms=<x> p99_ms=<x> throughput_ratio=<loaded/unloaded>
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.status, response.read()


def api_call(base: str, name: str, data: list) -> object:
    """Gradio's REST protocol: POST starts the call, GET streams its result."""
    _, body = request("POST", f"{base}gradio_api/call/{name}", json.dumps({"data": data}).encode(),
                      {"Content-Type": "application/json"})
    event_id = json.loads(body)["event_id"]
    _, stream = request("GET", f"{base}gradio_api/call/{name}/{event_id}")
    lines = stream.decode().splitlines()
    if any(line.startswith("event: error") for line in lines):
        raise RuntimeError(f"{name} answered an error")
    data_line = [line for line in lines if line.startswith("data:")][-1]
    return json.loads(data_line[5:])[0]


def upload(base: str) -> None:
    boundary = uuid.uuid4().hex
    content = b"instruction,output\nSay hi,hi\n"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"tiny.csv\"\r\n"
            f"Content-Type: text/csv\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    request("POST", f"{base}gradio_api/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def client(base: str, run_id: str, stop: threading.Event, latencies: list, errors: list, index: int) -> None:
    actions = [lambda: request("GET", base), lambda: api_call(base, "run_status", [run_id]),
               lambda: upload(base), lambda: request("GET", f"{base}gradio_api/info")]
    n = index
    while not stop.is_set():
        started = time.perf_counter()
        try:
            actions[n % len(actions)]()
            latencies.append(time.perf_counter() - started)
        except Exception as err:  # counted, reported, never fatal
            errors.append(repr(err))
        n += 1


def queue_run(home: Path, config: Path) -> str:
    env = dict(os.environ, STUDIO_HOME=str(home))
    out = subprocess.run([sys.executable, "-m", "studio.cli", "train", str(config), "--detach"], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return out.split()[1]


def throughput(home: Path, run_id: str, window: tuple[float, float] | None = None) -> float:
    """Tokens per second over the run's steps (within the wall-clock window, if given), after warm-up."""
    events = [json.loads(line) for line in (home / "runs" / run_id / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["type"] == "step"][5:]
    if window:
        steps = [e for e in steps if window[0] <= e["time"] <= window[1]]
    seconds = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
    return sum(e["units"] for e in steps[1:]) / max(seconds, 1e-9)


def first_step_seen(home: Path, run_id: str) -> None:
    path = home / "runs" / run_id / "events.jsonl"
    while not (path.exists() and '"type": "step"' in path.read_text()):
        time.sleep(0.2)


def wait_done(home: Path, run_id: str, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = home / "runs" / run_id / "events.jsonl"
        if path.exists():
            statuses = [json.loads(l)["status"] for l in path.read_text().splitlines() if '"status"' in l and
                        json.loads(l)["type"] == "status"]
            if statuses and statuses[-1] in ("completed", "failed", "stopped", "cancelled", "interrupted"):
                return statuses[-1]
        time.sleep(0.5)
    raise TimeoutError(run_id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--steps", type=int, default=3000, help="long enough to outlast the load window")
    parser.add_argument("--client-niceness", type=int, default=19,
                        help="nice value of the load-generating threads (0 = same priority as the studio)")
    args = parser.parse_args()
    if args.client_niceness and sys.platform.startswith("linux"):
        from studio.jobs import continue_in_own_session
        continue_in_own_session()  # so that lowering this session's priority below reaches no one else

    home = Path(tempfile.mkdtemp(prefix="studio-load-"))
    data = yaml.safe_load((ROOT / "assets" / "llm" / "config.yaml").read_text())
    data.update(train_files=[str(ROOT / "assets" / "llm" / "sample.csv")], max_steps=args.steps, sample_every=0,
                checkpoint_every=100_000)
    config = home / "bench.yaml"
    config.write_text(yaml.safe_dump(data))
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, "-m", "studio.cli", "serve", "--port", str(port)], cwd=ROOT,
                              env=dict(os.environ, STUDIO_HOME=str(home)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                request("GET", base, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        quiet_run = queue_run(home, config)
        print(f"baseline run {quiet_run}: training with no load…", flush=True)
        wait_done(home, quiet_run)
        unloaded = throughput(home, quiet_run)

        loaded_run = queue_run(home, config)
        first_step_seen(home, loaded_run)
        # The clients stand in for browsers on other machines: their own CPU is not the studio's cost, so on
        # a machine this small they run at the lowest priority (Linux keeps nice per thread; the threads
        # started below inherit this one's; and where the kernel shares the CPU between sessions first, this
        # benchmark's session, of its own since main(), steps back too). The server and the runs keep theirs.
        if args.client_niceness:
            from studio.jobs import lower_priority
            lower_priority(args.client_niceness)
        print(f"loaded run {loaded_run}: {args.clients} clients for {args.seconds:.0f} s…", flush=True)
        window_start = time.time()
        latencies: list[float] = []
        errors: list[str] = []
        stop = threading.Event()
        threads = [threading.Thread(target=client, args=(base, loaded_run, stop, latencies, errors, i), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        window = (window_start, time.time())
        for t in threads:
            t.join(timeout=60)
        status = wait_done(home, loaded_run)
        loaded = throughput(home, loaded_run, window)
    finally:
        server.terminate()
        server.wait(timeout=30)

    ms = sorted(x * 1000 for x in latencies)
    pct = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")  # noqa: E731
    print(f"\nrequests {len(ms)}  errors {len(errors)}  p50 {pct(0.5):.0f} ms  p95 {pct(0.95):.0f} ms  "
          f"p99 {pct(0.99):.0f} ms  mean {statistics.mean(ms) if ms else float('nan'):.0f} ms")
    print(f"training: {unloaded:,.0f} tokens/s without load, {loaded:,.0f} tokens/s with load "
          f"(ratio {loaded / unloaded:.3f}); loaded run {status}")
    if errors:
        print("first errors:", *errors[:5], sep="\n  ")
    print(f"RESULT errors={len(errors)} p50_ms={pct(0.5):.0f} p95_ms={pct(0.95):.0f} p99_ms={pct(0.99):.0f} "
          f"throughput_ratio={loaded / unloaded:.3f}")


if __name__ == "__main__":
    main()
