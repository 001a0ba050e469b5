"""The Runs tab's functions over real runs: real worker processes started by the CLI, a real SQLite index,
real TensorBoard event files read back by TensorBoard's own reader."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from studio import jobs, tracking
from studio.runs import Registry
from studio.tabs import curve, runs_tab, widgets

ROOT = Path(__file__).resolve().parent.parent


def train_detached(folder: Path, **changes) -> str:
    data = yaml.safe_load((ROOT / "assets" / "llm" / "config.yaml").read_text())
    data.update({"train_files": [str(ROOT / "assets" / "llm" / "sample.csv")], "sample_every": 0,
                 "checkpoint_every": 1000, "validation_fraction": 0.25, "eval_every": 4, **changes})
    path = folder / f"config-{len(list(folder.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "studio.cli", "train", str(path), "--detach"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()[1]


def wait_for(predicate, timeout=240, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


TABLE_VERSIONS: dict[str, str] = {}  # runs_tab.table_version() as the `runs` fixture saw it on its way


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A long run that trains while two short ones wait in the queue; then the long one is cancelled and the
    short ones complete. Yields (registry, long id, short ids, what the table showed with the queue full)."""
    import os
    folder = tmp_path_factory.mktemp("runs-tab")
    old = os.environ.get("STUDIO_HOME")
    os.environ["STUDIO_HOME"] = str(folder / "ws")
    try:
        registry = Registry()
        long_id = train_detached(folder, name="long", max_steps=5000, eval_every=0)
        wait_for(lambda: registry.get(long_id).status == "running", what="the long run to start")
        short = [train_detached(folder, name="short-a", max_steps=8, lora_rank=8),
                 train_detached(folder, name="short-b", max_steps=8, lora_rank=4, learning_rate=0.002)]
        queued_table = runs_tab.runs_table()
        TABLE_VERSIONS["queued"] = runs_tab.table_version()
        wait_for(lambda: runs_tab.table_version() != TABLE_VERSIONS["queued"], what="the long run to move on")
        TABLE_VERSIONS["queued, a step later"] = runs_tab.table_version()
        refused = None
        try:
            runs_tab.delete_run(long_id, registry)
        except ValueError as err:
            refused = str(err)
        os.environ["STUDIO_MAX_CONCURRENT_RUNS"] = "2"  # from here on the short runs may train side by side
        jobs.cancel(long_id, registry)
        wait_for(lambda: all(registry.get(i).status == "completed" for i in short), what="the short runs")
        yield registry, long_id, short, queued_table, refused
    finally:
        os.environ.pop("STUDIO_MAX_CONCURRENT_RUNS", None)
        if old is None:
            os.environ.pop("STUDIO_HOME", None)
        else:
            os.environ["STUDIO_HOME"] = old


def test_table_shows_queue_positions_and_filters(runs):
    registry, long_id, short, queued_table, _ = runs
    statuses = dict(zip(queued_table["id"], queued_table["status"]))
    assert statuses == {long_id: "running", short[0]: "queued (#1)", short[1]: "queued (#2)"}

    table = runs_tab.runs_table()
    assert list(table.columns) == runs_tab.COLUMNS
    row = table.set_index("id").loc[short[0]]
    assert (row["name"], row["modality"], row["base model"], row["status"], row["progress"]) == \
        ("short-a", "Language model", "tiny-llama", "completed", "8/8 (100%)")
    assert row["best validation"].startswith("loss ") and row["duration"]
    assert list(runs_tab.runs_table(status="cancelled")["id"]) == [long_id]
    assert sorted(runs_tab.runs_table(status="completed")["id"]) == sorted(short)
    assert runs_tab.runs_table(modality="image").empty
    assert len(runs_tab.runs_table(modality="llm")) == 3


def test_details_show_config_and_files(runs):
    registry, _, short, _, _ = runs
    summary, config, files, name = runs_tab.run_details(short[0], registry)
    assert "short-a" in summary and "completed" in summary and name == "short-a"
    assert "lora_rank: 8" in config
    assert {"config.yaml", "events.jsonl", "log.txt", "adapter/", "data/"} <= set(files["path"])
    assert runs_tab.run_details(None, registry)[0] == runs_tab.NO_SELECTION


def test_compare_has_one_series_per_run_and_diff_only_differing_settings(runs):
    registry, long_id, short, _, _ = runs
    frame = runs_tab.compare_frame(short, runs_tab.TRAIN_LOSS, registry)
    labels = {runs_tab.run_label(registry.get(i)) for i in short}
    assert set(frame["run"]) == labels
    assert frame.groupby("run")["step"].apply(list).map(sorted).tolist() == [list(range(1, 9))] * 2
    assert "eval_loss" in runs_tab.metric_choices(short, registry)
    evals = runs_tab.compare_frame(short, "eval_loss", registry)
    assert set(evals["run"]) == labels and set(evals["step"]) >= {4, 8}
    assert runs_tab.compare_frame([], runs_tab.TRAIN_LOSS, registry) is None  # None, never an empty frame

    diff = runs_tab.config_diff(short, registry)
    assert sorted(diff["setting"]) == ["learning_rate", "lora_rank"]
    assert diff.set_index("setting").loc["lora_rank"].tolist() == ["8", "4"]
    assert runs_tab.config_diff(short[:1], registry) is None
    three = runs_tab.config_diff([long_id, *short], registry)
    assert set(three["setting"]) == {"learning_rate", "lora_rank", "max_steps", "eval_every"}


def test_clone_fills_the_language_tab_from_the_run(runs):
    registry, _, short, _, _ = runs
    modality, values = runs_tab.clone_values(short[1], registry)
    assert modality == "llm"
    from studio.tabs import llm
    form = llm.FORM_SPEC
    uploads, (base, name), settings = (values[:2], values[2:4], values[4:-1])
    assert uploads[0] == [str(registry.get(short[1]).dir / "data" / "sample.csv")]
    assert (base, name) == ("tiny-llama", "short-b-clone")
    from pipelines.llm.config import LLMConfig
    assert LLMConfig.from_dict(form.values(*values[:-1])).name == "short-b-clone"  # Train takes the clone's name
    chosen = dict(zip(form.form, settings))
    assert (chosen["lora_rank"], chosen["learning_rate"], chosen["max_steps"]) == (4, 0.002, 8)
    assert "Cloned from run **short-b**" in values[-1]


# What each tab's form leaves out on purpose: the run's name, the model picker and the uploads are the
# tab's own widgets; a DeepSpeed/FSDP file is for `studio train`; the image pipeline has no validation split.
LEFT_OFF_THE_FORM = {
    "llm": {"name", "base_model", "train_files", "validation_files", "strategy_config"},
    "image": {"name", "base_model", "data_path", "data_files", "strategy_config", "eval_every"},
    "speech": {"name", "base_model", "data_path", "data_files", "validation_path", "strategy_config"},
}


@pytest.mark.parametrize("modality", sorted(LEFT_OFF_THE_FORM))
def test_every_setting_is_on_the_form(modality):
    """A setting left off the form cannot be set in the browser and is lost when a run is cloned."""
    import dataclasses
    from pipelines import config_class
    fields = {f.name for f in dataclasses.fields(config_class(modality))}
    assert fields - set(runs_tab._tab_module(modality).FORM) == LEFT_OFF_THE_FORM[modality]


@pytest.mark.parametrize("modality, expected", [("image", "01-red-circle.png"), ("speech", "apples.wav")])
def test_clone_puts_a_data_folder_into_the_upload(runs, modality, expected):
    """Image and speech runs keep their data as a folder, which the tabs take as the files of a folder upload
    (named by their places in it), and put back in the same folders: Train on the clone trains the same data."""
    from pipelines import load_config
    from pipelines.archives import FOLDER_MARK
    registry = runs[0]
    run = registry.create(load_config(ROOT / "assets" / modality / "config.yaml"), status="stopped")
    try:
        chosen, values = runs_tab.clone_values(run.id, registry)
        assert chosen == modality
        names = [Path(p).name.split(FOLDER_MARK)[-1] for p in values[0]]
        assert expected in names and "config.yaml" not in names
        assert values[1] is None  # the tab's second upload is cleared, not left as it was
        (folder,) = widgets.gathered(values[0])
        (data,) = (run.dir / "data").iterdir()

        def places(root):
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "config.yaml")
        assert places(Path(folder)) == places(data) and Path(folder).name == data.name
    finally:
        registry.delete(run.id)


def test_clone_of_uploaded_images_fills_one_upload_box(runs):
    """The image tab's two boxes (files, a folder) both feed data_files: the clone (and Load config) puts the
    files into the first only. Filled into both, clearing one kept the old images in the run."""
    from pipelines import load_config
    registry = runs[0]
    uploaded = sorted(str(p) for p in (ROOT / "assets" / "image").iterdir() if p.suffix in (".png", ".txt"))
    config = load_config(ROOT / "assets" / "image" / "config.yaml").changed(data_path="", data_files=uploaded)
    run = registry.create(config, status="stopped")
    try:
        _, values = runs_tab.clone_values(run.id, registry)
        assert sorted(Path(p).name for p in values[0]) == sorted(Path(p).name for p in uploaded)
        assert values[1] is None
    finally:
        registry.delete(run.id)


def test_load_config_fills_what_it_names_and_says_what_is_missing(tmp_path):
    """Load config: the uploads hold the config's own data, nothing left from before; data it names that is
    not next to it is named in the message (a config.yaml uploaded without its data folder)."""
    from studio.tabs import image, llm
    alone = tmp_path / "alone" / "config.yaml"
    alone.parent.mkdir()
    alone.write_text((ROOT / "assets" / "image" / "config.yaml").read_text())
    values = image.FORM_SPEC.load(str(alone))
    assert values[:2] == [None, None]
    assert values[-1] == ("Settings loaded from the config file. The data it names (.) is not found next to it: "
                          "upload the data above.")
    with_data = image.FORM_SPEC.load(str(ROOT / "assets" / "image" / "config.yaml"))
    assert len(with_data[0]) == 16 and with_data[1] is None  # 8 drawings and their captions, in the first box
    assert with_data[-1] == "Settings loaded from the config file."
    text = tmp_path / "llm.yaml"
    text.write_text(f"modality: llm\ntrain_files: [{ROOT / 'assets' / 'llm' / 'sample.csv'}, gone.csv]\n")
    loaded = llm.FORM_SPEC.load(str(text))
    assert loaded[0] == [str(ROOT / "assets" / "llm" / "sample.csv")] and loaded[1] is None  # no validation file
    assert "The data it names (gone.csv) is not found next to it" in loaded[-1]


def test_load_config_fills_the_speech_validation_box_as_the_training_one(tmp_path, monkeypatch):
    """The speech tab's validation box takes what its training box takes (files, a zip): a config naming a zip
    gets it, one naming a folder (a run's copy, or a CLI user's) its files as a folder upload, and one naming
    files those files; Train then validates on the clips the config named. (The box took one zip: a config
    naming files could not be loaded.)"""
    import shutil
    from pipelines.speech.config import SpeechConfig
    from pipelines.speech.data import load_clips
    from studio.tabs import speech
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "ws"))
    clips = ROOT / "assets" / "speech" / "clips"
    shutil.make_archive(str(tmp_path / "held"), "zip", clips)
    for validation, held in [("held.zip", 8), (str(clips), 8),
                             ([str(clips / "cat.wav"), str(clips / "metadata.csv")], 1)]:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"modality": "speech", "data_path": str(clips), "validation_path": validation,
                                          "validation_fraction": 0}))
        values = speech.FORM_SPEC.load(str(config))
        assert values[-1] == "Settings loaded from the config file."
        assert isinstance(values[2], list)
        settings = SpeechConfig.from_dict(speech.FORM_SPEC.values(*values[:-1]))
        report, _, validation_clips = load_clips(settings, keep_audio=False)
        assert len(validation_clips) == held, (validation, report.problems)


def test_a_data_path_with_a_comma_in_its_name_is_one_path(tmp_path):
    """A list of paths given as text in a config file (`train_files: ...`, `data_files: ...`) was read as items
    between commas, also where it named one file or folder: 'shapes, set 1' became 'shapes' and 'set 1', neither
    found, for studio train and Load config alike. Text naming an existing path (read against the config file's
    folder, as its paths are) is that path; any other text is a list between commas, as before."""
    import shutil
    from pipelines import load_config
    from pipelines.image.data import inspect_data as check_images
    from pipelines.llm.data import inspect_data as check_rows
    from studio.tabs import image, llm
    shapes = tmp_path / "shapes, set 1"
    shutil.copytree(ROOT / "assets" / "image", shapes, ignore=shutil.ignore_patterns("config.yaml"))
    (tmp_path / "notes, 2024").mkdir()
    for copy in ("notes, 2024/sample.csv", "sample.csv", "more.csv"):
        shutil.copy(ROOT / "assets" / "llm" / "sample.csv", tmp_path / copy)
    rows = check_rows(load_config(ROOT / "assets" / "llm" / "config.yaml")).rows_usable

    drawings = tmp_path / "image.yaml"
    drawings.write_text("modality: image\nresolution: 32\ndata_files: shapes, set 1\n")
    settings = load_config(drawings)
    assert settings.data_files == [str(shapes)] and check_images(settings).rows_usable == 8
    assert len(image.FORM_SPEC.load(str(drawings))[0]) == 16  # Load config: the 8 drawings and their captions

    text = tmp_path / "llm.yaml"
    text.write_text("modality: llm\ntrain_files: notes, 2024/sample.csv\n")
    settings = load_config(text)
    assert settings.train_files == [str(tmp_path / "notes, 2024" / "sample.csv")]
    assert check_rows(settings).rows_usable == rows
    assert llm.FORM_SPEC.load(str(text))[0] == settings.train_files
    text.write_text("modality: llm\ntrain_files: sample.csv, more.csv\n")  # no path of that name: a list
    assert load_config(text).train_files == [str(tmp_path / "sample.csv"), str(tmp_path / "more.csv")]


def test_prompts_with_commas_keep_them_through_the_form(tmp_path):
    """Sample prompts are sentences: the form takes them one per line (split at commas, 'Hello, who are you?'
    became two prompts in the saved config). Module names stay comma-separated."""
    import yaml as yaml_module
    from pipelines.llm.config import LLMConfig
    from studio.tabs import llm
    config = LLMConfig(sample_prompts=["Hello, who are you?", "Name a colour."], target_modules="custom",
                       custom_target_modules=["q_proj", "v_proj"])
    shown = widgets.config_to_form(config, llm.FORM)
    assert dict(zip(llm.FORM, shown))["sample_prompts"] == "Hello, who are you?\nName a colour."
    assert dict(zip(llm.FORM, shown))["custom_target_modules"] == "q_proj, v_proj"
    sample = str(ROOT / "assets" / "llm" / "sample.csv")
    saved, message = llm.FORM_SPEC.save([sample], [], "tiny-llama", "commas", *shown)
    assert message == ""
    written = yaml_module.safe_load(Path(saved["value"]).read_text())
    assert written["sample_prompts"] == ["Hello, who are you?", "Name a colour."]
    assert written["custom_target_modules"] == ["q_proj", "v_proj"]


def test_tensorboard_export_is_readable_by_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    registry, _, short, _, _ = runs
    run = registry.get(short[0])
    assert tracking.stale(run.dir) and tracking.sync(run.dir) == []  # off by default: writes nothing
    folder = tracking.export_tensorboard(run.dir)
    assert folder == run.dir / "tensorboard" and not tracking.stale(run.dir)
    tracking.export_tensorboard(run.dir)  # again: rebuilt, not appended to
    assert len(list(folder.iterdir())) == 1
    reader = EventAccumulator(str(folder))
    reader.Reload()
    assert {"train/loss", "train/learning_rate", "eval/loss"} <= set(reader.Tags()["scalars"])
    assert [e.step for e in reader.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in reader.Scalars("eval/loss")][-1] == 8

    tracking.set_enabled(True)
    try:
        assert tracking.enabled()
        other = registry.get(short[1])
        runs_tab.sync_tracking(registry)  # the switch: every finished run gets its export
        assert (other.dir / "tensorboard").is_dir()
    finally:
        tracking.set_enabled(False)
    assert not tracking.enabled()


def test_rename_changes_the_name_everywhere(runs):
    registry, _, short, _, _ = runs
    runs_tab.rename_run(short[1], "  renamed run ", registry)
    run = registry.get(short[1])
    assert run.name == "renamed run"
    assert yaml.safe_load((run.dir / "config.yaml").read_text())["name"] == "renamed run"
    assert runs_tab.runs_table().set_index("id").loc[short[1], "name"] == "renamed run"
    assert Registry().rebuild() == 3 and Registry().get(short[1]).name == "renamed run"  # the folder agrees
    with pytest.raises(ValueError, match="Type the new name"):
        runs_tab.rename_run(short[1], " ", registry)
    with pytest.raises(ValueError) as refused:  # said of the name typed (it was "name: may hold only …")
        runs_tab.rename_run(short[1], "a/b", registry)
    assert str(refused.value).startswith("The name 'a/b' may hold only letters")
    with pytest.raises(ValueError, match="^The name 'short-a' is already another run's name.$"):
        runs_tab.rename_run(short[1], "short-a", registry)
    assert registry.get(short[1]).name == "renamed run"


def test_delete_refuses_a_running_run_and_removes_folder_and_row(runs):
    registry, long_id, short, _, refused = runs
    assert refused and "running" in refused and "stop or cancel it" in refused
    run = registry.get(short[0])
    message = runs_tab.delete_run(short[0], registry)
    assert "Deleted run **short-a**" in message
    assert not run.dir.exists() and registry.get(short[0]) is None
    assert short[0] not in set(runs_tab.runs_table()["id"])
    with pytest.raises(ValueError, match="Select a run"):
        runs_tab.delete_run(short[0], registry)


def test_live_update_sends_status_and_curve_only_when_the_run_changed(runs):
    registry, long_id, short, _, _ = runs
    first = widgets.live_update(short[1], "")  # (short[0] is deleted above)
    assert short[1] in first["status"] and "completed" in first["status"]
    assert 'data-live-poll="0"' in first["status"]  # a completed run is not asked about again
    assert first["curve"].count("<polyline") == 3  # train, smoothed and validation (eval_every 4)
    assert widgets.live_update(short[1], first["version"]) == {"version": first["version"]}
    assert widgets.live_update("no-such-run", "")["version"] == "gone"


def test_the_table_version_tells_progress_from_changes_to_the_list(runs):
    registry, long_id, short, _, _ = runs
    listed, moving = zip(*(v.split(":") for v in TABLE_VERSIONS.values()))
    assert listed[0] == listed[1] and moving[0] != moving[1]  # the long run trained, the queue stayed
    now = runs_tab.table_version(registry)
    assert now.split(":")[0] != listed[0]  # cancelled, completed: statuses changed since
    assert runs_tab.table_version(registry) == now  # nothing trains: the page sees no reason to refresh
    runs_tab.rename_run(short[1], "short-b renamed", registry)
    assert runs_tab.table_version(registry).split(":")[0] != now.split(":")[0]


@pytest.mark.parametrize("count, limit, expected_last", [(10, 400, 9), (401, 400, 400), (1000, 400, 999), (1001, 7, 1000)])
def test_the_curve_keeps_at_most_its_limit_and_always_the_last_point(count, limit, expected_last):
    points = [(step, 1.0 / (step + 1)) for step in range(count)]
    kept = curve.thinned(points, limit)
    assert len(kept) <= limit and kept[0] == points[0] and kept[-1] == points[expected_last]


def test_the_curve_leaves_out_values_that_are_not_finite():
    svg = curve.curve_svg({"train": [(1, 2.0), (2, float("nan")), (3, float("inf")), (4, 1.0)]}, "Loss")
    assert "nan" not in svg and "inf" not in svg and svg.count("<polyline") == 1
    assert "appears with the first" in curve.curve_svg({"train": []}, "Loss")
    short = curve.curve_svg({"train": [(1, 2.0), (2, 1.5), (3, 1.0)]}, "Loss")  # labelled 1 2 2 2 3 before
    assert re.findall(r'text-anchor="middle">(\d+)</text>', short) == ["1", "2", "3"]


def test_load_config_keeps_the_uploaded_data_it_names(tmp_path):
    """A config.yaml loaded in the browser arrives alone in an upload folder: the data it names was never next
    to it, and the files the user had just uploaded were cleared ('not found next to it: upload the data')."""
    from studio.tabs import llm
    uploaded = tmp_path / "upload-1" / "mine.csv"
    uploaded.parent.mkdir()
    uploaded.write_text("instruction,output\nSay hi,hi\n")
    other = tmp_path / "upload-2" / "other.csv"
    other.parent.mkdir()
    other.write_text("instruction,output\nSay bye,bye\n")
    config = tmp_path / "upload-3" / "config.yaml"
    config.parent.mkdir()
    config.write_text("modality: llm\ntrain_files: [/home/someone/data/mine.csv, gone.csv]\nlora_rank: 4\n")
    values = llm.FORM_SPEC.load(str(config), [str(uploaded), str(other)], None)
    assert values[0] == [str(uploaded)] and values[1] is None  # what it names, and no file it does not
    assert values[-1] == ("Settings loaded from the config file. The data it names (gone.csv) is not found next "
                          "to it: upload the data above.")
    assert dict(zip(llm.FORM, values[4:-1]))["lora_rank"] == 4


def test_a_run_asked_to_stop_says_so_until_it_ends(tmp_path, monkeypatch):
    """After Stop, the status line said 'running' until the checkpoint was saved, and users pressed it again."""
    from pipelines import load_config
    from pipelines.events import STOP_FILE
    from studio.progress import read_progress
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "ws"))
    registry = Registry()
    config = load_config(ROOT / "assets" / "llm" / "config.yaml")
    run = registry.create(config.changed(train_files=[str(ROOT / "assets" / "llm" / "sample.csv")]),
                          status="running")
    from studio.runs import append_event
    append_event(run.dir, "step", step=1, total_steps=10, loss=1.0, eta_s=30.0)
    before = widgets.live_version(run, read_progress(run.dir), registry)
    running = widgets.status_markdown(run, read_progress(run.dir), registry)
    assert "**running**" in running and "ETA" in running
    (run.dir / STOP_FILE).touch()
    shown = widgets.status_markdown(run, read_progress(run.dir), registry)
    assert "**stopping**" in shown and "saves a checkpoint at the end of this step, then ends" in shown
    assert "ETA" not in shown
    assert widgets.live_version(run, read_progress(run.dir), registry) != before  # the page polls it at once
    registry.set_status(run.id, "stopped")
    stopped = widgets.status_markdown(registry.get(run.id), read_progress(run.dir), registry)
    assert "**stopped**" in stopped and "Stopped before any checkpoint: **Resume** starts it from the beginning" \
        in stopped


def test_resume_is_offered_only_where_it_can_get_past_the_failure(tmp_path, monkeypatch):
    """The panel's Resume was enabled for every failed run: pressed after a loss gone to nan it queued the run, which
    failed again the same way. `studio train` suggested a resume only where it can help; the tabs now agree."""
    from pipelines import load_config
    from pipelines.training import TrainingFailure
    from studio.worker import explain
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "ws"))
    registry = Registry()
    config = load_config(ROOT / "assets" / "llm" / "config.yaml")
    config = config.changed(train_files=[str(ROOT / "assets" / "llm" / "sample.csv")])
    shown = {}
    for name, failure in (("nan", TrainingFailure("The loss became nan at step 3.", "Lower the learning rate.")),
                          ("memory", MemoryError())):
        run = registry.create(config.changed(name=name), status="running")
        error, advice = explain(failure)
        registry.set_status(run.id, "failed", error=error, advice=advice)
        shown[name] = widgets.live_values(run.id, registry)
    assert shown["nan"][8]["interactive"] is False  # (Resume: the 9th of LivePanel.outputs)
    assert "Resuming would fail the same way" in shown["nan"][0] and "Clone" in shown["nan"][0]
    assert shown["memory"][8]["interactive"] is True  # memory other work held may be free now
    assert "Resuming would fail" not in shown["memory"][0]
    stopped = registry.create(config.changed(name="stopped"), status="running")
    registry.set_status(stopped.id, "stopped")
    assert widgets.live_values(stopped.id, registry)[8]["interactive"] is True


def test_settings_compared_read_as_typed():
    """'epochs 1000.0', 'lora_alpha 32.0': the float settings showed their type, not the value typed."""
    assert [runs_tab._shown(v) for v in (1000.0, 32.0, 0.0002, 1e-05, 3, None, [1.0, 0.5])] == [
        "1000", "32", "0.0002", "1e-05", "3", "", "1, 0.5"]


def test_a_run_that_ended_without_an_adapter_says_so_and_a_resumed_run_its_whole_time(tmp_path, monkeypatch):
    """Export of a failed run said 'wait for its first checkpoint', which would never come; a 3000-step run
    resumed at its end showed a duration of 9 s."""
    import gradio as gr
    from pipelines import load_config
    from studio.runs import append_event
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "ws"))
    registry = Registry()
    config = load_config(ROOT / "assets" / "llm" / "config.yaml")
    config = config.changed(train_files=[str(ROOT / "assets" / "llm" / "sample.csv")])
    failed = registry.create(config, status="failed")
    with pytest.raises(gr.Error, match=r"This run ended \(failed\) before it saved an adapter: there is nothing to "
                                       r"export. Resume it, or train it again."):
        widgets.export_zip(failed.id, "adapter", "final")
    resumed = registry.create(config, status="running")
    now = time.time()
    registry.set_status(resumed.id, "completed", started=now - 9, ended=now)
    append_event(resumed.dir, "step", step=3000, total_steps=3000, loss=0.5, elapsed_s=1500.0)
    row = runs_tab.runs_table().set_index("id").loc[resumed.id]
    assert row["duration"] == widgets.format_seconds(1500.0)


def test_a_checkpoint_removed_since_it_was_chosen_is_not_offered(runs):
    """A run keeps its last few checkpoints: one chosen before it was removed (a run resumed and trained on) stayed
    in the box, and Generate failed ('This run has no checkpoint step-90')."""
    registry, _, short, *_ = runs
    run = registry.get(short[1])  # (short[0] is deleted by an earlier test)
    kept = widgets.checkpoint_choices(run.id)
    assert kept[0] == "final" and len(kept) > 1
    assert widgets.current_checkpoints(run.id, kept[-1])["value"] == kept[-1]
    assert widgets.current_checkpoints(run.id, "step-90")["value"] == "final"
    assert widgets.current_checkpoints(run.id, "step-90")["choices"] == kept


def test_try_it_and_export_on_a_run_deleted_meanwhile_say_so(tmp_path, monkeypatch):
    """A run deleted in another window stayed on screen; Try it and Export on it said "Train a run first"."""
    import gradio as gr
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "ws"))
    with pytest.raises(gr.Error) as deleted:
        widgets.export_zip("20261207-120000-llm-dead", "adapter", None)
    assert deleted.value.message == ("Run 20261207-120000-llm-dead has been deleted. Open another run from the Runs "
                                     "tab, or train one.")
    with pytest.raises(gr.Error) as nothing:
        widgets.export_zip(None, "adapter", None)
    assert nothing.value.message == "Train a run first: there is nothing to export yet."


def test_load_config_copies_no_folder_the_page_may_not_be_sent(tmp_path, monkeypatch):
    """A folder a config names is copied into the temporary folder, named for an upload box: named by a config
    uploaded in the browser, ~/.ssh was copied there, and Gradio (which refuses ~/.ssh) sent the copy."""
    from studio.tabs import speech
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    keys = tmp_path / "home" / ".ssh"
    keys.mkdir(parents=True)
    (keys / "id_rsa").write_text("secret")
    config = tmp_path / "config.yaml"
    config.write_text(f"modality: speech\ndata_path: {keys}\n")
    values = speech.FORM_SPEC.load(str(config))
    assert values[0] == [str(keys / "id_rsa")]  # where it is, for Gradio to refuse, not a copy it would send
