"""Whisper base models: the tiny offline preset, OpenAI's named sizes and local .pt checkpoints; the
tokenizer, the log-mel input, and LoRA targets.

Everything loads through `whisper.load_model`, the way a user's own checkpoint loads: the preset is
materialised once as a .pt in openai-whisper's format, so it exercises the same path as a download,
and a merged export is a file plain openai-whisper reads.
"""

from __future__ import annotations

import os
import socket
import zipfile
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import whisper
from whisper.audio import N_FRAMES, N_SAMPLES
from whisper.model import ModelDimensions, Whisper
from whisper.tokenizer import Tokenizer, get_tokenizer

from pipelines.hub import (ModelUnavailable, building_presets, error_text, host_reachable, reporting_download,
                           resolve_source, workspace)
from pipelines.speech.config import BASE_MODELS
from pipelines.training import TrainingFailure

# 3.6 M parameters, mostly the 51865 x 64 token embedding; one encoder layer over Whisper's full 30 s
# window (n_audio_ctx must stay 1500: the encoder checks the mel's shape). Trains in seconds on a CPU.
# `scale` departs from PyTorch's default initialisation where a random Whisper cannot hear: its conv
# outputs are ten times smaller than the sinusoidal positions (clips look alike to the decoder), and
# its cross-attention spreads evenly over 1500 positions, most of them padding, so a LoRA would learn
# a language model that ignores the audio. Larger conv weights and encoder output (as a trained
# encoder has) and moderate output logits let LoRA memorise a handful of clips in ~40 steps.
PRESETS = {
    "tiny-whisper": {
        "dims": dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
                     n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=4, n_text_layer=2),
        "seed": 0,
        "scale": {"encoder.conv1.weight": 4.0, "encoder.conv2.weight": 3.0},
        "fill": {"encoder.ln_post.weight": 6.0, "decoder.ln.weight": 2.0},
        "normal": {"decoder.token_embedding.weight": 0.25, "decoder.positional_embedding": 0.02},
    },
}
NAMED_MODELS = [name for name in BASE_MODELS if name not in PRESETS] + \
    [name for name in whisper.available_models() if name not in BASE_MODELS]

ATTENTION = ["query", "key", "value", "out"]
MLP = ["mlp.0", "mlp.2"]


def whisper_cache_dir() -> Path:
    """Where openai-whisper keeps downloads (its own default), so models fetched earlier are reused."""
    default = Path.home() / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME", default)) / "whisper"


def materialise_preset(name: str, spec: dict | None = None) -> Path:
    """Build the preset deterministically into workspace/models/<name>.pt once (atomic write). A spec of the
    same form builds another model under that name (the benchmark's random Whisper sizes)."""
    target = workspace() / "models" / f"{name}.pt"
    with building_presets:
        return target if target.exists() else _build_preset(spec or PRESETS[name], target)


def _build_preset(spec: dict, target: Path) -> Path:
    dims = ModelDimensions(**spec["dims"])
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec["seed"])
    model = Whisper(dims)
    params = dict(model.named_parameters())
    with torch.no_grad():
        # The decoder's positional embedding is created with torch.empty: left alone it would hold
        # whatever the memory held, so it is always among the tensors drawn here.
        for key, std in spec["normal"].items():
            params[key].normal_(0.0, std)
        for key, factor in spec["scale"].items():
            params[key].mul_(factor)
        for key, value in spec["fill"].items():
            params[key].fill_(value)
    torch.random.set_rng_state(generator_state)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.stem}-{os.getpid()}.pt")
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, tmp)
    os.replace(tmp, target)  # another process may have written the same file: theirs is identical
    return target


def base_location(base_model: str) -> str:
    """What whisper.load_model should load: a named size or a .pt path. Raises ModelUnavailable."""
    text = base_model.strip()
    if text in PRESETS:
        return str(materialise_preset(text))
    if text in whisper.available_models():
        return text
    kind, value = resolve_source(text, PRESETS)
    if kind == "local":
        path = Path(value)
        if path.is_dir():
            raise ModelUnavailable(f"{path} is a folder; speech runs load openai-whisper .pt checkpoint files.",
                                   "Choose the .pt file itself.")
        return value
    raise ModelUnavailable(f"'{text}' is not a Whisper model the studio can load.",
                           f"Use one of {', '.join(['tiny-whisper'] + NAMED_MODELS[:10])}, or a local .pt checkpoint "
                           "(Hugging Face transformers Whisper folders are not supported here).")


def load_base_model(base_model: str, device: torch.device) -> Whisper:
    location = base_location(base_model)
    if location in whisper.available_models():
        return _load_named(location, device)
    try:
        return whisper.load_model(location, device=device)  # torch.load(weights_only=True) inside
    except Exception as err:  # a damaged file raises pickle, key or shape errors: one sentence for all
        raise ModelUnavailable(f"{location} could not be read as an openai-whisper checkpoint ({error_text(err)}).",
                               "Choose a .pt file saved by openai-whisper or exported by the studio.") from None


def unusable_base(base_model: str) -> str:
    """Why a run could not load this base model, found without loading it ("" when nothing is seen wrong):
    for the data check, so that no run is made only to fail."""
    try:
        location = base_location(base_model)
        if location in whisper.available_models():
            _check_downloadable(location)
        elif not zipfile.is_zipfile(location):  # torch saves a zip; a cut-off copy has no central directory
            return (f"{location} could not be read as an openai-whisper checkpoint (it is not a complete torch "
                    "file). Choose a .pt file saved by openai-whisper or exported by the studio.")
        else:
            return _not_whisper(location)
    except ModelUnavailable as err:
        return str(err)
    return ""


def _not_whisper(location: str) -> str:
    """Why a torch file is no openai-whisper checkpoint ("" when it looks like one): any other torch file (a
    Hugging Face pytorch_model.bin renamed to .pt) passed the check, and its run failed on loading it with
    "('dims')". Memory-mapped, so that even large-v3's weights are not read for this."""
    try:
        checkpoint = torch.load(location, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # (pickle, zip and unsupported-type errors alike)
        return (f"{location} could not be read as an openai-whisper checkpoint ({error_text(err)}). Choose a .pt "
                "file saved by openai-whisper or exported by the studio.")
    missing = [key for key in ("dims", "model_state_dict") if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        return (f"{location} is a torch file but not an openai-whisper checkpoint: it has no "
                f"{' and no '.join(repr(key) for key in missing)}, which openai-whisper's checkpoints hold (Hugging "
                "Face transformers Whisper weights are not supported here). Choose a .pt file saved by "
                "openai-whisper or exported by the studio.")
    return ""


def _check_downloadable(name: str) -> None:
    url = whisper._MODELS[name]
    cached = whisper_cache_dir() / os.path.basename(url)
    if not cached.is_file() and not host_reachable(url):
        raise ModelUnavailable(f"Whisper '{name}' is not downloaded yet and this machine cannot reach "
                               f"{urlparse(url).hostname} to fetch it.",
                               "Pick the built-in tiny-whisper preset, or download the model on a connected "
                               f"machine into {whisper_cache_dir()}, or choose a local .pt file.")


def _load_named(name: str, device: torch.device) -> Whisper:
    _check_downloadable(name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # urllib has no timeout of its own: a stalled download must not hang a run
    try:
        file = whisper_cache_dir() / os.path.basename(whisper._MODELS[name])
        with reporting_download(file, f"Whisper '{name}'"):
            return whisper.load_model(name, device=device, download_root=str(whisper_cache_dir()))
    except (OSError, RuntimeError) as err:
        raise ModelUnavailable(f"Whisper '{name}' could not be downloaded or read ({error_text(err)}).",
                               "Check the network and the free disk space, then try again.") from None
    finally:
        socket.setdefaulttimeout(previous)


def text_tokenizer(model: Whisper, language: str, task: str) -> Tokenizer:
    """The tokenizer with the language and task tokens pinned (from tiktoken files inside the package)."""
    if not model.is_multilingual:
        if language != "en" or task != "transcribe":
            raise TrainingFailure("This Whisper model knows English only and cannot translate.",
                                  "Set language to en and task to transcribe, or pick a multilingual model.")
        return get_tokenizer(False)
    return get_tokenizer(True, num_languages=model.num_languages, language=language, task=task)


def check_language(model: Whisper, language: str) -> None:
    codes = list(whisper.tokenizer.LANGUAGES)
    if model.is_multilingual and codes.index(language) >= model.num_languages:
        raise TrainingFailure(f"This Whisper model does not know the language '{language}'.",
                              "Pick another language or a newer model (large-v3).")


def log_mel(samples: np.ndarray, n_mels: int) -> torch.Tensor:
    """The encoder input for a clip of at most 30 s: computed exactly as `whisper.transcribe` does for its
    first window (mel of the padded audio, cut to the clip, zero-padded to 3000 frames), so training
    and transcription see the same numbers."""
    mel = whisper.log_mel_spectrogram(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)),
                                      n_mels, padding=N_SAMPLES)
    frames = min(N_FRAMES, mel.shape[-1] - N_FRAMES)
    return whisper.pad_or_trim(mel[:, :frames], N_FRAMES)


def lora_targets(model: Whisper, target: str, decoder_only: bool) -> list[str]:
    """Full module names, so 'decoder only' can leave the encoder's layers untouched."""
    suffixes = ATTENTION + (MLP if target == "attention+mlp" else [])
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if decoder_only and not name.startswith("decoder."):
            continue
        if any(name == s or name.endswith("." + s) for s in suffixes):
            names.append(name)
    if not names:
        raise TrainingFailure("No attention layers were found in this Whisper model.",
                              "Check that the checkpoint is an openai-whisper model.")
    return names


def model_summary(model: Whisper) -> str:
    dims = model.dims
    return (f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {dims.n_audio_layer}+"
            f"{dims.n_text_layer} layers, {'multilingual' if model.is_multilingual else 'English only'}")
