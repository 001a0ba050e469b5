"""Faults in a real training process: each ends as a failed run with one sentence and advice, and what was
saved before stays intact and usable."""

import json
import re
import resource
import shutil
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from pipelines.training import checkpoint_dirs, read_events
from studio.runs import Registry
from tests.test_runs import ROOT, config_file, home, run_id_of, studio  # noqa: F401


def final_status(home, run_id):
    return [e for e in read_events(home / "runs" / run_id)[0] if e["type"] == "status"][-1]


def test_nan_loss_fails_with_advice_and_keeps_earlier_checkpoints(home, tmp_path):
    # An absurd learning rate in float32 overflows to NaN within a few steps (bf16 autocast happens to survive it).
    config = config_file(tmp_path, learning_rate=1.0, max_grad_norm=0.0, warmup_steps=0, scheduler="constant",
                         max_steps=200, checkpoint_every=3, sample_every=0, mixed_precision="no")
    result = studio("train", str(config))
    assert result.returncode == 1
    # (the loss, or before it the gradients of a still finite loss: either stops the run before the weights)
    assert re.search(r"The (loss|gradients) became (nan|inf)", result.stdout), result.stdout[-2000:]
    assert "Lower the learning rate" in result.stdout
    run_id = run_id_of(result.stdout)
    status = final_status(home, run_id)
    assert status["status"] == "failed" and status["advice"].startswith("Lower the learning rate")
    assert Registry(home).get(run_id).status == "failed"
    saved = checkpoint_dirs(home / "runs" / run_id)
    assert saved, "checkpoints written before the failure must remain"
    for checkpoint in saved:
        state = json.loads((checkpoint / "state.json").read_text())
        weights = load_file(checkpoint / "trainable.safetensors")
        assert state["step"] == int(checkpoint.name.split("-")[1])
        assert all(t.isfinite().all() for t in weights.values())
    assert not list((home / "runs" / run_id / "checkpoints").glob(".tmp-*"))


def test_out_of_memory_fails_with_advice_and_the_advice_works(home, tmp_path):
    # A real allocation failure: the training process may use 3 GB of address space (the sample run needs
    # far less), and the batch asks for more: four examples of ~16k tokens in one forward pass.
    rows = "instruction,output\n" + "".join(f"Recite {i},{'amber basil cedar delta ' * 1500}\n" for i in range(4))
    (tmp_path / "long.csv").write_text(rows)
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))  # noqa: E731

    def train(**changes):
        config = config_file(tmp_path, **{"train_files": [str(tmp_path / "long.csv")], "max_length": 32768,
                                          "max_steps": 2, "sample_every": 0, "validation_fraction": 0.0, **changes})
        return subprocess.run([sys.executable, "-m", "studio.cli", "train", str(config)], capture_output=True,
                              text=True, timeout=600, cwd=ROOT, preexec_fn=limit)

    result = train(batch_size=4)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "The run ran out of memory. Lower the batch size or the max length" in result.stdout
    run_id = run_id_of(result.stdout)
    assert final_status(home, run_id)["status"] == "failed"
    assert not list((home / "runs" / run_id / "checkpoints").glob("*"))  # nothing half-made
    followed = train(batch_size=1, max_length=1024)  # what the advice says
    assert followed.returncode == 0, followed.stdout + followed.stderr


def test_missing_base_model_fails_in_one_sentence(home, tmp_path):
    gone = home / "models" / "gone"
    config = config_file(tmp_path, base_model=str(gone))
    refused = studio("train", str(config))  # the data check loads the tokenizer as the run would: no run made
    assert refused.returncode == 2 and refused.stderr == (
        f"error: Cannot train yet: 24 of 24 rows usable (alpaca); but the base model cannot be used: The model "
        f"path {gone} does not exist. Check the folder name.\n")
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())
    # A model folder gone after the run was queued: the run fails in one sentence.
    from pipelines import load_config
    from studio import jobs
    registry = Registry(home)
    run = registry.create(load_config(config))
    jobs.dispatch(registry)
    deadline = time.monotonic() + 240
    while registry.get(run.id).status not in ("failed", "completed"):
        assert time.monotonic() < deadline, registry.get(run.id).status
        time.sleep(0.3)
    status = final_status(home, run.id)
    assert status["error"] == f"The model path {gone} does not exist."
    assert "Traceback" not in status["error"] + status["advice"]


@pytest.fixture
def small_disk(tmp_path):
    """A real, small filesystem (tmpfs) for the workspace, so a checkpoint can meet a full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_during_a_checkpoint_fails_cleanly(small_disk, tmp_path, monkeypatch):
    home = small_disk / "ws"
    monkeypatch.setenv("STUDIO_HOME", str(home))
    probe = run_id_of(studio("train", str(config_file(tmp_path, max_steps=1, sample_every=0))).stdout)
    checkpoint_bytes = sum(f.stat().st_size for f in (home / "runs" / probe / "checkpoints").rglob("*") if f.is_file())
    # Fill the disk so that one more checkpoint fits, but not two.
    free = shutil.disk_usage(small_disk).free
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - int(1.6 * checkpoint_bytes) - 300_000))
    result = studio("train", str(config_file(tmp_path, max_steps=50, checkpoint_every=2, keep_checkpoints=10,
                                              sample_every=0)))
    assert result.returncode == 1, result.stdout
    run_id = run_id_of(result.stdout)
    status = final_status(home, run_id)
    assert status["status"] == "failed" and status["error"].startswith("The disk is full"), status
    saved = checkpoint_dirs(home / "runs" / run_id)
    assert [c.name for c in saved] == ["step-2"]  # the one that fitted is complete and loadable
    load_file(saved[0] / "trainable.safetensors")
    assert not list((home / "runs" / run_id / "checkpoints").glob(".tmp-*"))
    filler.unlink()
    resumed = studio("train", str(home / "runs" / run_id / "config.yaml"), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
