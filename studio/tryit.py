"""Trying trained runs: generate text, images or transcripts with or without the adapter.

Loading a model is the slow part, so the last one loaded is kept (one at a time, to bound memory) and
the base model's answer comes from the same weights with the adapter switched off.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pipelines import pipeline_module
from pipelines.config import RunConfig
from pipelines.events import TrainingFailure
from studio import jobs

_lock = threading.Lock()
_loaded: dict[str, Any] = {"key": None, "value": None}


def _pipeline(modality: str):
    jobs.wait_for_libraries()  # (in the server: not while another thread imports them)
    return pipeline_module(modality)


def _cached(key: tuple, load) -> Any:
    if _loaded["key"] != key:
        _loaded["key"], _loaded["value"] = None, None  # free the old model before loading the next
        _loaded["value"] = load()
        _loaded["key"] = key
    return _loaded["value"]


def _key(pipeline, config: RunConfig, run_dir: str | Path | None, checkpoint: str | None) -> tuple:
    """What a loaded model stands for, down to the adapter files it was made from: "final" is the latest
    checkpoint while a run trains and its adapter once it is done (a run resumed writes it again), so the
    model loaded at step 40 must not keep answering after the run has finished."""
    key: tuple = (pipeline.__name__, config.base_model, str(run_dir), checkpoint)
    if run_dir is None:
        return key
    try:
        folder = pipeline.adapter_dir(run_dir, checkpoint)  # where loading looks, by the same rule
    except TrainingFailure:
        return key  # no adapter yet: loading says so
    return key + (str(folder), *((f.name, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())))


def _adapter_switch(model, use_adapter: bool):
    return nullcontext() if use_adapter or not hasattr(model, "disable_adapter") else model.disable_adapter()


def generate_text(config: RunConfig, run_dir: str | Path | None, prompt: str, *, checkpoint: str | None = None,
                  use_adapter: bool = True, **options) -> str:
    """The run's answer (run_dir given and use_adapter), or the base model's; after the run's system prompt
    unless `system` is given (both sides get the same prompt)."""
    options.setdefault("system", config.system_prompt)
    llm = _pipeline("llm")
    key = _key(llm, config, run_dir, checkpoint)
    with _lock:
        model, tokenizer = _cached(key, lambda: llm.load_for_generation(config, run_dir, checkpoint))
        with _adapter_switch(model, use_adapter and run_dir is not None):
            return llm.complete(model, tokenizer, prompt, **options)


def generate_image(config: RunConfig, run_dir: str | Path | None, prompt: str, *, checkpoint: str | None = None,
                   lora_scale: float = 1.0, **options):
    image = _pipeline("image")
    key = _key(image, config, run_dir, checkpoint)
    with _lock:
        pipe = _cached(key, lambda: image.load_for_generation(config, run_dir, checkpoint))
        return image.generate(pipe, prompt, lora_scale=lora_scale if run_dir is not None else 0.0, **options)


def transcribe(config: RunConfig, run_dir: str | Path | None, audio: str | Path, *, checkpoint: str | None = None,
               use_adapter: bool = True) -> tuple[str, float]:
    speech = _pipeline("speech")
    key = _key(speech, config, run_dir, checkpoint)
    with _lock:
        model = _cached(key, lambda: speech.load_for_transcription(config, run_dir, checkpoint))
        with _adapter_switch(model, use_adapter and run_dir is not None):
            return speech.transcribe(model, audio, config.language, config.task)
