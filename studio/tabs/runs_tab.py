"""The Runs tab: every run of every tab in one table; select one to see its curve, config and log."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from pipelines import MODALITIES
from studio import jobs
from studio.progress import format_seconds
from studio.runs import ACTIVE, FINAL, Registry
from studio.tabs import widgets

COLUMNS = ["id", "name", "modality", "base model", "status", "progress", "loss", "best eval loss", "created",
           "duration"]


def runs_table(modality: str, status: str) -> pd.DataFrame:
    registry = Registry()
    jobs.reconcile(registry)
    rows = []
    for run in registry.list(modality=modality or None, status=status or None):
        progress = widgets.progress_of(run.id, registry)
        end = run.ended if run.status in FINAL and run.ended else time.time()
        best = progress.best()
        rows.append({"id": run.id, "name": run.name, "modality": MODALITIES.get(run.modality, run.modality),
                     "base model": run.base_model, "status": run.status,
                     "progress": f"{progress.step}/{progress.total_steps}" if progress.total_steps else "",
                     "loss": round(progress.last_loss, 4) if progress.last_loss is not None else None,
                     "best eval loss": round(best, 4) if best is not None else None,
                     "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.created)),
                     "duration": format_seconds(end - run.started) if run.started else ""})
    return pd.DataFrame(rows, columns=COLUMNS)


def select_run(table: pd.DataFrame, event: gr.SelectData):
    row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
    run_id = table.iloc[row]["id"]
    return run_id, details(run_id)


def details(run_id: str | None) -> str:
    run = Registry().get(run_id) if run_id else None
    if run is None:
        return ""
    config = (run.dir / "config.yaml").read_text()
    return f"**{run.name}** · `{run.id}` · {run.status}\n\n```yaml\n{config}```"


def build() -> None:
    selected = gr.State(None)
    with gr.Row():
        modality = gr.Dropdown([("all", "")] + [(label, key) for key, label in MODALITIES.items()], value="",
                               label="Tab", scale=1)
        status = gr.Dropdown(["", *ACTIVE, *FINAL], value="", label="Status", scale=1)
        refresh = gr.Button("Refresh", scale=0)
    table = gr.Dataframe(runs_table("", ""), interactive=False, wrap=True, max_height=360, label="Runs")
    gr.Markdown("Select a row to see the run.")
    panel = widgets.live_panel("runs")
    info = gr.Markdown()

    for trigger in (modality.change, status.change, refresh.click):
        trigger(runs_table, [modality, status], table, api_visibility="private")
    table.select(select_run, table, [selected, info], api_visibility="private").then(
        widgets.live_values, selected, panel.outputs(), api_visibility="private")
    timer = gr.Timer(3)
    timer.tick(runs_table, [modality, status], table, api_visibility="private", show_progress="hidden")
    timer.tick(widgets.live_values, selected, panel.outputs(), api_visibility="private", show_progress="hidden")
    widgets.wire_controls(panel, selected)
