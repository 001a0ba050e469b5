"""Settings of a Stable Diffusion LoRA run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipelines.config import RunConfig, option

# Popular diffusers-format bases for the UI's dropdown. Sizes: what the studio downloads (full-precision
# UNet, VAE and text encoder; the safety checker is skipped), rounded.
HUB_MODELS = [
    {"id": "stable-diffusion-v1-5/stable-diffusion-v1-5", "label": "Stable Diffusion 1.5", "download_gb": 4.3,
     "resolution": 512, "note": "The most fine-tuned base; most community LoRAs target it."},
    {"id": "stabilityai/stable-diffusion-2-1-base", "label": "Stable Diffusion 2.1 base", "download_gb": 5.2,
     "resolution": 512, "note": "OpenCLIP text encoder; prompts behave differently from 1.5."},
    {"id": "stabilityai/sd-turbo", "label": "SD-Turbo", "download_gb": 5.2, "resolution": 512,
     "note": "Distilled 2.1: samples in 1-4 steps with guidance 0."},
    {"id": "Lykon/dreamshaper-8", "label": "DreamShaper 8 (SD 1.5)", "download_gb": 4.3, "resolution": 512,
     "note": "A popular SD 1.5 fine-tune for illustration and photos."},
    {"id": "nota-ai/bk-sdm-small", "label": "BK-SDM small (SD 1.4, pruned)", "download_gb": 2.9, "resolution": 512,
     "note": "A block-removed SD 1.4: about a third smaller and faster."},
]

# The built-in offline presets (their architectures are in model.py) and the size they draw at.
PRESET_RESOLUTIONS = {"tiny-sd": 32}

CAPTION_SOURCES = {
    "auto": "Per image: a same-name .txt/.caption file, else metadata.csv/.jsonl, else the instance prompt.",
    "files": "A same-name .txt or .caption file next to each image.",
    "metadata": "metadata.csv or metadata.jsonl with file_name and text columns (Hugging Face imagefolder).",
    "instance_prompt": "The instance prompt for every image (DreamBooth style).",
}


@dataclass
class ImageConfig(RunConfig):
    modality: ClassVar[str] = "image"
    path_fields: ClassVar[tuple[str, ...]] = ("data_path", "data_files", "strategy_config")

    base_model: str = option("tiny-sd", "Built-in preset, Hugging Face hub id in diffusers format "
                                        "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), a local diffusers "
                                        "folder or a single .safetensors checkpoint.")

    data_path: str = option("", "A folder of images (subfolders are searched too) or a .zip of one.")
    data_files: list[str] = option([], "Image files (and their .txt captions or metadata file, or zips) uploaded "
                                       "one by one; used together with the data path.")
    caption_source: str = option("auto", "Where each image's caption comes from.", choices=list(CAPTION_SOURCES))
    instance_prompt: str = option("", "Caption for images without one, and for all images when the caption "
                                      "source is instance_prompt; e.g. 'a photo of sks dog'.")

    resolution: int = option(0, "Training size in pixels (square): images are resized and cropped to it. "
                                "0 = the base model's native size (512 for SD 1.5, 32 for tiny-sd).",
                             min=0, max=2048, step=8)
    center_crop: bool = option(True, "Crop the centre of each image; otherwise a crop position drawn once per "
                                     "image from the seed.")
    random_flip: bool = option(True, "Mirror images left-right at random: doubles the variety for "
                                     "symmetric subjects. Turn off for text or asymmetric logos.")
    train_text_encoder: bool = option(False, "Also put LoRA on the text encoder: learns new words faster, "
                                             "over-fits sooner, costs more memory.")
    snr_gamma: float = option(5.0, "Min-SNR loss weighting (about 5 is good); 0 = plain MSE. Steadier, "
                                   "faster convergence.", min=0.0, max=20.0, step=0.5, advanced=True)
    mixed_precision: str = option("auto", "Half-precision frozen weights under autocast: about half the "
                                          "memory, faster. auto = bf16 on an NVIDIA GPU that has it (fp16 on "
                                          "older ones) and on a CPU with native bf16 (AMX or AVX512-BF16: Intel "
                                          "Xeon since Cooper Lake, AMD since Zen 4) for full-size models; float32 "
                                          "for the tiny preset, whose small convolutions run slower in bf16. fp16 "
                                          "(GPUs only) scales the loss so small gradients survive.",
                                  choices=["auto", "no", "bf16", "fp16"], advanced=True)
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass: much less GPU "
                                                 "memory, about 20% slower.", advanced=True)

    sample_prompts: list[str] = option([], "Prompts drawn from while training, with a fixed seed "
                                           "(empty = the instance prompt or the first captions).", one_per_line=True)
    sample_seed: int = option(1234, "Seed of the sample images, so every sample step is comparable.",
                              min=0, max=2**31 - 1, advanced=True)
    sample_steps: int = option(25, "Denoising steps per sample image.", min=1, max=150, advanced=True)
    sample_guidance: float = option(7.5, "Classifier-free guidance of the sample images (0-1 = off).",
                                    min=0.0, max=30.0, step=0.5, advanced=True)

    # Defaults that suit diffusion LoRA better than the shared ones.
    lora_rank: int = option(8, "LoRA rank r: capacity of the adapter. 4-32 is usual for Stable Diffusion.",
                            min=1, max=256, step=1)
    lora_alpha: float = option(8.0, "LoRA alpha: scales the adapter's update (alpha / rank).",
                               min=0.5, max=512.0, step=0.5)
    learning_rate: float = option(1e-4, "Peak learning rate of AdamW (1e-4 is usual for SD LoRA).", min=1e-7, max=1.0)
    epochs: float = option(50.0, "Passes over the images (ignored when max steps is set).",
                           min=0.01, max=10000.0, step=1.0)
    batch_size: int = option(2, "Images per forward pass. Lower it if memory runs out.", min=1, max=256, step=1)
    sample_every: int = option(100, "Draw sample images every N steps; 0 = only at the end.", min=0, max=100_000)
    checkpoint_every: int = option(100, "Save a resumable checkpoint every N steps.", min=1, max=100_000,
                                   advanced=True)

    def extra_problems(self) -> list[tuple[str, str]]:
        problems = super().extra_problems()
        if not self.data_path.strip() and not self.data_files:
            problems.append(("data_path", "no images given: choose a folder or zip, or upload image files"))
        if self.caption_source == "instance_prompt" and not self.instance_prompt.strip():
            problems.append(("instance_prompt", "is empty but the caption source is instance_prompt"))
        if self.resolution and self.resolution % 8:
            problems.append(("resolution", f"must be a multiple of 8 (got {self.resolution})"))
        if too_large := oversize(self.resolution, self.base_model, "each step"):
            problems.append(("resolution", too_large))
        path = self.data_path.strip()
        if path and Path(path).suffix.lower() not in ("", ".zip") and Path(path).is_file():
            problems.append(("data_path", "must be a folder or a .zip file"))
        return problems


CONFIG = ImageConfig


def oversize(size: int, base_model: str, what: str) -> str:
    """Why `size` is refused for this model ("" when it is not): over 4 times its native size, `what` (each
    training step, each image tried) takes very long for images it cannot draw. 2048 px on the 32 px preset
    held a run at its first step for minutes, and a picture tried at 1000 px tied the server up for 20."""
    native = native_resolution(base_model)
    if size <= 4 * native:
        return ""
    return (f"{size} px is over 4 times this model's native {native} px: {what} would take very long for images "
            f"it cannot draw; choose at most {4 * native} (0 = {native})")


def native_resolution(base_model: str) -> int:
    """The image size a base model was trained at, found without loading weights: the preset table, the
    HUB_MODELS table or a local folder's configs; otherwise 512 (SD 1.x and 2.x base)."""
    text = base_model.strip()
    if text in PRESET_RESOLUTIONS:
        return PRESET_RESOLUTIONS[text]
    for entry in HUB_MODELS:
        if entry["id"] == text:
            return entry["resolution"]
    folder = Path(text).expanduser()
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return 512


def training_resolution(config: ImageConfig) -> int:
    """The size images are trained at: the config's, or the base model's native size when it says 0."""
    return config.resolution or native_resolution(config.base_model)
