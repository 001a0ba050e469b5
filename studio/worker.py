"""The training process of one run: `python -m studio.worker RUN_DIR [--resume]`.

Started by studio.jobs in its own session with output to the run's log.txt. It records its status in
the run folder and the index, turns failures into one sentence plus advice, and when it ends starts
the next queued run, so the queue advances even with no server running.

A run with several processes (config `processes` x `nodes` > 1) is trained by its ranks: this process
starts them with `accelerate launch` (GPUs) or torchrun (CPUs) as `studio.worker RUN_DIR --rank`, waits,
and reads how they ended from `ranks/` (pipelines.distributed). Other nodes start theirs with `studio join`.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from pipelines import distributed, hub, load_config, model_module, pipeline_module
from pipelines.config import ConfigError, RunConfig
from pipelines.threads import usable_cores
from pipelines.training import STOP_FILE, Events, TrainingFailure, pick_device, stop_requested
from studio import jobs, tracking
from studio.runs import DISK_FULL, ENDED, OUT_OF_MEMORY, UNEXPECTED, Registry, append_event


def explain(error: BaseException) -> tuple[str, str]:
    """(cause in one sentence, what to change) for any failure."""
    if isinstance(error, TrainingFailure):
        return error.cause, error.advice
    if isinstance(error, ConfigError):
        return f"The run's settings are invalid: {error}.", "Fix the named settings."
    name = type(error).__name__
    text = str(error).strip().splitlines()[0] if str(error).strip() else name
    lowered = text.lower()
    if (name == "OutOfMemoryError" or isinstance(error, MemoryError) or "out of memory" in lowered
            or "can't allocate memory" in lowered):  # the last: torch's CPU allocator
        return (OUT_OF_MEMORY,
                "Lower the batch size or the max length (raise gradient accumulation to keep the same global batch); "
                "for a language model on a GPU, 4-bit loading also helps.")
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in text:
        return DISK_FULL, "Free some disk space, then resume the run."
    return f"{UNEXPECTED}: {name}: {text}", "See the log below for details."


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cores_each(processes: int = 1) -> int:
    """Share the CPU cores between the processes training at once, rather than oversubscribing them."""
    return max(1, usable_cores() // (jobs.max_concurrent_runs() * processes))


def share_cores(processes: int = 1) -> None:
    import torch
    torch.set_num_threads(cores_each(processes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="studio.worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--rank", action="store_true", help="one of a multi-process run's ranks (set by its launcher)")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    if args.rank:
        code = train_as_rank(run_dir, args.resume)
        # The rank has recorded how it ended and written what it had to: leave without the interpreter's
        # teardown, where a library's native threads (DeepSpeed's shared-memory communication, once) can
        # abort the process ("terminate called without an active exception") and fail a finished run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    run_id = run_dir.name
    registry = Registry(run_dir.parent.parent)
    # Ctrl-C in a terminal that owns this process means Stop: checkpoint at the next step, then exit.
    signal.signal(signal.SIGINT, lambda *_: (run_dir / STOP_FILE).touch())
    # The claim: a run cancelled (or found lost) between its dispatch and this moment is not trained.
    if not registry.set_status(run_id, "running", expect=("starting",), pid=os.getpid(), resume=0):
        run = registry.get(run_id)
        log(f"Run {run_id} is {run.status if run else 'gone'}; not training it.")
        return 1
    events = None
    status, error, advice = "failed", "", ""
    try:
        config = load_config(run_dir / "config.yaml")
        log(f"Run {run_id}: {config.modality} LoRA on {config.base_model}" + (" (resuming)" if args.resume else ""))
        if config.world_size > 1:
            status = launch_ranks(config, run_dir, args.resume)
        else:
            share_cores()
            events = Events(run_dir)
            hub.download_progress = lambda text: (log(text), events.emit("loading", message=text))
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
        if events:
            events.close()
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        # Not over a Cancel that came too late to end this process ("interrupted": a server that could not see
        # this process, and took it for gone, is corrected).
        try:
            registry.set_status(run_id, status, expect=("running", "interrupted"), error=error, advice=advice)
        except Exception as err:  # the index unwritable: the run folder still says how the run ended, for a rebuild
            append_event(run_dir, "status", status=status, **({"error": error, "advice": advice} if error else {}))
            log(f"The index of runs (studio.db) could not be updated: {err}")
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


# ---- multi-process runs ------------------------------------------------------------------------

def launch_command(config: RunConfig, run_dir: Path, resume: bool, node_rank: int, use_gpu: bool) -> list[str]:
    """This node's launcher: accelerate launch on GPUs; on CPUs torchrun, which accelerate itself uses
    underneath (its multi-CPU path wants mpirun)."""
    address = config.main_address.strip() if config.nodes > 1 else "127.0.0.1"
    port = str(config.main_port or distributed.free_port())
    ranks = ["-m", "studio.worker", str(run_dir), "--rank"] + (["--resume"] if resume else [])
    if use_gpu:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", str(config.world_size), "--num_machines", str(config.nodes),
                "--machine_rank", str(node_rank), "--main_process_ip", address, "--main_process_port", port,
                "--mixed_precision", "no", "--dynamo_backend", "no", *ranks]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(config.processes),
            "--nnodes", str(config.nodes), "--node_rank", str(node_rank),
            "--master_addr", address, "--master_port", port, *ranks]


def launch_ranks(config: RunConfig, run_dir: Path, resume: bool, node_rank: int = 0) -> str:
    """Start this node's ranks, wait for them, and return how the run ended (raise when it failed)."""
    import torch
    use_gpu = pick_device(config.device).type == "cuda"
    if use_gpu and config.processes > torch.cuda.device_count():
        raise TrainingFailure(f"This run asks for {config.processes} processes, one per GPU, but this machine "
                              f"has {torch.cuda.device_count()} GPU(s).", "Lower processes, or set device to cpu.")
    if node_rank == 0:
        distributed.clear_ranks(run_dir)
    # A built-in preset is built here, before the ranks start: built inside their process group, it would be
    # saved without its weights (see pipelines.hub.publish_folder).
    model_module(config.modality).base_location(config.base_model)
    command = launch_command(config, run_dir, resume, node_rank, use_gpu)
    log(f"Starting {config.processes} training process(es) on this node ({'GPU' if use_gpu else 'CPU'}), "
        f"{config.world_size} in all; global batch {config.global_batch}.")
    # Its own session: Ctrl-C in a terminal reaches only us (we turn it into Stop); Cancel's SIGTERM
    # reaches us and we pass it on to the launcher, which ends its ranks. If we die, even by SIGKILL, the
    # launcher gets SIGTERM (end_with_parent), so a run shown as interrupted has no ranks left training.
    launcher = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL, preexec_fn=jobs.end_with_parent,
                                env=dict(os.environ, OMP_NUM_THREADS=str(cores_each(config.processes))))

    def end_ranks(*_) -> None:  # Cancel: end the ranks too, and leave the status to whoever cancelled
        os.killpg(launcher.pid, signal.SIGTERM)
        os._exit(143)

    signal.signal(signal.SIGTERM, end_ranks)
    code = launcher.wait()
    ranks = distributed.read_ranks(run_dir)
    failed = [r for r in ranks if r.get("state") == "failed"]
    if failed:
        first = failed[0]
        raise TrainingFailure(f"Process {first['rank']} of {config.world_size}: {first.get('error', 'failed')}",
                              first.get("advice", ""))
    main_rank = next((r for r in ranks if r["rank"] == 0), None)
    if node_rank == 0 and code == 0 and main_rank and main_rank.get("state") in ("completed", "stopped"):
        return main_rank["state"]
    if node_rank != 0 and code == 0:
        return "completed"
    raise TrainingFailure(f"{ENDED} (launcher exit code {code}).",
                          "See the log below; resume the run to continue from its last checkpoint.")


def train_as_rank(run_dir: Path, resume: bool) -> int:
    """One rank of a multi-process run. Only rank 0 writes events; every rank records its state."""
    config = load_config(run_dir / "config.yaml")
    share_cores(config.processes)
    device = pick_device(config.device)
    here = distributed.join(device.type == "cuda")
    status = distributed.RankStatus(run_dir, here, device)
    status.update(force=True)
    events = Events(run_dir, write=here.main)
    say = log if here.main else (lambda message: None)  # one copy of each line in log.txt
    try:
        pipeline_module(config.modality).train(config, run_dir, events, stop_requested(run_dir), resume=resume,
                                               log=say)
        return 0  # the training loop itself recorded "completed" or "stopped" in this rank's state
    except BaseException as err:  # noqa: BLE001 - the node's worker reads this rank's state
        error, advice = explain(err)
        status.finish("failed", error=error, advice=advice)
        log(f"rank {here.rank} failed: {error}")
        traceback.print_exc()
        return 1
    finally:
        events.close()


if __name__ == "__main__":
    sys.exit(main())
