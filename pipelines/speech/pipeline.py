"""Speech-to-text LoRA on Whisper: train, transcribe, export. Reads like a recipe: load clips, load the
model, attach LoRA, compute each clip's input once, hand the loop a task.

Training target per clip: the start-of-transcript sequence with the language and task pinned and no
timestamps, then the transcript, then end-of-text; the loss counts the transcript and end-of-text only.
Decoding uses the same pinned prompt (greedy, temperature 0, no timestamps), so the tuned model never
has to guess the language: a classic Whisper fine-tuning failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import jiwer
import torch
import torch.nn.functional as F
import whisper
from peft import LoraConfig, PeftModel, get_peft_model
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

from pipelines.speech.audio import AudioUnreadable, read_audio
from pipelines.speech.config import SpeechConfig
from pipelines.speech.cross_cache import CrossAttentionCache
from pipelines.speech.data import Clip, load_clips
from pipelines.speech.model import (base_location, check_language, load_base_model, log_mel, lora_targets,
                                    model_summary, text_tokenizer)
from pipelines.training import (Events, TrainingFailure, TrainingTask, adapter_dir, iterate_in_batches, require_data,
                                native_bf16, pick_device, run_training, seed_everything, shuffled)

IGNORE = -100
# Encoder outputs of all clips are kept in memory when they fit in this budget; otherwise only the
# log-mels are, and the frozen encoder runs again each step (still no audio decoding or mel per step).
# What the encoder outputs leave of it holds the decoder's cross-attention keys and values (cross_cache.py).
CACHE_BYTES = int(os.environ.get("STUDIO_SPEECH_CACHE_MB", 4096)) * 2**20
# The narrowest decoder that gains from bf16 on a CPU with native bf16. Measured (decoder forward + backward
# with LoRA, 8 clips, 1 thread, an Intel Xeon with AMX): Whisper tiny's 384 wide 1.3x faster, base's 512
# 1.4x, small's 768 2.4x; the tiny preset's 64 no faster, so it stays float32.
CPU_BF16_MIN_WIDTH = 384


def trains_in_bf16(config: SpeechConfig, device: torch.device, dims) -> bool:
    if config.mixed_precision != "auto":
        return config.mixed_precision == "bf16"
    return native_bf16(device) and (device.type == "cuda" or dims.n_text_state >= CPU_BF16_MIN_WIDTH)


def attach_lora(model: whisper.model.Whisper, config: SpeechConfig) -> PeftModel:
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lora_targets(model, config.target, config.decoder_only))
    return get_peft_model(model, lora)


def _features(model, clips: list[Clip], encode: bool, device: torch.device) -> list[torch.Tensor]:
    """Each clip's model input, computed once: the encoder's output when the encoder is frozen (the
    decoder then trains on it directly), else the log-mel. Frees the audio afterwards."""
    out = []
    with torch.no_grad():
        for group in iterate_in_batches(clips, 8):
            mels = torch.stack([log_mel(c.samples, model.dims.n_mels) for c in group])
            if encode:
                mels = model.encoder(mels.to(device)).cpu()
            out += list(mels)
            for c in group:
                c.samples = None
    return out


def _labels(tokenizer, text: str) -> list[int]:
    """Prompt (pinned language + task + no-timestamps), transcript, end-of-text. Text that looks like a
    special token ("<|en|>") is read as plain text, never as the token."""
    text_tokens = tokenizer.encode(" " + text.strip(), disallowed_special=())
    return list(tokenizer.sot_sequence_including_notimestamps) + text_tokens + [tokenizer.eot]


def _collate(sequences: list[list[int]], prompt_length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token labels; the prompt's own tokens and the padding are not learnt."""
    longest = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), longest), pad, dtype=torch.long)
    labels = torch.full((len(sequences), longest), IGNORE, dtype=torch.long)
    for i, seq in enumerate(sequences):
        inputs[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        target = torch.tensor(seq[1:])
        target[:prompt_length - 1] = IGNORE
        labels[i, :len(seq) - 1] = target
    return inputs, labels


def _normalizer(language: str, task: str) -> Callable[[str], str]:
    """WER on normalised text (case, punctuation, spelling variants), the way Whisper's paper scores it."""
    return EnglishTextNormalizer() if language == "en" or task == "translate" else BasicTextNormalizer()


def error_rates(references: list[str], hypotheses: list[str], normalize: Callable[[str], str]) -> dict[str, float]:
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    if not pairs:
        return {}
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}


def decode_features(model, features: list[torch.Tensor], language: str, task: str, device: torch.device,
                    sample_len: int | None = None, batch_size: int = 16) -> list[str]:
    """Greedy transcripts of precomputed inputs (encoder outputs or log-mels), language and task pinned."""
    options = whisper.DecodingOptions(language=language, task=task, temperature=0.0, without_timestamps=True,
                                      fp16=False, sample_len=sample_len)
    texts = []
    for group in iterate_in_batches(features, batch_size):
        results = whisper.decode(model, torch.stack(group).to(device), options)
        texts += [r.text for r in results]
    return texts


def train(config: SpeechConfig, run_dir: str | Path, events: Events, should_stop: Callable[[], bool],
          resume: bool = False, log: Callable[[str], None] = print) -> str:
    run_dir = Path(run_dir)
    device = pick_device(config.device)
    report, train_clips, validation_clips = load_clips(config)
    require_data(report, train_clips, "clip", log)

    log(f"Loading {config.base_model} on {device.type}.")
    base = load_base_model(config.base_model, device)
    check_language(base, config.language)
    tokenizer = text_tokenizer(base, config.language, config.task)
    log(f"Base model: {model_summary(base)}.")
    seed_everything(config.seed)  # LoRA's initial weights depend on it
    model = attach_lora(base, config)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"LoRA adds {trainable:,} trainable parameters to {total - trainable:,} frozen ones"
        f"{' (decoder only, encoder frozen)' if config.decoder_only else ''}.")

    # Each clip's input is computed once here, not every step: decoding audio and the mel (and, with the
    # encoder frozen, the whole encoder) would otherwise dominate the cost of a step.
    started = time.perf_counter()
    clips = train_clips + validation_clips
    state_bytes = len(clips) * base.dims.n_audio_ctx * base.dims.n_audio_state * 4
    encoded = config.decoder_only and state_bytes <= CACHE_BYTES
    features = _features(model, clips, encoded, device)
    log(f"Prepared {len(clips)} clips in {time.perf_counter() - started:.1f} s "
        f"({'encoder outputs' if encoded else 'log-mels'} kept in memory).")
    bf16 = trains_in_bf16(config, device, base.dims)
    log(f"Training in {'bf16 autocast (the adapter in float32)' if bf16 else 'float32'}.")
    cross = None
    if encoded:  # the encoder's outputs never change: neither do the frozen cross-attention projections of them
        dims = base.dims
        per_clip = 2 * dims.n_text_layer * dims.n_audio_ctx * dims.n_text_state * (2 if bf16 else 4)
        room = CACHE_BYTES - state_bytes
        if device.type == "cuda":  # (held on the GPU, beside the model's own needs)
            room = min(room, torch.cuda.mem_get_info(device)[0] // 4)
        cross = CrossAttentionCache(model.decoder, room)
        log(f"Cross-attention keys and values kept for {min(len(clips), room // per_clip)} of {len(clips)} clips "
            f"({per_clip / 2**20:.1f} MB each), without LoRA's part.")
    sequences = [_labels(tokenizer, c.text) for c in clips]
    prompt_length = len(tokenizer.sot_sequence_including_notimestamps)
    if max(len(s) for s in sequences) - 1 > base.dims.n_text_ctx:
        raise TrainingFailure(f"A transcript is longer than this model's {base.dims.n_text_ctx}-token context.",
                              f"Lower max label tokens below {base.dims.n_text_ctx - prompt_length}.")
    train_items = list(range(len(train_clips)))
    eval_items = list(range(len(train_clips), len(clips))) or train_items
    eval_on = "validation" if validation_clips else "training"

    def batches_for_epoch(epoch: int) -> list[list[int]]:
        return list(iterate_in_batches(shuffled(train_items, config.seed, epoch), config.batch_size))

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def forward(batch: list[int]) -> torch.Tensor:
        inputs = torch.stack([features[i] for i in batch]).to(device)
        tokens, labels = _collate([sequences[i] for i in batch], prompt_length, tokenizer.eot)
        tokens, labels = tokens.to(device), labels.to(device)
        with autocast(), cross.serving(batch) if cross else contextlib.nullcontext():
            if not encoded:
                with torch.set_grad_enabled(torch.is_grad_enabled() and not config.decoder_only):
                    inputs = model.encoder(inputs)
            logits = model.decoder(tokens, inputs)
        return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE)

    def loss_on(batch: list[int]) -> tuple[torch.Tensor, int]:
        return forward(batch), len(batch)

    normalize = _normalizer(config.language, config.task)
    # A babbling model is cut off at twice the longest reference: its WER is over 100% by then anyway,
    # and an untrained model would otherwise decode 224 tokens per clip at every evaluation.
    longest = max(len(sequences[i]) for i in eval_items)
    sample_len = min(base.dims.n_text_ctx // 2, 2 * longest + 8)

    def transcribe_items(items: list[int]) -> list[str]:
        return decode_features(model, [features[i] for i in items], config.language, config.task, device,
                               sample_len=sample_len, batch_size=max(config.batch_size, 8))

    def evaluate() -> dict[str, float]:
        loss_sum, count = 0.0, 0
        for batch in iterate_in_batches(eval_items, config.batch_size):
            n = sum(len(sequences[i]) - prompt_length for i in batch)
            loss_sum += forward(batch).item() * n
            count += n
        hypotheses = transcribe_items(eval_items)
        metrics = {"eval_loss": loss_sum / max(1, count)}
        metrics.update(error_rates([clips[i].text for i in eval_items], hypotheses, normalize))
        return metrics

    sampled = eval_items[:config.sample_count]

    def make_samples() -> list[dict]:
        texts = transcribe_items(sampled)
        return [{"audio": clips[i].source, "reference": clips[i].text, "transcript": text, "split": eval_on}
                for i, text in zip(sampled, texts)]

    def save_adapter(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        _describe_adapter(folder, config)

    task = TrainingTask(model=model, batches_for_epoch=batches_for_epoch, loss_on=loss_on, save_adapter=save_adapter,
                        unit="clips", evaluate=evaluate, make_samples=make_samples if sampled else None,
                        evaluate_at_start=True,
                        # Whisper's decoder turns its output into logits with the token embedding's weight.
                        borrowed_weights=[(model.decoder, model.decoder.token_embedding.weight)])
    events.emit("data", rows=len(train_clips), validation_rows=len(validation_clips), format=report.format,
                seconds=round(sum(c.seconds for c in train_clips), 1), eval_on=eval_on)
    return run_training(task, config, run_dir, events, should_stop, resume=resume, log=log)


def _describe_adapter(folder: Path, config: SpeechConfig) -> None:
    """Name the base in adapter_config.json (as peft expects) and record how the adapter decodes, so an
    exported adapter folder says everything needed to use it."""
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = base_location(config.base_model)
    path.write_text(json.dumps(data, indent=2))
    (folder / "whisper.json").write_text(json.dumps({
        "base_model": config.base_model, "language": config.language, "task": config.task,
        "decoding": {"temperature": 0.0, "without_timestamps": True}}, indent=2))


# ---- using a trained run ---------------------------------------------------------------------


def load_for_transcription(config: SpeechConfig, run_dir: str | Path | None = None,
                           checkpoint: str | None = None):
    """The base model, or with a run the model carrying its adapter (`with model.disable_adapter():`
    gives the base again without loading it twice)."""
    device = pick_device(config.device)
    model = load_base_model(config.base_model, device)
    if run_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir(run_dir, checkpoint))
    model.eval()
    return model


@torch.no_grad()
def transcribe(model, audio_path: str | Path, language: str, task: str = "transcribe") -> tuple[str, float]:
    """(text, seconds taken). Runs openai-whisper's own `transcribe` (any length; greedy, no timestamps,
    language and task pinned), so the text is what plain openai-whisper gives for the same weights.
    Raises AudioUnreadable with one sentence when the file is not usable audio."""
    sound = read_audio(audio_path)
    if len(sound.samples) == 0:
        raise AudioUnreadable("the file holds no audio (0 seconds long)")
    started = time.perf_counter()
    result = whisper.transcribe(model, sound.samples, language=language, task=task, temperature=0.0,
                                without_timestamps=True, fp16=model.device.type == "cuda", verbose=None)
    return result["text"].strip(), time.perf_counter() - started


def export(config: SpeechConfig, run_dir: str | Path, kind: str, destination: str | Path,
           checkpoint: str | None = None) -> Path:
    """kind "adapter": the peft adapter folder (adapter_model.safetensors + adapter_config.json);
    "merged": the LoRA merged into the weights, one .pt that plain `whisper.load_model(path)` loads.
    A destination without .pt suffix is a folder; the file is then <folder>/<run name or model>.pt."""
    destination = Path(destination)
    source = adapter_dir(run_dir, checkpoint)
    if kind == "adapter":
        shutil.copytree(source, destination, dirs_exist_ok=True)
        return destination
    if kind != "merged":
        raise ValueError(f"unknown export kind {kind!r}: use 'adapter' or 'merged'")
    model = load_for_transcription(config.changed(device="cpu"), run_dir, checkpoint)
    merged = model.merge_and_unload()
    if destination.suffix != ".pt":
        destination = destination / f"{(config.name.strip() or 'whisper-lora').replace(' ', '-')}-merged.pt"
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".tmp-{destination.name}")
    # Full precision: the file then transcribes exactly like the studio's model with its adapter.
    torch.save({"dims": asdict(merged.dims), "model_state_dict": merged.state_dict()}, tmp)
    os.replace(tmp, destination)
    return destination
