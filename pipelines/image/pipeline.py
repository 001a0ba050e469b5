"""Stable Diffusion LoRA: train, generate, export. Reads like a recipe: load, freeze, attach LoRA, encode the
data once, hand the loop a task.

The VAE and (unless it trains) the text encoder are frozen, so each image's latent distribution and each
caption's embedding are computed once and reused every step: most of a step's cost is then the UNet.
Every adapter the run writes (checkpoints and final) is a diffusers-format `pytorch_lora_weights.safetensors`
that plain `StableDiffusionPipeline.load_lora_weights()` reads.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines import distributed
from pipelines.image.config import ImageConfig
from pipelines.image.data import ImageExample, load_examples, read_image
from pipelines.image.model import PRESETS, base_location, load_pipeline
from pipelines.training import (Events, TrainingFailure, TrainingTask, iterate_in_batches, latest_checkpoint,
                                native_bf16, pick_device, read_events, run_training, seed_everything, shuffled)
from pipelines.training import adapter_dir as shared_adapter_dir
from pipelines.training import require_data

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_FILE = "pytorch_lora_weights.safetensors"
INFO_FILE = "lora_info.json"
ADAPTER_NAME = "tuned"


class LoraModules(torch.nn.Module):
    """What trains, in one module for the loop: the UNet, and the text encoder when it gets LoRA too."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module | None):
        super().__init__()
        self.unet = unet
        if text_encoder is not None:
            self.text_encoder = text_encoder


# ---- preparing the data ----------------------------------------------------------------------

def to_pixels(image: Image.Image, resolution: int, center_crop: bool, rng: random.Random) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square, scale to [-1, 1], CHW."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left = (size[0] - resolution) // 2 if center_crop else rng.randint(0, size[0] - resolution)
    top = (size[1] - resolution) // 2 if center_crop else rng.randint(0, size[1] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def encode_images(examples: list[ImageExample], vae, config: ImageConfig, resolution: int,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Each image's latent mean and standard deviation (already scaled), and their mirror images' when
    random_flip is on. A fresh latent is still sampled from them every step, as if encoded anew."""
    factor = vae.config.scaling_factor
    means, stds, flipped_means, flipped_stds = [], [], [], []
    for group in iterate_in_batches(examples, 8):
        pixels = []
        for e in group:
            image, reason, _ = read_image(e.path)
            if image is None:  # changed on disk since the data check
                raise TrainingFailure(f"{e.source} {reason}.", "Fix or remove the file and start again.")
            # A crop position drawn once per image from the seed: cached latents stay valid.
            pixels.append(to_pixels(image, resolution, config.center_crop, random.Random(f"{config.seed}:{e.source}")))
        batch = torch.stack(pixels).to(device, vae.dtype)
        for source, mean_list, std_list in [(batch, means, stds)] + (
                [(torch.flip(batch, dims=[3]), flipped_means, flipped_stds)] if config.random_flip else []):
            latent = vae.encode(source).latent_dist
            mean_list.append((latent.mean * factor).float().cpu())
            std_list.append((latent.std * factor).float().cpu())
    cache = {"mean": torch.cat(means), "std": torch.cat(stds)}
    if config.random_flip:
        cache.update(flipped_mean=torch.cat(flipped_means), flipped_std=torch.cat(flipped_stds))
    return cache


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_text(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    # What StableDiffusionPipeline.encode_prompt does (without clip-skip): the last hidden state.
    mask = torch.ones_like(ids) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(ids.to(text_encoder.device), attention_mask=mask)[0]


# ---- training --------------------------------------------------------------------------------

# The narrowest UNet whose convolutions gain from bf16 on a CPU that has it natively. Measured on an AMD
# Zen 4 (fwd+bwd with LoRA, 1 thread): 64 channels 1.4x faster, SD 1.5's 320 1.5-1.7x, the tiny preset's
# 32 (16x16 latents) 0.7x: its tiny products spend more on the conversions than they save.
CPU_BF16_MIN_CHANNELS = 64


def _weight_dtype(config: ImageConfig, device: torch.device, unet, log: Callable[[str], None]) -> torch.dtype:
    """The frozen weights' dtype (also the autocast dtype when it is not float32)."""
    choice = config.mixed_precision
    if choice == "no":
        return torch.float32
    if device.type != "cuda":
        if not native_bf16(device):
            if choice != "auto":
                log(f"Mixed precision ({choice}) needs an NVIDIA GPU or a CPU with native bf16: training in "
                    "float32 on this CPU.")
            return torch.float32
        if choice == "auto" and unet.config.block_out_channels[0] < CPU_BF16_MIN_CHANNELS:
            return torch.float32
        if choice == "fp16":
            log("fp16 is for GPUs: training in bf16 on this CPU, which has it natively.")
        return torch.bfloat16
    if choice in ("auto", "bf16") and native_bf16(device):
        return torch.bfloat16
    if choice == "bf16":
        log("This GPU has no bf16: using fp16 instead.")
    return torch.float16


def _lora_config(config: ImageConfig, targets: list[str]):
    from peft import LoraConfig
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      init_lora_weights="gaussian", target_modules=targets)


def default_prompts(config: ImageConfig, examples: list[ImageExample]) -> list[str]:
    if config.sample_prompts:
        return config.sample_prompts
    if config.instance_prompt.strip():
        return [config.instance_prompt.strip()]
    return list(dict.fromkeys(e.caption for e in examples))[:2]


def attach_lora(pipe, config: ImageConfig, device: torch.device, weight_dtype: torch.dtype):
    """Freeze the pipeline, put LoRA on the UNet's attention (and the text encoder's, if asked) and move it
    to the device. Returns (what trains, as one module; the text encoder's PeftModel or None)."""
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    vae.to(device)  # float32 always: it only encodes once, and fp16 VAEs are known to overflow
    seed_everything(config.seed)  # LoRA's initial weights depend on it
    unet.add_adapter(_lora_config(config, UNET_TARGETS))
    text_lora = None
    if config.train_text_encoder:
        # peft directly: transformers' own add_adapter wants a newer peft than diffusers needs. It puts the
        # LoRA layers into the text encoder in place, so the pipeline's sampling uses them too.
        from peft import get_peft_model
        text_lora = get_peft_model(text_encoder, _lora_config(config, TEXT_TARGETS))
    for module in (unet, text_encoder):
        module.to(device)
        if weight_dtype != torch.float32:
            module.to(weight_dtype)
    model = LoraModules(unet, text_encoder if config.train_text_encoder else None)
    for p in model.parameters():
        if p.requires_grad:  # the adapter trains in float32 even when the frozen weights are half precision
            p.data = p.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            # Non-reentrant: the frozen embeddings' outputs need no grad, and the LoRA inside still gets one.
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, text_lora


def embed_captions(captions: list[str], tokenizer, text_encoder) -> torch.Tensor:
    """Each caption's text-encoder output, computing every distinct caption once."""
    distinct = list(dict.fromkeys(captions))
    with torch.no_grad():
        table = torch.cat([encode_text(text_encoder, tokenize(tokenizer, group))
                           for group in iterate_in_batches(distinct, 32)])
    return table[[distinct.index(c) for c in captions]]


def train(config: ImageConfig, run_dir: str | Path, events: Events, should_stop: Callable[[], bool],
          resume: bool = False, log: Callable[[str], None] = print) -> str:
    threads = torch.get_num_threads()
    if config.base_model.strip() in PRESETS and pick_device(config.device).type == "cpu":
        # The preset's operations are far too small to split between cores: one thread is as fast on an idle
        # CPU, and on a busy one (another run, a test suite) several spinning threads make each step many
        # times slower (measured: 150 steps in 24 s with one thread, 140-600 s with two on a shared 2-core box).
        torch.set_num_threads(1)
    try:
        return _train(config, run_dir, events, should_stop, resume, log)
    finally:
        torch.set_num_threads(threads)


def _train(config: ImageConfig, run_dir: str | Path, events: Events, should_stop: Callable[[], bool],
           resume: bool, log: Callable[[str], None]) -> str:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    run_dir = Path(run_dir)
    device = pick_device(config.device)
    report, examples = load_examples(config, keep_notes=False)
    require_data(report, examples, "image", log)
    log(f"Loading {config.base_model} on {device.type}.")
    pipe = load_pipeline(config.base_model)
    weight_dtype = _weight_dtype(config, device, pipe.unet, log)
    log(f"Training with the frozen weights in {str(weight_dtype).removeprefix('torch.')}"
        + (" under autocast." if weight_dtype != torch.float32 else "."))
    # 0 = the size this model was trained at, read from the model itself (the data check had to guess).
    resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    # The folder's scheduler samples; DDPM with the same noise schedule defines the training noise.
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    model, text_lora = attach_lora(pipe, config, device, weight_dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"LoRA adds {trainable:,} trainable parameters to {sum(p.numel() for p in unet.parameters()):,} in the UNet.")

    latents = encode_images(examples, vae, config, resolution, device)
    captions = [e.caption for e in examples]
    ids = tokenize(tokenizer, captions)
    embeddings = None if config.train_text_encoder else embed_captions(captions, tokenizer, text_encoder)
    log(f"Encoded {len(examples)} images{' and their mirror images' if config.random_flip else ''} at {resolution} px "
        f"once with the frozen VAE" + ("" if config.train_text_encoder else " and their captions once with the frozen "
                                       "text encoder") + "; every step reuses them.")

    autocast = (torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32
                else contextlib.nullcontext())
    prediction = noise_scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise TrainingFailure(f"The model's scheduler predicts '{prediction}', which this trainer does not support.",
                              "Use a Stable Diffusion 1.x or 2.x base model.")

    def batches_for_epoch(epoch: int) -> list[list[int]]:
        return list(iterate_in_batches(shuffled(list(range(len(examples))), config.seed, epoch), config.batch_size))

    # The cached latents and caption embeddings live on the training device, and each step's noise is drawn
    # there: a step copies nothing to a GPU (each copy from ordinary memory would wait for the GPU's queue).
    latents = {k: v.to(device) for k, v in latents.items()}
    ids = ids.to(device)
    if embeddings is not None:
        embeddings = embeddings.to(device, weight_dtype)
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)  # read by add_noise and the SNR

    def loss_on(batch: list[int]) -> tuple[torch.Tensor, int]:
        # The randomness comes from torch's generators, which the loop seeds for each batch.
        index = torch.tensor(batch, device=device)
        mean, std = latents["mean"][index], latents["std"][index]
        if config.random_flip:
            flip = (torch.rand(len(batch), device=device) < 0.5).view(-1, 1, 1, 1)
            mean = torch.where(flip, latents["flipped_mean"][index], mean)
            std = torch.where(flip, latents["flipped_std"][index], std)
        clean = mean + std * torch.randn(mean.shape, device=device)
        noise = torch.randn(clean.shape, device=device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), device=device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(clean, noise, timesteps)
        with autocast:
            hidden = embeddings[index] if embeddings is not None else encode_text(text_encoder, ids[index])
            predicted = unet(noisy.to(weight_dtype), timesteps, hidden.to(weight_dtype)).sample
        loss = F.mse_loss(predicted.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if config.snr_gamma > 0:
            # Min-SNR (Hang et al. 2023): easy, low-noise steps stop dominating the gradient.
            snr = compute_snr(noise_scheduler, timesteps)
            weight = torch.clamp(snr, max=config.snr_gamma) / (snr + 1 if prediction == "v_prediction" else snr)
            loss = loss * weight
        return loss.mean(), len(batch)

    prompts = default_prompts(config, examples)
    samples_dir = run_dir / "samples"
    reached = StepReader(events)

    def make_samples(step: int | None = None) -> list[dict]:
        step = reached() if step is None else step
        samples_dir.mkdir(parents=True, exist_ok=True)
        made = []
        with autocast:
            for i, prompt in enumerate(prompts):
                image = generate(pipe, prompt, seed=config.sample_seed, steps=config.sample_steps,
                                 guidance=config.sample_guidance, width=resolution, height=resolution)
                name = f"step-{step}-{i}.png"
                if distributed.place().main:  # with fsdp or zero3 every rank draws it; one writes it
                    image.save(samples_dir / name)
                made.append({"prompt": prompt, "image": f"samples/{name}", "seed": config.sample_seed})
        return made

    def save_adapter(folder: Path) -> None:
        save_lora(folder, unet, text_lora, config, resolution)

    task = TrainingTask(model=model, batches_for_epoch=batches_for_epoch, loss_on=loss_on, save_adapter=save_adapter,
                        unit="images", make_samples=make_samples if prompts else None,
                        fp16=weight_dtype == torch.float16)
    events.emit("data", rows=len(examples), format=report.format, resolution=resolution)
    if prompts and distributed.place().main and (not resume or latest_checkpoint(run_dir) is None):
        # Step 0: the base model's pictures (the new LoRA adds exactly zero), to compare the samples against.
        unet.eval()
        with torch.no_grad():
            for sample in make_samples(step=0):
                events.emit("sample", step=0, **sample)
    return run_training(task, config, run_dir, events, should_stop, resume=resume, log=log)


class StepReader:
    """The step the loop has reached, from its own step events (make_samples is called without one).
    Reads only what was appended since the last call."""

    def __init__(self, events: Events):
        self.run_dir, self.offset, self.step = events.path.parent, 0, 0

    def __call__(self) -> int:
        found, self.offset = read_events(self.run_dir, self.offset)
        for event in found:
            if event.get("type") in ("step", "resumed"):
                self.step = event["step"]
        return self.step


def save_lora(folder: Path, unet, text_encoder, config: ImageConfig, resolution: int) -> None:
    """The diffusers-format LoRA file (with its rank and alpha in the file's metadata) and a small JSON
    saying which base and settings it belongs to."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
              "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    if text_encoder is not None:  # a PeftModel: its keys carry the wrapper's prefix, diffusers' do not
        state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(text_encoder).items()}
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(state)
        layers["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(folder, safe_serialization=True, **layers)
    info = {"base_model": config.base_model, "base_location": base_location(config.base_model)[1],
            "resolution": resolution, "lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
            "train_text_encoder": config.train_text_encoder, "instance_prompt": config.instance_prompt,
            "load_with": "StableDiffusionPipeline.from_pretrained(base).load_lora_weights(this folder)"}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2))


# ---- using a trained run ---------------------------------------------------------------------

def adapter_dir(run_dir: str | Path, checkpoint: str | None = None) -> Path:
    """The run's LoRA folder (final, a named checkpoint's, or the latest checkpoint's while training)."""
    return shared_adapter_dir(run_dir, checkpoint, marker=LORA_FILE)


def load_for_generation(config: ImageConfig, run_dir: str | Path | None = None, checkpoint: str | None = None):
    """A StableDiffusionPipeline of the base model, carrying the run's LoRA (adapter "tuned") when a run is
    given. generate(..., lora_scale=0) then draws with the base model, the same seed giving the same noise."""
    device = pick_device(config.device)
    dtype = torch.float32
    if device.type == "cuda":
        dtype = torch.bfloat16 if native_bf16(device) else torch.float16
    pipe = load_pipeline(config.base_model, dtype)
    if device.type == "cpu":
        # In the dtype the run trains in here: bf16 for a full-size UNet on a CPU with native bf16 (a 256 px
        # picture from SD 1.x's UNet and VAE in 0.55 of float32's time on an AMD Zen 4), float32 otherwise.
        dtype = _weight_dtype(config, device, pipe.unet, log=lambda message: None)
    pipe.to(device, dtype)
    # generate() draws at the size the run trained at unless told otherwise (the base model's native size
    # may be another: a LoRA trained at 512 px on a 768 px model).
    pipe.studio_size = config.resolution or None  # None: the pipeline's own native size
    if run_dir is not None:
        folder = adapter_dir(run_dir, checkpoint)
        with quiet_diffusers():  # it warns that a UNet-only LoRA has no text-encoder keys: expected
            pipe.load_lora_weights(str(folder), adapter_name=ADAPTER_NAME)
        if (folder / INFO_FILE).exists():
            pipe.studio_size = json.loads((folder / INFO_FILE).read_text()).get("resolution", pipe.studio_size)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def quiet_diffusers():
    from diffusers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


@torch.no_grad()
def generate(pipe, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int = 25, guidance: float = 7.5,
             width: int | None = None, height: int | None = None, lora_scale: float = 1.0,
             on_step: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> Image.Image:
    """One image. The seed fixes the starting noise (drawn on the CPU, so it is the same on every device);
    lora_scale 0 gives exactly the base model's image, 1 the tuned one. Width and height default to the
    run's training size (see load_for_generation), else the model's native size. Leaves torch's global
    random state as it found it, so sampling during training does not change the training run.
    `on_step(done, steps)` is told after each denoising step, and `should_stop` asked: Try it shows how far an
    image is, and stops drawing one the user left (the image then comes back unfinished)."""
    default = getattr(pipe, "studio_size", None)
    width, height = width or default, height or default
    state = torch.random.get_rng_state()
    tuned = ADAPTER_NAME in (pipe.get_list_adapters().get("unet", []) if hasattr(pipe, "get_list_adapters") else [])
    try:
        if tuned:
            if lora_scale == 0:
                pipe.disable_lora()
            else:
                pipe.enable_lora()
                pipe.set_adapters([ADAPTER_NAME], adapter_weights=[float(lora_scale)])
        pipe.set_progress_bar_config(disable=True)
        result = pipe(prompt=prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                      guidance_scale=guidance, width=width, height=height,
                      generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
                      callback_on_step_end=_step_end(on_step, should_stop, steps))
    finally:
        if tuned:
            pipe.enable_lora()
        torch.random.set_rng_state(state)
    return result.images[0]


def _step_end(on_step, should_stop, steps: int):
    """A diffusers callback_on_step_end that reports the step and stops the denoising loop when asked (the
    pipeline then skips the steps left)."""
    if on_step is None and should_stop is None:
        return None

    def step_end(pipe, step: int, timestep, tensors: dict) -> dict:
        if on_step:
            on_step(step + 1, steps)
        if should_stop and should_stop():
            pipe._interrupt = True  # (read by the loop as `pipe.interrupt`; there is no setter)
        return tensors
    return step_end


EXPORT_KINDS = {
    "lora": "pytorch_lora_weights.safetensors in diffusers format: pipe.load_lora_weights(folder).",
    "kohya": "One .safetensors file in kohya/A1111 format for AUTOMATIC1111, ComfyUI, Forge, InvokeAI.",
    "merged": "A full diffusers pipeline folder with the LoRA fused into the UNet (and text encoder).",
}  # also accepted: "adapter" (every modality's name for the bare adapter) = "lora", "fused" = "merged"


def export(config: ImageConfig, run_dir: str | Path, kind: str, destination: str | Path,
           checkpoint: str | None = None) -> Path:
    """Write the run's LoRA (or a checkpoint's) in one of EXPORT_KINDS into the folder `destination`.
    Returns the folder ("lora", "merged") or the file ("kohya")."""
    destination = Path(destination)
    source = adapter_dir(run_dir, checkpoint)
    if kind in ("lora", "adapter"):
        destination.mkdir(parents=True, exist_ok=True)
        for name in (LORA_FILE, INFO_FILE):
            if (source / name).exists():
                shutil.copy2(source / name, destination / name)
        return destination
    if kind == "kohya":
        return _export_kohya(config, source, destination)
    if kind not in ("merged", "fused"):
        raise ValueError(f"unknown export kind {kind!r}: use one of {', '.join(EXPORT_KINDS)}")
    pipe = load_for_generation(config.changed(device="cpu", mixed_precision="no"), run_dir, checkpoint)  # float32
    pipe.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER_NAME])
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    pipe.save_pretrained(destination, safe_serialization=True)
    return destination


def _export_kohya(config: ImageConfig, source: Path, destination: Path) -> Path:
    """kohya's key names (lora_unet_..., lora_te1_...) with each layer's alpha, which diffusers' converter
    sets to the rank; the run's alpha goes in instead, so strength 1 means the same as here."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    state = load_file(source / LORA_FILE)
    info = json.loads((source / INFO_FILE).read_text()) if (source / INFO_FILE).exists() else {}
    alpha = float(info.get("lora_alpha", config.lora_alpha))
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(state))
    kohya = {k: (torch.tensor(alpha) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
    destination.mkdir(parents=True, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in (config.name or "lora").strip()) or "lora"
    path = destination / f"{name}.safetensors"
    save_file(kohya, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(config.lora_rank),
                                     "ss_network_alpha": str(alpha), "ss_base_model": config.base_model})
    return path
