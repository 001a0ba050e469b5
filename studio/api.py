"""The studio's HTTP API for scripts, served by Gradio next to the UI (see README: "Scripting the studio").

    start_run(config_yaml, data_files) -> run id      run_status(run_id) -> dict
    generate(run_id, prompt, base) -> text              stop_run(run_id) -> status
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import yaml

from pipelines import config_class, config_from_dict
from pipelines.config import ConfigError
from studio import jobs
from studio.progress import read_progress
from studio.runs import ACTIVE, Registry
from studio.tabs import widgets


def start_run(config_yaml: str, data_files: list[gr.FileData] | None = None) -> str:
    """Queue a run from config.yaml text. Data paths in it are matched by file name to the uploads."""
    try:
        data = yaml.safe_load(config_yaml)
    except yaml.YAMLError as err:
        raise widgets.refused(f"config_yaml is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise widgets.refused("config_yaml must be a mapping of settings")
    uploads = {Path(_path(f)).name: _path(f) for f in data_files or []}
    try:
        cls = config_class(str(data.get("modality", "")))
        for name in cls.path_fields:
            value = data.get(name)
            if not value:
                continue
            names = value if isinstance(value, list) else [value]
            missing = [n for n in names if Path(n).name not in uploads]
            if missing:
                raise widgets.refused(f"{name}: upload {', '.join(missing)} in data_files")
            resolved = [uploads[Path(n).name] for n in names]
            data[name] = resolved if isinstance(value, list) else resolved[0]
        config = config_from_dict(data)
        return jobs.submit(config).id
    except ConfigError as err:
        raise widgets.refused(f"invalid settings: {err}") from None
    except jobs.UnusableData as err:
        raise widgets.refused(str(err)) from None


def _path(file) -> str:
    if isinstance(file, dict):
        return file.get("path", "")
    return getattr(file, "path", None) or str(file)


def run_status(run_id: str) -> dict:
    registry = Registry()
    run = registry.get(run_id)
    if run is None:
        raise widgets.refused(f"There is no run {run_id!r}.")
    progress = read_progress(run.dir)
    return {"id": run.id, "name": run.name, "modality": run.modality, "status": run.status,
            "step": progress.step, "total_steps": progress.total_steps, "loss": progress.last_loss,
            "losses": progress.losses, "evals": [{k: v for k, v in e.items() if k != "type"} for e in progress.evals],
            "error": run.error, "advice": run.advice, "queue_position": registry.queue_position(run.id)}


def generate(run_id: str, prompt: str, base: bool = False) -> str:
    from studio import tryit
    run = Registry().get(run_id)
    if run is None:
        raise widgets.refused(f"There is no run {run_id!r}.")
    if run.modality != "llm":
        raise widgets.refused("generate answers language-model runs; use the tab for image and speech runs")
    return tryit.generate_text(run.config(), run.dir, prompt, use_adapter=not base)


def stop_run(run_id: str) -> str:
    """'stopping' (a checkpoint at the next step), or 'stopped' for a queued run taken off the queue."""
    run = Registry().get(run_id)
    if run is None:
        raise widgets.refused(f"There is no run {run_id!r}.")
    if run.status not in ACTIVE:  # as `studio stop` says: not answered as if the stop had been done
        raise widgets.refused(f"Run {run_id} has already ended ({run.status}); there is nothing to stop.")
    return jobs.request_stop(run_id)
