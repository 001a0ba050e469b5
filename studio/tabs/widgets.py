"""Pieces every tab shares: the settings form built from a config's metadata, the live run panel
(loss curve, progress, samples, log, Stop/Cancel/Resume), checkpoint choice and export downloads.

A tab supplies its data and try-it sections and wires these in; everything about a run's life looks
and behaves the same in every tab.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import secrets
import shutil
import typing
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from pipelines.archives import FOLDER_MARK, folder_as_uploads, gather_folder, mark_used
from pipelines.config import ConfigError, RunConfig
from pipelines.distributed import read_ranks
from pipelines.hub import workspace
from pipelines.events import STOP_FILE, checkpoint_dirs
from studio import jobs
from studio.progress import Progress, format_seconds
from studio.runs import ACTIVE, FINAL, RESUMABLE, Registry, resume_may_help
from studio.tabs.curve import curve_svg

LOG_LINES = 40
# The page's own poller (live.js) refreshes a shown panel's status line, curve and log every 3 s while its
# run can still change, and asks Gradio for the whole panel only when something else changed (the run's
# status at once; samples and evaluations at most every 10 s). Every Gradio event costs the browser a pass
# over the page's state (about 0.2 s of a core), which on a machine of few cores comes out of the training
# run's share. Where the server could not offer the poller its route (studio/page.py sets FAST_REFRESH),
# the panel's Gradio timer refreshes it instead: every 3 s while the run is queued or training, every 10 s
# while it could be resumed (from another browser, say).
FAST_REFRESH = False
LIVE_REFRESH_S = 3.0
IDLE_REFRESH_S = 10.0
CAN_CHANGE = ACTIVE + RESUMABLE


# ---- the settings form -----------------------------------------------------------------------

def _label(name: str) -> str:
    words = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA", "4bit": "4-bit", "snr": "SNR"}
    text = " ".join(words.get(w, w) for w in name.split("_"))
    return text[0].upper() + text[1:]


def config_inputs(config_cls: type[RunConfig], names: list[str], defaults: RunConfig) -> dict[str, gr.Component]:
    """One input per config field, with label, tooltip and bounds from the field's metadata. They are
    made unrendered: the tab places each with .render() where it belongs in its layout."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    types = typing.get_type_hints(config_cls)
    return {name: _input_for(fields[name], types[name], getattr(defaults, name)) for name in names}


def column_input(config_cls: type[RunConfig], name: str) -> gr.Dropdown:
    """A dropdown for a field naming a data column; its choices are filled in once data is uploaded."""
    field = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    return gr.Dropdown([""], value="", allow_custom_value=True, label=_label(name), info=field.metadata["help"],
                       render=False)


def _input_for(field: dataclasses.Field, kind: Any, value: Any) -> gr.Component:
    meta, label = field.metadata, _label(field.name)
    info, render = meta.get("help"), False
    low, high, step = meta.get("min"), meta.get("max"), meta.get("step")
    if meta.get("choices"):
        choices = meta["choices"]  # a dict names its values: "English (en)", not a bare "en"
        shown = [(f"{name.capitalize()} ({key})", key) for key, name in choices.items()] if isinstance(choices, dict) \
            else choices
        return gr.Dropdown(shown, value=value, label=label, info=info, render=render)
    if kind is bool:
        return gr.Checkbox(value=value, label=label, info=info, render=render)
    if kind in (int, float):
        if step and low is not None and high is not None and (high - low) / step <= 600:
            return gr.Slider(low, high, value=value, step=step, label=label, info=info, render=render)
        # Bounds go in the tooltip, not to gr.Number: its own refusal names no field, while Train's check
        # names the field and every other problem at once.
        bounds = f" ({low:g} to {high:g})" if low is not None and high is not None else ""
        return gr.Number(value=value, label=label, info=info + bounds, precision=0 if kind is int else None,
                         render=render)
    if typing.get_origin(kind) is list and meta.get("one_per_line"):
        return gr.Textbox("\n".join(value), label=label, info=info + " (one per line)", lines=2, render=render)
    if typing.get_origin(kind) is list:
        return gr.Textbox(", ".join(value), label=label, info=info + " (comma-separated)", render=render)
    return gr.Textbox(value, label=label, info=info, render=render)


def build_config(config_cls: type[RunConfig], values: dict[str, Any]) -> tuple[RunConfig | None, str]:
    """(config, "") or (None, a message naming every bad field)."""
    try:
        return config_cls.from_dict({k: v for k, v in values.items()}), ""
    except ConfigError as err:
        lines = "\n".join(f"- **{_label(name)}** (`{name}`): {why}" for name, why in err.problems)
        return None, f"**These settings need fixing:**\n{lines}"


def one_per_line(config_cls: type[RunConfig]) -> set[str]:
    """The list settings whose items the form takes one per line (see pipelines.config.option)."""
    return {f.name for f in dataclasses.fields(config_cls) if f.metadata.get("one_per_line")}


def config_to_form(config: RunConfig, names: list[str]) -> list[Any]:
    lines = one_per_line(type(config))
    values = []
    for name in names:
        value = getattr(config, name)
        values.append(("\n" if name in lines else ", ").join(value) if isinstance(value, list) else value)
    return values


class TabForm:
    """The settings a tab collects, in one order shared by all its handlers:
    the upload components (each feeding a config field; several may feed the same list field), then the
    base model, the run name, then the config fields of `form`."""

    def __init__(self, config_cls: type[RunConfig], form: list[str], upload_fields: list[str],
                 upload_types: list[str] | None = None, defaults: Callable[[], RunConfig] | None = None):
        self.config_cls, self.form, self.upload_fields = config_cls, form, upload_fields
        self.upload_types = upload_types  # the suffixes the first upload takes (None: any file)
        self.modality = config_cls.modality
        self.defaults = defaults or config_cls  # the settings a page opens with (the tab's sample run)
        self.settings = ["base_model", "name", *form]  # what a draft keeps: all but the uploads

    # ---- drafts: the settings kept in the browser (see keep_drafts) ----

    def shown(self, config: RunConfig) -> list[Any]:
        """The settings of a config as the form shows them."""
        return [config.base_model, config.name, *config_to_form(config, self.form)]

    def opening(self) -> list[Any]:
        """The settings as a page opens with them: the sample run's, with no name."""
        return self.shown(self.defaults().changed(name=""))

    def settings_in(self, load_outputs: list) -> list:
        """The settings' components among those TabForm.load fills (uploads first, the message last)."""
        return load_outputs[len(self.upload_fields):-1]

    def restore(self, draft):
        """The page opened again: the settings the browser kept put back, each that still makes a valid config (a
        draft from an older studio may hold a setting since renamed, or a value since out of range)."""
        unchanged = [gr.update()] * (len(self.settings) + 1)
        if not isinstance(draft, dict):
            return unchanged
        shown = dict(zip(self.settings, self.opening()))
        kept = {k: v for k, v in draft.items() if k in shown and v != shown[k]}
        values = self.values(*[None] * len(self.upload_fields), *[kept.get(n, shown[n]) for n in self.settings])
        try:
            bad = {name for name, _ in self.config_cls.from_dict(values, check=False).problems()}
        except ConfigError as err:
            bad = {name for name, _ in err.problems}
        kept = {k: v for k, v in kept.items() if k not in bad}
        if not kept:
            return unchanged
        return [gr.update(value=kept[n]) if n in kept else gr.update() for n in self.settings] + [
            "Your settings from before the page was reloaded are back (the data is the sample's again: upload yours "
            "if it was not). **Reset settings** returns to the sample run's."]

    def reset(self):
        return self.opening() + ["Settings reset to the sample run's."]

    def values(self, *args) -> dict[str, Any]:
        uploads, (base_model, name), form = (args[:len(self.upload_fields)],
                                             args[len(self.upload_fields):len(self.upload_fields) + 2],
                                             args[len(self.upload_fields) + 2:])
        values: dict[str, Any] = dict(zip(self.form, form))
        for field in one_per_line(self.config_cls) & values.keys():  # else the config would split them at commas
            if isinstance(values[field], str):
                values[field] = [line.strip() for line in values[field].splitlines() if line.strip()]
        values.update(modality=self.modality, base_model=base_model or "", name=name or "")
        types = typing.get_type_hints(self.config_cls)
        for field, files in zip(self.upload_fields, uploads):
            paths = [upload_path(f) for f in (files if isinstance(files, list) else [files] if files else [])]
            for path in paths:  # the page's form still holds it: kept by the server's hourly clean (app.clean_unused)
                mark_used(path)
            paths = gathered(paths)
            if typing.get_origin(types[field]) is list:
                values[field] = values.get(field, []) + paths
            else:
                values[field] = paths[0] if paths else ""
        return values

    def takes(self, path: Path) -> bool:
        """Whether the tab's first upload box takes this file."""
        return self.upload_types is None or path.suffix.lower() in self.upload_types

    def _folder_files(self, path: Path, keep=None) -> list[str]:
        """A path a config names, as an upload box holds it: a file as it is, a folder as its files, with their
        subfolders (named as a folder upload names them, archives.FOLDER_MARK). Only a folder the page may be
        sent is copied so (a config uploaded in the browser may name any folder: ~/.ssh); any other gives its
        files where they are, for Gradio to refuse."""
        if not path.is_dir():
            return [str(path)] if path.exists() else []
        keep = keep or self.takes
        if may_serve(path):
            return folder_as_uploads(path, keep)
        return [str(p) for p in sorted(path.rglob("*")) if p.is_file() and keep(p)]

    def start(self, *args):
        """Train: validate every setting and the data, create the run (with its own copy of the data), queue it."""
        config, problems = build_config(self.config_cls, self.values(*args))
        if config is None:
            return gr.update(), problems
        try:
            run = jobs.submit(config)
        except jobs.UnusableData as err:
            return gr.update(), str(err)
        said = f"Started run `{run.id}`." if run.status != "queued" else f"Run `{run.id}` is queued."
        if config.name.strip() and run.name != config.name.strip():
            said += f" It is named **{run.name}**: another run is named {config.name.strip()}."
        return run.id, said

    def save(self, *args):
        """Save config: the run's config.yaml, for `studio train` or for loading back later."""
        import tempfile
        config, problems = build_config(self.config_cls, self.values(*args))
        if config is None:
            return gr.update(visible=False), problems
        folder = Path(tempfile.mkdtemp(prefix="studio-config-"))
        config.save(folder / "config.yaml")
        return gr.update(value=str(folder / "config.yaml"), visible=True), ""

    def load(self, upload, *uploaded):
        """Load config (and a run's Clone): fill the form from a config.yaml. The uploads hold the data files it
        names that exist, and a data folder's files (image and speech runs; no input of its own in the tabs) go
        into the first, as if the user had picked them. Paths are read relative to the config file; a file not
        found there that the tab's boxes already hold (`uploaded`, matched by name) stays: a config.yaml loaded
        in the browser arrives alone, without the data beside it that the user has just uploaded."""
        from pipelines.config import read_yaml
        unchanged = [gr.update()] * (len(self.upload_fields) + 2 + len(self.form))
        config_file = Path(upload_path(upload)).resolve()
        try:
            data = read_yaml(config_file)
            try:
                config = self.config_cls.from_dict(data, base=config_file.parent)
            except ConfigError as err:
                # Data files missing on this machine: still fill the settings; the user uploads the data.
                if any(name not in self.config_cls.path_fields for name, _ in err.problems):
                    raise
                config = self.config_cls.from_dict(data, check=False, base=config_file.parent)
        except ConfigError as err:
            text = "; ".join(f"`{n}` {w}" for n, w in err.problems)
            return unchanged + [f"**This config.yaml cannot be used:** {text}"]
        held_paths = _paths(uploaded)
        names = Counter(Path(p).name for p in held_paths)
        held = {Path(p).name: p for p in held_paths if names[Path(p).name] == 1}  # a name two files share: neither
        found: dict[str, list[str]] = {}
        missing = []
        types = typing.get_type_hints(self.config_cls)
        for field in dict.fromkeys(self.upload_fields):
            value = getattr(config, field)
            named = [p for p in (value if isinstance(value, list) else [value]) if p]
            beside = {p: (config_file.parent / p).resolve() for p in named}
            found[field] = [str(beside[p]) if beside[p].exists() else held[Path(p).name] for p in named
                            if beside[p].exists() or Path(p).name in held]
            if typing.get_origin(types[field]) is list:
                found[field] = [q for p in found[field] for q in self._folder_files(Path(p))]
            missing += [p for p in named if not beside[p].exists() and Path(p).name not in held]
        if getattr(config, "data_path", ""):
            source = (config_file.parent / config.data_path).resolve()
            files = self._folder_files(source, lambda p: p != config_file and self.takes(p))
            first = found[self.upload_fields[0]]
            first += [p for p in files if p not in first]
            missing += [] if files else [config.data_path]
        uploads, given = [], set()
        for field in self.upload_fields:
            # What the config names and exists, nothing else: uploads it does not name are cleared, not left as
            # they were. Several boxes may feed one setting (image: files, a folder): the first holds its files.
            files = None if field in given else found[field] or None
            if files and typing.get_origin(types[field]) is not list:
                files = files[0]  # a box of one file: given a list, Gradio fails
            uploads.append(files)
            given.add(field)
        message = "Settings loaded from the config file." + (
            f" The data it names ({', '.join(missing)}) is not found next to it: upload the data above."
            if missing else "")
        return uploads + [config.base_model, config.name, *config_to_form(config, self.form), message]


def served_paths() -> tuple[list[Path], list[Path]]:
    """Gradio's allowed and blocked paths (app.serve): the page may be sent the runs' files (and, as Gradio
    allows by itself, the working folder's and the temporary folder's), never the index, SSH keys or caches."""
    root = workspace()
    return [root / "runs"], [root / "studio.db", Path.home() / ".ssh", Path.home() / ".cache"]


def may_serve(path: Path) -> bool:
    """Whether Gradio would send the page this file or folder's files: what the studio copies for an upload box
    (a run opened in its tab) must not widen that."""
    import tempfile
    allowed, blocked = served_paths()
    path = path.resolve()
    if any(path.is_relative_to(b.resolve()) for b in blocked):
        return False
    return any(path.is_relative_to(a.resolve()) for a in [*allowed, Path.cwd(), Path(tempfile.gettempdir())])


def gathered(paths: list[str]) -> list[str]:
    """An upload box's files, those of a folder upload (named by their places in it, see
    archives.FOLDER_MARK) put back in their folders: the folder instead of its loose files."""
    marked = [Path(p) for p in paths if FOLDER_MARK in Path(p).name]
    if not marked:
        return paths
    return [p for p in paths if FOLDER_MARK not in Path(p).name] + [str(gather_folder(marked, workspace() / "uploads"))]


def upload_replaces_the_sample(samples):
    """The handler of an upload into a tab's data boxes (given the files box, and the folder box where there is
    one; it sets the files box): files or a folder uploaded while the files box still holds the tab's sample
    data take its place. Gradio adds an upload to what a box holds, so the user's data was trained mixed with
    the demo's ('30 of 30 rows' for 6 of their own). `samples` lists the sample files; a file is one of them
    by its name and size (the box holds Gradio's copies)."""
    def name_and_size(path: str) -> tuple[str, int]:
        try:
            return Path(path).name, Path(path).stat().st_size
        except OSError:  # gone from Gradio's cache (a page open for days): not the sample's
            return Path(path).name, -1

    def replace(files, folder=None):
        known = {name_and_size(p) for p in samples()}
        paths = [upload_path(f) for f in files or []]
        theirs = [p for p in paths if name_and_size(p) not in known]
        if len(theirs) < len(paths) and (theirs or folder):
            return theirs or None
        return gr.update()
    return replace


def _paths(uploads) -> list[str]:
    """The files of upload boxes' values (each None, one file or a list)."""
    return [upload_path(f) for value in uploads if value for f in (value if isinstance(value, list) else [value])]


def shown_if_any(rows: list, as_value=pd.DataFrame) -> dict:
    """An output that hides while there is nothing to show (an empty table would show placeholder headers
    "1 2 3")."""
    return gr.update(value=as_value(rows) if rows else None, visible=bool(rows))


def headline(report, what: str) -> str:
    """The data check's first line: "**Data:** 8 of 8 images usable", or "**No usable images.** ..." (not
    "No usable images. No usable data: ..." where the summary says so itself)."""
    lead, text = report.verdict(what), report.summary()
    if report.ok:
        return f"**{lead}:** {text}"
    return f"**{lead}.** {text}" if lead else f"**{text}**"


def noted(title: str, lines: list[str], most: int = 8) -> str:
    """What the data check did on its own (conversions, rotations), as a short list under the summary."""
    if not lines:
        return ""
    more = f"\n- … and {len(lines) - most} more" if len(lines) > most else ""
    return f"\n\n{title}\n" + "\n".join(f"- {line}" for line in lines[:most]) + more


def problems_box(modality: str, **layout) -> gr.Dataframe:
    """Where a tab shows its data check's problems (problems_table fills it)."""
    return gr.Dataframe(label="Problems found", wrap=True, max_height=200, visible=False,
                        elem_id=f"{modality}-problems", **layout)


def problems_table(report) -> dict:
    """The data check's problems (a DataReport's) as the tabs show them: file, row where any has one, why.
    The reason gets most of the width: left to fit their content, the columns cut it off at the right edge."""
    rows = any(p.row is not None for p in report.problems)
    table = shown_if_any([{"file": p.file, **({"row": "" if p.row is None else p.row} if rows else {}),
                           "problem": p.reason} for p in report.problems])
    return {**table, "column_widths": ["28%", "8%", "64%"] if rows else ["28%", "72%"]}


PREVIEW_CHARS = 500


def preview_table(rows: list[dict]) -> dict:
    """A data check's preview rows as a table: each cell cut at PREVIEW_CHARS (a row of 20,000 characters filled
    the table and pushed its response column out of sight), the columns sharing the width evenly. Line breaks
    show as written (the table's `keeps-lines` style)."""
    def cut(value):
        if isinstance(value, str) and len(value) > PREVIEW_CHARS:
            return f"{value[:PREVIEW_CHARS]}… ({len(value) - PREVIEW_CHARS:,} more characters)"
        return value
    table = shown_if_any([{key: cut(value) for key, value in row.items()} for row in rows])
    columns = len(rows[0]) if rows else 0
    return {**table, "column_widths": [f"{100 / columns:.0f}%"] * columns} if columns else table


def upload_path(file) -> str:
    return file if isinstance(file, str) else getattr(file, "path", None) or getattr(file, "name", str(file))


# ---- the live run panel ----------------------------------------------------------------------

@dataclasses.dataclass
class LivePanel:
    status: gr.HTML
    loss_plot: gr.HTML
    metrics_plot: gr.LinePlot
    samples_table: gr.Dataframe
    samples_gallery: gr.Gallery
    log: gr.Textbox
    stop: gr.Button
    cancel: gr.Button
    resume: gr.Button
    refresh: gr.Button  # hidden: live.js presses it when the whole panel needs refreshing
    timer: gr.Timer     # only without FAST_REFRESH

    def outputs(self) -> list[gr.Component]:
        return [self.status, self.loss_plot, self.metrics_plot, self.samples_table, self.samples_gallery, self.log,
                self.stop, self.cancel, self.resume, self.timer]


NO_RUN = "<p>No run yet. Press <b>Train</b> to start one.</p>"


def live_panel(key: str) -> LivePanel:
    """`key` prefixes the elements' ids (e.g. llm-run-status), for styling and browser tests."""
    status = gr.HTML(NO_RUN, elem_classes=["run-status"], elem_id=f"{key}-run-status", js_on_load=None)
    with gr.Row():
        loss_plot = gr.HTML(loss_curve(None), scale=2, elem_id=f"{key}-loss-plot", js_on_load=None)
        metrics_plot = gr.LinePlot(None, x="step", y="value", color="series", title="Validation metrics",
                                   height=300, scale=1, visible=False, x_title="step", y_title="",
                                   elem_id=f"{key}-metrics-plot")
    with gr.Row():
        stop = gr.Button("Stop (save checkpoint)", variant="secondary", interactive=False)
        cancel = gr.Button("Cancel", variant="stop", interactive=False)
        resume = gr.Button("Resume", interactive=False)
    samples_gallery = gr.Gallery(label="Samples during training", visible=False, columns=6, height=260,
                                 elem_id=f"{key}-samples-gallery")
    samples_table = gr.Dataframe(label="Samples during training", visible=False, wrap=True, max_height=260,
                                 elem_id=f"{key}-samples")
    with gr.Accordion("Log", open=False):
        log = gr.Textbox(lines=12, max_lines=12, show_label=False, autoscroll=True, elem_id=f"{key}-log")
    refresh = gr.Button("Refresh", elem_id=f"{key}-refresh", elem_classes=["live-refresh"])
    timer = gr.Timer(LIVE_REFRESH_S, active=False)
    return LivePanel(status, loss_plot, metrics_plot, samples_table, samples_gallery, log, stop, cancel, resume,
                     refresh, timer)


_progress: dict[str, Progress] = {}  # run id -> incrementally read events


def progress_of(run_id: str, registry: Registry) -> Progress | None:
    run = registry.get(run_id) if run_id else None
    if run is None:
        return None
    progress = _progress.get(run_id)
    if progress is None or not run.dir.exists():
        progress = _progress[run_id] = Progress(run.dir)
    progress.update()
    return progress


def smoothed(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's, so the first points are not dragged to 0."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def loss_curve(progress: Progress | None) -> str:
    losses = progress.losses if progress else []
    steps = [s for s, _ in losses]
    return curve_svg({"train": losses, "train (smoothed)": list(zip(steps, smoothed([v for _, v in losses]))),
                      "validation": [(e["step"], e["eval_loss"]) for e in (progress.evals if progress else [])
                                     if "eval_loss" in e]}, title="Loss")


def metrics_frame(progress: Progress) -> pd.DataFrame | None:
    rows = [(e["step"], v, k) for e in progress.evals for k, v in e.items()
            if k not in ("type", "time", "step", "eval_loss", "eval_perplexity") and isinstance(v, (int, float))]
    return pd.DataFrame(rows, columns=["step", "value", "series"]) if rows else None


def status_html(run, progress: Progress, registry: Registry, version: str | None = None) -> str:
    """The status line, with what live.js needs to keep it fresh: the run, whether it can still change
    (data-live-poll), how far its events were read (data-live-version; `version` when the caller has it
    already) and what only a whole-panel refresh shows (data-live-panel)."""
    text = html.escape(status_markdown(run, progress, registry), quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text))
    body = "".join(f"<p>{paragraph}</p>" for paragraph in text.split("\n\n"))
    polls = run.status in CAN_CHANGE
    whole = f"{run.status}:{len(progress.samples)}:{len(progress.evals)}"  # live.js reads the status first
    return (f'<div class="live-status" data-live-run="{html.escape(run.id)}" data-live-poll="{int(polls)}" '
            f'data-live-version="{version or live_version(run, progress, registry)}" data-live-panel="{whole}">'
            f'{body}</div>')


def live_version(run, progress: Progress, registry: Registry) -> str:
    """Changes whenever the status line, the curve or the log would: the run's status, its events, its place
    in the queue, the log's length."""
    log = run.dir / "log.txt"
    return (f"{run.status}:{progress.offset}:{registry.queue_position(run.id) if run.status == 'queued' else ''}:"
            f"{log.stat().st_size if log.exists() else 0}:{int(stopping(run))}")


def stopping(run) -> bool:
    """Stop was pressed and the run has not ended yet: it finishes its step and saves a checkpoint first."""
    return run.status in ("starting", "running") and (run.dir / STOP_FILE).exists()


def status_markdown(run, progress: Progress, registry: Registry) -> str:
    status = run.status
    head = f"**{run.name}** · `{run.id}` · **{'stopping' if stopping(run) else status}**"
    if status == "queued":
        return (f"{head} — waiting in the queue (position {registry.queue_position(run.id)}); it starts by itself "
                "when a slot is free.")
    parts = []
    if progress.total_steps:
        parts.append(f"step {progress.step}/{progress.total_steps} ({100 * progress.fraction():.0f}%)")
    if status == "running" and progress.eta_s and not stopping(run):
        parts.append(f"ETA {format_seconds(progress.eta_s)}")
    if progress.units_per_s:
        parts.append(f"{progress.units_per_s:,.1f} {progress.unit}/s")
    if progress.lr:
        parts.append(f"lr {progress.lr:.2e}")
    if progress.elapsed_s:
        parts.append(f"{format_seconds(progress.elapsed_s)} elapsed")
    if progress.last_loss is not None:
        parts.append(f"loss {progress.last_loss:.4f}")
    if progress.processes > 1:
        parts.append(f"global batch {progress.global_batch} over {progress.processes} processes")
    text = head + (" — " + " · ".join(parts) if parts else "")
    ranks = read_ranks(run.dir) if progress.processes > 1 else []
    if ranks:
        text += "\n\n**Processes:** " + " · ".join(
            f"rank {r['rank']} {r.get('state', '?')} at step {r.get('step', 0)} ({r.get('device', '?')} on {r.get('host', '?')}"
            + (f", holding {r['weights_mb']:,} MB of model weights)" if "weights_mb" in r else ")")
            for r in ranks)
    if status == "failed":
        text += f"\n\n**Why it failed:** {run.error or progress.error}\n\n**What to change:** {run.advice or progress.advice}"
        if not resume_may_help(status, run.error or progress.error):  # (so Resume is off: live_values)
            text += ("\n\nResuming would fail the same way: make the change and train again (**Clone** in the Runs "
                     "tab fills the run's tab with its settings).")
    elif status == "interrupted":
        text += f"\n\n{run.error} {run.advice}"
    elif status == "stopped" and checkpoint_dirs(run.dir):
        text += "\n\nStopped with a checkpoint: press **Resume** to continue."
    elif status == "stopped":  # taken off the queue, or stopped before its first checkpoint
        text += "\n\nStopped before any checkpoint: **Resume** starts it from the beginning."
    elif stopping(run):  # said at once: the line kept saying "running" until the checkpoint was saved
        text += "\n\nStopping: the run saves a checkpoint at the end of this step, then ends."
    elif status in ("starting",) or (status == "running" and not progress.losses):
        text += "\n\nLoading the model and data…" + (f" {progress.loading}" if progress.loading else "")
    return text


def read_log_tail(run_dir: Path, lines: int = LOG_LINES) -> str:
    path = run_dir / "log.txt"
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 32_000))
        tail = f.read().decode("utf-8", errors="replace")
    return "\n".join(tail.splitlines()[-lines:])


def live_values(run_id: str | None, registry: Registry | None = None) -> list[Any]:
    """Values for LivePanel.outputs(): called on each whole-panel refresh and after each action."""
    registry = registry or Registry()
    run = registry.get(run_id) if run_id else None
    if run is None:
        return [NO_RUN, loss_curve(None), gr.update(visible=False),
                gr.update(visible=False), gr.update(visible=False), "",
                gr.update(interactive=False), gr.update(interactive=False), gr.update(interactive=False),
                refresh_timer(None)]
    progress = progress_of(run_id, registry)
    metrics = metrics_frame(progress)
    images = [(str(run.dir / s["image"]), f"step {s['step']}: {s.get('prompt', '')}")
              for s in progress.samples if s.get("image")]
    texts = [{k: v for k, v in s.items() if k not in ("type", "time")} for s in progress.samples if not s.get("image")]
    active = run.status in ACTIVE
    return [status_html(run, progress, registry), loss_curve(progress),
            gr.update(value=metrics, visible=metrics is not None,
                      title="Validation metrics" if progress.evaluated_on == "validation" else
                      f"Metrics on the {progress.evaluated_on} data (no validation data)"),
            shown_if_any(texts[-12:][::-1]),
            shown_if_any(images[-12:], as_value=list),
            read_log_tail(run.dir),
            gr.update(interactive=active), gr.update(interactive=active),
            # Resume only where it can get past what ended the run (the CLI suggests it so): a loss gone to nan or
            # a setting the base model refuses would only fail again. jobs.resume still takes any of RESUMABLE.
            gr.update(interactive=resume_may_help(run.status, run.error or progress.error)),
            refresh_timer(run.status)]


def refresh_timer(status: str | None) -> gr.Timer:
    if FAST_REFRESH or status not in CAN_CHANGE:
        return gr.Timer(active=False)
    return gr.Timer(LIVE_REFRESH_S if status in ACTIVE else IDLE_REFRESH_S, active=True)


def live_update(run_id: str, version: str) -> dict[str, Any]:
    """What live.js asks for a shown panel every 3 s: {"version"} alone when nothing was written since
    `version`, else the status line, the curve and the log's tail as the whole panel shows them."""
    registry = Registry()
    run = registry.get(run_id) if run_id else None
    if run is None:
        return {"version": "gone", "status": NO_RUN, "curve": loss_curve(None), "log": ""}
    progress = progress_of(run_id, registry)
    now = live_version(run, progress, registry)
    if now == version:
        return {"version": now}
    return {"version": now, "status": status_html(run, progress, registry, now), "curve": loss_curve(progress),
            "log": read_log_tail(run.dir)}


def wire_controls(panel: LivePanel, run_state: gr.Component) -> None:
    """Stop / Cancel / Resume act on the run shown and the panel refreshes at once; later, when live.js presses
    the hidden Refresh button (or, without FAST_REFRESH, on the panel's timer)."""
    panel.timer.tick(live_values, run_state, panel.outputs(), show_progress="hidden", api_visibility="private")
    panel.refresh.click(live_values, run_state, panel.outputs(), show_progress="hidden", api_visibility="private")
    def act(action):
        def handler(run_id):
            if run_id:
                try:
                    action(run_id)
                except ValueError as err:
                    gr.Warning(str(err))
            return live_values(run_id)
        return handler

    panel.stop.click(act(jobs.request_stop), run_state, panel.outputs(), api_visibility="private")
    panel.cancel.click(act(jobs.cancel), run_state, panel.outputs(), api_visibility="private")
    panel.resume.click(act(jobs.resume), run_state, panel.outputs(), api_visibility="private")


def run_holder(modality: str) -> gr.Textbox:
    """The id of the run a tab shows (its panel, Try it and Export act on it), held in the page: a gr.State lives
    in the server's memory, so after the server restarted a page left open went on showing its run while every
    button said "Train a run first"."""
    return gr.Textbox(visible=False, elem_id=f"{modality}-run-id")


def still_there(modality: str):
    """A handler for a tab's run_state: the tab's newest run in place of a run deleted since it was shown (in
    the Runs tab, perhaps of another page), where the tab said "No run yet" beside a run training, and Try it
    "Train a run first"."""
    def newest_if_gone(run_id):
        return latest_run_id(modality) if run_id and Registry().get(run_id) is None else gr.update()
    return newest_if_gone


def latest_run_id(modality: str, registry: Registry | None = None) -> str | None:
    """The run a freshly opened page shows: the newest training run of this tab, else its newest queued run,
    else its newest run (a queued run newer than the one training took its place once)."""
    runs = (registry or Registry()).list(modality=modality)
    training = [r for r in runs if r.status in ("starting", "running")]
    chosen = training or [r for r in runs if r.status not in FINAL] or runs
    return chosen[0].id if chosen else None


# ---- the part of a tab every modality shares --------------------------------------------------

SCALE_OUT = ["processes", "strategy", "nodes", "main_address", "main_port"]  # every tab's FORM holds these


# The global batch, worked out in the browser: a product needs no trip through the server's queue, which
# a busy server (a data check importing the ML libraries) made the figure wait for, and once answer with
# stale values.
GLOBAL_BATCH_JS = """(batch, accumulation, processes, nodes) => {
    const parts = [batch, accumulation, processes, nodes].map((v) => (v === null || v === "" ? NaN : Number(v)));
    if (parts.some((n) => !Number.isInteger(n))) return "";
    const total = parts.reduce((a, b) => a * b, 1);
    return `**Global batch: ${total}** examples per optimizer step = ${parts[0]} per process x ` +
           `${parts[1]} accumulated x ${parts[2]} process(es) x ${parts[3]} node(s).`;
}"""


def scale_out_settings(inputs: dict[str, gr.Component], key: str) -> None:
    """Processes, strategy, nodes and where they meet (in a tab's Advanced accordion), with the global batch
    they make, recomputed as the batch settings change."""
    gr.Markdown("**Several GPUs or machines** (data parallel, FSDP or DeepSpeed ZeRO: see the README's *Scale out* section)")
    with gr.Row():
        for name in SCALE_OUT:
            inputs[name].render()
    sources = [inputs[k] for k in ("batch_size", "gradient_accumulation", "processes", "nodes")]
    shown = gr.Markdown(elem_id=f"{key}-global-batch")
    page = gr.context.Context.root_block  # the figure is filled in as the page opens, then on each change
    gr.on([page.load, *(source.change for source in sources)], None, sources, shown, js=GLOBAL_BATCH_JS,
          api_visibility="private", show_progress="hidden")


@dataclasses.dataclass
class RunSection:
    train: gr.Button
    message: gr.Markdown
    panel: LivePanel
    save: gr.Button
    load: gr.UploadButton
    reset: gr.Button
    config_file: gr.File


def run_section(key: str) -> RunSection:
    """Train / Save config / Load config / Reset settings, the settings message, and the live training panel."""
    with gr.Row():
        train = gr.Button("Train", variant="primary", interactive=False, scale=2, elem_id=f"{key}-train")
        save = gr.Button("Save config", scale=1)
        load = gr.UploadButton("Load config", file_types=[".yaml", ".yml"], scale=1)
        reset = gr.Button("Reset settings", scale=1, elem_id=f"{key}-reset")
    config_file = gr.File(label="config.yaml", visible=False)
    message = gr.Markdown(elem_id=f"{key}-message")
    gr.Markdown("### Training")
    return RunSection(train, message, live_panel(key), save, load, reset, config_file)


def wire_run_section(section: RunSection, form: TabForm, run_state: gr.Textbox, inputs: list, load_outputs: list,
                     checkpoint: gr.Dropdown, exports: dict[str, gr.Button], download: gr.File,
                     results: list[gr.Component], trying: gr.events.Dependency) -> None:
    """The handlers every tab shares: train, save/load config, the live refresh, run controls, the
    checkpoint choice and the export buttons. `results` are what Try it (the event `trying`) shows: emptied
    when the tab shows another run, with the download, and a Try it or export still under way is cancelled
    (its answer or file not shown), so that none is taken for that run's."""
    private = {"api_visibility": "private"}
    # A new run in this tab (Train, or the newest one shown when the page opens) fills the panel in and
    # starts its timer.
    section.train.click(form.start, inputs, [run_state, section.message], **private)
    run_state.change(live_values, run_state, section.panel.outputs(), **private)
    section.save.click(form.save, inputs, [section.config_file, section.message], **private)
    section.load.upload(form.load, [section.load, *inputs[:len(form.upload_fields)]], load_outputs, **private)
    section.reset.click(form.reset, None, [*form.settings_in(load_outputs), section.message], **private)
    wire_controls(section.panel, run_state)
    section.panel.refresh.click(still_there(form.modality), run_state, run_state, **private)
    run_state.change(lambda r: gr.update(choices=checkpoint_choices(r), value="final"), run_state, checkpoint,
                     **private)
    checkpoint.focus(current_checkpoints, [run_state, checkpoint], checkpoint, **private)
    exporting = [button.click(lambda r, c, kind=kind: gr.update(value=export_zip(r, kind, c), visible=True),
                              [run_state, checkpoint], download, **private) for kind, button in exports.items()]
    # Emptied in the browser at once: done by the server, the emptying could come after an export the user had
    # asked for since (on a busy machine), and hide its file. (Cancelled, a Try it or export already under way
    # still ends in the server; its answer or file is not shown.)
    empty = ", ".join("[]" if isinstance(result, gr.Chatbot) else "null" for result in results)  # (null: no change)
    run_state.change(None, None, [*results, download], cancels=[trying, *exporting],
                     js=f"() => [{empty}, {{__type__: 'update', value: null, visible: false}}]")


# ---- checkpoints and export -------------------------------------------------------------------

def keep_drafts(app: gr.Blocks, form: TabForm, load_outputs: list) -> None:
    """A tab's settings kept in the browser as they change, and put back when the page opens again: a reload, or
    Gradio's own after the server restarted, lost settings tuned for an hour. (The data is not kept: the files
    uploaded stay in Gradio's cache of that page.) `load_outputs` as TabForm.load fills them."""
    settings, message = form.settings_in(load_outputs), load_outputs[-1]
    # (Gradio encrypts what it keeps with this key, which the page is sent anyway: a constant, so that a draft
    # outlives the server that made it)
    draft = gr.BrowserState(None, storage_key=f"lora-studio-{form.modality}-settings", secret="lora-studio-drafts")
    # Kept by the page itself, at once (sent to the server and back, a draft changed just before a reload was lost)
    gr.on([c.change for c in settings], None, settings, draft, show_progress="hidden", api_visibility="private",
          js=f"(...values) => Object.fromEntries({json.dumps(form.settings)}.map((name, i) => [name, values[i]]))")
    app.load(form.restore, draft, [*settings, message], api_visibility="private")


def checkpoint_choices(run_id: str | None) -> list[str]:
    registry = Registry()
    run = registry.get(run_id) if run_id else None
    if run is None:
        return ["final"]
    return ["final"] + [p.name for p in reversed(checkpoint_dirs(run.dir))]


def current_checkpoints(run_id: str | None, chosen: str | None) -> dict:
    """The checkpoint box as it is opened: the run's checkpoints now, and the one chosen if it is still there
    (a run keeps only its last few: a resumed run removed the step-90 still shown, and Generate failed)."""
    choices = checkpoint_choices(run_id)
    return gr.update(choices=choices, value=chosen if chosen in choices else "final")


def refused(message: str) -> gr.Error:
    """An error the user is told of (no run yet, an empty prompt, a setting): said in the page, with no traceback
    in the server's log, where a session's worth of them hid what really went wrong."""
    return gr.Error(message, print_exception=False)


def shown_run(run_id: str | None, when_none: str):
    """The run a tab shows, for Try it and Export to act on; else they are refused with `when_none`, or for a run
    deleted since (in the Runs tab, perhaps of another window) with that said ("Train a run first" beside the
    deleted run still shown, and other runs in the tab, made no sense)."""
    run = Registry().get(run_id) if run_id else None
    if run is None and run_id:
        raise refused(f"Run {run_id} has been deleted. Open another run from the Runs tab, or train one.")
    if run is None:
        raise refused(when_none)
    return run


def export_zip(run_id: str | None, kind: str, checkpoint: str | None) -> str:
    """Export into the run folder and zip it for download. Returns the zip's path."""
    from studio.exporting import export_run
    run = shown_run(run_id, "Train a run first: there is nothing to export yet.")
    checkpoint = None if checkpoint in (None, "", "final") else checkpoint
    if checkpoint is None and not (run.dir / "adapter").exists() and run.status != "completed":
        checkpoints = checkpoint_choices(run_id)[1:]
        if not checkpoints and run.status in FINAL:  # (no checkpoint will come)
            raise refused(f"This run ended ({run.status}) before it saved an adapter: there is nothing to export. "
                           "Resume it, or train it again.")
        if not checkpoints:
            raise refused("This run has no adapter yet: wait for its first checkpoint or for it to finish.")
        checkpoint = checkpoints[0]
    label = f"{run.id}-{kind}" + (f"-{checkpoint}" if checkpoint else "")
    # Made in a folder of its own, the zip put in place whole: two exports of one kind at once (asked again
    # after the tab came back to this run) wrote in one folder, and one removed the other's half-made files.
    work = run.dir / "exports" / f".{label}-{secrets.token_hex(4)}"
    try:
        export_run(run, kind, work / label, checkpoint=checkpoint)
        made = shutil.make_archive(str(work / label), "zip", work / label)
        os.replace(made, run.dir / "exports" / f"{label}.zip")
    except Exception as err:  # shown as one message, not a traceback
        raise gr.Error(f"Export failed: {getattr(err, 'cause', None) or err}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(run.dir / "exports" / f"{label}.zip")
