"""The ML side of the studio: one package per modality, all offering the same protocol.

Each modality package has
  config.py    a RunConfig subclass (light: no torch import), named in CONFIG
  data.py      inspect_data(config) -> DataReport; never raises on bad user data
  pipeline.py  train(config, run_dir, events, should_stop, resume), generate/transcribe, export

The studio looks modalities up here by name and imports their heavy parts only when needed.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

from pipelines.config import ConfigError, RunConfig, read_yaml

# accelerate and transformers import DeepSpeed where it is installed, and on a machine with no GPU it prints
# "[WARNING] Setting accelerator to CPU ..." to standard output: into `studio train`'s own output (which
# scripts read a run id from) and every run's log. Said in advance, on Linux with no GPU driver loaded, the
# CPU is its choice all the same.
if sys.platform == "linux" and not (Path("/dev/nvidiactl").exists() or Path("/dev/kfd").exists()):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

MODALITIES = {"llm": "Language model", "image": "Image (Stable Diffusion)", "speech": "Speech (Whisper)"}


def _package(modality: str) -> str:
    if modality not in MODALITIES:
        raise ConfigError([("modality", f"must be one of {', '.join(MODALITIES)} (got {modality!r})")])
    return f"pipelines.{modality}"


def config_class(modality: str) -> type[RunConfig]:
    return importlib.import_module(_package(modality) + ".config").CONFIG


def data_module(modality: str) -> ModuleType:
    return importlib.import_module(_package(modality) + ".data")


def pipeline_module(modality: str) -> ModuleType:
    return importlib.import_module(_package(modality) + ".pipeline")


def model_module(modality: str) -> ModuleType:
    return importlib.import_module(_package(modality) + ".model")


def config_from_dict(data: dict, base: Path | None = None) -> RunConfig:
    modality = data.get("modality")
    if not modality:
        raise ConfigError([("modality", f"is missing: say which of {', '.join(MODALITIES)} this run is")])
    return config_class(modality).from_dict(data, base=base)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run's config.yaml. Relative data paths resolve against the file's folder."""
    folder = Path(path).resolve().parent
    return config_from_dict(read_yaml(path), base=folder).resolved_paths(folder)
