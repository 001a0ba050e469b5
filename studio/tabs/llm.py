"""The Language model tab: pick a model, upload data and see it checked, set LoRA, train, watch, try, export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gradio as gr
import pandas as pd

from pipelines.config import ConfigError
from pipelines.llm.config import KNOWN_MODELS, LLMConfig
from pipelines.llm.data import SAVE_AS_FIRST, TABLE_SUFFIXES
from studio import hardware, jobs
from studio.tabs import widgets

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "llm"
SAMPLE_CONFIG = ASSETS / "config.yaml"

TRAINING = ["lora_rank", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "epochs", "max_steps",
            "batch_size", "gradient_accumulation", "max_length", "warmup_steps", "eval_every", "sample_every", "seed"]
TOGGLES = ["use_dora", "use_rslora", "load_in_4bit"]
ADVANCED = ["scheduler", "weight_decay", "max_grad_norm", "train_on", "packing", "mixed_precision", "torch_compile",
            "system_prompt",
            "custom_target_modules", "sample_prompts", "sample_max_new_tokens", "checkpoint_every",
            "keep_checkpoints", "device", "trust_remote_code"]
DATA = ["validation_fraction", "data_format", "prompt_column", "input_column", "response_column", "text_column",
        "messages_column"]
FORM = TRAINING + TOGGLES + ADVANCED + DATA + widgets.SCALE_OUT
COLUMNS = ["prompt_column", "input_column", "response_column", "text_column", "messages_column"]
COLUMN_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(LLMConfig) if f.name in COLUMNS}


def sample_files() -> list[str]:
    return [str(ASSETS / "sample.csv")]


def default_config() -> LLMConfig:
    """The sample run, so a new user can press Train straight away."""
    from pipelines import load_config
    return load_config(SAMPLE_CONFIG)


def model_choices() -> list[tuple[str, str]]:
    return [(hardware.describe_model(name, size) + (" (built-in, offline)" if "/" not in name else ""), name)
            for name, size in KNOWN_MODELS]


def model_size(base_model: str) -> float | None:
    """Parameters in billions, where we can tell without loading the model."""
    known = dict(KNOWN_MODELS)
    if base_model in known:
        return known[base_model]
    config_file = Path(base_model).expanduser() / "config.json"
    try:
        c = json.loads(config_file.read_text())
        hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
        return (12 * layers * hidden * hidden + vocab * hidden) / 1e9
    except (OSError, KeyError, ValueError):
        return None


FORM_SPEC = widgets.TabForm(LLMConfig, FORM, ["train_files", "validation_files"], defaults=lambda: default_config())
UPLOAD_TYPES = TABLE_SUFFIXES + list(SAVE_AS_FIRST)  # (the check explains the second kind)


def check_data(*args):
    """Data check shown under the upload: summary, problems, preview, token lengths; gates the Train button."""
    values = FORM_SPEC.values(*args)
    if not values["train_files"]:
        return ("Upload a CSV, JSONL, JSON, Parquet or Excel file to begin.", gr.update(visible=False),
                gr.update(value=None, visible=False), None,
                # one update each: Gradio takes the value out of an update as it applies it
                *[gr.update(choices=[""], value="", info=COLUMN_HELP[key]) for key in COLUMNS],
                gr.update(interactive=False), "")
    try:
        config = LLMConfig.from_dict(values)
    except ConfigError as err:  # a setting the data check does not read (the run's name, say) is Train's to report
        invalid = {name for name, _ in err.problems} - {"train_files", "validation_files"}
        config = LLMConfig.from_dict({k: v for k, v in values.items() if k not in invalid}, check=False)
    report = jobs.check_data(config)
    # A column chosen for other data (a loaded config's, or for the file before) that none of these files has
    # is no choice made for them: check them again with it left to detection.
    stale = {key: "" for key in COLUMNS if getattr(config, key) and getattr(config, key) not in report.columns}
    if stale and report.columns:
        config = config.changed(**stale)
        report = jobs.check_data(config)
    summary = widgets.headline(report, "data")
    if stale and report.columns:  # said, as a name typed into a box by hand would otherwise vanish unexplained
        named = ", ".join(f"{key.replace('_', ' ')} '{values[key]}'" for key in stale)
        summary += f"\n\nNot in these files, so left to detection: {named}."
    stats = report.stats
    if stats:
        summary += (f"\n\nTokens per example: min {stats['tokens_min']}, mean {stats['tokens_mean']}, "
                    f"95% at most {stats['tokens_p95']}, max {stats['tokens_max']}. ")
        if stats["over_max_length"]:
            summary += f"**{stats['over_max_length']} examples exceed the max length of {stats['max_length']}** " \
                       "and will be truncated."
        if stats["no_reply_within_max_length"]:
            summary += f" **{stats['no_reply_within_max_length']} of them keep no reply within it and will be " \
                       "skipped:** raise the max length."
    problems = widgets.problems_table(report)
    preview = widgets.preview_table(report.preview)
    histogram = _histogram(stats) if stats else None
    # The boxes keep the user's choice (empty: detect, file by file); what each file is read with shows below them.
    in_use = {f"{role}_column": column for role, column in report.mapping.items()}
    mapping = [gr.update(choices=[""] + report.columns, value=getattr(config, key),
                         info=COLUMN_HELP[key] + (f" In use: {in_use[key]}." if key in in_use else ""))
               for key in COLUMNS]
    preflight = preflight_line(config, stats)
    return (summary, problems, preview, histogram, *mapping, gr.update(interactive=report.ok), preflight)


def _histogram(stats: dict) -> pd.DataFrame:
    lengths, limit = stats["lengths"], stats["max_length"]
    width = max(1, max(max(lengths), limit) // 20 + 1)
    # One bin edge at the max length, so that no bar holds examples on both sides of it: a first bar of 0-1851
    # tokens for a limit of 128 was all called 'over max length', though most of it fitted.
    first_over = limit + 1
    bins: dict[int, int] = {}
    for n in lengths:
        start = (n - first_over) // width * width + first_over
        bins[start] = bins.get(start, 0) + 1
    return pd.DataFrame([{"tokens": f"{max(0, start)}-{start + width - 1}", "examples": count,
                          "fits": "within max length" if start < first_over else "over max length",
                          "start": max(0, start)} for start, count in sorted(bins.items())])


def preflight_line(config: LLMConfig, stats: dict | None) -> str:
    size = model_size(config.base_model)
    if size is None:
        return "Pre-flight: model size unknown until it loads."
    on_gpu = bool(hardware.gpus()) and config.device != "cpu"
    batch_tokens = config.batch_size * min(config.max_length, int(stats["tokens_p95"]) if stats else config.max_length)
    split = config.world_size if config.splits_weights else 1
    bf16_on_cpu = config.bf16_products(hardware.cpu_has_bf16()) and config.holds_frozen_bf16()  # as training decides
    memory = hardware.training_memory_gib(size, on_gpu, config.load_in_4bit, batch_tokens, split=split,
                                          bf16_on_cpu=bf16_on_cpu)
    if on_gpu:
        where = "the GPU" if config.processes == 1 else f"each of the {config.processes} GPUs"
    else:  # the processes of a CPU run share this machine's memory
        memory *= config.processes
        where = "the CPU" if config.processes == 1 else f"the CPU ({config.processes} processes)"
    text = f"Pre-flight: about **{memory:.1f} GiB** peak memory on {where}"
    if stats:
        tokens = stats["tokens_trained"]
        flops = 4 * size * 1e9 * tokens  # LoRA: forward plus activation gradients, no frozen-weight gradients
        rate = 2e14 if on_gpu else 2e10   # sustained FLOP/s, deliberately modest
        seconds = max(flops / rate, 0.05 * tokens / max(1, batch_tokens))
        from studio.progress import format_seconds
        shown = format_seconds(seconds) if seconds >= 1 else "under a second"
        text += f", about **{shown} per epoch** ({tokens:,} tokens)."
    return text


NO_REPLY = "(no reply: the model ended its answer at once)"  # an empty bubble read as a failure
WRITING = "…"  # a reply begun, before its first word


def _turns(chat: list[dict] | None) -> list[dict[str, str]]:
    """A Chatbot's conversation as messages for the model: Gradio hands each turn's content over in parts, and
    the studio's own stand-ins for an empty reply are none of the model's words."""
    def text(content) -> str:
        text = content if isinstance(content, str) else "".join(
            part.get("text", "") for part in content if isinstance(part, dict))
        return "" if text in (NO_REPLY, WRITING) else text
    return [{"role": turn["role"], "content": text(turn["content"])} for turn in chat or []]


def try_prompt(run_id, checkpoint, prompt, system, max_new_tokens, temperature, top_p, follow_up, base_chat,
               tuned_chat):
    """The tuned model's reply, then the base model's, to the same prompt, each shown as it grows: (base
    conversation, tuned conversation). The prompt is asked on its own, or with `follow_up` after each side's
    conversation so far; after the system prompt typed, else the run's own."""
    from contextlib import closing
    from studio import tryit
    run = widgets.shown_run(run_id, "Train a run first, then try it here.")
    if not (prompt or "").strip():
        raise widgets.refused("Type a prompt first.")
    checkpoint = None if checkpoint in (None, "", "final") else checkpoint
    options = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))
    system = (system or "").strip() or run.config().system_prompt
    asked = {"role": "user", "content": prompt.strip()}
    chats = {"base": _turns(base_chat) if follow_up else [], "tuned": _turns(tuned_chat) if follow_up else []}
    chats = {side: turns + [asked] for side, turns in chats.items()}
    yield chats["base"], chats["tuned"]  # the question at once, and the last one's replies gone unless followed up
    try:
        for side in ("tuned", "base"):
            conversation = ([{"role": "system", "content": system}] if system else []) + chats[side]
            with closing(tryit.stream_text(run.config(), run.dir, conversation, checkpoint=checkpoint,
                                           use_adapter=side == "tuned", **options)) as updates:
                for update in updates:
                    if update is None:
                        yield gr.skip(), gr.skip()  # (where Gradio can stop it: see tryit._in_the_background)
                        continue
                    reply = {"role": "assistant", "content": update.value or (NO_REPLY if update.final else WRITING)}
                    chats[side] = chats[side][:-1] + [reply] if chats[side][-1]["role"] == "assistant" else \
                        chats[side] + [reply]
                    yield chats["base"], chats["tuned"]
    except Exception as err:
        raise gr.Error(f"Generation failed: {getattr(err, 'cause', None) or err}") from None


def build() -> None:
    defaults = default_config()
    run_state = widgets.run_holder("llm")

    gr.Markdown(hardware.hardware_line(), elem_classes=["hardware"])
    with gr.Row():
        base_model = gr.Dropdown(model_choices(), value=defaults.base_model, allow_custom_value=True, scale=3,
                                 label="Base model",
                                 info="A built-in preset, a Hugging Face hub id, or a local folder path.")
        name = gr.Textbox(label="Run name", placeholder="optional", scale=1)

    with gr.Group():
        gr.Markdown("### Data")
        with gr.Row():
            files = gr.File(value=sample_files(), file_count="multiple", label="Training data",
                            elem_id="llm-train-files", file_types=UPLOAD_TYPES,
                            height=140)
            validation_files = gr.File(file_count="multiple", label="Validation data (optional)",
                                       file_types=UPLOAD_TYPES, height=140)
        data_summary = gr.Markdown(elem_id="llm-data-summary")
        with gr.Row():  # the problems' reasons are long: they get twice the histogram's width
            problems = widgets.problems_box("llm", scale=2)
            histogram = gr.BarPlot(None, x="tokens", y="examples", color="fits", sort=None, height=220, scale=1,
                                   title="Token lengths", x_title="tokens per example", x_label_angle=-45)
        preview = gr.Dataframe(label="Preview (as the model will see it)", wrap=True, max_height=240, visible=False,
                               elem_id="llm-preview", elem_classes=["keeps-lines"])

    inputs = widgets.config_inputs(LLMConfig, FORM, defaults)
    for key in COLUMNS:
        inputs[key] = widgets.column_input(LLMConfig, key)
    with gr.Group():
        gr.Markdown("### LoRA and training")
        with gr.Row():
            for key in ("validation_fraction", "data_format"):
                inputs[key].render()
        with gr.Row():
            for key in COLUMNS:
                inputs[key].render()
        with gr.Row():
            for key in TRAINING[:5]:
                inputs[key].render()
        with gr.Row():
            for key in TRAINING[5:10]:
                inputs[key].render()
        with gr.Row():
            for key in TRAINING[10:] + TOGGLES:
                inputs[key].render()
        with gr.Accordion("Advanced", open=False):
            # (eight in the last row squeezed 'Trust remote code' to a word a line, and the system prompt)
            for keys in (ADVANCED[:4], ADVANCED[4:7], ADVANCED[7:10], ADVANCED[10:]):
                with gr.Row():
                    for key in keys:
                        inputs[key].render()
            widgets.scale_out_settings(inputs, "llm")
    preflight = gr.Markdown()
    section = widgets.run_section("llm")

    with gr.Group():
        gr.Markdown("### Try it")
        with gr.Row():
            checkpoint = gr.Dropdown(["final"], value="final", label="Checkpoint", scale=1)
            max_new_tokens = gr.Slider(1, 512, value=64, step=1, label="Max new tokens", scale=1)
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature", info="0 = greedy", scale=1)
            top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p", scale=1)
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="What is the capital of Zorbia?", lines=2, scale=3,
                                elem_id="llm-prompt")
            system = gr.Textbox(label="System prompt", lines=2, scale=2, elem_id="llm-try-system",
                                placeholder="empty: the run's own (its system prompt setting), if it has one")
        with gr.Row(equal_height=True):
            generate = gr.Button("Generate", elem_id="llm-generate", scale=3)
            stop_generating = gr.Button("Stop", elem_id="llm-stop-generating", scale=1)
            follow_up = gr.Checkbox(False, label="Continue the conversation", scale=2, elem_id="llm-follow-up",
                                    info="off: each prompt is asked on its own, as the model trained")
        with gr.Row():
            base_answer = gr.Chatbot(label="Base model", height=300, elem_id="llm-base-answer", buttons=["copy"])
            tuned_answer = gr.Chatbot(label="Tuned model", height=300, elem_id="llm-tuned-answer", buttons=["copy"])

    with gr.Group():
        gr.Markdown("### Export")
        with gr.Row():
            export_adapter = gr.Button("Adapter (zip)")
            export_merged = gr.Button("Merged model (zip)")
        download = gr.File(label="Download", visible=False, elem_id="llm-download")

    form = [inputs[k] for k in FORM]
    everything = [files, validation_files, base_model, name, *form]
    mapping = [inputs[k] for k in COLUMNS]
    check_outputs = [data_summary, problems, preview, histogram, *mapping, section.train, preflight]
    files.upload(widgets.upload_replaces_the_sample(sample_files), files, files, api_visibility="private")
    # (the target modules too: a custom one the model has no layer for is found by the check, before any run)
    check_triggers = [files.change, validation_files.change, base_model.change, inputs["data_format"].change,
                      inputs["max_length"].change, inputs["validation_fraction"].change, inputs["system_prompt"].blur,
                      inputs["batch_size"].change, inputs["load_in_4bit"].change, inputs["target_modules"].change,
                      inputs["custom_target_modules"].blur, *(c.input for c in mapping)]

    trying = generate.click(try_prompt, [run_state, checkpoint, prompt, system, max_new_tokens, temperature, top_p,
                                         follow_up, base_answer, tuned_answer],
                            [base_answer, tuned_answer], api_visibility="private")
    stop_generating.click(None, cancels=[trying], api_visibility="private")  # (the replies so far stay)
    load_outputs = [files, validation_files, base_model, name, *form, section.message]
    widgets.wire_run_section(section, FORM_SPEC, run_state, everything, load_outputs, checkpoint,
                             {"adapter": export_adapter, "merged": export_merged}, download,
                             [base_answer, tuned_answer], trying)
    return {"run_state": run_state, "load_outputs": load_outputs, "form": FORM_SPEC,
            "check": (check_data, everything, check_outputs, check_triggers)}
