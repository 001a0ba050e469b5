"""A run's export (adapter, merged model, kohya file) with a model card, README.md, saying what it is, how it
was trained and how to load it: the adapter folders carried peft's blank card ("[More Information Needed]"),
and nothing named the base model, the settings or the system prompt the model expects. The Runs tab's and the
tabs' downloads and `studio export` all come through here."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipelines import MODALITIES, pipeline_module
from pipelines.config import RunConfig
from studio import jobs
from studio.progress import read_progress
from studio.runs import Run

LIBRARY = {"llm": "peft", "image": "diffusers", "speech": "openai-whisper"}
TAGS = {"llm": ["text-generation"], "image": ["stable-diffusion", "text-to-image"],
        "speech": ["whisper", "automatic-speech-recognition"]}


def export_run(run: Run, kind: str, destination: str | Path, checkpoint: str | None = None) -> Path:
    """The run's adapter (or a checkpoint's) exported as `kind` into `destination`, with its model card beside
    it. Returns what the pipeline wrote (a folder, or a file for kohya and a merged Whisper)."""
    jobs.wait_for_libraries()  # (in the server: not while another thread imports them)
    config = run.config()
    pipeline = pipeline_module(run.modality)
    if checkpoint is None:  # a run with no final adapter (stopped, or still training) gives its latest checkpoint's
        source = pipeline.adapter_dir(run.dir)
        checkpoint = source.parent.name if source.parent.parent.name == "checkpoints" else None
    path = Path(pipeline.export(config, run.dir, kind, destination, checkpoint=checkpoint))
    folder = path if path.is_dir() else path.parent
    (folder / "README.md").write_text(model_card(run, config, kind, path, checkpoint), encoding="utf-8")
    return path


def model_card(run: Run, config: RunConfig, kind: str, path: Path, checkpoint: str | None = None) -> str:
    progress = read_progress(run.dir)
    # A checkpoint's card tells of the training up to it (the run's end came later, or never).
    step = int(checkpoint.split("-")[1]) if checkpoint else progress.step  # (named step-N)
    progress.losses = [(s, loss) for s, loss in progress.losses if s <= step]
    progress.evals = [e for e in progress.evals if e["step"] <= step]
    merged = kind in ("merged", "fused")
    what = (f"`{config.base_model}` with a LoRA adapter merged into its weights" if merged
            else f"A LoRA adapter for `{config.base_model}`")
    trained = [
        f"- Steps: {step} of {progress.total_steps}" + (f" (checkpoint {checkpoint})" if checkpoint else ""),
        f"- LoRA: rank {config.lora_rank}, alpha {config.lora_alpha:g}",
        f"- Learning rate {config.learning_rate:g}, batch size {config.batch_size}"
        + (f" x {config.gradient_accumulation} accumulated" if config.gradient_accumulation > 1 else ""),
    ]
    if progress.last_loss is not None:
        trained.append(f"- Last training loss: {progress.last_loss:.4f}")
    if progress.best() is not None:
        trained.append(f"- Best validation loss: {progress.best():.4f}")
    if getattr(config, "system_prompt", ""):
        trained.append(f"- System prompt (ask with it too): {config.system_prompt!r}")
    library = "transformers" if run.modality == "llm" and merged else LIBRARY[run.modality]  # (no adapter left)
    hub_base = _hub_id(config.base_model, run.modality)  # (the hub links the card to it)
    front = "\n".join(["---", *([f"base_model: {hub_base}"] if hub_base else []), f"library_name: {library}",
                       "tags:", *[f"- {t}" for t in ["lora", "lora-studio", *TAGS[run.modality]]], "---"])
    return (f"{front}\n\n# {run.name}\n\n{what}, fine-tuned with LoRA Studio ({MODALITIES[run.modality]}, run "
            f"`{run.id}`).\n\n## Training\n\n" + "\n".join(trained)
            + f"\n\n## Use\n\n```python\n{_usage(run.modality, kind, path, config)}\n```\n")


def _hub_id(base_model: str, modality: str) -> str:
    """The base model's id on the Hugging Face hub, or "" where it has none (a preset, a folder made elsewhere, a
    file): where the studio loads it from the hub (namespaced or a legacy id: 'gpt2'), or the one a local folder's
    config.json (a diffusers folder's model_index.json) says it was saved from. Read by the rule the run's load
    followed, so that a preset's name or a folder's relative name is not taken for an id."""
    from pipelines import model_module
    from pipelines.hub import ModelUnavailable, resolve_source
    if modality == "speech":
        return ""  # (Whisper's sizes are OpenAI's downloads, not the hub's)
    presets = model_module(modality).PRESETS
    try:
        kind, where = resolve_source(base_model, presets)
        if kind == "local":
            folder = Path(where)
            config = next(folder / n for n in ("config.json", "model_index.json") if (folder / n).is_file())
            saved_from = str(json.loads(config.read_text()).get("_name_or_path") or "")
            if not saved_from or (folder.parent / saved_from).exists():  # (a folder beside it, by its relative name)
                return ""
            kind, where = resolve_source(saved_from, presets)
    except (ModelUnavailable, StopIteration, OSError, ValueError, AttributeError):
        return ""
    return where if kind == "hub" else ""


def _usage(modality: str, kind: str, path: Path, config: RunConfig) -> str:
    here = "." if path.is_dir() else path.name
    if modality == "llm":
        # A model that ships its own code loads only with that code allowed to run, as its run had it.
        trust = ", trust_remote_code=True" if config.trust_remote_code else ""
        if kind == "merged":
            return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                    f'model = AutoModelForCausalLM.from_pretrained("{here}"{trust})\n'
                    f'tokenizer = AutoTokenizer.from_pretrained("{here}"{trust})')
        return ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n"
                f'model = AutoPeftModelForCausalLM.from_pretrained("{here}"{trust})  # loads {config.base_model} too\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{here}"{trust})')
    if modality == "image":
        if kind in ("merged", "fused"):
            return ("from diffusers import StableDiffusionPipeline\n"
                    f'pipe = StableDiffusionPipeline.from_pretrained("{here}")')
        weights = f', weight_name="{path.name}"' if kind == "kohya" else ""
        return ("from diffusers import StableDiffusionPipeline\n"
                f'pipe = StableDiffusionPipeline.from_pretrained("{config.base_model}")\n'
                f'pipe.load_lora_weights("."{weights})' + ("  # or load the file in A1111, ComfyUI or Forge"
                                                           if kind == "kohya" else ""))
    # Decoded as the studio decodes (greedy, no timestamps): whisper's defaults, timestamps and a temperature
    # fallback, gave other text than the studio's for the same model.
    transcribe = (f'print(model.transcribe("clip.wav", language="{config.language}", task="{config.task}", '
                  'temperature=0.0, without_timestamps=True)["text"].strip())')
    if kind == "merged":
        return f'import whisper\nmodel = whisper.load_model("{here}")\n{transcribe}'
    # The base as the adapter names it: whisper.load_model does not know the built-in preset by its name, and
    # loads its file instead.
    base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    where = f"  # {config.base_model}, as adapter_config.json names it" if base != config.base_model else ""
    return ('import whisper\nfrom peft import PeftModel\n'
            f'model = PeftModel.from_pretrained(whisper.load_model("{base}"), "."){where}\n{transcribe}')
