"""Where a base model comes from: a built-in preset, a local folder, or the Hugging Face hub.

All three modalities resolve `base_model` the same way and fail the same way: one sentence that says
what went wrong and what to do instead, never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

from pipelines.events import TrainingFailure

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
T = TypeVar("T")


class ModelUnavailable(TrainingFailure):
    """The base model cannot be loaded; the message says why in one sentence."""


def workspace() -> Path:
    """All studio state lives here: $STUDIO_HOME, default ./workspace."""
    return Path(os.environ.get("STUDIO_HOME", "workspace")).resolve()


def allowed_model_roots() -> list[Path]:
    """Folders a user may load local models from (STUDIO_MODEL_DIRS, ':'-separated); the workspace
    and the home folder by default, so a browser user cannot point the server at arbitrary paths."""
    raw = os.environ.get("STUDIO_MODEL_DIRS")
    roots = [Path(p) for p in raw.split(os.pathsep) if p] if raw else [workspace(), Path.home()]
    return [r.expanduser().resolve() for r in roots]


def resolve_source(base_model: str, presets: dict) -> tuple[str, str]:
    """("preset", name) | ("local", absolute path) | ("hub", repo id). Raises ModelUnavailable."""
    text = base_model.strip()
    if text in presets:
        return "preset", text
    path = Path(text).expanduser()
    if text.startswith(("/", ".", "~")) or path.exists():
        path = path.resolve()
        if not any(path == root or root in path.parents for root in allowed_model_roots()):
            raise ModelUnavailable(f"The model path {path} is outside the folders models may be loaded from.",
                                   "Move it under your home or workspace folder, or add its parent to "
                                   "STUDIO_MODEL_DIRS.")
        if not path.exists():
            raise ModelUnavailable(f"The model path {path} does not exist.", "Check the folder name.")
        return "local", str(path)
    if HUB_ID.match(text) and ".." not in text:
        return "hub", text
    raise ModelUnavailable(f"'{text}' is neither a built-in preset, an existing folder nor a hub id.",
                           f"Use one of {', '.join(presets)}, an id like 'Qwen/Qwen2.5-0.5B-Instruct', "
                           "or a local folder.")


# host -> (when asked, the answer): a data check is run again at each change of a setting, and on a machine
# offline whose DNS is slow each one waited the whole timeout.
_reachable: dict[tuple[str, int], tuple[float, bool]] = {}
REACHABLE_KEPT_S = 60.0


def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """A quick TCP check of a download host, so an offline machine gets its answer in seconds, not after
    minutes of retries; the answer is kept a minute. STUDIO_OFFLINE=1 or HF_HUB_OFFLINE=1 answers no without
    asking."""
    if any(os.environ.get(flag, "0").lower() in ("1", "true", "yes") for flag in ("STUDIO_OFFLINE", "HF_HUB_OFFLINE")):
        return False
    parsed = urlparse(url)
    host = (parsed.hostname or "", parsed.port or 443)
    asked, answer = _reachable.get(host, (-REACHABLE_KEPT_S, False))
    if time.monotonic() - asked < REACHABLE_KEPT_S:
        return answer
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection(host, timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo ignores socket timeouts; a daemon thread bounds the whole check.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    _reachable[host] = (time.monotonic(), bool(result and result[0]))
    return _reachable[host][1]


def hub_reachable(timeout: float = 3.0) -> bool:
    return host_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


# One preset built at a time in a process: the builds seed torch's global generator, and a build's temporary
# name is the process's (two data checks of the tabs, in two threads, once built tiny-whisper at once).
building_presets = threading.Lock()


def publish_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder (a materialised preset) under a temporary name and rename it into place, so a
    half-written folder never looks complete and two processes building it at once both end up fine.

    Never inside a multi-process run's process group: there transformers' save_pretrained writes weights on
    rank 0 only, and another rank would publish a folder without them (the ranks' launcher builds presets)."""
    import torch.distributed
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise RuntimeError(f"{target.name} must be built before the training processes join their process group")
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process built it first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def error_text(err: BaseException, limit: int = 240) -> str:
    """A library's error as one sentence for a message: its lines joined (their first line alone stopped
    mid-sentence: "...from one of: Check that..."), at most `limit` characters, without the closing stop."""
    text = " ".join(str(err).split()) or type(err).__name__
    return (text[:limit].rsplit(" ", 1)[0] + " …" if len(text) > limit else text).rstrip(".:")


def remote_code_refused(err: BaseException, model: str) -> ModelUnavailable | None:
    """transformers' refusal to run the Python code a model ships with (auto_map in its config.json) while
    trust_remote_code is off, as one sentence: its own text, cut to a message's length, lost its advice
    ("pass trust_remote_code=True") and took the folder for an incomplete one. None for any other error."""
    if not (isinstance(err, ValueError) and "trust_remote_code=True" in str(err)):
        return None
    return ModelUnavailable(f'The model {model} ships its own Python code, which runs only with "Trust remote '
                            'code" on.',
                            'Tick "Trust remote code" (Advanced; `trust_remote_code: true` in a config file) only if '
                            "you trust the model's author: its code runs on this machine.")


# Where a download's progress is told: printed (a worker's output is its run's log.txt); the worker also
# makes each line an event, so the live panel's status line and `studio train` show it.
download_progress: Callable[[str], None] = print


def _bytes_in(path: Path) -> int:
    """The bytes in a file or under a folder; 0 for neither (not downloaded yet)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a part renamed into place meanwhile
                info = os.lstat(os.path.join(root, name))
                # (the hub cache's snapshots/ hold links to its blobs/: counted once, as the blobs)
                total += 0 if stat.S_ISLNK(info.st_mode) else info.st_size
    return total


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


@contextlib.contextmanager
def reporting_download(where: Path, what: str, every_s: float = 5.0):
    """While the block runs (a model's first load, which downloads it into `where`, a folder or a file), tell
    every few seconds how much has arrived and how fast. A model of gigabytes otherwise showed "Loading the
    model" for minutes with nothing moving; the libraries' own progress bars are off (in a log file each
    becomes one line of carriage returns). Nothing is told when nothing arrives (the model was cached)."""
    start = _bytes_in(where)
    began = time.monotonic()
    done = threading.Event()

    def watch() -> None:
        last = start
        while not done.wait(every_s):
            now = _bytes_in(where)
            if now > last:
                rate = (now - start) / (time.monotonic() - began)
                download_progress(f"Downloading {what}: {_size(now - start)} so far ({_size(rate)}/s).")
            last = now

    watcher = threading.Thread(target=watch, daemon=True, name="download-progress")
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
    arrived = _bytes_in(where) - start  # (not said when the load failed)
    if arrived > 0:
        download_progress(f"Downloaded {what}: {_size(arrived)} in {time.monotonic() - began:.0f} s.")


def load_from_hub(loader: Callable[..., T], repo_id: str, **kwargs) -> T:
    """Call a `from_pretrained`-style loader for a hub id, turning network and access errors into
    one clear sentence. Offline, it still loads what the local cache already holds."""
    online = hub_reachable()
    try:
        if not online:
            return loader(repo_id, local_files_only=True, **kwargs)
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
        with reporting_download(Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model"),
                                repo_id):
            return loader(repo_id, local_files_only=False, **kwargs)
    except Exception as err:  # the hub client raises many kinds; sort them by what the user can do
        name = type(err).__name__
        text = str(err)
        if refused := remote_code_refused(err, f"'{repo_id}'"):
            raise refused from None
        if "Gated" in name or "gated" in text or "401" in text:
            raise ModelUnavailable(f"'{repo_id}' is a gated model on the Hugging Face hub and needs your access token.",
                                   "Accept its licence on the hub, then set HF_TOKEN or run `hf auth login`.") from None
        if "RepositoryNotFound" in name or "404" in text:
            raise ModelUnavailable(f"There is no model '{repo_id}' on the Hugging Face hub.",
                                   "Check the spelling of the id.") from None
        if not online:
            raise ModelUnavailable(f"'{repo_id}' cannot be downloaded: this machine cannot reach the Hugging Face hub "
                                   "and the model is not in the local cache.",
                                   "Pick a built-in tiny preset, or download the model on a connected machine "
                                   "and choose its folder.") from None
        raise ModelUnavailable(f"'{repo_id}' could not be loaded from the hub: {error_text(err)}.",
                               "Check the id, your network and your disk space.") from None
