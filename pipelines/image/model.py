"""Base Stable Diffusion pipelines: the tiny offline preset, local folders, single-file checkpoints and hub ids.

The tiny preset is materialised once as an ordinary diffusers folder in the workspace and then loaded
like any local model (`StableDiffusionPipeline.from_pretrained`), so it exercises the same code path
as a downloaded model, and exported LoRA files load onto a real folder with plain diffusers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.hub import (ModelUnavailable, building_presets, error_text, hub_reachable, load_from_hub,
                           publish_folder, resolve_source, workspace)

ASSETS = Path(__file__).resolve().parents[2] / "assets"

# Stable Diffusion's architecture at toy size (about 1.8 M parameters): a UNet with cross-attention in
# every block, a 2x VAE and a 2-layer CLIP text encoder. 32 px images (config.PRESET_RESOLUTIONS),
# 16x16 latents: a few hundred steps take seconds on a laptop CPU. Its weights are random, so its
# pictures are coloured noise: it is there to try the whole pipeline offline, not to draw.
PRESETS = {
    "tiny-sd": {
        "tokenizer": "tiny-sd-tokenizer",
        "unet": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                     cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16),
        "vae": dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    latent_channels=4, sample_size=32, norm_num_groups=16, scaling_factor=3.5),
        "vae_log_variance": -12.0,  # posterior std e^-6, about 0.0025
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=77, projection_dim=32),
        # Stable Diffusion's noise schedule; Euler samples well in 20-30 steps.
        "scheduler": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="epsilon", steps_offset=1, timestep_spacing="leading"),
        "seed": 0,
    },
}

SAFETY_OFF = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def materialise_preset(name: str) -> Path:
    """Build the preset deterministically (fixed seed, fixed configs) into workspace/models/<name>/ once."""
    target = workspace() / "models" / name
    with building_presets:
        if (target / "model_index.json").exists():
            return target
        pipe = build_pipeline(PRESETS[name])
        return publish_folder(target, lambda folder: pipe.save_pretrained(folder, safe_serialization=True))


def build_pipeline(spec: dict):
    """A StableDiffusionPipeline with random weights from a PRESETS-style spec (seeded: the same every time)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(ASSETS / spec["tokenizer"])
    torch.manual_seed(spec["seed"])
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    with torch.no_grad():
        # A trained VAE encodes almost deterministically (a tiny posterior spread); a random one would
        # drown each image's latent in sampling noise. Pin the log-variance half of quant_conv low.
        channels = spec["vae"]["latent_channels"]
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = spec["vae_log_variance"]
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, **spec["text_encoder"]))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=EulerDiscreteScheduler(**spec["scheduler"]), **SAFETY_OFF)


def base_location(base_model: str) -> tuple[str, str]:
    """("folder" | "file" | "hub", where). Raises ModelUnavailable with one clear sentence."""
    kind, value = resolve_source(base_model, PRESETS)
    if kind == "preset":
        return "folder", str(materialise_preset(value))
    if kind == "hub":
        return "hub", value
    path = Path(value)
    if path.is_file():
        if path.suffix.lower() == ".ckpt":  # (here, so that the data check says it too, not only the run)
            raise ModelUnavailable(f"{path.name} is a pickled .ckpt file, which can run code when loaded.",
                                   "Convert it to .safetensors, or use a diffusers folder.")
        if path.suffix.lower() != ".safetensors":
            raise ModelUnavailable(f"{path.name} is not a Stable Diffusion checkpoint (.safetensors).",
                                   "Choose a diffusers folder or a single .safetensors file.")
        return "file", value
    if not (path / "model_index.json").exists():
        singles = sorted(path.glob("*.safetensors"))
        hint = (f"To use the single-file checkpoint inside, choose {singles[0].name} itself." if singles
                else "Choose the folder that holds model_index.json, unet/, vae/ and text_encoder/.")
        raise ModelUnavailable(f"The folder {path} is not a diffusers pipeline (it has no model_index.json).", hint)
    return "folder", value


# What training loads of a diffusers folder (the safety checker and its feature extractor are left out).
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder")


def _weight_files(folder: Path) -> list[str]:
    return [p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin")]


def weights_variant(folder: str | Path) -> str | None:
    """"fp16" where a component's weights are there only as the fp16 variant (unet/diffusion_pytorch_model
    .fp16.safetensors, as a download with variant="fp16" or allow_patterns="*.fp16.*" leaves them): diffusers
    reads those only when told, and otherwise said "no file named model.safetensors". With the variant, a
    component that has only full-precision files is still read from them."""
    for name in WEIGHTED:
        files = _weight_files(Path(folder) / name)
        if files and all(".fp16." in f for f in files):
            return "fp16"
    return None


def unusable_base(base_model: str) -> str:
    """Why a run could not load this base model, found without loading it ("" when nothing is seen wrong):
    for the data check, so that no run is made only to fail."""
    try:
        kind, where = base_location(base_model)
        if kind == "hub":  # offline, only what the local cache holds
            from huggingface_hub import hf_hub_download
            load_from_hub(hf_hub_download, where, filename="model_index.json")
        if kind == "file":
            check_single_file(Path(where))
    except ModelUnavailable as err:
        return str(err)
    missing = [name for name in COMPONENTS if kind == "folder" and not (Path(where) / name).is_dir()]
    if missing:
        return (f"The pipeline folder {where} has no {', '.join(f'{m}/' for m in missing)}: check that it was "
                "copied whole (unet, vae, text_encoder, tokenizer, scheduler).")
    unweighted = [name for name in WEIGHTED if kind == "folder" and not _weight_files(Path(where) / name)]
    if unweighted:
        return (f"The pipeline folder {where} has no weights in {', '.join(f'{m}/' for m in unweighted)} (.safetensors "
                "or .bin, the fp16 variant too): copy the folder again, whole.")
    return ""


def load_pipeline(base_model: str, dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline on the CPU. Without the safety checker: it plays no part in training or in
    the LoRA, and skipping it saves a 1.2 GB download."""
    from diffusers import StableDiffusionPipeline

    kind, where = base_location(base_model)
    if kind == "hub":
        return load_from_hub(StableDiffusionPipeline.from_pretrained, where, dtype=dtype, **SAFETY_OFF)
    if kind == "file":
        return _load_single_file(Path(where), dtype)
    try:
        return StableDiffusionPipeline.from_pretrained(where, dtype=dtype, variant=weights_variant(where), **SAFETY_OFF)
    except Exception as err:  # diffusers raises many kinds for broken folders
        raise ModelUnavailable(f"The pipeline in {where} could not be read: {error_text(err)}.",
                               "Check that the folder is complete (unet, vae, text_encoder, tokenizer, scheduler).") from None


def _load_single_file(path: Path, dtype):
    """An A1111/civitai-style checkpoint. The file holds weights only: diffusers fetches the matching
    configs from the hub (or its local cache) by recognising the model family from the weight names."""
    from diffusers import StableDiffusionPipeline

    online = hub_reachable()
    try:
        return StableDiffusionPipeline.from_single_file(str(path), dtype=dtype, local_files_only=not online,
                                                        **SAFETY_OFF)
    except Exception as err:  # diffusers raises many kinds for files it cannot place
        check_single_file(path)  # (the file unreadable, or its family's configuration files out of reach)
        raise ModelUnavailable(f"The checkpoint {path.name} could not be read as Stable Diffusion 1.x/2.x: "
                               f"{error_text(err)}.",
                               "Check that it is a full SD checkpoint, not a LoRA or a VAE.") from None


def check_single_file(path: Path) -> None:
    """Raise ModelUnavailable where a single-file checkpoint cannot be loaded here, found from the weights' names
    and shapes in its header alone: a real one is 2-4 GB, and the data check runs at each change of the form.
    diffusers builds the pipeline with the configuration files of the model family those show (SD 1.5, 2.1...),
    from the hub; offline, they must be in its local cache (looked up as the check does for a hub id)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from huggingface_hub import try_to_load_from_cache
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as weights:  # (the tensors stay on disk)
            shapes = {k: torch.empty(weights.get_slice(k).get_shape(), device="meta") for k in weights.keys()}
    except Exception as err:  # safetensors' errors for a file cut short or of another kind
        raise ModelUnavailable(f"{path.name} cannot be read as a .safetensors file ({error_text(err)}).",
                               "Copy or download it again.") from None
    if hub_reachable():
        return  # (the configuration files come with the first load)
    try:
        family = fetch_diffusers_config(shapes)["pretrained_model_name_or_path"]
    except Exception:  # a family diffusers tells by the weights' values, not their shapes: the load finds out
        return
    if not isinstance(try_to_load_from_cache(family, "model_index.json"), str):
        raise ModelUnavailable(f"The checkpoint {path.name} needs the configuration files of its model family "
                               f"({family}) to be read, and they cannot be downloaded: this machine cannot reach the "
                               "Hugging Face hub and they are not in the local cache.",
                               "Connect this machine for the checkpoint's first load (the files are small and stay "
                               "cached), or use a diffusers folder of the model.")
