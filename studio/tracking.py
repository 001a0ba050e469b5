"""Optional experiment tracking: a run's events.jsonl replayed into TensorBoard event files (and into
MLflow when it is installed).

Off by default. One switch turns it on for every run: STUDIO_TRACKING=tensorboard (or "tensorboard,mlflow")
in the environment, or the Runs tab's switch, which writes <workspace>/tracking.json. events.jsonl stays the
truth: an export is rebuilt from it whole each time, so exporting twice, or after a resume, never duplicates
points.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from pipelines.hub import workspace
from pipelines.events import read_events

TENSORBOARD_DIR = "tensorboard"
SETTINGS_FILE = "tracking.json"


def mlflow_available() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def enabled(home: Path | None = None) -> bool:
    """Whether runs are logged to TensorBoard (and MLflow) as they change: the one switch."""
    env = os.environ.get("STUDIO_TRACKING", "").strip().lower()
    if env:
        return env not in ("0", "off", "false", "no", "none")
    try:
        return bool(json.loads(((home or workspace()) / SETTINGS_FILE).read_text()).get("enabled"))
    except (OSError, ValueError, AttributeError):
        return False


def set_enabled(on: bool, home: Path | None = None) -> None:
    path = (home or workspace()) / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"enabled": bool(on)}))
    os.replace(tmp, path)


def _scalars(events: list[dict]) -> list[tuple[str, int, float, float]]:
    """(tag, step, value, wall time) for every number worth plotting, after dropping the points a resumed
    run went back over (as studio.progress does)."""
    points: list[tuple[str, int, float, float]] = []
    for event in events:
        kind, when = event.get("type"), event.get("time", 0.0)
        if kind == "started":
            resumed_from = event.get("resumed_from", 0)
            points = [p for p in points if p[1] <= resumed_from]
        elif kind == "step":
            step = event["step"]
            for key, tag in (("loss", "train/loss"), ("lr", "train/learning_rate"),
                             ("units_per_s", "train/throughput")):
                if isinstance(event.get(key), (int, float)):
                    points.append((tag, step, float(event[key]), when))
        elif kind == "eval":
            for key, value in event.items():
                if key not in ("type", "time", "step") and isinstance(value, (int, float)):
                    points.append((f"eval/{key.removeprefix('eval_')}", event["step"], float(value), when))
    return points


def export_tensorboard(run_dir: str | Path) -> Path:
    """Write runs/<id>/tensorboard/ from events.jsonl: scalars (loss, learning rate, throughput, every
    validation metric), text and image samples, and the config. Returns the folder."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    events, _ = read_events(run_dir)
    target = run_dir / TENSORBOARD_DIR
    shutil.rmtree(target, ignore_errors=True)  # rebuilt whole: events.jsonl is the truth
    writer = SummaryWriter(log_dir=str(target), flush_secs=3600)
    try:
        for tag, step, value, when in _scalars(events):
            writer.add_scalar(tag, value, step, walltime=when)
        config = run_dir / "config.yaml"
        if config.exists():
            writer.add_text("config", "```\n" + config.read_text(encoding="utf-8") + "\n```", 0)
        for n, sample in enumerate(e for e in events if e.get("type") == "sample"):
            step = sample.get("step", 0)
            if sample.get("image") and (run_dir / sample["image"]).exists():
                import numpy as np
                from PIL import Image
                pixels = np.asarray(Image.open(run_dir / sample["image"]).convert("RGB"))
                writer.add_image(f"samples/{sample.get('prompt', 'image')[:60]}", pixels, step, dataformats="HWC")
            else:
                text = "  \n".join(f"**{k}:** {v}" for k, v in sample.items() if k not in ("type", "time", "step"))
                writer.add_text("samples", text, step)
        status = [e["status"] for e in events if e.get("type") == "status"]
        if status:
            writer.add_text("status", status[-1], 0)
    finally:
        writer.close()
    return target


def export_mlflow(run_dir: str | Path) -> str | None:
    """Log the run to MLflow (its usual MLFLOW_TRACKING_URI, else <workspace>/mlruns). Returns the MLflow
    run id, or None when mlflow is not installed. The MLflow run is tagged with our run id and replaced on
    each export, so it mirrors events.jsonl."""
    if not mlflow_available():
        return None
    import mlflow
    import yaml

    run_dir = Path(run_dir)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri((workspace() / "mlruns").resolve().as_uri())
    mlflow.set_experiment("lora-studio")
    client = mlflow.tracking.MlflowClient()
    experiment = client.get_experiment_by_name("lora-studio")
    for old in client.search_runs([experiment.experiment_id], f"tags.studio_run_id = '{run_dir.name}'"):
        client.delete_run(old.info.run_id)
    events, _ = read_events(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    with mlflow.start_run(run_name=str(config.get("name") or run_dir.name)) as active:
        mlflow.set_tag("studio_run_id", run_dir.name)
        mlflow.log_params({k: str(v)[:250] for k, v in (config or {}).items()})
        for tag, step, value, when in _scalars(events):
            mlflow.log_metric(tag.replace("/", "_"), value, step=step, timestamp=int(when * 1000))
        return active.info.run_id


def sync(run_dir: str | Path, force: bool = False) -> list[str]:
    """Export a run to every tracker that is switched on (or to all, with force). Meant to be called at
    each status change and checkpoint; cheap for the tiny event logs runs write. Returns what was written."""
    if not (force or enabled()):
        return []
    written = [str(export_tensorboard(run_dir))]
    try:
        mlflow_id = export_mlflow(run_dir)
    except Exception as err:  # a tracking server being down must never fail a run
        written.append(f"mlflow failed: {err}")
    else:
        if mlflow_id:
            written.append(f"mlflow run {mlflow_id}")
    return written


def stale(run_dir: str | Path) -> bool:
    """Whether the TensorBoard export is missing or older than the run's events."""
    run_dir = Path(run_dir)
    events, target = run_dir / "events.jsonl", run_dir / TENSORBOARD_DIR
    if not events.exists():
        return False
    if not target.exists():
        return True
    newest = max((p.stat().st_mtime for p in target.iterdir()), default=0.0)
    return events.stat().st_mtime > newest
