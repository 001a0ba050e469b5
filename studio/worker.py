"""The training process of one run: `python -m studio.worker RUN_DIR [--resume]`.

Started by studio.jobs in its own session with output to the run's log.txt. It records its status in
the run folder and the index, turns failures into one sentence plus advice, and when it ends starts
the next queued run, so the queue advances even with no server running.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from pipelines import load_config, pipeline_module
from pipelines.config import ConfigError
from pipelines.training import STOP_FILE, Events, TrainingFailure, stop_requested
from studio import jobs, tracking
from studio.runs import Registry


def explain(error: BaseException) -> tuple[str, str]:
    """(cause in one sentence, what to change) for any failure."""
    if isinstance(error, TrainingFailure):
        return error.cause, error.advice
    if isinstance(error, ConfigError):
        return f"The run's settings are invalid: {error}.", "Fix the named settings."
    name = type(error).__name__
    text = str(error).strip().splitlines()[0] if str(error).strip() else name
    if name == "OutOfMemoryError" or isinstance(error, MemoryError) or "out of memory" in text.lower():
        return ("The run ran out of memory.",
                "Lower the batch size or the max length, raise gradient accumulation instead, or turn on 4-bit.")
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in text:
        return ("The disk is full, so a checkpoint could not be written (earlier checkpoints are intact).",
                "Free some disk space, then resume the run.")
    return f"Training stopped on an unexpected error: {name}: {text}", "See the log below for details."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="studio.worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    run_id = run_dir.name
    registry = Registry(run_dir.parent.parent)
    # Ctrl-C in a terminal that owns this process means Stop: checkpoint at the next step, then exit.
    signal.signal(signal.SIGINT, lambda *_: (run_dir / STOP_FILE).touch())

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    # Share the CPU cores between the runs allowed to train at once, rather than oversubscribing them.
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs.max_concurrent_runs()))
    registry.set_status(run_id, "running", pid=os.getpid(), resume=0)
    events = Events(run_dir)
    status, error, advice = "failed", "", ""
    try:
        config = load_config(run_dir / "config.yaml")
        log(f"Run {run_id}: {config.modality} LoRA on {config.base_model}" + (" (resuming)" if args.resume else ""))
        status = pipeline_module(config.modality).train(config, run_dir, events, stop_requested(run_dir),
                                                        resume=args.resume, log=log)
    except BaseException as err:  # noqa: BLE001 - every failure must end as a status, not a silent exit
        if isinstance(err, KeyboardInterrupt):
            status, error, advice = "stopped", "Stopped before the first checkpoint.", "Start the run again."
        else:
            status = "failed"
            error, advice = explain(err)
            traceback.print_exc()
        log(f"{status}: {error} {advice}".strip())
    finally:
        events.close()
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        registry.set_status(run_id, status, error=error, advice=advice)
        log(f"Run {run_id} {status}.")
        try:
            tracking.sync(run_dir)  # TensorBoard / MLflow copies of the run, when switched on
        except Exception as err:  # tracking must never change the run's result
            log(f"Tracking export failed: {err}")
        sys.stdout.flush()
    try:
        jobs.dispatch(registry)
    except Exception:  # starting the next run must never turn this run's result into a failure
        traceback.print_exc()
    return 0 if status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
