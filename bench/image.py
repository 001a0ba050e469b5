"""Stable Diffusion LoRA: the studio's training vs a loop in the style of diffusers' train_text_to_image_lora.py.

    python bench/image.py [--quick] [--device cpu|cuda] [--rounds N] [--steps N] [--photos WxH] [--size sd15]
                          [--seed N]

Same model (the tiny-sd preset; with --size sd15 its UNet and VAE replaced by Stable Diffusion 1.x's, random
weights, trained at 256 px), same data (assets/image: 8 captioned 64 px drawings, trained at 32 px,
centre crop, random flip), same LoRA on the UNet's to_q/to_k/to_v/to_out.0 (rank 16, alpha 16, gaussian
init from the same seed), same AdamW/lr/cosine/clipping, min-SNR gamma 5, batch 4, same steps, same
images in each batch (the studio's per-epoch order).

  studio    pipelines.image.pipeline.train(ImageConfig): VAE latents and caption embeddings computed once.
  baseline  what train_text_to_image_lora.py does every step: open and transform the images (resize,
            crop, flip, normalise), tokenise the captions, encode the images with the VAE
            (latent_dist.sample() * scaling_factor) and the captions with the text encoder, then the
            same noise / UNet / min-SNR MSE / backward / step. On CUDA as that script does with
            --mixed_precision bf16: UNet, VAE and text encoder in bf16, the UNet's forward under bf16
            autocast; the LoRA weights are kept in float32 (the script does that for fp16 only; here
            for bf16 too, as the studio does, so the losses compare).

Figures per run (fresh process each): images/s over the training steps, peak memory (RSS high-water on
CPU, torch.cuda.max_memory_allocated on CUDA, taken right after training), training loss (mean of the
last 25% of steps) and a post-training loss on fixed latents, noise and timesteps (same function for both
ways, always in float32 on the CPU: on CUDA the baseline's LoRA is copied onto a fresh float32 pipeline).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (add_loss_tail, alternate, benchmark_parser, apply_threads, peak_memory_mb, ratios,  # noqa: E402
                          result_line, synchronize, table, warm_up, write_result)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "assets" / "image"
SD15_RESOLUTION = 256  # --size sd15 trains at 256 px (32x32 latents): SD 1.x's 512 px is minutes a step on a CPU


def config_for(args):
    from pipelines.image.config import ImageConfig
    full_size = args.size == "sd15"
    return ImageConfig(name="bench", base_model=str(sd15_size_folder()) if full_size else "tiny-sd",
                       data_path=args.data or str(DATA), caption_source="files",
                       resolution=SD15_RESOLUTION if full_size else 32, center_crop=True, random_flip=True, lora_rank=16, lora_alpha=16.0,
                       lora_dropout=0.0, learning_rate=1e-3, batch_size=args.batch_size, max_steps=args.steps,
                       warmup_steps=0, scheduler="cosine", snr_gamma=5.0, sample_every=0, sample_steps=1,
                       checkpoint_every=100_000, seed=args.seed, device=args.device)


def sd15_size_folder() -> Path:
    from pipelines.hub import workspace  # the run's workspace (STUDIO_HOME), where models may be loaded from
    return workspace() / "sd15-size"


def make_sd15_size_model(folder: Path) -> None:
    """The tiny preset's spec with Stable Diffusion 1.x's UNet and VAE (diffusers' default UNet is SD 1.x's;
    the VAE is SD's 8x one), random weights: what a full-size model costs per step, without a download.
    The UNet cross-attends to the tiny text encoder, which is cheap both ways."""
    from pipelines.image.model import PRESETS, build_pipeline
    tiny = PRESETS["tiny-sd"]
    spec = {**tiny, "unet": dict(sample_size=SD15_RESOLUTION // 8, cross_attention_dim=tiny["text_encoder"]["hidden_size"]),
            "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=32, sample_size=SD15_RESOLUTION, scaling_factor=0.18215)}
    build_pipeline(spec).save_pretrained(folder, safe_serialization=True)


def make_photos(folder: Path, width: int, height: int) -> None:
    """The sample drawings as photo-sized JPEGs (what users upload from a phone or camera), captions alike:
    upscaled, with a deterministic grain so they compress (and decode) like photographs, not flat colour."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True)
    grain = np.random.default_rng(0)
    for drawing in sorted(DATA.glob("*.png")):
        pixels = np.asarray(Image.open(drawing).convert("RGB").resize((width, height), Image.Resampling.BICUBIC),
                            dtype=np.int16) + grain.normal(0, 6, (height, width, 3)).astype(np.int16)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{drawing.stem}.jpg", quality=90)
        (folder / f"{drawing.stem}.txt").write_text(drawing.with_suffix(".txt").read_text())


def snr_weighted_mse(predicted, target, timesteps, scheduler, gamma):
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr
    loss = F.mse_loss(predicted.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    snr = compute_snr(scheduler, timesteps)
    return (loss * torch.clamp(snr, max=gamma) / snr).mean()


def fixed_loss(unet, vae, text_encoder, tokenizer, scheduler, examples, config) -> float:
    """The same evaluation for both ways: each image's latent mean (centre crop, no flip), its caption's
    embedding, 10 timesteps spread over the schedule, noise from a fixed generator."""
    import torch
    from pipelines.image.pipeline import encode_text, to_pixels, tokenize
    from pipelines.image.data import read_image
    torch.set_grad_enabled(False)
    size = config.resolution
    pixels = torch.stack([to_pixels(read_image(e.path)[0], size, True, random.Random(0)) for e in examples])
    clean = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    hidden = encode_text(text_encoder, tokenize(tokenizer, [e.caption for e in examples]))
    generator = torch.Generator().manual_seed(0)
    losses = []
    for t in torch.linspace(50, 950, 10).long():
        timesteps = t.repeat(len(examples))
        noise = torch.randn(clean.shape, generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        predicted = unet(noisy, timesteps, hidden).sample
        losses.append(snr_weighted_mse(predicted, noise, timesteps, scheduler, config.snr_gamma).item())
    return sum(losses) / len(losses)


def order(config, count: int, steps: int) -> list[list[int]]:
    from pipelines.training import iterate_in_batches, shuffled
    out, epoch = [], 0
    while len(out) < steps:
        out += list(iterate_in_batches(shuffled(list(range(count)), config.seed, epoch), config.batch_size))
        epoch += 1
    return out[:steps]


def worker_studio(args, config) -> dict:
    from diffusers import DDPMScheduler
    from pipelines.image.data import load_examples
    from pipelines.image.model import load_pipeline
    from pipelines.image.pipeline import train
    from pipelines.training import Events, read_events

    warm_up(args.device)
    run_dir = Path(tempfile.mkdtemp(prefix="studio-run-"))
    events = Events(run_dir)
    t0 = time.perf_counter()
    status = train(config, run_dir, events, lambda: False, log=lambda m: None)
    synchronize(args.device)
    wall = time.perf_counter() - t0
    events.close()
    peak = peak_memory_mb(args.device)
    assert status == "completed", status
    found, _ = read_events(run_dir)
    steps = [e for e in found if e["type"] == "step"]
    pipe = load_pipeline(config.base_model)  # plain diffusers loading of the run's exported LoRA
    pipe.load_lora_weights(str(run_dir / "adapter"))
    _, examples = load_examples(config, keep_notes=False)
    loss = fixed_loss(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                      DDPMScheduler.from_config(pipe.scheduler.config), examples, config)
    return {"train_s": steps[-1]["elapsed_s"], "run_s": wall, "images": sum(e["units"] for e in steps),
            "peak_mb": peak, "step_losses": [e["loss"] for e in steps], "fixed_loss": loss}


def worker_baseline(args, config) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    from peft import LoraConfig
    import numpy as np
    from PIL import Image
    from pipelines.image.data import load_examples
    from pipelines.image.model import load_pipeline
    from pipelines.training import make_scheduler, seed_everything

    device = torch.device(args.device)
    amp = device.type == "cuda"  # the script's --mixed_precision bf16
    weight_dtype = torch.bfloat16 if amp else torch.float32
    warm_up(args.device)
    t0 = time.perf_counter()
    _, examples = load_examples(config, keep_notes=False)
    pipe = load_pipeline(config.base_model)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    if amp:  # as the script: frozen weights to the device in weight_dtype, then the adapter
        for module in (unet, vae, text_encoder):
            module.to(device, dtype=weight_dtype)
    lora_config = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                             target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    seed_everything(config.seed)  # as the studio does right before add_adapter: the same initial LoRA
    unet.add_adapter(lora_config)
    if amp:
        from diffusers.training_utils import cast_training_params
        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    lr_scheduler = make_scheduler(optimizer, config, args.steps)
    def train_transforms(image):
        """train_text_to_image_lora.py's torchvision train_transforms (Resize bilinear, CenterCrop,
        RandomHorizontalFlip, ToTensor, Normalize 0.5), written with PIL as torchvision is not installed."""
        w, h = image.size
        size = config.resolution
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
        left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
        if torch.rand(1) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (array - 0.5) / 0.5

    def load(i: int):
        image = Image.open(examples[i].path).convert("RGB")
        ids = tokenizer(examples[i].caption, max_length=tokenizer.model_max_length, padding="max_length",
                        truncation=True, return_tensors="pt").input_ids[0]
        return train_transforms(image), ids

    seed_everything(config.seed)
    unet.train()
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=amp)
    synchronize(args.device)
    losses, begin = [], time.perf_counter()
    images = 0
    for batch in order(config, len(examples), args.steps):
        items = [load(i) for i in batch]
        pixel_values = torch.stack([p for p, _ in items]).to(device, dtype=weight_dtype)
        input_ids = torch.stack([ids for _, ids in items]).to(device)
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),),
                                  device=latents.device).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(input_ids, return_dict=False)[0]
        with autocast:
            predicted = unet(noisy, timesteps, hidden, return_dict=False)[0]
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=config.snr_gamma) / snr
        loss = (F.mse_loss(predicted.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        images += len(batch)
    synchronize(args.device)
    train_s = time.perf_counter() - begin
    wall = time.perf_counter() - t0
    peak = peak_memory_mb(args.device)
    if amp:  # evaluate as the studio's run is evaluated: its LoRA on a fresh float32 pipeline on the CPU
        trained = {n: p.detach().float().cpu() for n, p in unet.named_parameters() if p.requires_grad}
        pipe = load_pipeline(config.base_model)
        unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        unet.add_adapter(lora_config)
        fresh = {n: p for n, p in unet.named_parameters() if "lora_" in n}
        assert fresh.keys() == trained.keys(), (len(fresh), len(trained))
        with torch.no_grad():
            for n, p in fresh.items():
                p.copy_(trained[n])
    unet.eval()
    loss = fixed_loss(unet, vae, text_encoder, tokenizer, noise_scheduler, examples, config)
    return {"train_s": train_s, "run_s": wall, "images": images, "peak_mb": peak, "step_losses": losses,
            "fixed_loss": loss}


def worker(args) -> None:
    import torch
    torch.manual_seed(0)
    config = config_for(args)
    result = (worker_studio if args.worker == "studio" else worker_baseline)(args, config)
    add_loss_tail(result)
    result["images_s"] = result["images"] / result["train_s"]
    write_result(args.out, result)


def main() -> None:
    parser = benchmark_parser(__doc__, "optimizer steps per run (default 150, quick 40)", batch_size=4)
    parser.add_argument("--photos", metavar="WxH", help="train both ways on the sample drawings made into WxH "
                                                         "JPEG photos (e.g. 4032x3024, a phone's 12 MP) instead")
    parser.add_argument("--seed", type=int, default=1234, help="both ways' seed (LoRA init, noise, timesteps, "
                                                                "batch order): how far the losses move with it")
    parser.add_argument("--size", choices=["tiny", "sd15"], default="tiny",
                        help=f"sd15: the preset with Stable Diffusion 1.x's UNet and VAE (random weights), at "
                             f"{SD15_RESOLUTION} px")
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.steps = args.steps or (40 if args.quick else 150)
    apply_threads(args.threads)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp:
        os.environ["STUDIO_HOME"] = str(Path(tmp) / "workspace")  # the preset is materialised here once
        from pipelines.image.model import materialise_preset
        materialise_preset("tiny-sd")
        data = []
        if args.photos:
            make_photos(Path(tmp) / "photos", *map(int, args.photos.lower().split("x")))
            data = ["--data", str(Path(tmp) / "photos")]
        if args.size == "sd15":
            make_sd15_size_model(sd15_size_folder())
        model = "SD 1.x's UNet and VAE (random weights)" if args.size == "sd15" else "tiny-sd preset"
        print(f"Image LoRA benchmark on {args.device}: {model}, assets/image (8 images"
              f"{f' as {args.photos} JPEG photos' if args.photos else ''}, trained at {config_for(args).resolution} "
              f"px), batch "
              f"{args.batch_size}, {args.steps} steps, {args.rounds} round(s), {os.cpu_count()} CPU cores visible.",
              flush=True)
        runs = alternate(__file__, args.rounds, ["--steps", str(args.steps), "--batch-size", str(args.batch_size),
                                                 "--device", args.device, "--seed", str(args.seed), "--size", args.size,
                                                 *data])
    print("\nMedians over the rounds:\n")
    print(table(runs, [("images_s", "images/s"), ("train_s", "training wall time (s)"),
                       ("peak_mb", "peak memory (MB)"), ("train_loss_last", "train loss (last 25% of steps)"),
                       ("fixed_loss", "loss after (fixed noise/timesteps)")]))
    speedup, memory, delta = ratios(runs, "images_s", ["fixed_loss"])
    print(f"\nspeedup (images/s) {speedup:.2f}x, target >= 2x; peak memory ratio {memory:.2f}; "
          f"loss delta {delta:+.2f}% (no worse = <= 0 or within noise).")
    print(result_line(speedup, memory, delta))


if __name__ == "__main__":
    main()
