"""Stable Diffusion LoRA on the tiny preset, end to end: it learns, it stops and resumes exactly, and what it
exports loads in plain diffusers with no import of this project."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from pipelines import load_config
from pipelines.hub import ModelUnavailable, workspace
from pipelines.image import pipeline
from pipelines.image.config import native_resolution
from pipelines.image.model import load_pipeline, materialise_preset, unusable_base
from pipelines.training import Events, read_events

PROMPT = "a zqx drawing of a red circle on a white background"


def train(config, run_dir: Path, should_stop=lambda: False, resume=False,
          log=lambda line: None) -> tuple[str, list[dict]]:
    run_dir.mkdir(parents=True, exist_ok=True)
    events = Events(run_dir)
    try:
        status = pipeline.train(config, run_dir, events, should_stop, resume=resume, log=log)
    finally:
        events.close()
    return status, read_events(run_dir)[0]


def losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["type"] == "step"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny preset's operations are too small to share between cores, and on a CPU busy with other work
    (parallel test runs) torch's spinning worker threads slow each step severalfold: one thread is steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sample_config(assets):
    return load_config(assets / "image" / "config.yaml")


@pytest.fixture(scope="module")
def assets():
    return Path(__file__).resolve().parent.parent / "assets"


@pytest.fixture(scope="module")
def trained(sample_config, tmp_path_factory):
    """The sample run, shortened: 60 steps on the 8 shapes."""
    config = sample_config.changed(max_steps=60, sample_every=0, checkpoint_every=30)
    run_dir = tmp_path_factory.mktemp("image-run")
    status, events = train(config, run_dir)
    assert status == "completed"
    return config, run_dir, events


def test_training_lowers_the_loss_and_writes_samples(trained):
    config, run_dir, events = trained
    loss = list(losses(events).values())
    assert len(loss) == 60
    first, last = np.mean(loss[:15]), np.mean(loss[-15:])
    assert last < 0.85 * first, (first, last)
    started = next(e for e in events if e["type"] == "started")
    assert started["unit"] == "images" and started["trainable_parameters"] > 0
    samples = [e for e in events if e["type"] == "sample"]
    # The base model's picture first (step 0), then the tuned one, same prompt and seed.
    second = "a zqx drawing of a blue square on a white background"  # no sample prompts set: the first captions
    assert [(s["step"], s["prompt"], s["image"]) for s in samples] == [
        (0, PROMPT, "samples/step-0-0.png"), (0, second, "samples/step-0-1.png"),
        (60, PROMPT, "samples/step-60-0.png"), (60, second, "samples/step-60-1.png")]
    assert image_size(run_dir / samples[1]["image"]) == (32, 32)
    for folder in (run_dir / "adapter", run_dir / "checkpoints" / "step-30" / "adapter"):
        assert (folder / "pytorch_lora_weights.safetensors").is_file()
    info = json.loads((run_dir / "adapter" / "lora_info.json").read_text())
    assert info["base_location"] == str(materialise_preset("tiny-sd"))


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image
    with Image.open(path) as image:
        return image.size


def draw(pipe, **extra) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=6, guidance_scale=5.0, generator=torch.Generator().manual_seed(7),
                output_type="np", **extra).images[0]


def test_exported_lora_loads_in_plain_diffusers(trained, tmp_path):
    config, run_dir, _ = trained
    folder = pipeline.export(config, run_dir, "lora", tmp_path / "lora")
    assert (folder / "pytorch_lora_weights.safetensors").is_file()

    # Only diffusers from here: the materialised preset is an ordinary pipeline folder.
    pipe = StableDiffusionPipeline.from_pretrained(materialise_preset("tiny-sd"))
    pipe.set_progress_bar_config(disable=True)
    base = draw(pipe)
    pipe.load_lora_weights(str(folder))
    tuned = draw(pipe)
    off = draw(pipe, cross_attention_kwargs={"scale": 0.0})
    assert np.abs(tuned - base).mean() > 0.01  # the LoRA changes the picture for the same seed
    assert np.array_equal(off, base)           # strength 0 is exactly the base model

    # The studio's own try-it panel draws the same pictures.
    ours = pipeline.load_for_generation(config, run_dir)
    same = dict(seed=7, steps=6, guidance=5.0)
    assert np.abs(np.asarray(pipeline.generate(ours, PROMPT, **same)) / 255.0 - tuned).max() < 0.01
    assert np.abs(np.asarray(pipeline.generate(ours, PROMPT, lora_scale=0, **same)) / 255.0 - base).max() < 0.01

    # kohya/A1111 single file: same picture through diffusers' key conversion; merged: LoRA fused in.
    kohya = pipeline.export(config, run_dir, "kohya", tmp_path / "kohya")
    other = StableDiffusionPipeline.from_pretrained(materialise_preset("tiny-sd"))
    other.set_progress_bar_config(disable=True)
    other.load_lora_weights(str(kohya))
    assert np.abs(draw(other) - tuned).max() < 1e-4
    merged = StableDiffusionPipeline.from_pretrained(pipeline.export(config, run_dir, "merged", tmp_path / "merged"))
    merged.set_progress_bar_config(disable=True)
    assert np.abs(draw(merged) - tuned).max() < 1e-3


def test_any_checkpoint_can_be_tried(trained):
    config, run_dir, _ = trained
    early = pipeline.load_for_generation(config, run_dir, checkpoint="step-30")
    final = pipeline.load_for_generation(config, run_dir)
    a = np.asarray(pipeline.generate(early, PROMPT, seed=1, steps=4))
    b = np.asarray(pipeline.generate(final, PROMPT, seed=1, steps=4))
    assert a.shape == b.shape == (32, 32, 3) and not np.array_equal(a, b)
    with pytest.raises(pipeline.TrainingFailure):
        pipeline.adapter_dir(run_dir, "step-999")


def test_try_it_reports_each_step_and_stops_when_asked(trained):
    """Try it says how far an image is, and stops drawing one the user left (Stop, or another run shown)."""
    config, run_dir, _ = trained
    pipe = pipeline.load_for_generation(config, run_dir)
    steps_told = []
    pipeline.generate(pipe, PROMPT, steps=6, on_step=lambda done, steps: steps_told.append((done, steps)))
    assert steps_told == [(n, 6) for n in range(1, 7)]
    steps_told.clear()
    pipeline.generate(pipe, PROMPT, steps=50, on_step=lambda done, steps: steps_told.append(done),
                      should_stop=lambda: len(steps_told) >= 2)
    assert steps_told == [1, 2]
    a = np.asarray(pipeline.generate(pipe, PROMPT, seed=1, steps=4))  # the next image is not disturbed
    assert np.array_equal(a, np.asarray(pipeline.generate(pipe, PROMPT, seed=1, steps=4, on_step=lambda *_: None)))


def test_stop_and_resume_continue_exactly(sample_config, tmp_path):
    config = sample_config.changed(max_steps=7, sample_every=0, checkpoint_every=100)
    _, whole = train(config, tmp_path / "whole")

    # Sampling mid-run must not change the training either: this run also draws samples every 2 steps.
    calls = []
    interrupted = config.changed(sample_every=2, sample_steps=2, sample_prompts=[PROMPT])
    status, _ = train(interrupted, tmp_path / "parts", should_stop=lambda: calls.append(1) or len(calls) >= 3)
    assert status == "stopped"
    assert (tmp_path / "parts" / "checkpoints" / "step-3" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    status, events = train(interrupted, tmp_path / "parts", resume=True)
    assert status == "completed"
    assert next(e for e in events if e["type"] == "resumed")["step"] == 3
    assert losses(events) == pytest.approx(losses(whole), rel=1e-5)
    made = sorted(p.name for p in (tmp_path / "parts" / "samples").iterdir())
    assert made == ["step-0-0.png", "step-2-0.png", "step-4-0.png", "step-6-0.png", "step-7-0.png"]


def test_text_encoder_lora_and_flip_off(sample_config, tmp_path):
    config = sample_config.changed(max_steps=3, sample_every=0, train_text_encoder=True, random_flip=False,
                                   center_crop=False, snr_gamma=0.0, mixed_precision="bf16", gradient_checkpointing=True)
    status, events = train(config, tmp_path / "run")
    assert status == "completed" and len(losses(events)) == 3
    from safetensors import safe_open
    with safe_open(tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors", "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
    # LoRA's up (B) matrices start at zero: non-zero ones in both halves mean both learned.
    for half in ("unet.", "text_encoder."):
        ups = [w for k, w in weights.items() if k.startswith(half) and ".up." in k]
        assert ups and any(w.abs().sum() > 0 for w in ups), half
    # Both halves load back: the tuned text encoder changes the picture as well.
    pipe = pipeline.load_for_generation(config, tmp_path / "run")
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder"}


def test_unreachable_models_fail_in_one_sentence():
    # The test session is offline (conftest): a hub id that is not cached cannot load.
    with pytest.raises(ModelUnavailable, match="cannot reach the Hugging Face hub"):
        load_pipeline("someone/not-cached-sd-model")
    assert native_resolution(str(materialise_preset("tiny-sd"))) == 32  # the table agrees with the folder
    not_a_pipeline = workspace() / "not-a-pipeline"
    not_a_pipeline.mkdir()
    with pytest.raises(ModelUnavailable, match="not a diffusers pipeline"):
        load_pipeline(str(not_a_pipeline))
    # A single-file checkpoint needs its model family's configs, which an offline machine may not have.
    single = workspace() / "downloaded.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, single)
    with pytest.raises(ModelUnavailable, match="cannot reach the Hugging Face hub and they are not in the local cache"):
        load_pipeline(str(single))


def test_a_full_width_unet_trains_in_bf16_where_the_cpu_has_it(sample_config, tmp_path):
    """auto = bf16 frozen weights on a CPU with native bf16 for UNets as wide as real ones (1.4-1.7x faster
    there), float32 for the tiny preset (slower in bf16) and on CPUs without it; the losses stay float32's."""
    from diffusers import UNet2DConditionModel
    from pipelines.training import native_bf16
    wide = workspace() / "wide-sd"  # where models may be loaded from
    pipe = StableDiffusionPipeline.from_pretrained(materialise_preset("tiny-sd"))
    tiny = pipe.unet.config
    pipe.unet = UNet2DConditionModel(sample_size=tiny.sample_size, block_out_channels=(64, 128), layers_per_block=1,
                                     down_block_types=tiny.down_block_types, up_block_types=tiny.up_block_types,
                                     cross_attention_dim=tiny.cross_attention_dim, attention_head_dim=8)
    pipe.save_pretrained(wide)
    runs = {}
    for precision in ("auto", "no"):
        config = sample_config.changed(base_model=str(wide), max_steps=4, sample_every=4, mixed_precision=precision)
        lines = []
        status, events = train(config, tmp_path / precision, log=lines.append)
        assert status == "completed"
        runs[precision] = (losses(events), "\n".join(lines))
    expected = "bfloat16 under autocast" if native_bf16(torch.device("cpu")) else "float32."
    assert f"frozen weights in {expected}" in runs["auto"][1]
    assert "frozen weights in float32." in runs["no"][1]
    assert runs["auto"][0] == pytest.approx(runs["no"][0], rel=0.02)
    assert (tmp_path / "auto" / "samples" / "step-4-0.png").exists()  # sampling works in bf16 too
    adapter = tmp_path / "auto" / "adapter" / "pytorch_lora_weights.safetensors"
    from safetensors import safe_open
    with safe_open(adapter, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    # Trying it draws in the training dtype (faster); the merged export stays float32.
    auto = sample_config.changed(base_model=str(wide), mixed_precision="auto")
    pipe = pipeline.load_for_generation(auto, tmp_path / "auto")
    assert pipe.unet.dtype == (torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32)
    assert pipeline.generate(pipe, "a red circle", steps=2).size == (32, 32)
    merged = pipeline.export(auto, tmp_path / "auto", "merged", tmp_path / "merged")
    with safe_open(merged / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_the_tiny_preset_stays_in_float32_by_default(sample_config):
    lines = []
    pipe = load_pipeline("tiny-sd")
    assert pipeline._weight_dtype(sample_config, torch.device("cpu"), pipe.unet, lines.append) == torch.float32
    assert sample_config.mixed_precision == "auto" and not lines


def test_a_folder_of_fp16_variant_files_trains(sample_config, tmp_path):
    """A folder holding only fp16 variant files (unet/diffusion_pytorch_model.fp16.safetensors, as a download with
    variant="fp16" leaves) passed the check, then its run failed: "no file named model.safetensors … Check that
    the folder is complete". A folder with a component's weights missing is refused by the check."""
    from pipelines.image.data import inspect_data
    folder = workspace() / "sd-fp16-variant"  # where models may be loaded from
    pipe = StableDiffusionPipeline.from_pretrained(materialise_preset("tiny-sd"))
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    config = sample_config.changed(base_model=str(folder), max_steps=2, sample_every=0)
    assert inspect_data(config).ok
    status, events = train(config, tmp_path / "run")
    assert status == "completed", [e for e in events if e["type"] == "failed"]
    assert load_pipeline(str(folder)).unet.dtype == torch.float32  # read from the fp16 files, as asked
    (folder / "text_encoder" / "model.fp16.safetensors").unlink()
    assert inspect_data(config).blocker == (
        f"the base model cannot be used: The pipeline folder {folder} has no weights in text_encoder/ (.safetensors "
        "or .bin, the fp16 variant too): copy the folder again, whole.")


def a1111_checkpoint(pipe, path: Path) -> Path:
    """The pipeline as one .safetensors file in the original Stable Diffusion (CompVis, A1111, Civitai) layout:
    model.diffusion_model.input_blocks..., first_stage_model.encoder.down..., cond_stage_model.transformer...
    diffusers' single-file loader reads it back (its convert_ldm_* functions, inverted here for any depth)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
    from safetensors.torch import save_file
    per_block = pipe.unet.config.layers_per_block + 1  # (the down blocks' layers, and a downsampler or skip)
    attended = {i for i, kind in enumerate(pipe.unet.config.up_block_types) if "CrossAttn" in kind}
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    unet_rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda b, j: f"input_blocks.{b * per_block + j + 1}.0.", True),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda b, j: f"input_blocks.{b * per_block + j + 1}.1.", False),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda b: f"input_blocks.{(b + 1) * per_block}.0.op.", False),
        (r"mid_block\.resnets\.(\d+)\.", lambda j: f"middle_block.{2 * j}.", True),
        (r"mid_block\.attentions\.0\.", lambda: "middle_block.1.", False),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda b, j: f"output_blocks.{b * per_block + j}.0.", True),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda b, j: f"output_blocks.{b * per_block + j}.1.", False),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda b: f"output_blocks.{b * per_block + per_block - 1}.{2 if b in attended else 1}.", False)]
    last = len(pipe.vae.config.block_out_channels) - 1  # (the VAE's decoder blocks are numbered from the bottom)
    vae_rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.", lambda b: f"encoder.down.{b}.block.", False),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda b: f"encoder.down.{b}.downsample.", False),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda b: f"decoder.up.{last - b}.block.", False),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda b: f"decoder.up.{last - b}.upsample.", False),
        (r"(?<=coder\.)mid_block\.resnets\.(\d+)\.", lambda j: f"mid.block_{j + 1}.", False),
        (r"(?<=coder\.)mid_block\.attentions\.0\.", lambda: "mid.attn_1.", False)]

    def renamed(key: str, fixed: dict, rules: list) -> str:
        if key in fixed:
            return fixed[key]
        for pattern, prefix, in_resnet in rules:
            if match := re.search(pattern, key):
                rest = key[match.end():]
                for ours, theirs in resnet if in_resnet else []:
                    rest = rest.replace(ours, theirs)
                return key[:match.start()] + prefix(*map(int, match.groups())) + rest
        raise KeyError(key)

    state = {"model.diffusion_model." + renamed(k, DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], unet_rules): w
             for k, w in pipe.unet.state_dict().items()}
    attention = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
    for key, weight in pipe.vae.state_dict().items():
        key = renamed(key.replace("conv_shortcut", "nin_shortcut"), DIFFUSERS_TO_LDM_MAPPING["vae"], vae_rules)
        if ".mid.attn_1." in key:  # (1x1 convolutions there, linear layers in diffusers)
            for ours, theirs in attention:
                key = key.replace(f".{ours}.", f".{theirs}.")
            weight = weight[:, :, None, None] if weight.ndim == 2 else weight
        state["first_stage_model." + key] = weight
    for key, weight in pipe.text_encoder.state_dict().items():  # (transformers >= 5.6 has no text_model. prefix)
        state["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = weight
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: w.contiguous() for k, w in state.items()}, path)
    return path


def test_a_single_file_checkpoint_whose_configs_cannot_be_had_is_refused_before_a_run(assets, tmp_path, monkeypatch):
    """An A1111/Civitai-style .safetensors as base model: diffusers builds the pipeline with the configuration files
    of the model family its weights show (SD 1.5's here), from the hub. Offline with none cached, the check passed
    and the run failed on loading, after Train. With them cached it trains, and online it is not refused."""
    checkpoint = a1111_checkpoint(StableDiffusionPipeline.from_pretrained(materialise_preset("tiny-sd")),
                                  tmp_path / "models" / "my-sd15.safetensors")
    cache = tmp_path / "hub-cache"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load((assets / "image" / "config.yaml").read_text()),
                                      "base_model": str(checkpoint), "data_path": str(assets / "image"),
                                      "max_steps": 2, "sample_every": 0, "sample_steps": 2}))
    env = {**os.environ, "STUDIO_HOME": str(tmp_path / "ws"), "STUDIO_MODEL_DIRS": str(tmp_path),
           "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def studio_train():
        return subprocess.run([sys.executable, "-m", "studio.cli", "train", str(config)], capture_output=True,
                              text=True, timeout=600, cwd=assets.parent, env=env)

    refused = studio_train()
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert ("the base model cannot be used: The checkpoint my-sd15.safetensors needs the configuration files of its "
            "model family (stable-diffusion-v1-5/stable-diffusion-v1-5) to be read, and they cannot be downloaded: "
            "this machine cannot reach the Hugging Face hub and they are not in the local cache."
            ) in refused.stdout + refused.stderr
    assert not list((tmp_path / "ws" / "runs").glob("*"))  # refused before a run was made

    # Cached as a connected first load leaves them (refs/main and a snapshot of the configs; here tiny-sd's,
    # which describe what this file holds): it loads offline, and trains.
    family = cache / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    shutil.copytree(materialise_preset("tiny-sd"), family / "snapshots" / ("0" * 40),
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    (family / "refs").mkdir()
    (family / "refs" / "main").write_text("0" * 40)
    trained = studio_train()
    assert trained.returncode == 0 and "Completed" in trained.stdout, trained.stdout + trained.stderr

    # Online, the configuration files come with the first load: nothing to refuse (none cached in this process).
    monkeypatch.setenv("STUDIO_MODEL_DIRS", str(tmp_path))
    with socket.create_server(("127.0.0.1", 0)) as hub:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        for flag in ("STUDIO_OFFLINE", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(flag, raising=False)
        assert unusable_base(str(checkpoint)) == ""
    pickled = shutil.copy(checkpoint, tmp_path / "models" / "my-sd15.ckpt")  # (refused by the load alone, before)
    assert unusable_base(str(pickled)).startswith("my-sd15.ckpt is a pickled .ckpt file, which can run code")
