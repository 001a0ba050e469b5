"""A run's state as read from its events.jsonl, folded incrementally.

The CLI's progress bar, `studio runs` and the UI's live panels all read runs this way, so they can
never disagree with each other or with the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipelines.events import read_events


@dataclass
class Progress:
    run_dir: Path
    offset: int = 0
    status: str = ""
    error: str = ""
    advice: str = ""
    step: int = 0
    total_steps: int = 0
    unit: str = "tokens"
    units_per_s: float = 0.0
    eta_s: float = 0.0
    elapsed_s: float = 0.0
    lr: float = 0.0
    processes: int = 1
    global_batch: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    evaluated_on: str = "validation"  # or "training": a speech run with no validation clips measures its own
    loading: str = ""  # what loading the model says while a run has no step yet (a download's progress)

    def update(self) -> list[dict]:
        """Read events written since the last call; returns them."""
        events, self.offset = read_events(self.run_dir, self.offset)
        for event in events:
            kind = event.get("type")
            if kind == "status":
                self.status = event["status"]
                self.error, self.advice = event.get("error", ""), event.get("advice", "")
            elif kind == "started":
                self.total_steps, self.unit = event["total_steps"], event.get("unit", self.unit)
                self.processes, self.global_batch = event.get("processes", 1), event.get("global_batch", 0)
                self.step = event.get("resumed_from", 0)
                # A resumed run replays nothing: drop points past the checkpoint it resumed from.
                self.losses = [(s, v) for s, v in self.losses if s <= self.step]
                self.evals = [e for e in self.evals if e["step"] <= self.step]
            elif kind == "step":
                self.step, self.total_steps = event["step"], event["total_steps"]
                self.losses.append((event["step"], event["loss"]))
                self.units_per_s, self.eta_s = event.get("units_per_s", 0.0), event.get("eta_s", 0.0)
                self.elapsed_s, self.lr = event.get("elapsed_s", 0.0), event.get("lr", 0.0)
            elif kind == "loading":
                self.loading = event["message"]
            elif kind == "data":
                self.evaluated_on = event.get("eval_on", self.evaluated_on)
            elif kind == "eval":
                self.evals.append(event)
            elif kind == "sample":
                self.samples.append(event)
            elif kind == "checkpoint":
                name = Path(event["path"]).name
                if name not in self.checkpoints:
                    self.checkpoints.append(name)
        return events

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None

    def best(self, metric: str = "eval_loss") -> float | None:
        values = [e[metric] for e in self.evals if metric in e]
        return min(values) if values else None

    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0


def read_progress(run_dir: str | Path) -> Progress:
    progress = Progress(Path(run_dir))
    progress.update()
    return progress


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
