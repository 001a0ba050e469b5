"""The Runs tab: every run of every tab in one table. Filter, rename, delete; select one to see its
config, curves, samples, log and files, and to stop, resume, clone or export it to TensorBoard; pick
several to overlay their curves and see only the settings that differ.

The functions above build() are plain functions of run ids (tests call them directly); build() wires them.
"""

from __future__ import annotations

import threading
import time
import zlib
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from pipelines import MODALITIES
from pipelines.config import ConfigError
from studio import jobs, tracking
from studio.progress import Progress, format_seconds
from studio.runs import ACTIVE, FINAL, Registry, Run
from studio.tabs import widgets

COLUMNS = ["id", "name", "modality", "base model", "status", "progress", "best validation", "created", "duration"]
STATUSES = ["queued", "running", "completed", "stopped", "failed", "interrupted", "cancelled", "starting"]
TRAIN_LOSS, TRAIN_SMOOTHED = "train loss", "train loss (smoothed)"
NO_SELECTION = "Select a run in the table to see it here."
NOTHING_SELECTED = "Select a run first."


# ---- the table ---------------------------------------------------------------------------------

def best_validation(progress: Progress) -> str:
    """The run's best validation result: word error rate for speech runs that measure it, else loss."""
    for metric, label in (("wer", "WER"), ("eval_loss", "loss")):
        best = progress.best(metric)
        if best is not None:
            return f"{label} {best:.4f}"
    return ""


def status_label(run: Run, queue: list[str]) -> str:
    if run.status == "queued" and run.id in queue:
        return f"queued (#{queue.index(run.id) + 1})"
    return run.status


def runs_table(modality: str = "", status: str = "", registry: Registry | None = None) -> pd.DataFrame:
    """One row per run, newest first, filtered by modality and status ("" = all)."""
    registry = registry or Registry()
    jobs.reconcile(registry)
    queue = [r.id for r in registry.queue()]
    rows = []
    for run in registry.list(modality=modality or None, status=status or None):
        progress = widgets.progress_of(run.id, registry)
        end = run.ended if run.status in FINAL and run.ended else time.time()
        rows.append({"id": run.id, "name": run.name, "modality": MODALITIES.get(run.modality, run.modality),
                     "base model": run.base_model, "status": status_label(run, queue),
                     "progress": (f"{progress.step}/{progress.total_steps} ({100 * progress.fraction():.0f}%)"
                                  if progress.total_steps else ""),
                     "best validation": best_validation(progress),
                     "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.created)),
                     # this session's wall time, or the training time of all sessions where the run was
                     # resumed (a 3000-step run resumed at its end showed "9s")
                     "duration": format_seconds(max(end - run.started, progress.elapsed_s)) if run.started else ""})
    return pd.DataFrame(rows, columns=COLUMNS)


def table_version(registry: Registry | None = None) -> str:
    """What the page's poller (studio/tabs/live.js) compares to know when the shown Runs table is out of
    date, and how: "<runs>:<progress>". The first part changes when a run comes, goes, is renamed or changes
    status or place in the queue (the page refreshes the table at once), the second when a run in training
    moves on (the page refreshes at most every TABLE_PROGRESS_EVERY_MS): a Gradio event costs the browser
    far more than this answer costs the server. Filters aside: a change the filtered table does not show
    costs one refresh that sends nothing."""
    registry = registry or Registry()
    queue = [r.id for r in registry.queue()]
    runs = registry.list()
    listed = "|".join(f"{run.id}/{run.name}/{status_label(run, queue)}" for run in runs)
    moving = "|".join(f"{run.id}/{progress.step}/{len(progress.evals)}" for run in runs
                      if run.status in ACTIVE and (progress := widgets.progress_of(run.id, registry)))
    return f"{zlib.crc32(listed.encode()):08x}:{zlib.crc32(moving.encode()):08x}"


def version_mark(version: str) -> str:
    return f'<span data-version="{version}"></span>'


def run_label(run: Run) -> str:
    """A name that tells runs apart in legends and column headers even when two share a name."""
    return f"{run.name} ({run.id[-4:]})"


def run_choices(registry: Registry | None = None) -> list[tuple[str, str]]:
    return [(run_label(r), r.id) for r in (registry or Registry()).list()]


# ---- one run -----------------------------------------------------------------------------------

def run_files(run: Run) -> pd.DataFrame:
    """The run folder's main files and folders (checkpoints one per row), with sizes."""
    def size(path: Path) -> int:
        return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    def human(n: int) -> str:
        for unit in ("B", "KB", "MB", "GB"):
            if n < 1024 or unit == "GB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024
        return ""

    rows = []
    if run.dir.is_dir():
        for path in sorted(run.dir.iterdir(), key=lambda p: (p.is_dir(), p.name)):
            if path.name == "checkpoints" and path.is_dir():
                steps = sorted((p for p in path.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
                for checkpoint in steps:
                    complete = (checkpoint / "state.json").exists()
                    rows.append({"path": f"checkpoints/{checkpoint.name}/",
                                 "kind": "checkpoint" if complete else "checkpoint (incomplete)",
                                 "size": human(size(checkpoint))})
                continue
            rows.append({"path": path.name + ("/" if path.is_dir() else ""),
                         "kind": "folder" if path.is_dir() else "file", "size": human(size(path))})
    return pd.DataFrame(rows, columns=["path", "kind", "size"])


def run_details(run_id: str | None, registry: Registry | None = None) -> tuple[str, str, pd.DataFrame | None, str]:
    """(summary, config.yaml text, files, current name) of the selected run."""
    registry = registry or Registry()
    run = registry.get(run_id) if run_id else None
    if run is None:
        return NO_SELECTION, "", None, ""
    config = run.dir / "config.yaml"
    text = config.read_text(encoding="utf-8") if config.exists() else "(config.yaml is missing)"
    summary = (f"**{run.name}** · `{run.id}` · {MODALITIES.get(run.modality, run.modality)} · "
               f"{run.base_model} · **{run.status}**\n\nFolder: `{run.dir}`")
    return summary, text, run_files(run), run.name


def rename_run(run_id: str | None, name: str, registry: Registry | None = None) -> str:
    """Rename in the index and in the run's config.yaml. Returns a message for the user."""
    registry = registry or Registry()
    run = registry.get(run_id) if run_id else None
    if run is None:
        raise ValueError(NOTHING_SELECTED)
    name = (name or "").strip()
    if not name:
        raise ValueError("Type the new name first.")
    try:
        registry.rename(run.id, name)
    except ConfigError as err:  # said of the name typed, not of the setting ("name: may hold only …")
        raise ValueError(f"The name '{name}' " + "; ".join(why for _, why in err.problems) + ".") from None
    return f"Renamed `{run.id}` to **{name}**."


def delete_run(run_id: str | None, registry: Registry | None = None) -> str:
    """Delete the run's folder and its row. Refuses starting/running runs (ValueError with the reason)."""
    registry = registry or Registry()
    run = registry.get(run_id) if run_id else None
    if run is None:
        raise ValueError(NOTHING_SELECTED)
    if run.status == "queued":
        jobs.request_stop(run.id, registry)  # off the queue first, so no dispatcher starts it meanwhile
    registry.delete(run.id)
    widgets._progress.pop(run.id, None)
    return f"Deleted run **{run.name}** (`{run.id}`) and its folder."


# ---- comparing -----------------------------------------------------------------------------------

def metric_choices(run_ids: list[str] | None, registry: Registry | None = None) -> list[str]:
    """Curves the runs can be compared on: training loss, then every validation metric any of them logged."""
    registry = registry or Registry()
    found: list[str] = []
    for run_id in run_ids or []:
        progress = widgets.progress_of(run_id, registry)
        for event in progress.evals if progress else []:
            for key, value in event.items():
                if key not in ("type", "time", "step") and isinstance(value, (int, float)) and key not in found:
                    found.append(key)
    return [TRAIN_SMOOTHED, TRAIN_LOSS, *found]


def compare_frame(run_ids: list[str] | None, metric: str = TRAIN_SMOOTHED,
                  registry: Registry | None = None) -> pd.DataFrame | None:
    """Long frame (step, value, run) with one series per run, for a LinePlot coloured by run.
    None (not an empty frame) when there is nothing to draw: an empty frame leaves an empty colour scale."""
    registry = registry or Registry()
    parts = []
    for run_id in run_ids or []:
        run = registry.get(run_id)
        progress = widgets.progress_of(run_id, registry)
        if run is None or progress is None:
            continue
        if metric in (TRAIN_LOSS, TRAIN_SMOOTHED):
            steps = [s for s, _ in progress.losses]
            values = [v for _, v in progress.losses]
            if metric == TRAIN_SMOOTHED:
                values = widgets.smoothed(values)
        else:
            points = [(e["step"], e[metric]) for e in progress.evals if isinstance(e.get(metric), (int, float))]
            steps, values = [s for s, _ in points], [v for _, v in points]
        if steps:
            parts.append(pd.DataFrame({"step": steps, "value": values, "run": run_label(run)}))
    return pd.concat(parts, ignore_index=True) if parts else None


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(_shown, value))
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # epochs 1000, lora_alpha 32: as typed, not 1000.0
    return "" if value is None else str(value)


def _relative(value: Any, folder: Path) -> Any:
    if isinstance(value, list):
        return [_relative(v, folder) for v in value]
    if isinstance(value, str) and value:
        try:
            return str(Path(value).resolve().relative_to(folder.resolve()))
        except ValueError:
            return value
    return value


def config_diff(run_ids: list[str] | None, registry: Registry | None = None) -> pd.DataFrame | None:
    """The settings whose values differ between the runs (one column per run); None for fewer than two."""
    registry = registry or Registry()
    runs = [r for r in (registry.get(i) for i in run_ids or []) if r is not None]
    if len(runs) < 2:
        return None
    configs = []
    for run in runs:
        try:
            config = run.config()
        except Exception:  # an unreadable config still shows up, as missing values
            configs.append({})
            continue
        values = config.to_dict()
        for key in config.path_fields:  # each run's own copy of the data: compare them as the run sees them
            values[key] = _relative(values.get(key), run.dir)
        configs.append(values)
    keys = [k for k in dict.fromkeys(k for c in configs for k in c) if k != "name"]
    rows = []
    for key in keys:
        values = [_shown(c.get(key)) for c in configs]
        if len(set(values)) > 1:
            rows.append({"setting": key, **{run_label(r): v for r, v in zip(runs, values)}})
    return pd.DataFrame(rows, columns=["setting", *[run_label(r) for r in runs]])


# ---- clone ---------------------------------------------------------------------------------------

def _tab_module(modality: str):
    from studio.tabs import image, llm, speech
    return {"llm": llm, "image": image, "speech": speech}[modality]


def _tab_form(modality: str) -> widgets.TabForm:
    return _tab_module(modality).FORM_SPEC


def clone_values(run_id: str | None, registry: Registry | None = None) -> tuple[str, list[Any]]:
    """(modality, values) for that tab's form, in TabForm order plus its message: uploads (the run's own
    copies of its data), base model, name, settings, message. What "Load config" would fill in."""
    registry = registry or Registry()
    run = registry.get(run_id) if run_id else None
    if run is None:
        raise ValueError(NOTHING_SELECTED)
    form = _tab_form(run.modality)
    values = list(form.load(str(run.dir / "config.yaml")))
    values[len(form.upload_fields) + 1] = f"{run.name[:74]}-clone"  # a valid name: no brackets, 80 characters
    values[-1] = (f"Cloned from run **{run.name}** (`{run.id}`): change what you like, then press **Train** "
                  "to start a new run.")
    return run.modality, values


# ---- the tab ---------------------------------------------------------------------------------------

_tracking_lock = threading.Lock()


def sync_tracking(registry: Registry | None = None) -> None:
    """With tracking switched on, bring each finished run's TensorBoard/MLflow export up to date."""
    if not tracking.enabled():
        return
    with _tracking_lock:
        for run in (registry or Registry()).list():
            if run.status in FINAL and tracking.stale(run.dir):
                try:
                    tracking.sync(run.dir)
                except Exception as err:  # one bad run must not stop the table from showing
                    print(f"tracking export of {run.id} failed: {err}")


def _panel_values(run_id: str | None) -> list[Any]:
    values = widgets.live_values(run_id)
    if not run_id or Registry().get(run_id) is None:
        values[0] = NO_SELECTION
    return values


def build(tabs: gr.Tabs | None = None, targets: dict[str, list] | None = None,
          run_states: dict[str, gr.Textbox] | None = None) -> dict[str, Any]:
    """`tabs` and `targets` (per modality, the components its Load config fills, in TabForm.load's order)
    let Clone switch to the run's tab with its settings filled in; `run_states` (per modality, the run its
    tab shows) let Open show the run there, to try and export it."""
    targets, run_states = targets or {}, run_states or {}
    selected = gr.State(None)
    shown = gr.State("")  # the table last sent, so the timer sends it again only when it changed

    with gr.Row():
        modality = gr.Dropdown([("all", "")] + [(label, key) for key, label in MODALITIES.items()], value="",
                               label="Tab", scale=1, elem_id="runs-filter-modality")
        status = gr.Dropdown([("all", "")] + [(s, s) for s in STATUSES], value="", label="Status", scale=1,
                             elem_id="runs-filter-status")
        refresh = gr.Button("Refresh", scale=0)
        # live.js compares the version the table was made at with the server's and presses the hidden button.
        refresh_quietly = gr.Button("Refresh table", elem_id="runs-table-refresh", elem_classes=["live-refresh"])
        table_made_at = gr.HTML(version_mark(""), elem_id="runs-table-version", elem_classes=["live-refresh"])
        track = gr.Checkbox(tracking.enabled(), label="Log runs to TensorBoard"
                            + (" and MLflow" if tracking.mlflow_available() else ""), scale=1,
                            info="Writes runs/<id>/tensorboard/ for each finished run. Off by default.",
                            elem_id="runs-tracking")
    # Widths set, not fitted to content: fitted, "best validation" stood one letter a line and the table ran
    # wider than the page.
    table = gr.Dataframe(None, headers=COLUMNS, interactive=False, wrap=True, max_height=360, label="Runs",
                         elem_id="runs-table",
                         column_widths=["17%", "17%", "10%", "10%", "9%", "9%", "9%", "11%", "8%"])
    gr.Markdown("Select a row to see the run. Pick two or more under **Compare** to overlay their curves.")

    gr.Markdown("### Selected run")
    summary = gr.Markdown(NO_SELECTION, elem_id="runs-selected")
    with gr.Row():
        new_name = gr.Textbox(label="Name", scale=2, elem_id="runs-name")
        rename = gr.Button("Rename", scale=0, elem_id="runs-rename")
        open_run = gr.Button("Open in its tab", scale=0, elem_id="runs-open", visible=bool(run_states))
        clone = gr.Button("Clone", scale=0, elem_id="runs-clone")
        export_tb = gr.Button("Export to TensorBoard", scale=0, elem_id="runs-export-tensorboard")
        delete = gr.Button("Delete", variant="stop", scale=0, elem_id="runs-delete")
    with gr.Row(visible=False) as confirm_row:
        confirm_text = gr.Markdown(elem_id="runs-confirm-text")
        confirm = gr.Button("Yes, delete it", variant="stop", scale=0, elem_id="runs-confirm-delete")
        keep = gr.Button("Keep it", scale=0, elem_id="runs-keep")
    message = gr.Markdown(elem_id="runs-message")
    clone_file = gr.File(label="config.yaml", visible=False, elem_id="runs-clone-file")
    panel = widgets.live_panel("runs")
    panel.status.value = NO_SELECTION
    with gr.Accordion("Config", open=False):
        config = gr.Code(language="yaml", interactive=False, show_label=False, elem_id="runs-config")
    with gr.Accordion("Files", open=False):
        files = gr.Dataframe(None, headers=["path", "kind", "size"], interactive=False, max_height=300,
                             show_label=False, elem_id="runs-files")

    gr.Markdown("### Compare")
    with gr.Row():
        compare_runs = gr.Dropdown([], value=[], multiselect=True, label="Runs to compare", scale=3,
                                   elem_id="runs-compare-select")
        metric = gr.Dropdown([TRAIN_SMOOTHED, TRAIN_LOSS], value=TRAIN_SMOOTHED, label="Curve", scale=1,
                             elem_id="runs-compare-metric")
        compare = gr.Button("Compare", scale=0, elem_id="runs-compare")
    compare_plot = gr.LinePlot(None, x="step", y="value", color="run", title="Runs compared", height=320,
                               x_title="step", y_title=TRAIN_SMOOTHED, elem_id="runs-compare-plot")
    diff = gr.Dataframe(None, label="Settings that differ", interactive=False, wrap=True, visible=False,
                        elem_id="runs-diff")

    # -- handlers --
    def refresh_table(modality_value, status_value, last):
        made_at = version_mark(table_version())  # first: a change while the table is made shows as newer
        sync_tracking()
        frame = runs_table(modality_value, status_value)
        signature = frame.to_json()
        return (gr.skip(), last, made_at) if signature == last else (frame, signature, made_at)

    def show_run(run_id):
        text, yaml_text, file_rows, name = run_details(run_id)
        return [text, yaml_text, file_rows, name, *_panel_values(run_id)]

    details_outputs = [summary, config, files, new_name, *panel.outputs()]

    def select_run(frame: pd.DataFrame, event: gr.SelectData):
        # The clicked row's own values: right even after the user sorted the table in the browser.
        row_value = getattr(event, "row_value", None)
        if row_value:
            run_id = str(row_value[0])
        else:
            row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
            run_id = str(frame.iloc[row]["id"]) if frame is not None and row < len(frame) else None
        return [run_id, gr.update(visible=False), "", *show_run(run_id)]

    def do_rename(run_id, name, modality_value, status_value):
        try:
            text = rename_run(run_id, name)
        except ValueError as err:
            # A toast and the message only: an error raised here would cover the table and the details with
            # error frames that catch the next clicks.
            gr.Warning(str(err))
            return [str(err)] + [gr.update()] * (3 + len(details_outputs))
        frame = runs_table(modality_value, status_value)
        return [text, frame, frame.to_json(), gr.update(choices=run_choices()), *show_run(run_id)]

    # With nothing selected, a toast and the message only (as for Rename): a gr.Error put error frames over
    # every output, for Clone over every field of the tab it fills.
    def ask_delete(run_id):
        run = Registry().get(run_id) if run_id else None
        if run is None:
            gr.Warning(NOTHING_SELECTED)
            return gr.update(visible=False), "", NOTHING_SELECTED
        if run.status in ("starting", "running"):
            text = f"Run {run.id} is {run.status}: stop or cancel it before deleting it."
            gr.Warning(text)
            return gr.update(visible=False), "", text
        return (gr.update(visible=True),
                f"Delete **{run.name}** (`{run.id}`)? This removes its folder: checkpoints, adapter and samples.",
                "")

    def do_delete(run_id, modality_value, status_value):
        try:
            text = delete_run(run_id)
            run_id = None
        except ValueError as err:
            gr.Warning(str(err))
            text = str(err)
        frame = runs_table(modality_value, status_value)
        return [run_id, gr.update(visible=False), text, frame, frame.to_json(),
                gr.update(choices=run_choices()), *show_run(run_id)]

    def do_export(run_id):
        run = Registry().get(run_id) if run_id else None
        if run is None:
            gr.Warning(NOTHING_SELECTED)
            return NOTHING_SELECTED
        folder = tracking.export_tensorboard(run.dir)
        return f"TensorBoard files written to `{folder}`. View them with `tensorboard --logdir {folder}`."

    def do_compare(run_ids, metric_value):
        choices = metric_choices(run_ids)
        metric_value = metric_value if metric_value in choices else TRAIN_SMOOTHED
        frame = compare_frame(run_ids, metric_value)
        table_diff = config_diff(run_ids)
        if run_ids and len(run_ids) < 2:
            gr.Info("Pick at least two runs to see which settings differ.")
        return (gr.update(choices=choices, value=metric_value), gr.update(value=frame, y_title=metric_value),
                gr.update(value=table_diff, visible=table_diff is not None))

    def set_tracking(on):
        tracking.set_enabled(on)
        gr.Info("Finished runs will be written to TensorBoard." if on else "TensorBoard logging is off.")

    private = {"api_visibility": "private"}
    table_outputs = [table, shown, table_made_at]
    for trigger in (modality.change, status.change, refresh.click):
        trigger(refresh_table, [modality, status, shown], table_outputs, **private).then(
            lambda: gr.update(choices=run_choices()), None, compare_runs, **private)
    # Built into the app, the table refreshes only while this tab is shown (see `poll_while_shown`): through
    # live.js and the hidden button, or where the server has no route for live.js, on this timer.
    table_timer = gr.Timer(3, active=tabs is None)
    for trigger in (table_timer.tick, refresh_quietly.click):
        trigger(refresh_table, [modality, status, shown], table_outputs, show_progress="hidden", **private)
    compare_runs.focus(lambda: gr.update(choices=run_choices()), None, compare_runs, **private)

    table.select(select_run, table, [selected, confirm_row, message, *details_outputs], **private)
    rename.click(do_rename, [selected, new_name, modality, status],
                 [message, table, shown, compare_runs, *details_outputs], **private)
    delete.click(ask_delete, selected, [confirm_row, confirm_text, message], **private)
    keep.click(lambda: (gr.update(visible=False), "Kept."), None, [confirm_row, message], **private)
    confirm.click(do_delete, [selected, modality, status],
                  [selected, confirm_row, message, table, shown, compare_runs, *details_outputs], **private)
    export_tb.click(do_export, selected, message, **private)
    compare.click(do_compare, [compare_runs, metric], [metric, compare_plot, diff], **private)
    metric.input(lambda ids, m: gr.update(value=compare_frame(ids, m), y_title=m), [compare_runs, metric],
                 compare_plot, **private)
    track.input(set_tracking, track, None, **private)
    widgets.wire_controls(panel, selected)
    # The selected run's line follows its status as the panel under it does (it said running over a stopped run).
    for button in (panel.refresh, panel.stop, panel.cancel, panel.resume):
        button.click(lambda run_id: run_details(run_id)[0], selected, summary, show_progress="hidden", **private)
    root = gr.context.Context.root_block
    if root is not None:  # a page opened or reloaded shows the table at once, not at the first tick
        root.load(refresh_table, [modality, status, shown], table_outputs, **private).then(
            lambda: gr.update(choices=run_choices()), None, compare_runs, **private)
    _wire_clone(clone, selected, message, clone_file, tabs, targets, [table_timer, panel.timer])
    if run_states and tabs is not None:
        _wire_open(open_run, selected, message, tabs, run_states, targets, [table_timer, panel.timer])
    return {"run_state": selected, "table": (refresh_table, [modality, status, shown], table_outputs),
            "panel": (_panel_values, selected, panel.outputs()), "timers": [table_timer, panel.timer]}


def poll_while_shown(parts: dict[str, Any], runs: gr.Tab, others: list[gr.Tab]) -> None:
    """The Runs tab's table refreshes only while it is shown: showing it refreshes the table and the selected
    run at once and (without live.js's route, see widgets.FAST_REFRESH) starts the table's timer; showing
    another tab stops the timers. `parts` is what `build` returned."""
    private = {"api_visibility": "private"}
    runs.select(*parts["table"], **private).then(
        lambda: gr.Timer(active=not widgets.FAST_REFRESH), None, parts["timers"][0], **private).then(
        *parts["panel"], **private)
    for other in others:
        other.select(lambda: [gr.Timer(active=False)] * 2, None, parts["timers"], **private)


def _wire_clone(clone: gr.Button, selected: gr.State, message: gr.Markdown, clone_file: gr.File,
                tabs: gr.Tabs | None, targets: dict[str, list], timers: list[gr.Timer]) -> None:
    """Clone opens the run's tab with its settings and data filled in (and stops this tab's timers, as
    showing another tab does). Where this tab is built without the others, it offers the config.yaml to
    load there instead."""
    outputs = [message, clone_file] + ([tabs, *timers] if tabs is not None else [])
    for components in targets.values():
        outputs += [c for c in components if c not in outputs]

    def do_clone(run_id):
        try:
            modality, values = clone_values(run_id)
        except ValueError as err:
            gr.Warning(str(err))
            return {message: str(err)}
        run = Registry().get(run_id)
        if modality in targets and tabs is not None:
            update = dict(zip(targets[modality], values))
            update[tabs] = gr.Tabs(selected=modality)
            update.update({timer: gr.Timer(active=False) for timer in timers})
            update[message] = f"Cloned **{run.name}** into the {MODALITIES[modality]} tab."
            update[clone_file] = gr.update(visible=False)
            return update
        return {message: f"Load this config.yaml in the {MODALITIES[modality]} tab with **Load config**.",
                clone_file: gr.update(value=str(run.dir / "config.yaml"), visible=True)}

    clone.click(do_clone, selected, outputs, api_visibility="private")


def _wire_open(open_run: gr.Button, selected: gr.State, message: gr.Markdown, tabs: gr.Tabs,
               run_states: dict[str, gr.Textbox], targets: dict[str, list], timers: list[gr.Timer]) -> None:
    """Open shows the selected run in its tab, as if it were the tab's newest: its live panel, Try it and Export
    on it (they act on the tab's run, which was only ever its newest or the one just trained), and its settings
    and data in the form, as Clone fills them: the form kept the tab's last settings beside another run's
    panel, and Train then started a run of those."""
    outputs = [message, tabs, *timers, *run_states.values()]
    for components in targets.values():
        outputs += [c for c in components if c not in outputs]

    def do_open(run_id):
        run = Registry().get(run_id) if run_id else None
        if run is None:
            gr.Warning(NOTHING_SELECTED)
            return {message: NOTHING_SELECTED}
        update = {}
        if run.modality in targets:
            modality, values = clone_values(run_id)
            values[-1] = (f"Opened run **{run.name}** (`{run.id}`): Try it and Export act on it, and its settings "
                          "are filled in above; **Train** starts a new run from them.")
            update = dict(zip(targets[modality], values))
        return {**update, run_states[run.modality]: run.id, tabs: gr.Tabs(selected=run.modality),
                message: f"Opened **{run.name}** in the {MODALITIES[run.modality]} tab.",
                **{timer: gr.Timer(active=False) for timer in timers}}  # as showing another tab does

    open_run.click(do_open, selected, outputs, api_visibility="private")
