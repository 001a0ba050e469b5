"""UI versus CLI: does watching a run in the browser slow its training? (issue #7: target |diff| < 3%)

    python bench/ui_vs_cli.py [--quick] [--rounds N] [--steps N]

The sample language run (`assets/llm/config.yaml` with the sample data, `max_steps` from --steps,
no samples, no checkpoints) is trained two ways in one fresh workspace:

- cli: `python -m studio.cli train CONFIG` in the foreground, under a pseudo-terminal so it draws its
  tqdm bar as it does in a user's terminal; no server, no browser;
- ui:  `python -m studio.cli serve` on a free loopback port, and Debian's Chromium driven by Playwright
  opens the page, loads the same config.yaml with the Language model tab's "Load config" button, presses
  Train and keeps the page open (its live panel polling every 1.5 s) until the run has completed. The
  run's config.yaml must hold the same training settings as the CLI run's, or the script stops.

Throughput is tokens/s from each run's events.jsonl after 5 warm-up steps (bench.load.throughput). The
ways alternate, the order flipped every round; the ratio is the median of the per-round ui/cli ratios.
Server and browser start afresh for each ui run and are gone before the next cli run. Last line:

    RESULT ui_over_cli=<x> diff_pct=<x>
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import free_port, request, throughput, wait_done  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]
IGNORED = {"name", "train_files", "validation_files"}  # differ by design: run name, each run's own data copy
# The tab's data check writes the columns it detected into the form; the CLI config leaves them empty (detect
# at training time). For the sample CSV (alpaca) both mean these columns.
DETECTED = {"prompt_column": "instruction", "input_column": "input", "response_column": "output"}
RUN_ID = re.compile(r"\d{8}-\d{6}-llm-[0-9a-f]+")


def run_cli(home: Path, config: Path, env: dict) -> str:
    """`studio train CONFIG` in the foreground on a 30x120 pseudo-terminal; returns the run id."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "studio.cli", "train", str(config)], cwd=ROOT, env=env,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    output = b""
    while True:  # drain the terminal as a terminal would; EIO once the process has closed it
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    text = output.decode(errors="replace")
    match = re.search(r"Run (\S+) \(", text)
    if proc.wait() != 0 or not match:
        raise SystemExit(f"studio train failed (exit {proc.returncode}):\n{text[-3000:]}")
    return match.group(1)


def run_ui(playwright, home: Path, config: Path, env: dict) -> str:
    """Serve, load the config in the browser, press Train, watch until completed; returns the run id."""
    from playwright.sync_api import expect

    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    with open(home / f"server-{port}.log", "ab") as log:
        server = subprocess.Popen([sys.executable, "-m", "studio.cli", "serve", "--port", str(port)], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    browser = None
    try:
        for _ in range(360):
            if server.poll() is not None:
                raise SystemExit(f"server exited: {(home / f'server-{port}.log').read_text()[-2000:]}")
            try:
                request("GET", base, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(base)
        expect(page.locator("#llm-train")).to_be_enabled(timeout=120_000)
        with page.expect_file_chooser() as chooser:
            page.locator("button:visible", has_text="Load config").first.click()
        chooser.value.set_files(str(config))
        message = page.locator("#llm-message")
        expect(message).to_contain_text("Settings loaded from the config file", timeout=120_000)
        expect(page.locator("#llm-data-summary")).to_contain_text("24 of 24 rows usable", timeout=120_000)
        expect(page.locator("#llm-train")).to_be_enabled(timeout=120_000)
        page.locator("#llm-train").click()
        expect(message).to_contain_text(RUN_ID, timeout=120_000)  # "Started run <id>." / "Run <id> is queued."
        run_id = RUN_ID.search(message.inner_text()).group(0)
        # The page stays open, its timer polling the live panel; we only read the run's files meanwhile.
        status = wait_done(home, run_id, timeout=3600)
        if status != "completed":
            raise SystemExit(f"ui run {run_id} ended {status}")
        expect(page.locator("#llm-run-status")).to_contain_text("completed", timeout=60_000)
        return run_id
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        server.wait(timeout=30)


def training_settings(home: Path, run_id: str) -> dict:
    """The run's config.yaml minus IGNORED, empty columns resolved, and the tokens of every step (the same
    data in the same order gives the same counts)."""
    data = yaml.safe_load((home / "runs" / run_id / "config.yaml").read_text())
    settings = {k: (v or DETECTED[k]) if k in DETECTED else v for k, v in data.items() if k not in IGNORED}
    events = [json.loads(line) for line in (home / "runs" / run_id / "events.jsonl").read_text().splitlines()]
    settings["tokens per step"] = [e["units"] for e in events if e["type"] == "step"]
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of 120 steps")
    parser.add_argument("--rounds", type=int, default=None, help="pairs of runs (default 3, --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="max_steps of each run (default 300, --quick 120)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    steps = args.steps or (120 if args.quick else 300)

    home = Path(tempfile.mkdtemp(prefix="studio-ui-vs-cli-"))
    data = yaml.safe_load((ROOT / "assets" / "llm" / "config.yaml").read_text())
    data.update(train_files=[str(ROOT / "assets" / "llm" / "sample.csv")], max_steps=steps, sample_every=0,
                checkpoint_every=100_000)
    config = home / "bench.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    env = dict(os.environ, STUDIO_HOME=str(home), HF_HUB_OFFLINE="1", STUDIO_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False")
    print(f"workspace {home}; {rounds} round(s) of {steps} steps each way", flush=True)

    from playwright.sync_api import sync_playwright
    rates: dict[str, list[float]] = {"cli": [], "ui": []}
    orders, reference = [], None
    with sync_playwright() as playwright:
        for r in range(rounds):
            order = ["cli", "ui"] if r % 2 == 0 else ["ui", "cli"]
            orders.append(",".join(order))
            for way in order:
                print(f"[round {r + 1}/{rounds}] {way} ...", flush=True)
                started = time.perf_counter()
                run_id = run_cli(home, config, env) if way == "cli" else run_ui(playwright, home, config, env)
                settings = training_settings(home, run_id)
                if reference is None:
                    reference = settings
                elif settings != reference:
                    diff = {k: (reference.get(k), settings.get(k)) for k in reference.keys() | settings.keys()
                            if reference.get(k) != settings.get(k)}  # (first run's, this run's)
                    raise SystemExit(f"{way} run {run_id} trained with other settings: {diff}")
                rates[way].append(throughput(home, run_id))
                print(f"    {way}: run {run_id}, {rates[way][-1]:,.0f} tokens/s "
                      f"({time.perf_counter() - started:.0f} s end to end)", flush=True)

    per_round = [u / c for u, c in zip(rates["ui"], rates["cli"])]
    print(f"\n{'round':<7} {'order':<8} {'cli tokens/s':>13} {'ui tokens/s':>13} {'ui/cli':>8}")
    print("-" * 53)
    for r in range(rounds):
        print(f"{r + 1:<7} {orders[r]:<8} {rates['cli'][r]:>13,.0f} {rates['ui'][r]:>13,.0f} {per_round[r]:>8.3f}")
    cli_median, ui_median = statistics.median(rates["cli"]), statistics.median(rates["ui"])
    print(f"{'median':<16} {cli_median:>13,.0f} {ui_median:>13,.0f} {statistics.median(per_round):>8.3f}")
    ratio = statistics.median(per_round)
    print(f"\nui/cli: {ratio:.3f} (median of the per-round ratios; ratio of the medians {ui_median / cli_median:.3f}); "
          f"target |diff| < 3%: {'met' if abs(ratio - 1) < 0.03 else 'NOT met'}")
    print(f"RESULT ui_over_cli={ratio:.3f} diff_pct={100 * (ratio - 1):.2f}")


if __name__ == "__main__":
    main()
