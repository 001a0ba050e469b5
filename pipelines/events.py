"""What a training run tells the rest of the studio: its events file, the STOP file, and the one kind of
failure it explains to the user.

Kept free of torch, which the web UI (reading events, writing STOP) must not import: it would add over a
second to the studio's start-up. pipelines.training, where the loop writes these, imports them from here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

STOP_FILE = "STOP"


class TrainingFailure(Exception):
    """A failure we can explain: `cause` is one sentence, `advice` says what to change."""

    def __init__(self, cause: str, advice: str = ""):
        self.cause, self.advice = cause, advice
        super().__init__(f"{cause} {advice}".strip())


# ---- events ----------------------------------------------------------------------------------

class Events:
    """Append-only `events.jsonl`: one JSON object per line, flushed as written, so readers in other
    processes (the UI, the CLI) see each step as soon as it happens."""

    def __init__(self, run_dir: str | Path, write: bool = True):
        self.path = Path(run_dir) / "events.jsonl"
        # Processes other than rank 0 of a multi-process run pass write=False: one writer, one story.
        self._file = open(self.path, "a", encoding="utf-8") if write else None

    def emit(self, kind: str, **data: Any) -> dict:
        event = {"type": kind, "time": round(time.time(), 3), **data}
        if self._file:
            self._file.write(json.dumps(event, default=_jsonable) + "\n")
            self._file.flush()
        return event

    def close(self) -> None:
        if self._file:
            self._file.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # a numpy scalar or a one-element torch tensor (torch is not imported here)
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to events")


def read_events(run_dir: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Events from byte `offset` on, and the offset to continue from. Skips a half-written last line."""
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1
    events = []
    for line in chunk[:end].splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line from a killed writer: skip it, keep the rest
    return events, offset + end


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder without its state.json, written last, is half-made)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def stop_requested(run_dir: str | Path) -> Callable[[], bool]:
    """The should_stop callback the worker passes in: true once someone wrote the STOP file."""
    flag = Path(run_dir) / STOP_FILE
    return flag.exists
