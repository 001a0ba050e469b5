"""Trying trained runs: generate text, images or transcripts with or without the adapter.

Loading a model is the slow part, so the last one loaded is kept (one at a time, to bound memory) and
the base model's answer comes from the same weights with the adapter switched off. The tabs stream: a
reply as it grows, an image's steps, and a Try it the page cancels stops at the next token or step.
"""

from __future__ import annotations

import queue
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from pipelines import pipeline_module
from pipelines.config import RunConfig
from pipelines.events import TrainingFailure
from studio import jobs

_lock = threading.Lock()
_loaded: dict[str, Any] = {"key": None, "value": None}
HEARTBEAT_S = 0.25


class Update(NamedTuple):
    value: Any  # the reply so far, (steps done, steps), or with `final` the result
    final: bool = False


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


def _left_while_waiting(options: dict) -> bool:
    """A stream closed while it waited for another Try it to end: loading its model (in place of the one kept)
    would be for nothing."""
    return bool(options.get("should_stop") and options["should_stop"]())


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
        if _left_while_waiting(options):
            return ""
        model, tokenizer = _cached(key, lambda: llm.load_for_generation(config, run_dir, checkpoint))
        with _adapter_switch(model, use_adapter and run_dir is not None):
            return llm.complete(model, tokenizer, prompt, **options)


def generate_image(config: RunConfig, run_dir: str | Path | None, prompt: str, *, checkpoint: str | None = None,
                   lora_scale: float = 1.0, **options):
    image = _pipeline("image")
    key = _key(image, config, run_dir, checkpoint)
    with _lock:
        if _left_while_waiting(options):
            return None
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


def _in_the_background(work: Callable[[Callable[[Any], None], Callable[[], bool]], Any]) -> Iterator[Update | None]:
    """Runs work(report, stopped) in a thread: yields an Update for each value it reports, then its result as
    the final one, and None after HEARTBEAT_S without news. Closing the generator (Gradio does when the page
    cancels the event) makes `stopped()` true: a cancelled handler that is not a generator runs to its end in
    the server, and held the model (and Try it's lock) for minutes of a reply no one would see."""
    updates: queue.Queue = queue.Queue()
    stop = threading.Event()

    def run() -> None:
        try:
            updates.put(Update(work(lambda value: updates.put(Update(value)), stop.is_set), final=True))
        except BaseException as err:  # raised to the caller, in its thread
            updates.put(err)
    threading.Thread(target=run, daemon=True, name="try-it").start()
    try:
        while True:
            try:
                update = updates.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                yield None  # (a generator can be closed only where it yields: even while a model loads)
                continue
            if isinstance(update, BaseException):
                raise update
            yield update
            if update.final:
                return
    finally:
        stop.set()


def stream_text(config: RunConfig, run_dir: str | Path | None, prompt: str, **options) -> Iterator[Update | None]:
    """generate_text's reply as it grows, each word or line (see _in_the_background)."""
    return _in_the_background(lambda report, stopped: generate_text(config, run_dir, prompt, on_text=report,
                                                                    should_stop=stopped, **options))


def stream_image(config: RunConfig, run_dir: str | Path | None, prompt: str, **options) -> Iterator[Update | None]:
    """generate_image's (steps done, steps) after each denoising step, then the image."""
    return _in_the_background(lambda report, stopped: generate_image(
        config, run_dir, prompt, on_step=lambda done, steps: report((done, steps)), should_stop=stopped, **options))
