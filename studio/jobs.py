"""Starting, stopping and watching training processes.

Each run trains in its own OS process, started in a new session with its output going to the run's
log.txt (never to a pipe someone must read), so it outlives the server or terminal that started it.
Queued runs start in order while fewer than STUDIO_MAX_CONCURRENT_RUNS are training; whoever notices a
free slot (the server's timer, the CLI, a worker that just finished) starts the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from pipelines.config import RunConfig
from pipelines.data import DataReport, int_setting
from pipelines.events import STOP_FILE
from studio.runs import ACTIVE, RESUMABLE, Registry, Run


def max_concurrent_runs() -> int:
    return max(1, int_setting("STUDIO_MAX_CONCURRENT_RUNS", 1))


class UnusableData(ValueError):
    """The data check found nothing to train on (or nothing in the validation data given): no run is made."""

    def __init__(self, report):
        most, lead, summary, problems = 5, report.verdict(), report.summary(), report.problems
        if lead:
            summary = f"{lead}: {summary}"
        else:  # the summary is "No usable data: <the first problem>": listed once
            problems = problems[1:]
        super().__init__(summary + listed(problems, most))
        self.report = report


def listed(problems: list, most: int = 5) -> str:
    """The first problems of a data check, a line each, for a terminal."""
    more = f"\n- … and {len(problems) - most} more" if len(problems) > most else ""
    return "".join(f"\n- {problem}" for problem in problems[:most]) + more


_CHECKS: dict[str, DataReport] = {}  # the last data checks, by what they read (check_data)
_MAKING: dict[str, threading.Lock] = {}  # the checks being made, each held by the thread making it
_CHECKS_LOCK = threading.Lock()


_importer: threading.Thread | None = None


def import_libraries_in_background() -> None:
    """The libraries the server's handlers load (transformers, accelerate, peft, diffusers, whisper), imported
    once, by one thread of their own, as the server starts (app.serve); the data checks, Try it and Export wait
    for it (wait_for_libraries). Imported by two threads at once they came out half-made, for good: a page
    opening checks its three tabs at once, and data uploaded meanwhile got "token lengths not computed: cannot
    import name AutoModelForCausalLM from transformers", or every image check of that server failed ("partially
    initialized module 'accelerate.state'")."""
    global _importer
    _importer = threading.Thread(target=_import_libraries, daemon=True, name="import-libraries")
    _importer.start()


def wait_for_libraries() -> None:
    """Where the server imports the libraries (above), until it has; elsewhere (`studio train`, `generate`,
    `export`: one thread, one modality) at once, importing nothing."""
    if _importer is not None:
        _importer.join()


def _import_libraries() -> None:
    import accelerate.big_modeling  # noqa: F401
    import diffusers
    import transformers

    from pipelines import MODALITIES, model_module, pipeline_module
    for modality in MODALITIES:
        pipeline_module(modality)
        model_module(modality)
    for name in ("AutoencoderKL", "EulerDiscreteScheduler", "StableDiffusionPipeline", "UNet2DConditionModel"):
        getattr(diffusers, name)  # (diffusers and transformers import what they hold when first asked)
    for name in ("CLIPTextConfig", "CLIPTextModel", "CLIPTokenizer", "AutoModelForCausalLM"):
        getattr(transformers, name)


def check_data(config: RunConfig) -> DataReport:
    """The modality's data check, kept for what it reads: the settings, but those of training alone, and the times
    and sizes of the data's files and a local base model's. The tabs check as the user changes things, and Train
    checks before it makes the run: done again in full, the page sat silent after the click for a minute with a
    50 MB table, for half a minute with 200 clips to decode."""
    from pipelines import data_module
    settings = {k: v for k, v in config.to_dict().items() if k not in config.training_only}
    places = [os.path.expanduser(config.base_model.strip())]
    for name in (f for f in config.path_fields if f not in config.training_only):  # (not a strategy's settings)
        value = getattr(config, name)
        places += value if isinstance(value, list) else [value]
    key = json.dumps([settings, [_stamp(place) for place in places if place]], sort_keys=True, default=str)
    with _CHECKS_LOCK:
        making = _MAKING.setdefault(key, threading.Lock())
    with making:  # asked again while it is being made (Train pressed while the tab checks): made once
        with _CHECKS_LOCK:
            if key in _CHECKS:
                return _CHECKS[key]
        try:
            wait_for_libraries()
            report = data_module(config.modality).inspect_data(config)
            with _CHECKS_LOCK:
                _CHECKS[key] = report
                while len(_CHECKS) > 6:
                    _CHECKS.pop(next(iter(_CHECKS)))
        finally:
            with _CHECKS_LOCK:
                _MAKING.pop(key, None)
    return report


def _stamp(place: str) -> tuple:
    """What changes when the data at a path does: a file's time and size, or those of every file in a folder."""
    if not os.path.isdir(place):
        return (place, (info := os.stat(place)).st_mtime_ns, info.st_size) if os.path.exists(place) else (place,)
    digest = hashlib.sha1()
    for folder, _, files in sorted(os.walk(place)):
        for name in sorted(files):
            with contextlib.suppress(OSError):
                info = os.stat(os.path.join(folder, name))
                digest.update(f"{folder}/{name}:{info.st_mtime_ns}:{info.st_size};".encode())
    return place, digest.hexdigest()


def submit(config: RunConfig, registry: Registry | None = None) -> Run:
    """Check the data, then create a run and queue it; it starts now if a slot is free. Every way in (the
    tabs, `studio train`, the API) comes through here, so none makes a run that can only fail."""
    report = check_data(config)
    if not report.ok:
        raise UnusableData(report)
    registry = registry or Registry()
    run = registry.create(config, status="queued")
    dispatch(registry)
    return registry.get(run.id)


def resume(run_id: str, registry: Registry | None = None) -> Run:
    """Queue a stopped, interrupted or failed run to continue from its latest checkpoint. Any failed run: the tabs
    offer Resume only where runs.resume_may_help, but what failed may have been mended outside the run's settings
    (a model folder completed, the network back for a download), and a script or `studio resume` may try."""
    registry = registry or Registry()
    run = registry.get(run_id)
    if run is None:
        raise ValueError(f"There is no run {run_id!r}.")
    if run.status not in RESUMABLE:
        raise ValueError(f"Run {run_id} is {run.status}; only {', '.join(RESUMABLE)} runs can be resumed.")
    (run.dir / STOP_FILE).unlink(missing_ok=True)
    registry.set_status(run_id, "queued", expect=RESUMABLE, resume=1, queued_at=time.time(),
                        error="", advice="", ended=None)
    dispatch(registry)
    return registry.get(run_id)


def dispatch(registry: Registry | None = None) -> list[str]:
    """Start queued runs while slots are free. Returns the ids started."""
    registry = registry or Registry()
    reconcile(registry)
    started = []
    busy = len(registry.list(status="running")) + len(registry.list(status="starting"))
    for run in registry.queue():
        if busy >= max_concurrent_runs():
            break
        if not registry.set_status(run.id, "starting", expect=("queued",), started=time.time(), pid=None):
            continue  # another process claimed it first
        pid = _spawn_worker(run)
        # Only while it is still "starting": a run cancelled meanwhile stays cancelled (its worker finds it so
        # and exits without training), and a worker already running has recorded its pid itself.
        registry.set_status(run.id, "starting", expect=("starting",), pid=pid)
        started.append(run.id)
        busy += 1
    return started


_spawner: ThreadPoolExecutor | None = None  # set in the server: starts workers at the normal priority


def yield_cpu_to_training() -> None:
    """For the web server: give the training workers priority over request handling on a busy machine.

    Linux keeps a nice value per thread; a new thread inherits its creator's, a child process that of the
    thread that started it, and an unprivileged process can never lower it again. So first start one
    thread at the normal priority that every later worker launch goes through, then raise this thread's
    nice value (STUDIO_SERVER_NICENESS, default 10): the web server's threads, all started from this
    one afterwards, inherit it, and the workers do not."""
    global _spawner
    niceness = int_setting("STUDIO_SERVER_NICENESS", 10)
    if niceness <= 0 or not sys.platform.startswith("linux") or _spawner is not None:
        return
    continue_in_own_session()
    _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-launcher")
    _spawner.submit(lambda: None).result()  # its thread exists now, at the normal priority
    lower_priority(niceness)  # this thread's, and the server's own session's; workers have sessions of their own


def lower_priority(niceness: int) -> None:
    """Raise this thread's nice value (threads started from it afterwards inherit it) and, with autogroup
    scheduling (the default of most desktop and server kernels), where the CPU is first shared fairly between
    sessions whatever the threads' nice values, this session's group's too: call it alone in a session
    (continue_in_own_session)."""
    os.nice(niceness)
    try:
        Path("/proc/self/autogroup").write_text(str(niceness))
    except OSError:
        pass  # no autogroup here: the nice value alone decides


def continue_in_own_session() -> None:
    """The autogroup nice applies to a whole session: lowered in the session of the terminal, the shell
    script or the test runner that started the server, it would slow all of those too. So the server goes
    on in a forked child that leads a session of its own; this process only waits for it, passes on Ctrl-C
    and termination, and exits as it does. Returns in the child."""
    if os.getsid(0) == os.getpid():
        return  # already alone in its session (started with setsid or by a service manager)
    child = os.fork()
    if child == 0:
        os.setsid()
        end_with_parent()
        return
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, lambda received, _frame: os.kill(child, received))
    _, status = os.waitpid(child, 0)
    os._exit(os.waitstatus_to_exitcode(status))


def end_with_parent(sent: int = signal.SIGTERM) -> None:
    """Have the kernel send this process `sent` when its parent dies, even by SIGKILL (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sent)


def _spawn_worker(run: Run) -> int:
    if _spawner is not None:
        return _spawner.submit(_start_worker_process, run).result()
    return _start_worker_process(run)


def _start_worker_process(run: Run) -> int:
    command = [sys.executable, "-m", "studio.worker", str(run.dir)]
    if run.resume:
        command.append("--resume")
    log = open(run.dir / "log.txt", "ab")
    # Keep log.txt readable: no download bars (hub.reporting_download tells a download's progress in lines)
    # or library deprecation chatter between our lines.
    env = dict(os.environ, PYTHONUNBUFFERED="1", STUDIO_HOME=str(run.dir.parent.parent),
               HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning")
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, env=env, cwd=root, close_fds=True)
    log.close()
    _children.append(process)
    return process.pid


_children: list[subprocess.Popen] = []  # reaped now and then so finished workers leave no zombies


def worker_alive(run: Run) -> bool:
    """Whether this run's worker process still exists: same pid, not a zombie, and its command line
    names this run (a recycled pid belongs to someone else)."""
    for child in list(_children):
        if child.poll() is not None:
            _children.remove(child)
    if not run.pid:
        return False
    try:
        process = psutil.Process(run.pid)
        return process.status() != psutil.STATUS_ZOMBIE and any(run.id in part for part in process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # one we may not inspect is another user's: not ours
        return False


def reconcile(registry: Registry | None = None) -> list[str]:
    """Mark runs whose process is gone as interrupted: no run is shown running without a process. A run whose
    folder was deleted by hand leaves the index (the folder is the run; one still training stays, to be
    cancelled): kept, it was offered a resume that could never work, and dispatched, it failed another run's
    worker on its missing log.txt."""
    registry = registry or Registry()
    lost = []
    for run in registry.list():  # (one query: dispatch calls this every few seconds)
        if run.status in ("starting", "running") and worker_alive(run):
            continue
        if not (registry.home / "runs" / run.id).is_dir():  # (this registry's workspace, not $STUDIO_HOME's)
            registry.forget(run.id)
        elif run.status == "starting" and not run.pid and time.time() - (run.started or 0) < 10:
            continue  # claimed by a dispatcher that is launching it this very moment
        elif run.status in ("starting", "running") and registry.set_status(
                run.id, "interrupted", expect=(run.status,), error="The training process ended unexpectedly.",
                advice="Resume the run to continue from its last checkpoint."):
            lost.append(run.id)
    return lost


def request_stop(run_id: str, registry: Registry | None = None) -> str:
    """Stop = save a checkpoint at the next step and exit. A queued run is simply taken off the queue."""
    registry = registry or Registry()
    run = registry.get(run_id)
    if run is None:
        raise ValueError(f"There is no run {run_id!r}.")
    if run.status == "queued":
        registry.set_status(run_id, "stopped", expect=("queued",))
        return "stopped"
    if run.status in ("starting", "running"):
        (run.dir / STOP_FILE).touch()
        return "stopping"
    return run.status


def cancel(run_id: str, registry: Registry | None = None) -> str:
    """Cancel = end the process now, without a checkpoint."""
    registry = registry or Registry()
    run = registry.get(run_id)
    if run is None:
        raise ValueError(f"There is no run {run_id!r}.")
    # Marked cancelled before the process is ended: a server that meanwhile sees the process gone
    # (reconcile) would otherwise call the run interrupted, "ended unexpectedly", and keep it so.
    if not registry.set_status(run_id, "cancelled", expect=ACTIVE):
        return registry.get(run_id).status  # it ended (or was cancelled) just now
    run = registry.get(run_id)  # its pid as of the claim: a worker may have recorded it since the read above
    if run.pid and worker_alive(run):
        try:
            os.killpg(run.pid, signal.SIGTERM)
            psutil.Process(run.pid).wait(timeout=10)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
        except psutil.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
    dispatch(registry)
    return "cancelled"
