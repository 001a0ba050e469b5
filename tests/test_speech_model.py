"""Speech settings and base models: validation a user sees, the offline preset, named sizes offline,
local checkpoints and where LoRA goes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
import whisper

from pipelines import ConfigError, config_from_dict, load_config
from pipelines.hub import ModelUnavailable, workspace
from pipelines.speech.config import BASE_MODELS, LANGUAGES, SpeechConfig
from pipelines.speech.model import NAMED_MODELS, load_base_model, lora_targets, materialise_preset

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def test_language_choices_are_whispers():
    assert list(LANGUAGES.items()) == list(whisper.tokenizer.LANGUAGES.items())  # in the tokens' order
    from studio.tabs import widgets
    box = widgets.config_inputs(SpeechConfig, ["language"], SpeechConfig())["language"]
    assert box.choices[0] == ("English (en)", "en") and ("Hawaiian (haw)", "haw") in box.choices  # not bare codes
    assert set(NAMED_MODELS) <= set(whisper.available_models())
    assert {"tiny-whisper", "tiny", "base", "small", "medium", "large-v3", "turbo", "small.en"} <= set(BASE_MODELS)


@pytest.mark.parametrize("values, field, words", [
    ({"language": "klingon"}, "language", "must be one of"),
    ({"base_model": "small.en", "language": "fr"}, "language", "English only"),
    ({"base_model": "base.en", "task": "translate"}, "task", "cannot translate"),
    ({"data_path": ""}, "data_path", "no training data"),
    ({"long_clips": "trim"}, "long_clips", "must be one of"),
    ({"max_label_tokens": 1000}, "max_label_tokens", "at most"),
])
def test_bad_settings_are_named(values, field, words):
    data = {"modality": "speech", "data_path": "clips", **values}
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert any(name == field and words in why for name, why in err.value.problems)


def test_asset_config_loads_with_resolved_paths():
    config = load_config(ROOT / "assets" / "speech" / "config.yaml")
    assert isinstance(config, SpeechConfig) and config.base_model == "tiny-whisper"
    assert Path(config.data_path) == ROOT / "assets" / "speech" / "clips"


def test_tiny_preset_is_a_plain_deterministic_whisper_checkpoint(tmp_path, monkeypatch):
    first = materialise_preset("tiny-whisper")
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    second = materialise_preset("tiny-whisper")
    assert first != second
    a = torch.load(first, weights_only=True)
    b = torch.load(second, weights_only=True)
    assert a["dims"] == b["dims"] and a["dims"]["n_audio_ctx"] == 1500 and a["dims"]["n_vocab"] == 51865
    for key in a["model_state_dict"]:
        assert torch.equal(a["model_state_dict"][key], b["model_state_dict"][key]), key
    position = a["model_state_dict"]["decoder.positional_embedding"]
    assert torch.isfinite(position).all() and 0.01 < position.std() < 0.03
    model = whisper.load_model(str(second), device="cpu")  # the user's path: plain openai-whisper
    assert model.is_multilingual


def test_named_model_offline_fails_fast_with_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty download cache
    monkeypatch.setenv("STUDIO_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelUnavailable) as err:
        load_base_model("small", CPU)
    assert time.perf_counter() - started < 5
    assert "not downloaded yet" in err.value.cause and "\n" not in str(err.value)


def test_a_download_host_is_asked_once_a_minute(monkeypatch):
    """Each data check of a named Whisper size asked the download host again: on a machine offline whose DNS is
    slow, every change of a setting waited the whole 3 s timeout."""
    import socket
    from pipelines import hub
    for flag in ("STUDIO_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as host:
        url = f"https://127.0.0.1:{host.getsockname()[1]}/whisper/small.pt"
        assert all(hub.host_reachable(url) for _ in range(3))
        host.settimeout(1)
        host.accept()[0].close()  # the first check's connection
        with pytest.raises(TimeoutError):
            host.accept()  # and no other


def test_local_checkpoints_and_wrong_sources(tmp_path):
    preset = materialise_preset("tiny-whisper")
    assert load_base_model(str(preset), CPU).dims.n_text_state == 64
    broken = workspace() / "broken.pt"  # local models load from the workspace or home folder only
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelUnavailable, match="could not be read as an openai-whisper checkpoint"):
        load_base_model(str(broken), CPU)
    with pytest.raises(ModelUnavailable, match="is a folder"):
        load_base_model(str(workspace()), CPU)
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes(preset.read_bytes())
    with pytest.raises(ModelUnavailable, match="outside the folders models may be loaded from"):
        load_base_model(str(outside), CPU)
    with pytest.raises(ModelUnavailable, match="not a Whisper model the studio can load"):
        load_base_model("openai/whisper-small", CPU)


def test_lora_targets_follow_the_settings():
    model = load_base_model("tiny-whisper", CPU)
    decoder = lora_targets(model, "attention", decoder_only=True)
    assert decoder and all(n.startswith("decoder.") for n in decoder)
    assert "decoder.blocks.0.cross_attn.query" in decoder and not any(".mlp." in n for n in decoder)
    everything = lora_targets(model, "attention+mlp", decoder_only=False)
    assert "encoder.blocks.0.attn.value" in everything and "decoder.blocks.1.mlp.2" in everything


def test_a_whisper_download_tells_its_progress_on_the_status_line(tmp_path, monkeypatch):
    """A named Whisper downloads on first use (whisper-small: 460 MB, large-v3: 3 GB), and the run's status
    line said "Loading the model and data…" with nothing moving for minutes. Its progress is now told every few
    seconds as a line of the log and an event the live panel shows. Here a real download over HTTP from a slow
    local server stands in for OpenAI's (the checkpoint it serves is the preset's; whisper checks its SHA-256)."""
    import base64
    import gzip
    import hashlib
    import http.server
    import threading

    import numpy as np

    from pipelines import hub
    from pipelines.events import Events
    from studio.progress import read_progress
    from studio.runs import Run, runs_root
    from studio.tabs import widgets

    checkpoint = materialise_preset("tiny-whisper").read_bytes()
    dims = torch.load(materialise_preset("tiny-whisper"), weights_only=True)["dims"]

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # about 7 s for the whole file
            self.send_response(200)
            self.send_header("Content-Length", str(len(checkpoint)))
            self.end_headers()
            piece = len(checkpoint) // 35 + 1
            for start in range(0, len(checkpoint), piece):
                self.wfile.write(checkpoint[start:start + piece])
                time.sleep(0.2)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    digest = hashlib.sha256(checkpoint).hexdigest()
    monkeypatch.setitem(whisper._MODELS, "tiny", f"http://127.0.0.1:{server.server_port}/{digest}/tiny.pt")
    heads = np.ones(dims["n_text_layer"] * dims["n_text_head"], dtype=bool)  # (its cross-attention heads, all)
    monkeypatch.setitem(whisper._ALIGNMENT_HEADS, "tiny", base64.b85encode(gzip.compress(heads.tobytes())))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for flag in ("STUDIO_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    run = Run(id="download-test", name="big", modality="speech", base_model="tiny", status="running", pid=None,
              resume=0, queued_at=None, created=0.0, started=None, ended=None, config_hash="", error="", advice="")
    run_dir = run.dir
    run_dir.mkdir(parents=True)
    events = Events(run_dir)
    told = []
    monkeypatch.setattr(hub, "download_progress",
                        lambda text: (told.append(text), events.emit("loading", message=text)))
    try:
        model = load_base_model("tiny", CPU)
    finally:
        server.shutdown()
    assert model.dims.n_text_state == dims["n_text_state"]
    size = f"{len(checkpoint) / 2**20:.0f} MB"
    assert told[0].startswith("Downloading Whisper 'tiny': ") and " so far (" in told[0], told
    assert told[-1].startswith(f"Downloaded Whisper 'tiny': {size} in "), told
    shown = widgets.status_markdown(run, read_progress(run_dir), None)
    assert f"Loading the model and data… Downloaded Whisper 'tiny': {size}" in shown
    told.clear()
    load_base_model("tiny", CPU)  # now from the cache: nothing to tell
    assert told == []


def test_a_hub_download_is_counted_once_and_a_failed_one_is_not_called_downloaded(tmp_path, monkeypatch):
    """The hub cache keeps each file once in blobs/ and links to it from snapshots/: counted through the links too,
    a model showed twice its size. And a load that failed still said "Downloaded"."""
    from pipelines import hub
    repo = tmp_path / "models--org--model"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    told = []
    monkeypatch.setattr(hub, "download_progress", told.append)

    def download(fail: bool):
        (repo / "blobs" / "weights").write_bytes(b"x" * 3 * 2**20)
        (repo / "snapshots" / "abc" / "model.safetensors").symlink_to(repo / "blobs" / "weights")
        if fail:
            raise OSError("No space left on device")

    with hub.reporting_download(repo, "org/model"):
        download(fail=False)
    assert hub._bytes_in(repo) == 3 * 2**20 and told[-1].startswith("Downloaded org/model: 3 MB in ")
    shutil.rmtree(repo / "blobs"), shutil.rmtree(repo / "snapshots" / "abc")
    (repo / "blobs").mkdir()
    told.clear()
    with pytest.raises(OSError), hub.reporting_download(repo, "org/model"):
        download(fail=True)
    assert told == []
