"""The Image (Stable Diffusion) tab: images with captions in, a LoRA that plain diffusers loads out."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path

import gradio as gr

from pipelines.archives import mark_used
from pipelines.image.config import HUB_MODELS, ImageConfig, oversize
from pipelines.image.data import CAPTION_SUFFIXES, CONVERT_FIRST, IMAGE_SUFFIXES, METADATA_SUFFIXES, read_image
from studio import hardware, jobs
from studio.tabs import widgets

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "image"
# (files to convert first are taken too: the check says so, where the browser would only say "Invalid file type")
UPLOAD_TYPES = (sorted(IMAGE_SUFFIXES) + sorted(CONVERT_FIRST) + list(CAPTION_SUFFIXES) + list(METADATA_SUFFIXES)
                + [".zip"])

DATA = ["caption_source", "instance_prompt", "resolution", "center_crop", "random_flip"]
TRAINING = ["lora_rank", "lora_alpha", "learning_rate", "epochs", "max_steps", "batch_size", "gradient_accumulation",
            "warmup_steps", "sample_every", "seed", "train_text_encoder"]
ADVANCED = ["sample_prompts", "snr_gamma", "mixed_precision", "gradient_checkpointing", "sample_seed", "sample_steps",
            "sample_guidance", "scheduler", "weight_decay", "max_grad_norm", "lora_dropout", "checkpoint_every",
            "keep_checkpoints", "device"]
FORM = DATA + TRAINING + ADVANCED + widgets.SCALE_OUT
FORM_SPEC = widgets.TabForm(ImageConfig, FORM, ["data_files", "data_files"], UPLOAD_TYPES,
                            defaults=lambda: default_config())


def default_config() -> ImageConfig:
    from pipelines import load_config
    return load_config(ASSETS / "config.yaml")


def sample_files() -> list[str]:
    return [str(p) for p in sorted(ASSETS.iterdir()) if p.suffix in (".png", ".txt")]


def model_choices() -> list[tuple[str, str]]:
    choices = [("tiny-sd — built-in, offline, 32 px", "tiny-sd")]
    return choices + [(f"{m['label']} — {m['id']}, {m['download_gb']} GB download, {m['resolution']} px", m["id"])
                      for m in HUB_MODELS]


def check_data(*args):
    """Data check: every unreadable, truncated or odd image and every missing caption, with a gallery."""
    values = FORM_SPEC.values(*args)
    if not values["data_files"]:
        return "Upload images (with .txt captions, a metadata.csv, or a zip of them) to begin.", \
            gr.update(visible=False), gr.update(value=None, visible=False), gr.update(interactive=False)
    config = ImageConfig.from_dict(values, check=False)
    report = jobs.check_data(config)
    summary = widgets.headline(report, "images")
    summary += widgets.noted("Used as follows:", report.stats.get("notes", []))
    problems = widgets.problems_table(report)
    gallery = widgets.shown_if_any([(drawable(p["image"]), p.get("caption", "")) for p in report.preview],
                                   as_value=list)
    return summary, problems, gallery, gr.update(interactive=report.ok)


BROWSERS_DRAW = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".avif"}


def previews_folder() -> Path:
    """Where drawable's thumbnails are kept; the server removes those unused for a day (app.clean_unused)."""
    return Path(tempfile.gettempdir()) / "studio-previews"


def drawable(path: str) -> str:
    """The image as the browser can draw it: a phone's HEIC or a TIFF, which it cannot (the preview showed only
    captions), as a JPEG thumbnail made once in the temporary folder."""
    source = Path(path)
    if source.suffix.lower() in BROWSERS_DRAW or not source.is_file():
        return path
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    thumbnail = previews_folder() / f"{key}.jpg"
    if thumbnail.exists():
        mark_used(thumbnail)
    else:
        image = read_image(source)[0]
        if image is None:
            return path
        image.thumbnail((512, 512))
        thumbnail.parent.mkdir(exist_ok=True)
        made = thumbnail.with_name(f".{key}-{os.getpid()}.jpg")
        image.save(made, quality=90)
        os.replace(made, thumbnail)
    return str(thumbnail)


def try_prompt(run_id, checkpoint, prompt, negative, seed, steps, guidance, size, strength):
    """Base and tuned images for the same prompt and seed, each shown when it is drawn, and a line saying how far
    the drawing is: (base, tuned, progress line)."""
    from contextlib import closing
    from studio import tryit
    run = widgets.shown_run(run_id, "Train a run first, then try it here.")
    checkpoint = None if checkpoint in (None, "", "final") else checkpoint
    if not (prompt or "").strip():  # the run's own sample prompt: one of its captions, not the demo's
        from studio.progress import read_progress
        prompt = next((s["prompt"] for s in read_progress(run.dir).samples if s.get("prompt")), "")
        if not prompt:
            raise widgets.refused("Type a prompt first.")
    config = run.config()
    if too_large := oversize(int(size or 0), config.base_model, "each image"):
        raise widgets.refused(f"Size: {too_large}.")
    if seed is None or seed < 0:  # empty or -1: a new seed each time, named under the images to draw them again
        seed = random.randrange(2**31)
    options = dict(negative_prompt=negative or "", seed=int(seed), steps=int(steps), guidance=float(guidance),
                   width=int(size) or None, height=int(size) or None)
    labels = {"base": f"Base model (seed {int(seed)})", "tuned": f"Tuned model (seed {int(seed)})"}
    images = {"base": gr.update(value=None, label=labels["base"]), "tuned": gr.update(value=None, label=labels["tuned"])}
    yield images["base"], images["tuned"], ""  # the last prompt's images go at once
    try:
        for side, lora_scale in (("base", 0.0), ("tuned", float(strength))):
            with closing(tryit.stream_image(config, run.dir, prompt, checkpoint=checkpoint, lora_scale=lora_scale,
                                            **options)) as updates:
                for update in updates:
                    if update is None:  # (where Gradio can stop it: see tryit._in_the_background)
                        yield gr.skip(), gr.skip(), gr.skip()
                    elif update.final:
                        images[side] = gr.update(value=update.value, label=labels[side])
                        yield images["base"], images["tuned"], ""
                    else:
                        yield gr.skip(), gr.skip(), f"Drawing the {side} image: step {update.value[0]}/{update.value[1]}"
    except Exception as err:
        raise gr.Error(f"Generation failed: {getattr(err, 'cause', None) or err}") from None


def build() -> dict:
    defaults = default_config()
    run_state = widgets.run_holder("image")
    gr.Markdown(hardware.hardware_line(), elem_classes=["hardware"])
    with gr.Row():
        base_model = gr.Dropdown(model_choices(), value=defaults.base_model, allow_custom_value=True, scale=3,
                                 label="Base model", info="A built-in preset, a diffusers hub id, a local diffusers "
                                                          "folder or a single .safetensors checkpoint.")
        name = gr.Textbox(label="Run name", placeholder="optional", scale=1)

    with gr.Group():
        gr.Markdown("### Images and captions")
        with gr.Row():
            files = gr.File(value=sample_files(), file_count="multiple", file_types=UPLOAD_TYPES, height=160,
                            label="Images, captions (.txt / metadata.csv) or a zip", elem_id="image-files")
            folder = gr.File(file_count="directory", label="…or a whole folder", height=160,
                             elem_id="image-folder")
        data_summary = gr.Markdown(elem_id="image-data-summary")
        problems = widgets.problems_box("image")
        preview = gr.Gallery(label="Preview (with captions)", columns=8, height=220, visible=False,
                             object_fit="contain", elem_id="image-preview")  # whole images, not their top halves

    inputs = widgets.config_inputs(ImageConfig, FORM, defaults)
    with gr.Group():
        gr.Markdown("### LoRA and training")
        for row in (DATA, TRAINING[:6], TRAINING[6:]):
            with gr.Row():
                for key in row:
                    inputs[key].render()
        with gr.Accordion("Advanced", open=False):
            for row in (ADVANCED[:7], ADVANCED[7:]):
                with gr.Row():
                    for key in row:
                        inputs[key].render()
            widgets.scale_out_settings(inputs, "image")
    section = widgets.run_section("image")

    with gr.Group():
        gr.Markdown("### Try it: base and tuned, same seed")
        with gr.Row():
            checkpoint = gr.Dropdown(["final"], value="final", label="Checkpoint")
            strength = gr.Slider(0, 2, value=1, step=0.05, label="LoRA strength", info="0 = the base model")
            seed = gr.Number(1234, label="Seed", precision=0, info="empty or -1 = a new one each time")
            steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
            guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance")
            size = gr.Slider(0, 1024, value=0, step=8, label="Size", info="0 = the model's native size")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder="empty: the run's sample prompt (its first caption)",
                                scale=3, elem_id="image-prompt")
            negative = gr.Textbox(label="Negative prompt", scale=2)
        with gr.Row():
            generate = gr.Button("Generate", elem_id="image-generate", scale=3)
            stop_generating = gr.Button("Stop", elem_id="image-stop-generating", scale=1)
        drawing = gr.Markdown(elem_id="image-drawing")
        with gr.Row():
            base_image = gr.Image(label="Base model", type="pil", elem_id="image-base", height=256)
            tuned_image = gr.Image(label="Tuned model", type="pil", elem_id="image-tuned", height=256)

    with gr.Group():
        gr.Markdown("### Export")
        with gr.Row():
            export_lora = gr.Button("LoRA for diffusers (zip)")
            export_kohya = gr.Button("LoRA for A1111 / ComfyUI (kohya)")
            export_merged = gr.Button("Fused pipeline (zip)")
        download = gr.File(label="Download", visible=False, elem_id="image-download")

    form = [inputs[k] for k in FORM]
    everything = [files, folder, base_model, name, *form]
    check_outputs = [data_summary, problems, preview, section.train]
    replace_the_sample = widgets.upload_replaces_the_sample(sample_files)
    files.upload(replace_the_sample, files, files, api_visibility="private")
    folder.upload(replace_the_sample, [files, folder], files, api_visibility="private")
    # The instance prompt is checked as it is typed, not on blur: Train stays disabled while it is empty, and a
    # click on Train straight after typing landed on the still-disabled button.
    check_triggers = [files.change, folder.change, base_model.change, inputs["caption_source"].change,
                      inputs["instance_prompt"].change, inputs["resolution"].change]
    trying = generate.click(try_prompt, [run_state, checkpoint, prompt, negative, seed, steps, guidance, size,
                                         strength], [base_image, tuned_image, drawing], api_visibility="private")
    stop_generating.click(None, None, drawing, cancels=[trying], js="() => 'Stopped.'", api_visibility="private")
    load_outputs = [files, folder, base_model, name, *form, section.message]
    widgets.wire_run_section(section, FORM_SPEC, run_state, everything, load_outputs, checkpoint,
                             {"lora": export_lora, "kohya": export_kohya, "merged": export_merged}, download,
                             [base_image, tuned_image, drawing], trying)
    return {"run_state": run_state, "load_outputs": load_outputs, "form": FORM_SPEC,
            "check": (check_data, everything, check_outputs, check_triggers)}
