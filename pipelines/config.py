"""Run configuration: one typed dataclass per modality, one YAML file per run.

Every field carries its default, bounds and one line of help in `metadata`. The UI builds its sliders
and tooltips from these, `check()` validates against them, and `config.yaml` round-trips through
`to_dict`/`from_dict`: the same file whether the UI, the CLI or a user wrote it.

This module imports no torch, so the UI can start without loading the ML stack.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           choices: list | None = None, step: float | None = None, advanced: bool = False,
           one_per_line: bool = False) -> Any:
    """A config field with the metadata the UI and validation read. choices: the values allowed, or a dict of
    them to what the form shows for each. one_per_line: a list whose items are sentences (prompts), which may
    hold commas, so the form takes them one per line."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "step": step, "advanced": advanced,
            "one_per_line": one_per_line}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class ConfigError(ValueError):
    """Raised with every bad field at once, each named, so the user fixes them in one go."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{name}: {why}" for name, why in problems))


@dataclass
class RunConfig:
    """Fields every modality shares: the run, LoRA and the optimisation loop."""

    modality: ClassVar[str] = ""
    # Fields that name data files or folders: relative paths resolve against the config file's folder.
    path_fields: ClassVar[tuple[str, ...]] = ()
    # Fields that no data check reads, only training: a change of one keeps a data check made before it.
    training_only: ClassVar[tuple[str, ...]] = (
        "name", "lora_rank", "lora_alpha", "lora_dropout", "learning_rate", "epochs", "max_steps", "batch_size",
        "gradient_accumulation", "warmup_steps", "scheduler", "weight_decay", "max_grad_norm", "eval_every",
        "sample_every", "checkpoint_every", "keep_checkpoints", "processes", "nodes", "strategy", "strategy_config",
        "main_address", "main_port")

    name: str = option("", "A short name for the run (letters, digits, spaces, - and _).")
    base_model: str = option("", "Built-in preset name, Hugging Face hub id, or a local folder.")
    seed: int = option(42, "Random seed: the same seed and data give the same run.", min=0, max=2**31 - 1)

    lora_rank: int = option(8, "LoRA rank r: capacity of the adapter. Higher learns more, costs more.",
                            min=1, max=256, step=1)
    lora_alpha: float = option(16.0, "LoRA alpha: scales the adapter's update (often 2 x rank).",
                               min=0.5, max=512.0, step=0.5)
    lora_dropout: float = option(0.0, "Dropout on the LoRA input, against over-fitting small data.",
                                 min=0.0, max=0.5, step=0.01)

    learning_rate: float = option(2e-4, "Peak learning rate of AdamW.", min=1e-7, max=1.0)
    epochs: float = option(3.0, "Passes over the training data (ignored when max steps is set).",
                           min=0.01, max=1000.0, step=0.5)
    max_steps: int = option(0, "Stop after this many optimizer steps; 0 = use epochs.", min=0, max=1_000_000)
    batch_size: int = option(4, "Examples per forward pass. Lower it if memory runs out.", min=1, max=512, step=1)
    gradient_accumulation: int = option(1, "Forward passes summed into one optimizer step "
                                           "(effective batch = batch size x this).", min=1, max=256, step=1)
    warmup_steps: int = option(0, "Steps over which the learning rate ramps up from 0.", min=0, max=100_000)
    scheduler: str = option("cosine", "Learning-rate schedule after warm-up.",
                            choices=["constant", "linear", "cosine"])
    weight_decay: float = option(0.0, "AdamW weight decay on the adapter weights.", min=0.0, max=1.0)
    max_grad_norm: float = option(1.0, "Clip gradients to this norm; 0 = no clipping.", min=0.0, max=100.0,
                                  advanced=True)

    eval_every: int = option(0, "Evaluate on the validation split every N steps; 0 = only at the end.",
                             min=0, max=100_000)
    sample_every: int = option(0, "Log samples every N steps; 0 = only at the end.", min=0, max=100_000)
    checkpoint_every: int = option(50, "Save a resumable checkpoint every N steps.", min=1, max=100_000,
                                   advanced=True)
    keep_checkpoints: int = option(3, "How many recent checkpoints to keep on disk.", min=1, max=100,
                                   advanced=True)
    device: str = option("auto", "Where to train: auto picks the GPU when there is one.",
                         choices=["auto", "cpu", "cuda"], advanced=True)
    processes: int = option(1, "Training processes on this machine: one per GPU (on a CPU, each takes a share "
                               "of the cores). Above 1 trains data parallel: global batch = batch size x "
                               "accumulation x processes x nodes.", min=1, max=64, step=1, advanced=True)
    nodes: int = option(1, "Machines training this run together. Node 0 is this studio; start the others with "
                           "`studio join` on the same run folder (shared storage).", min=1, max=1024, advanced=True)
    strategy: str = option("ddp", "How several processes share the model. ddp: each holds all of it. fsdp: the "
                                  "base model's blocks are split between them (torch FSDP); the adapter stays whole. "
                                  "zero2 / zero3: DeepSpeed ZeRO stage 2 (gradients and optimizer state split) or 3 "
                                  "(the weights too), set by assets/scale/<strategy>.json.",
                           choices=["ddp", "fsdp", "zero2", "zero3"], advanced=True)
    strategy_config: str = option("", "A JSON file of the strategy's settings to use instead of the shipped "
                                      "assets/scale/<strategy>.json (fsdp, zero2, zero3).", advanced=True)
    main_address: str = option("127.0.0.1", "Address of node 0 that the other nodes can reach (nodes > 1 only).",
                               advanced=True)
    main_port: int = option(0, "Port the processes meet on; 0 = any free port (one machine only).",
                            min=0, max=65535, advanced=True)

    # ---- (de)serialisation -------------------------------------------------------------------

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    def to_dict(self) -> dict[str, Any]:
        return {"modality": self.modality, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], check: bool = True, base: Path | None = None) -> "RunConfig":
        """Build and check a config from plain data (YAML, form values). Raises ConfigError.
        check=False only converts types (for filling a form from a config whose data is elsewhere).
        base: the folder relative data paths are read against (a config file's own; else the working folder)."""
        data = dict(data or {})
        modality = data.pop("modality", cls.modality)
        problems: list[tuple[str, str]] = []
        if modality != cls.modality:
            problems.append(("modality", f"is '{modality}', expected '{cls.modality}'"))
        known = {f.name for f in cls.fields()}
        problems += [(k, "is not a known setting") for k in data if k not in known]
        types = cls.field_types()
        for name in set(cls.path_fields) & data.keys():
            if typing.get_origin(types[name]) is list:
                data[name] = _one_path(data[name], base)
        values = {}
        for name in known & data.keys():
            try:
                values[name] = _coerce(data[name], types[name])
            except ValueError as err:
                problems.append((name, str(err)))
        config = cls(**values)
        if check:
            # Every problem at once: also the bounds and rules of the fields that converted fine.
            named = {name for name, _ in problems}
            problems += [(name, why) for name, why in config.problems() if name not in named]
        if problems:
            raise ConfigError(problems)
        return config

    def check(self) -> None:
        """Validate every field against its type and bounds, then cross-field rules. Raises ConfigError."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[tuple[str, str]]:
        """(field, reason) for every field out of type or bounds, then the cross-field rules."""
        problems = []
        types = self.field_types()
        for f in self.fields():
            value = getattr(self, f.name)
            try:
                value = _coerce(value, types[f.name])
            except ValueError as err:
                problems.append((f.name, str(err)))
                continue
            meta = f.metadata
            if meta.get("min") is not None and value < meta["min"]:
                problems.append((f.name, f"must be at least {meta['min']} (got {value})"))
            if meta.get("max") is not None and value > meta["max"]:
                problems.append((f.name, f"must be at most {meta['max']} (got {value})"))
            if meta.get("choices") and value not in meta["choices"]:
                problems.append((f.name, f"must be one of {', '.join(map(str, meta['choices']))} (got {value!r})"))
        return problems + self.extra_problems()

    def extra_problems(self) -> list[tuple[str, str]]:
        """Cross-field rules; modalities extend this."""
        problems = []
        if not self.base_model.strip():
            problems.append(("base_model", "is empty: pick a preset, a hub id or a local folder"))
        name = self.name.strip()
        if name and not all(c.isalnum() or c in " -_." for c in name):
            problems.append(("name", "may hold only letters, digits, spaces, '-', '_' and '.'"))
        if len(name) > 80:
            problems.append(("name", "is longer than 80 characters"))
        if Path(self.strategy_config).is_absolute():  # (a relative path is read once resolved_paths made it absolute)
            problems += _json_file_problems("strategy_config", self.strategy_config)
        if self.nodes > 1 and not self.main_port:
            problems.append(("main_port", "must be set (not 0) when several nodes train together"))
        address = self.main_address.strip()
        if not address or not all(c.isalnum() or c in ".-:[]" for c in address):
            problems.append(("main_address", "must be a host name or an IP address"))
        return problems

    @property
    def world_size(self) -> int:
        """Training processes over all nodes."""
        return self.processes * self.nodes

    @property
    def splits_weights(self) -> bool:
        """Whether several processes split the weights between them (fsdp, zero3): a forward pass then needs
        every process."""
        return self.world_size > 1 and self.strategy in ("fsdp", "zero3")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation * self.world_size

    def resolved_paths(self, base: Path) -> "RunConfig":
        """A copy whose data paths are absolute, relative ones read against `base`."""
        def resolve(value: str) -> str:
            return value if not value or Path(value).is_absolute() else str((base / value).resolve())
        changes = {}
        for name in self.path_fields:
            value = getattr(self, name)
            changes[name] = [resolve(v) for v in value] if isinstance(value, list) else resolve(value)
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    def changed(self, **values) -> "RunConfig":
        return dataclasses.replace(self, **values)


def _one_path(value: Any, base: Path | None) -> Any:
    """A list of paths given as text (a config file's `data_files: ...`): the one path it names where that exists,
    whatever commas its name holds ('Smith, J.csv', a run's copy of such a folder); otherwise left to be read as
    items between commas."""
    if isinstance(value, str) and value.strip() and ((base or Path()) / Path(value.strip()).expanduser()).exists():
        return [value.strip()]
    return value


def _coerce(value: Any, kind: Any) -> Any:
    """Convert YAML/form values to the field's type, refusing what does not fit (never silently)."""
    origin = typing.get_origin(kind)
    if origin is list:
        if value is None:
            return []
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list (got {value!r})")
        return [str(v) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"must be true or false (got {value!r})")
    if kind in (int, float) and (value is None or (isinstance(value, str) and not value.strip())):
        raise ValueError("is empty: enter a number")  # a number box cleared in the form ("got None" said before)
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"must be a whole number (got {value!r})")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(f"must be a whole number (got {value!r})")
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number (got {value!r})")
        try:
            number = float(value)  # YAML reads 3e-4 as a string: accept it
        except (TypeError, ValueError):
            raise ValueError(f"must be a number (got {value!r})") from None
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number (got {value!r})")
        return number
    if kind is str:
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ValueError(f"must be text (got {value!r})")
        return value
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file; a broken file raises ConfigError naming the problem."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([("config", f"file not found: {path}")]) from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError([("config", f"{path} is not valid YAML: {err}")]) from None
    if not isinstance(data, dict):
        raise ConfigError([("config", f"{path} must hold a mapping of settings")])
    return data


def _json_file_problems(name: str, path: str) -> list[tuple[str, str]]:
    import json
    try:
        if not isinstance(json.loads(Path(path).read_text()), dict):
            return [(name, f"{path} does not hold a JSON object")]
    except OSError:
        return [(name, f"{path} cannot be read")]
    except ValueError as err:
        return [(name, f"{path} is not valid JSON ({err})")]
    return []
