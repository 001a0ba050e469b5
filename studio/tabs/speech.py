"""The Speech (Whisper) tab: clips with transcripts in, WER going down, a checkpoint plain openai-whisper loads out."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from pipelines.speech.audio import AUDIO_SUFFIXES
from pipelines.speech.config import BASE_MODELS, SpeechConfig
from pipelines.speech.data import TABLE_SUFFIXES
from studio import hardware, jobs
from studio.tabs import widgets

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "speech"
UPLOAD_TYPES = sorted(AUDIO_SUFFIXES) + sorted(TABLE_SUFFIXES) + [".txt", ".zip"]

DATA = ["language", "task", "long_clips", "validation_fraction"]
TRAINING = ["target", "decoder_only", "lora_rank", "lora_alpha", "lora_dropout", "learning_rate", "epochs",
            "max_steps", "batch_size", "gradient_accumulation", "warmup_steps", "eval_every", "sample_every", "seed"]
ADVANCED = ["max_label_tokens", "mixed_precision", "sample_count", "scheduler", "weight_decay", "max_grad_norm",
            "checkpoint_every", "keep_checkpoints", "device"]
FORM = DATA + TRAINING + ADVANCED + widgets.SCALE_OUT
FORM_SPEC = widgets.TabForm(SpeechConfig, FORM, ["data_files", "data_files", "validation_path"],
                            defaults=lambda: default_config())


def default_config() -> SpeechConfig:
    from pipelines import load_config
    return load_config(ASSETS / "config.yaml")


def sample_files() -> list[str]:
    return [str(p) for p in sorted((ASSETS / "clips").iterdir()) if p.suffix in (".wav", ".csv")]


def check_data(*args):
    """Data check: unreadable, silent, empty or too long clips and missing transcripts, with a player."""
    values = FORM_SPEC.values(*args)
    if not values["data_files"]:
        return ("Upload audio clips with a metadata.csv or same-name .txt transcripts (or a zip) to begin.",
                gr.update(visible=False), gr.update(value=None, visible=False), gr.update(choices=[], value=None), None,
                gr.update(interactive=False))
    report = jobs.check_data(SpeechConfig.from_dict(values, check=False))
    summary = widgets.headline(report, "clips")
    stats = report.stats
    if stats.get("total_seconds"):
        rates = sorted(stats.get("sample_rates", {}).items(), key=lambda rate_and_count: int(rate_and_count[0]))
        rates = ", ".join(f"{rate} Hz ({n})" for rate, n in rates)
        validation = (f", plus {stats['validation_seconds']:.1f} s to validate on" if "validation_seconds" in stats
                      else "")
        summary += f"\n\nTotal audio: {stats['total_seconds']:.1f} s{validation}. Sample rates: {rates}."
    summary += widgets.noted("Converted for Whisper:", stats.get("converted", []))
    problems = widgets.problems_table(report)
    # A clip split into pieces is one recording: named with its piece in the table, listed once in the player.
    table = widgets.shown_if_any([{"clip": p["name"] + (f", {p['part'].split(', ', 1)[1]}" if "part" in p else ""),
                                   "seconds": p.get("seconds"), "transcript": p.get("text")} for p in report.preview])
    names = {p["audio"]: p["name"] for p in report.preview}
    clips = list(names)
    choices = [(name, clip) for clip, name in names.items()]
    return (summary, problems, table, gr.update(choices=choices, value=clips[0] if clips else None),
            clips[0] if clips else None, gr.update(interactive=report.ok))


def try_audio(run_id, checkpoint, audio):
    """Base and tuned transcriptions of the same audio, with the time each took."""
    from studio import tryit
    run = widgets.shown_run(run_id, "Train a run first, then try it here.")
    if not audio:
        raise widgets.refused("Upload or record some audio first.")
    checkpoint = None if checkpoint in (None, "", "final") else checkpoint
    try:
        base, base_s = tryit.transcribe(run.config(), run.dir, audio, checkpoint=checkpoint, use_adapter=False)
        tuned, tuned_s = tryit.transcribe(run.config(), run.dir, audio, checkpoint=checkpoint)
    except Exception as err:
        raise gr.Error(f"Transcription failed: {getattr(err, 'cause', None) or err}") from None
    return base, f"{base_s:.2f} s", tuned, f"{tuned_s:.2f} s"


def build() -> dict:
    defaults = default_config()
    run_state = widgets.run_holder("speech")
    gr.Markdown(hardware.hardware_line(), elem_classes=["hardware"])
    with gr.Row():
        base_model = gr.Dropdown([(f"{name} — {text}", name) for name, text in BASE_MODELS.items()],
                                 value=defaults.base_model, allow_custom_value=True, scale=3, label="Base model",
                                 info="A built-in preset, an OpenAI Whisper size, or a local .pt checkpoint.")
        name = gr.Textbox(label="Run name", placeholder="optional", scale=1)

    with gr.Group():
        gr.Markdown("### Audio and transcripts")
        with gr.Row():
            files = gr.File(value=sample_files(), file_count="multiple", file_types=UPLOAD_TYPES, height=160,
                            label="Audio clips with metadata.csv or .txt transcripts, or a zip",
                            elem_id="speech-files")
            folder = gr.File(file_count="directory", label="…or a whole folder", height=160,
                             elem_id="speech-folder")
            validation = gr.File(file_count="multiple", file_types=UPLOAD_TYPES, height=160,
                                 label="Validation clips with their transcripts, or a zip (optional)",
                                 elem_id="speech-validation")
        data_summary = gr.Markdown(elem_id="speech-data-summary")
        problems = widgets.problems_box("speech")
        with gr.Row():
            preview = gr.Dataframe(label="Preview", wrap=True, max_height=240, scale=2, visible=False,
                                   elem_id="speech-preview")
            with gr.Column(scale=1):
                clip = gr.Dropdown([], label="Listen to a clip")
                player = gr.Audio(label="Clip", type="filepath", interactive=False)

    inputs = widgets.config_inputs(SpeechConfig, FORM, defaults)
    with gr.Group():
        gr.Markdown("### LoRA and training")
        for row in (DATA, TRAINING[:7], TRAINING[7:]):
            with gr.Row():
                for key in row:
                    inputs[key].render()
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                for key in ADVANCED:
                    inputs[key].render()
            widgets.scale_out_settings(inputs, "speech")
    section = widgets.run_section("speech")

    with gr.Group():
        gr.Markdown("### Try it: base and tuned on the same audio")
        with gr.Row():
            checkpoint = gr.Dropdown(["final"], value="final", label="Checkpoint", scale=1)
            audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", scale=3,
                             elem_id="speech-audio")
        transcribe = gr.Button("Transcribe", elem_id="speech-transcribe")
        with gr.Row():
            base_text = gr.Textbox(label="Base model", lines=3, scale=3, elem_id="speech-base-text")
            base_time = gr.Textbox(label="Time", scale=1)
            tuned_text = gr.Textbox(label="Tuned model", lines=3, scale=3, elem_id="speech-tuned-text")
            tuned_time = gr.Textbox(label="Time", scale=1)

    with gr.Group():
        gr.Markdown("### Export")
        with gr.Row():
            export_adapter = gr.Button("Adapter (zip)")
            export_merged = gr.Button("Merged checkpoint for openai-whisper (zip)")
        download = gr.File(label="Download", visible=False, elem_id="speech-download")

    form = [inputs[k] for k in FORM]
    everything = [files, folder, validation, base_model, name, *form]
    check_outputs = [data_summary, problems, preview, clip, player, section.train]
    replace_the_sample = widgets.upload_replaces_the_sample(sample_files)
    files.upload(replace_the_sample, files, files, api_visibility="private")
    folder.upload(replace_the_sample, [files, folder], files, api_visibility="private")
    check_triggers = [files.change, folder.change, validation.change, base_model.change,
                      inputs["long_clips"].change, inputs["validation_fraction"].change,
                      inputs["max_label_tokens"].change]
    clip.change(lambda c: c, clip, player, api_visibility="private")
    trying = transcribe.click(try_audio, [run_state, checkpoint, audio], [base_text, base_time, tuned_text,
                                                                         tuned_time], api_visibility="private")
    load_outputs = [files, folder, validation, base_model, name, *form, section.message]
    widgets.wire_run_section(section, FORM_SPEC, run_state, everything, load_outputs, checkpoint,
                             {"adapter": export_adapter, "merged": export_merged}, download,
                             [base_text, base_time, tuned_text, tuned_time], trying)
    return {"run_state": run_state, "load_outputs": load_outputs, "form": FORM_SPEC,
            "check": (check_data, everything, check_outputs, check_triggers)}
