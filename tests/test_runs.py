"""The run engine through the real CLI: real worker processes, a real SQLite index, real signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines import load_config
from pipelines.config import ConfigError
from pipelines.training import STOP_FILE, latest_checkpoint, read_events
from studio import jobs
from studio.runs import Registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "ws"
    monkeypatch.setenv("STUDIO_HOME", str(home))
    return home


def studio(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "studio.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def config_file(tmp_path, **changes):
    data = yaml.safe_load((ROOT / "assets" / "llm" / "config.yaml").read_text())
    data["train_files"] = [str(ROOT / "assets" / "llm" / "sample.csv")]
    data.update(changes)
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_for(predicate, timeout=240, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def run_id_of(output: str) -> str:
    return output.split()[1]


def steps(home, run_id):
    return [e["step"] for e in read_events(home / "runs" / run_id)[0] if e["type"] == "step"]


def test_train_then_generate_from_the_command_line(home, tmp_path):
    result = studio("train", str(ROOT / "assets" / "llm" / "config.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = run_id_of(result.stdout)
    assert "Completed" in result.stdout
    tuned = studio("generate", run_id, "--prompt", "What is the capital of Zorbia?")
    base = studio("generate", run_id, "--base", "--prompt", "What is the capital of Zorbia?")
    assert tuned.stdout.strip() == "The capital of Zorbia is Quillton."
    assert base.returncode == 0 and "Quillton" not in base.stdout
    missing = studio("generate", run_id, "--checkpoint", "step-7", "--prompt", "Hi")  # one line, no traceback
    assert missing.returncode == 2 and missing.stderr.startswith(
        "error: This run has no checkpoint step-7; it has: step-30, step-60, step-90, final.")
    assert "Traceback" not in missing.stderr
    listed = json.loads(studio("runs", "--json").stdout)
    assert [(r["id"], r["status"], r["step"]) for r in listed] == [(run_id, "completed", 90)]
    run_dir = home / "runs" / run_id
    assert (run_dir / "data" / "sample.csv").exists()  # the run folder alone replays the run
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train_files"] == ["data/sample.csv"]
    assert "completed" in (run_dir / "log.txt").read_text()
    exported = studio("export", run_id, "--adapter", str(tmp_path / "adapter"))
    assert exported.returncode == 0 and (tmp_path / "adapter" / "adapter_config.json").is_file()
    # its model card says what it is and how to load it (it was peft's blank "[More Information Needed]")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "More Information Needed" not in card and "# zorbia-facts" in card and "for `tiny-llama`" in card
    assert "base_model:" not in card  # (the hub would link the card to a model of that name: a preset is none)
    assert "- Steps: 90 of 90" in card and "- LoRA: rank 16" in card and "AutoPeftModelForCausalLM" in card
    # a checkpoint's card tells of the training up to it, not of the run's end; a merged model has no adapter
    merged = studio("export", run_id, "--merged", str(tmp_path / "merged"), "--checkpoint", "step-30")
    assert merged.returncode == 0, merged.stderr
    card = (tmp_path / "merged" / "README.md").read_text()
    loss_at_30 = next(e["loss"] for e in read_events(run_dir)[0] if e["type"] == "step" and e["step"] == 30)
    assert "- Steps: 30 of 90 (checkpoint step-30)" in card and f"- Last training loss: {loss_at_30:.4f}" in card
    assert "library_name: transformers" in card
    again = studio("export", run_id, "--adapter", str(tmp_path / "adapter"))  # never into a folder with files
    assert again.returncode == 2 and again.stderr == (
        f"error: {tmp_path / 'adapter'} already exists and is not an empty folder: choose a new one.\n")


def test_stop_checkpoints_and_resume_continues(home, tmp_path):
    config = config_file(tmp_path, max_steps=120, checkpoint_every=1000, sample_every=0)
    run_id = run_id_of(studio("train", str(config), "--detach").stdout)
    wait_for(lambda: steps(home, run_id), what="the first step")
    assert studio("stop", run_id).stdout.strip() == "stopping"
    registry = Registry(home)
    wait_for(lambda: registry.get(run_id).status == "stopped", what="stopped")
    stopped_at = steps(home, run_id)[-1]
    assert stopped_at < 120 and (home / "runs" / run_id / "checkpoints" / f"step-{stopped_at}").is_dir()
    result = studio("train", str(home / "runs" / run_id / "config.yaml"), "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    after = steps(home, run_id)
    assert after[after.index(stopped_at) + 1] == stopped_at + 1 and after[-1] == 120
    assert registry.get(run_id).status == "completed"


def test_cancel_ends_the_process_at_once(home, tmp_path):
    config = config_file(tmp_path, max_steps=100000, sample_every=0)
    run_id = run_id_of(studio("train", str(config), "--detach").stdout)
    registry = Registry(home)
    wait_for(lambda: steps(home, run_id), what="the first step")
    pid = registry.get(run_id).pid
    assert studio("cancel", run_id).stdout.strip() == "cancelled"
    assert registry.get(run_id).status == "cancelled"
    wait_for(lambda: not _alive(pid), timeout=15, what="the worker to exit")
    again = studio("stop", run_id)  # an ended run: said so, and not as if the stop had been done
    assert again.returncode == 2 and again.stderr.strip() == (
        f"error: Run {run_id} has already ended (cancelled); there is nothing to stop.")


def test_a_run_cancelled_while_its_worker_starts_is_not_trained(home, tmp_path, monkeypatch):
    # Cancel lands between the dispatcher's claim ("starting", no pid yet: nothing to kill) and its recording
    # of the new worker's pid, as a click in the UI can while the CLI starts the run.
    registry = Registry(home)
    spawned = []

    def cancel_then_spawn(run, spawn=jobs._spawn_worker):
        assert jobs.cancel(run.id, registry) == "cancelled"
        spawned.append(spawn(run))
        return spawned[-1]

    monkeypatch.setattr(jobs, "_spawn_worker", cancel_then_spawn)
    run = jobs.submit(load_config(config_file(tmp_path, max_steps=100000, sample_every=0)), registry)
    wait_for(lambda: not _alive(spawned[0]), timeout=120, what="the worker to exit")
    assert registry.get(run.id).status == "cancelled"
    assert steps(home, run.id) == []
    assert "not training it" in (home / "runs" / run.id / "log.txt").read_text()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_killed_worker_becomes_interrupted_and_resumes(home, tmp_path):
    config = config_file(tmp_path, max_steps=60, checkpoint_every=5, sample_every=0)
    run_id = run_id_of(studio("train", str(config), "--detach").stdout)
    registry = Registry(home)
    run_dir = home / "runs" / run_id
    wait_for(lambda: (run_dir / "checkpoints" / "step-10").is_dir(), what="a checkpoint")
    os.kill(registry.get(run_id).pid, signal.SIGKILL)
    wait_for(lambda: jobs.reconcile(registry) or registry.get(run_id).status == "interrupted", timeout=15,
             what="interrupted")
    assert registry.get(run_id).status == "interrupted"
    assert studio("runs").stdout.count("interrupted") == 1
    # with no final adapter, an export is of the latest checkpoint, and its card says so (it told of the last step)
    latest = latest_checkpoint(run_dir).name  # (the kill may leave a half-written .tmp-step-N beside them)
    exported = studio("export", run_id, "--adapter", str(tmp_path / "adapter"))
    assert exported.returncode == 0, exported.stderr
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert f"- Steps: {latest.split('-')[1]} of 60 (checkpoint {latest})" in card
    jobs.resume(run_id, registry)
    wait_for(lambda: registry.get(run_id).status == "completed", what="the resumed run to complete")
    resumed = [e for e in read_events(run_dir)[0] if e["type"] == "resumed"]
    assert resumed and resumed[0]["step"] >= 10 and steps(home, run_id)[-1] == 60


def test_runs_queue_one_at_a_time_and_start_by_themselves(home, tmp_path):
    # (the first long enough to be training still when the second is given: 20 steps were over before the second
    # `studio train` had checked its data, on a quiet machine; it is stopped once the second is seen queued)
    first = run_id_of(studio("train", str(config_file(tmp_path, max_steps=5000, sample_every=0)), "--detach").stdout)
    second_out = studio("train", str(config_file(tmp_path, max_steps=5, sample_every=0)), "--detach").stdout
    second = run_id_of(second_out)
    registry = Registry(home)
    assert registry.get(second).status == "queued" and "Queued" in second_out
    jobs.request_stop(first, registry)
    wait_for(lambda: registry.get(second).status == "completed", what="the queued run to finish")
    first_end = registry.get(first).ended
    second_start = registry.get(second).started
    assert registry.get(first).status == "stopped" and second_start >= first_end - 0.5


def test_index_rebuilds_from_run_folders(home, tmp_path):
    run_id = run_id_of(studio("train", str(config_file(tmp_path, max_steps=3, sample_every=0))).stdout)
    (home / "studio.db").unlink()
    for suffix in ("-wal", "-shm"):
        (home / f"studio.db{suffix}").unlink(missing_ok=True)
    registry = Registry(home)
    assert registry.list() == []
    assert registry.rebuild() == 1
    run = registry.get(run_id)
    assert (run.status, run.modality, run.name) == ("completed", "llm", "zorbia-facts")


def test_bad_settings_are_refused_with_the_field_name_and_no_run(home, tmp_path):
    result = studio("train", str(config_file(tmp_path, lora_rank=0, learning_rate="fast", colour="blue")))
    assert result.returncode == 2
    for expected in ("lora_rank: must be at least 1", "learning_rate: must be a number", "colour: is not a known"):
        assert expected in result.stderr
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())
    missing = studio("train", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "file not found" in missing.stderr
    # Data with nothing to train on is refused before a run is made (a failed run to 'resume' was made before),
    # and so is validation data with nothing usable (its loss would have been the training rows').
    empty = tmp_path / "empty.csv"
    empty.write_text("instruction,output\n,nothing asked\n")
    unusable = studio("train", str(config_file(tmp_path, train_files=[str(empty)])))
    assert unusable.returncode == 2 and unusable.stderr == (
        "error: No usable data: 0 of 1 rows usable (alpaca); 1 row dropped\n"
        "- empty.csv, row 2: the 'instruction' column is empty\n")
    header = tmp_path / "header.csv"
    header.write_text("instruction,output\n")
    no_rows = studio("train", str(config_file(tmp_path, train_files=[str(header)])))  # said once, not twice
    assert no_rows.stderr == "error: No usable data: header.csv: has a header row but no data rows\n"
    no_validation = studio("train", str(config_file(tmp_path, validation_files=[str(empty)])))
    assert no_validation.returncode == 2 and "the validation data has nothing usable" in no_validation.stderr
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())
    # A data file gone between the check and the copy: the run folder made for it goes too.
    with pytest.raises(FileNotFoundError):
        Registry(home).create(load_config(config_file(tmp_path, train_files=[str(tmp_path / "gone.csv")])))
    assert not any((home / "runs").iterdir())


def test_ctrl_c_in_studio_train_stops_with_a_checkpoint(home, tmp_path):
    config = config_file(tmp_path, max_steps=100000, checkpoint_every=100000, sample_every=0)
    # As from a terminal: Ctrl-C's default action restored. A test runner started in the background by a
    # shell (`make test &`) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt for it.
    # Unbuffered, and with faulthandler: if it ever hangs, SIGABRT prints where each of its threads is.
    process = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "studio.cli", "train", str(config)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    registry = Registry(home)
    run = wait_for(lambda: (registry.list() or [None])[0], what="the run")
    wait_for(lambda: steps(home, run.id), what="the first step")
    process.send_signal(signal.SIGINT)
    try:
        out, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # Say where each side was.
        process.send_signal(signal.SIGABRT)
        out, err = process.communicate()
        log = run.dir / "log.txt"
        pytest.fail(f"studio train did not end within 240 s of Ctrl-C. Status {registry.get(run.id).status!r}; "
                    f"its output: {out!r} {err!r}; stop file there: {(run.dir / STOP_FILE).exists()}; "
                    f"the run's log ends: {log.read_text()[-3000:] if log.exists() else '(none)'}")
    assert process.returncode == 1 and "Stopping: saving a checkpoint" in out
    assert f"Resume:  studio resume {run.id}" in out
    assert registry.get(run.id).status == "stopped"
    assert list((home / "runs" / run.id / "checkpoints").glob("step-*"))


def test_training_threads_follow_the_cores_this_process_may_use():
    # A container or `taskset` that allows one CPU gets one torch thread, not one per CPU of the machine.
    probe = [sys.executable, "-c", "from studio.worker import cores_each; print(cores_each())"]
    one_cpu = subprocess.run(probe, capture_output=True, text=True, check=True,
                             preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert one_cpu.stdout.strip() == "1"
    every_cpu = subprocess.run(probe, capture_output=True, text=True, check=True)
    assert 1 <= int(every_cpu.stdout) <= len(os.sched_getaffinity(0))  # fewer where cores have hyperthreads


def test_generate_checks_where_it_writes_before_drawing(home, tmp_path):
    """A picture to a folder that is not there failed only after the model had loaded and drawn it."""
    run = Registry(home).create(load_config(ROOT / "assets" / "image" / "config.yaml"), status="completed")
    out = tmp_path / "missing" / "cat.png"
    refused = studio("generate", run.id, "--prompt", "a zqx drawing", "--out", str(out))
    assert refused.returncode == 2 and refused.stderr == (
        f"error: --out {out}: give a .png, .jpg or .webp file in a folder that exists\n")


def test_a_damaged_index_is_set_aside_and_rebuilt_from_the_run_folders(home, tmp_path):
    """studio.db overwritten (a disk fault, a stray write): `studio runs --rebuild`, the documented way out,
    failed on the damaged file itself ('file is not a database'), as did every page and command; a run that
    ended meanwhile was rebuilt as interrupted, and a queued resume as a fresh start."""
    registry = Registry(home)
    done = run_id_of(studio("train", str(config_file(tmp_path, max_steps=3, sample_every=0))).stdout)
    ahead = run_id_of(studio("train", str(config_file(tmp_path, max_steps=100000, sample_every=0,
                                                      checkpoint_every=1000)), "--detach").stdout)
    wait_for(lambda: steps(home, ahead), what="the first step")
    behind = registry.create(load_config(config_file(tmp_path, max_steps=3, sample_every=0)), status="stopped")
    assert jobs.resume(behind.id, registry).status == "queued"  # behind the run training: a resume, queued

    def damage():
        (home / "studio.db").write_bytes(b"not a database " * 1000)

    damage()
    listed = studio("runs", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "studio.db could not be read (file is not a database): it was set aside as studio.db.damaged-" \
           in listed.stderr and "rebuilt from the 3 run folders" in listed.stderr
    assert {r["id"]: r["status"] for r in json.loads(listed.stdout)} == {
        done: "completed", ahead: "running", behind.id: "queued"}
    assert Registry(home).get(behind.id).resume == 1
    assert list(home.glob("studio.db.damaged-*"))  # kept, for whoever wants to look into it

    damage()  # again, and the run ahead ends now: its worker finds the index damaged as it records the end
    (home / "runs" / ahead / STOP_FILE).touch()
    wait_for(lambda: Registry(home).get(ahead).status == "stopped", what="the run ahead to stop")
    wait_for(lambda: Registry(home).get(behind.id).status == "completed", what="the queued run to train")
    assert studio("runs", "--rebuild").returncode == 0
    statuses = {r.id: r.status for r in Registry(home).list()}
    assert statuses == {done: "completed", ahead: "stopped", behind.id: "completed"}


def test_a_run_that_ends_while_another_process_mends_the_index_stays_ended(home, tmp_path):
    """CI once saw the run ahead never stop in the test above: the index being rebuilt by another process was
    empty for a moment, the worker's 'stopped' changed no row, and the rebuild then wrote 'running' back from
    the folders. Here the mending process is slowed by many run folders to read, and the run's end is
    recorded the moment the damaged file is set aside."""
    import shutil
    registry = Registry(home)
    config = load_config(config_file(tmp_path, max_steps=3, sample_every=0))
    ending = registry.create(config, status="running")
    finished = registry.create(config, status="completed")
    for number in range(300):  # copies of its folder: quick to make, slow to read back
        shutil.copytree(finished.dir, home / "runs" / f"20200101-000000-llm-{number:04x}")
    (home / "studio.db").write_bytes(b"not a database " * 1000)
    reading = "from studio.runs import Registry; Registry().list()"  # any page or command
    mending = subprocess.Popen([sys.executable, "-c", reading], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list(home.glob("studio.db.damaged-*")), timeout=60, what="the damaged index set aside")
    assert registry.set_status(ending.id, "stopped", expect=("running",))
    mended = mending.communicate(timeout=120)[1]
    assert "rebuilt from the 302 run folders" in mended, mended
    assert Registry(home).get(ending.id).status == "stopped"
    assert Registry(home).rebuild() == 302 and Registry(home).get(ending.id).status == "stopped"  # the folder agrees
    assert len([f for f in home.glob("studio.db.damaged-*") if f.name[-1].isdigit()]) == 1  # set aside once


def test_a_run_folder_deleted_by_hand_leaves_the_index(home, tmp_path):
    """Kept, a queued run whose folder was deleted was called interrupted and offered a resume that could not
    work, and the next dispatch failed on its missing log.txt (in another run's worker)."""
    import shutil
    registry = Registry(home)
    queued = registry.create(load_config(config_file(tmp_path, max_steps=3, sample_every=0)))
    finished = registry.create(load_config(config_file(tmp_path, max_steps=3, sample_every=0)), status="completed")
    for run in (queued, finished):
        shutil.rmtree(run.dir)
    assert jobs.dispatch(registry) == []
    assert registry.list() == []
    # a workspace other than $STUDIO_HOME's (`studio train <its run>/config.yaml --resume`): its runs stay
    other = Registry(tmp_path / "elsewhere")
    kept = other.create(load_config(config_file(tmp_path, max_steps=3, sample_every=0)), status="stopped")
    jobs.reconcile(other)
    assert [r.id for r in other.list()] == [kept.id]


def test_with_no_server_a_waiting_studio_train_starts_when_the_run_ahead_dies(home, tmp_path):
    """Only the dead run was marked: the run queued behind it waited for ever ('Queued: waiting for 1 running
    run(s)'), until something else started the queue."""
    registry = Registry(home)
    ahead = run_id_of(studio("train", str(config_file(tmp_path, max_steps=100000, sample_every=0)),
                             "--detach").stdout)
    wait_for(lambda: steps(home, ahead), what="the first step")
    waiting = subprocess.Popen([sys.executable, "-m", "studio.cli", "train",
                                str(config_file(tmp_path, max_steps=3, sample_every=0))],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    wait_for(lambda: registry.queue(), what="the second run to queue")
    os.kill(registry.get(ahead).pid, signal.SIGKILL)
    output, _ = waiting.communicate(timeout=180)
    assert waiting.returncode == 0, output
    assert "Queued (position 1): waiting for 1 running run(s)." in output and "Completed." in output
    assert registry.get(ahead).status == "interrupted"


def test_a_page_opened_shows_the_run_training_before_a_queued_one(home, tmp_path):
    from studio.tabs import widgets
    registry = Registry(home)
    training = registry.create(load_config(config_file(tmp_path)), status="running")
    queued = registry.create(load_config(config_file(tmp_path)))
    assert widgets.latest_run_id("llm", registry) == training.id
    registry.set_status(training.id, "completed")
    assert widgets.latest_run_id("llm", registry) == queued.id


def test_an_image_run_exports_its_kohya_file_from_the_command_line(home, tmp_path):
    """The A1111/ComfyUI file was only in the Image tab."""
    from safetensors import safe_open
    data = yaml.safe_load((ROOT / "assets" / "image" / "config.yaml").read_text())
    data.update(data_path=str(ROOT / "assets" / "image" / data["data_path"]), max_steps=2, sample_every=0)
    config = tmp_path / "image.yaml"
    config.write_text(yaml.safe_dump(data))
    run_id = run_id_of(studio("train", str(config)).stdout)
    exported = studio("export", run_id, "--kohya", str(tmp_path / "kohya"))
    assert exported.returncode == 0, exported.stderr
    with safe_open(exported.stdout.strip(), "pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())
    card = (tmp_path / "kohya" / "README.md").read_text()
    assert f'weight_name="{Path(exported.stdout.strip()).name}"' in card and "library_name: diffusers" in card
    llm_run = run_id_of(studio("train", str(config_file(tmp_path, max_steps=2, sample_every=0))).stdout)
    refused = studio("export", llm_run, "--kohya", str(tmp_path / "nope"))
    assert refused.returncode == 2 and "--kohya is for image runs" in refused.stderr


def test_only_a_damaged_file_sets_the_index_aside(home):
    """A broken constraint or a wrong query is a DatabaseError too: taken for damage, it would set aside a good
    index."""
    import sqlite3
    registry = Registry(home)
    with pytest.raises(sqlite3.IntegrityError):
        registry._sql("INSERT INTO runs (id) VALUES ('x')")  # (the other columns may not be NULL)
    assert not list(home.glob("studio.db.damaged-*"))


def test_a_run_given_a_name_another_run_has_is_named_apart(home, tmp_path):
    """Training again with the name still in the form made two runs the Runs tab and its chart could not tell
    apart; a rename could do the same."""
    registry = Registry()
    config = load_config(config_file(tmp_path, name="support bot"))
    names = [registry.create(config, status="stopped").name for _ in range(3)]
    assert names == ["support bot", "support bot 2", "support bot 3"]
    first = registry.list()[-1]
    with pytest.raises(ConfigError, match="is already another run's name"):
        registry.rename(first.id, "support bot 2 ")  # (as the name is kept: without the space)
    registry.rename(first.id, "support bot")  # its own name is no clash
    assert sorted(run.name for run in registry.list()) == names


def test_runs_given_one_name_at_the_same_moment_are_still_named_apart(home, tmp_path):
    """The name was picked, then the run's row written, apart: two Trains of one name pressed at once (two
    browser windows, a script's runs) both found the name free and both kept it; two renames alike."""
    import threading
    config = load_config(config_file(tmp_path, name="support bot"))
    Registry()  # (the index made first, not by the threads racing)
    count = 8
    barrier = threading.Barrier(count)
    names, refused = [], []

    def train():
        barrier.wait()  # all at once, each with a Registry and a connection of its own, as each request has
        names.append(Registry().create(config, status="stopped").name)

    def rename(run_id):
        barrier.wait()
        try:
            Registry().rename(run_id, "the one")
        except ConfigError:
            refused.append(run_id)

    def all_at_once(work, args):
        threads = [threading.Thread(target=work, args=a) for a in args]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    all_at_once(train, [()] * count)
    assert sorted(names) == sorted(["support bot"] + [f"support bot {n}" for n in range(2, count + 1)])
    all_at_once(rename, [(run.id,) for run in Registry().list()])
    assert len(refused) == count - 1
    assert [run.name for run in Registry().list()].count("the one") == 1
    assert Registry().rebuild() == count and [run.name for run in Registry().list()].count("the one") == 1


def test_two_data_files_of_one_name_both_reach_the_run(home, tmp_path):
    """Uploads from two folders may share a name (two exports named data.csv): the run keeps both, each named as
    it was in a folder of its own (named as no data folder is: '2' was, and took a speaker folder's place), and
    trains on the rows of both."""
    for folder, rows in (("first", "instruction,output\nSay one,one\n"), ("second", "instruction,output\nSay two,two\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "data.csv").write_text(rows)
    config = load_config(config_file(tmp_path, train_files=[str(tmp_path / "first" / "data.csv"),
                                                             str(tmp_path / "second" / "data.csv")]))
    run = Registry().create(config, status="stopped")
    copied = load_config(run.dir / "config.yaml")
    assert [Path(p).relative_to(run.dir).as_posix() for p in copied.train_files] == [
        "data/same-name-1/data.csv", "data/same-name-2/data.csv"]
    assert jobs.check_data(copied).rows_usable == 2


def test_studio_train_says_what_the_run_trains_on_and_leaves_out(home, tmp_path):
    """The tabs show the check's summary and problems; `studio train` said nothing of the rows it left out."""
    data = tmp_path / "qa.csv"
    data.write_text("instruction,output\nSay one,one\nSay two,\nSay three,three\n")
    result = studio("train", str(config_file(tmp_path, train_files=[str(data)], validation_fraction=0,
                                             max_steps=2, sample_every=0)), "--detach")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "Data: 2 of 3 rows usable (alpaca); 1 row dropped"
    assert lines[2] == "- qa.csv, row 3: the 'output' column is empty"


REMOTE_CONFIG = ("from transformers import LlamaConfig\n\n\n"
                 "class TinyRemoteConfig(LlamaConfig):\n    model_type = 'tiny_remote'\n")
REMOTE_MODEL = ("from transformers import LlamaForCausalLM\nfrom .configuration_tiny import TinyRemoteConfig\n\n\n"
                "class TinyRemoteForCausalLM(LlamaForCausalLM):\n    config_class = TinyRemoteConfig\n")


def test_a_model_that_ships_its_own_code_is_refused_unless_trusted_and_its_card_loads_it(home, tmp_path, monkeypatch):
    """A model folder with its own code (auto_map in config.json) passed the check, then its run failed with
    transformers' refusal cut short ("...You can inspect the repository …. Check that the folder is complete."),
    its advice to trust the code lost; and the model card of a run that trusted it loaded it without."""
    import shutil
    from pipelines.llm.model import materialise_preset
    monkeypatch.setenv("STUDIO_MODEL_DIRS", str(tmp_path))
    model = tmp_path / "remote-code"
    shutil.copytree(materialise_preset("tiny-llama"), model)
    (model / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (model / "modeling_tiny.py").write_text(REMOTE_MODEL)
    settings = json.loads((model / "config.json").read_text())
    settings.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"],
                    auto_map={"AutoConfig": "configuration_tiny.TinyRemoteConfig",
                              "AutoModelForCausalLM": "modeling_tiny.TinyRemoteForCausalLM"})
    (model / "config.json").write_text(json.dumps(settings))
    refused = studio("train", str(config_file(tmp_path, base_model=str(model), max_steps=2, sample_every=0)))
    assert refused.returncode == 2 and refused.stderr == (
        f"error: Cannot train yet: 24 of 24 rows usable (alpaca); but the base model cannot be used: The model in "
        f'{model} ships its own Python code, which runs only with "Trust remote code" on. Tick "Trust remote code" '
        "(Advanced; `trust_remote_code: true` in a config file) only if you trust the model's author: its code runs "
        "on this machine.\n")
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())  # no run made
    trusted = studio("train", str(config_file(tmp_path, base_model=str(model), max_steps=2, sample_every=0,
                                              trust_remote_code=True)))
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    for kind in ("merged", "adapter"):
        assert studio("export", run_id_of(trusted.stdout), f"--{kind}", str(tmp_path / kind)).returncode == 0
    # the code of each model card, as written, loads the model (without trust_remote_code it was refused)
    code = {kind: (tmp_path / kind / "README.md").read_text().split("```python\n")[1].split("```")[0]
            for kind in ("merged", "adapter")}
    for kind in ("merged", "adapter"):
        loaded = subprocess.run([sys.executable, "-c", code[kind] + "print(type(model.get_base_model() if "
                                 "hasattr(model, 'get_base_model') else model).__name__)"],
                                capture_output=True, text=True, cwd=tmp_path / kind, timeout=300)
        assert loaded.stdout.strip() == "TinyRemoteForCausalLM", loaded.stderr[-2000:]


def test_resume_is_suggested_only_where_it_can_help(home, tmp_path):
    """`studio train` said "Resume: studio resume <id>" after any failure, also after one a resume meets again
    (the settings, the base model). It still says so after a stop, an interruption, memory running out or a
    crash."""
    from pipelines.training import TrainingFailure
    from studio.runs import resume_may_help
    from studio.worker import explain
    failed = studio("train", str(config_file(tmp_path, load_in_4bit=True, device="cpu", max_steps=2)))
    assert failed.returncode == 1 and "4-bit (QLoRA) loading needs an NVIDIA GPU" in failed.stdout
    assert "studio resume" not in failed.stdout
    assert not resume_may_help("failed", explain(TrainingFailure("The loss became nan at step 3.", "Lower it."))[0])
    for error in (MemoryError(), RuntimeError("CUDA out of memory."), OSError(28, "No space left on device"),
                  RuntimeError("boom")):
        assert resume_may_help("failed", explain(error)[0]), error
    assert resume_may_help("failed", f"Process 1 of 2: {explain(MemoryError())[0]}")  # as a rank's is told
    assert resume_may_help("stopped", "") and resume_may_help("interrupted", "")


def test_a_model_card_names_the_hub_model_a_local_folder_came_from(tmp_path, monkeypatch):
    """A run on a downloaded model saved to a folder put the folder's path in the card's base_model, which the hub
    reads as a model id."""
    from studio.exporting import _hub_id
    monkeypatch.setenv("STUDIO_MODEL_DIRS", str(tmp_path))
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2.5-0.5B", "model_type": "qwen2"}))
    assert _hub_id(str(folder), "llm") == "Qwen/Qwen2.5-0.5B"
    (folder / "config.json").write_text(json.dumps({"_name_or_path": str(folder), "model_type": "qwen2"}))
    assert _hub_id(str(folder), "llm") == "" and _hub_id("tiny-llama", "llm") == ""
    assert _hub_id("meta-llama/Llama-3.2-1B", "llm") == "meta-llama/Llama-3.2-1B"
    pipeline = tmp_path / "sd15"  # a diffusers folder says it in its model_index.json
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5"}))
    assert _hub_id(str(pipeline), "image") == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_a_model_card_names_a_legacy_hub_id_without_a_namespace(home, tmp_path, monkeypatch):
    """gpt2, distilgpt2, bert-base-uncased: the hub's ids from before namespaces got no base_model in the card's front
    matter (an id was told from a preset's name by its '/'), whether the run loaded it from the hub or from a folder
    it was saved to. A preset's name and a folder's relative name still give none."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from studio.exporting import model_card
    monkeypatch.setenv("STUDIO_MODEL_DIRS", str(tmp_path))
    models = tmp_path / "models"
    saved = models / "my-gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)).save_pretrained(saved)
    config_json = json.loads((saved / "config.json").read_text())
    assert GPT2LMHeadModel.from_pretrained(saved).config.n_layer == 2

    def saved_from(name: str) -> None:
        # (transformers before 5 wrote the id a model was loaded from into the config.json it saved)
        (saved / "config.json").write_text(json.dumps({**config_json, "_name_or_path": name}))

    def front_matter(base_model: str) -> list[str]:
        config = load_config(config_file(tmp_path, base_model=base_model))
        card = model_card(Registry().create(config, status="stopped"), config, "adapter", tmp_path)
        return [line for line in card.split("---")[1].splitlines() if line.startswith("base_model:")]

    assert front_matter("gpt2") == ["base_model: gpt2"]
    saved_from("gpt2")
    assert front_matter(str(saved)) == ["base_model: gpt2"]
    assert front_matter("tiny-llama") == []
    (models / "my-base").mkdir()
    for local in ("tiny-llama", "my-base"):  # a preset's materialised folder, by its name; a folder beside this one
        saved_from(local)
        assert front_matter(str(saved)) == [], local
