"""Base causal language models: the tiny offline preset, local folders and hub ids, plus LoRA setup.

The tiny preset is materialised once as an ordinary transformers folder in the workspace and then
loaded like any local model, so the preset exercises the same code path as a downloaded model, and an
exported adapter's `base_model_name_or_path` points at a real folder plain peft can load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from pipelines.hub import (ModelUnavailable, building_presets, error_text, load_from_hub, publish_folder,
                           remote_code_refused, resolve_source, workspace)
from pipelines.training import TrainingFailure, native_bf16

ASSETS = Path(__file__).resolve().parents[2] / "assets"

# A few million parameters: trains in well under a minute on a laptop CPU.
PRESETS = {
    "tiny-llama": {
        "tokenizer": "tiny-llama-tokenizer",
        "config": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, initializer_range=0.05),
        "seed": 0,
    },
}

# Used when a tokenizer has no chat template of its own (documented in the README).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)

ATTENTION_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn",
                   "Wqkv", "out_proj", "query", "key", "value"}


def materialise_preset(name: str) -> Path:
    """Build the preset deterministically (fixed seed, fixed config) into workspace/models/<name>/ once."""
    target = workspace() / "models" / name
    with building_presets:
        return target if (target / "config.json").exists() else _build_preset(name, target)


def _build_preset(name: str, target: Path) -> Path:
    spec = PRESETS[name]
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / spec["tokenizer"])
    # No pad_token_id in the model config: nn.Embedding would zero that row, and as the tokenizer pads
    # with its end-of-text token, the model could then never learn to stop.
    config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=None, bos_token_id=None, **spec["config"])
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    def save(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return publish_folder(target, save)


def base_location(base_model: str) -> str:
    """What from_pretrained should load: a folder path or a hub id."""
    kind, value = resolve_source(base_model, PRESETS)
    if kind == "preset":
        return str(materialise_preset(value))
    if kind == "local" and not (Path(value) / "config.json").exists():
        raise ModelUnavailable(f"The folder {value} is not a transformers model (it has no config.json).",
                               "Choose the folder that holds config.json and the weights.")
    return value


def unusable_weights(base_model: str) -> str:
    """Why a local model folder's weights could not be loaded, found without loading them ("" when nothing is
    seen wrong): the data check's, which loads only the tokenizer (a folder without its weights, a shard
    missing or a file cut short made a run that failed on loading)."""
    folder = Path(base_location(base_model))
    if not folder.is_dir():
        return ""  # a hub id: the weights come with it, as the tokenizer did
    index = next((folder / name for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (folder / name).exists()), None)
    if index is not None:
        files = sorted({folder / shard for shard in json.loads(index.read_text()).get("weight_map", {}).values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            return (f"The model folder {folder} lacks {len(missing)} of its {len(files)} weight files "
                    f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}): copy the folder again, whole.")
    else:
        files = [folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).exists()]
        if not files:
            return (f"The model folder {folder} holds no weights (model.safetensors or pytorch_model.bin, or the "
                    "index of its shards): copy the folder again, whole.")
    short = [f.name for f in files if f.suffix == ".safetensors" and not _whole_safetensors(f)]
    if short:
        return f"The weights file {short[0]} in {folder} is cut short or damaged: copy it again."
    return ""


def _whole_safetensors(path: Path) -> bool:
    """Whether the file is as long as its header says (8 bytes of header length, the JSON header, the data)."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size >= 8 + length + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _load(loader, location: str, **kwargs):
    if Path(location).is_dir():
        try:
            return loader(location, **kwargs)
        except (OSError, ValueError) as err:
            if refused := remote_code_refused(err, f"in {location}"):
                raise refused from None
            raise ModelUnavailable(f"The model in {location} could not be read: {error_text(err)}.",
                                   "Check that the folder is complete.") from None
    return load_from_hub(loader, location, **kwargs)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(base_model: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    location = base_location(base_model)
    if Path(location).is_dir() and not any((Path(location) / name).exists() for name in TOKENIZER_FILES):
        # (transformers' own words for it are a paragraph about backends, cut off as a message)
        raise ModelUnavailable(f"The folder {location} has no tokenizer (tokenizer.json, or tokenizer.model with "
                               "tokenizer_config.json).",
                               "Copy the tokenizer files from the model's repository into the folder.")
    tokenizer = _load(AutoTokenizer.from_pretrained, location, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(base_model: str, device: torch.device, *, trust_remote_code: bool = False,
                    load_in_4bit: bool = False) -> torch.nn.Module:
    location = base_location(base_model)
    kwargs: dict = {"trust_remote_code": trust_remote_code, "use_safetensors": None}
    if device.type == "cuda":
        kwargs["dtype"] = torch.bfloat16 if native_bf16(device) else torch.float16
    else:
        kwargs["dtype"] = torch.float32
    if load_in_4bit:
        kwargs["quantization_config"] = _four_bit_config(device)
        kwargs["device_map"] = {"": device.index or 0}
    model = _load(AutoModelForCausalLM.from_pretrained, location, **kwargs)
    if not load_in_4bit:
        model.to(device)
    return model


def _four_bit_config(device: torch.device):
    if device.type != "cuda":
        raise TrainingFailure("4-bit (QLoRA) loading needs an NVIDIA GPU, and this run is on the CPU.",
                              "Turn off 4-bit, or run on a machine with a GPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainingFailure("4-bit (QLoRA) loading needs the bitsandbytes package, which is not installed.",
                              "Run `.venv/bin/pip install bitsandbytes`, or turn off 4-bit.") from None
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if native_bf16(device) else torch.float16)


def builtin_base(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformers model under a peft wrapper, or None when its class is remote code, which may use any
    model type's name and compute anything (what is known of transformers' own classes does not hold)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base if type(base).__module__.startswith("transformers.models.") else None


def _linear(module: torch.nn.Module) -> bool:
    """A layer LoRA adapts as a linear one, as peft's all-linear does: transformers' Conv1D (GPT-2's c_attn,
    c_proj and c_fc, a linear layer stored transposed) and a 4-bit linear too."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit")


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The names a custom target module can take: each linear layer's own name (q_proj, down_proj...)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _linear(module)}
                  - {"lm_head"})


def missing_targets(model: torch.nn.Module, custom: list[str]) -> list[str]:
    """The custom target modules no layer of the model answers to, matched as peft matches a list: a layer's
    whole name, or its end after a dot ('q_proj', 'self_attn.q_proj'), of a kind LoRA can adapt."""
    adaptable = [name for name, module in model.named_modules()
                 if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d))
                 or type(module).__name__ in ("Conv1D", "Linear4bit")]
    return [key for key in custom if not any(name == key or name.endswith("." + key) for name in adaptable)]


def load_model_config(base_model: str, trust_remote_code: bool = False):
    """The base model's config.json as transformers reads it: for the data check, which loads only the tokenizer,
    this is where a model whose own code may not run is refused (the tokenizer may need none)."""
    from transformers import AutoConfig
    return _load(AutoConfig.from_pretrained, base_location(base_model), trust_remote_code=trust_remote_code)


def model_skeleton(base_model: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The base model's layers without its weights (on the meta device): what LoRA could attach to, known in a
    moment from config.json alone, for the data check."""
    config = load_model_config(base_model, trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def lora_targets(model: torch.nn.Module, choice: str, custom: list[str]) -> list[str] | str:
    if choice == "all-linear":
        return "all-linear"
    if choice == "custom":
        return custom
    found = set()
    for name, module in model.named_modules():
        if not _linear(module):
            continue
        parent, _, layer = name.rpartition(".")
        parent = parent.rsplit(".", 1)[-1]
        if layer in ATTENTION_NAMES:
            found.add(layer)
        elif "attn" in parent.lower() or "attention" in parent.lower():
            # The output projection under another name (Phi-2's dense, GPT-2's c_proj), named with its attention
            # module, as peft matches a name's dotted end: the MLP's layer of the same name stays out.
            found.add(f"{parent}.{layer}")
    found = sorted(found)
    if not found:
        raise TrainingFailure("No attention projection layers were recognised in this model.",
                              "Choose 'all-linear' or list the module names under custom target modules.")
    return found
