"""Whisper LoRA: the studio's training vs a plain openai-whisper + peft loop.

    python bench/speech.py [--quick] [--device cpu|cuda] [--rounds N] [--steps N] [--size tiny|base|small]

Same model (the tiny-whisper preset; with --size, one of OpenAI's Whisper sizes with random weights, the
preset's initialisation at that size: what a real model costs per step, without a download; learning rate
1e-3 there, the studio's default, where the preset's 1e-2 makes the wider models' losses erratic), same
data (assets/speech/clips: 8 short English clips), same LoRA
(the decoder's attention query/key/value/out, rank 16, alpha 32, same seed so the same initial adapter,
encoder frozen: the studio's decoder_only setting), same AdamW/lr/cosine/clipping, batch 8, same steps,
same clips in each batch, same targets (start-of-transcript + language + task + no-timestamps prompt,
transcript, end-of-text; the prompt not learnt).

  studio    pipelines.speech.pipeline.train(SpeechConfig): audio decoded, log-mel and (encoder frozen)
            encoder output computed once per clip, then the decoder trains on them.
  baseline  every step: whisper.load_audio (ffmpeg) each clip, pad_or_trim to 30 s, log_mel_spectrogram,
            tokenise, then the whole model forward (frozen encoder + decoder with LoRA), backward, step.
            On CUDA: float32 weights, the forward under bf16 autocast (as the studio does).

Figures per run (fresh process each): clips/s over the training steps (the studio's evaluations at start
and end are not counted), peak memory (RSS high-water on CPU, torch.cuda.max_memory_allocated on CUDA,
taken right after training), training loss (last 25% of steps), and after training, with the same
function for both ways (float32, on the run's device): teacher-forced loss over the clips and WER/CER of
greedy transcripts (language and task pinned).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (add_loss_tail, alternate, benchmark_parser, apply_threads, peak_memory_mb, ratios,  # noqa: E402
                          result_line, synchronize, table, warm_up, write_result)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "assets" / "speech" / "clips"
# OpenAI's Whisper sizes (model width, heads, layers of the encoder and of the decoder alike), for --size.
WHISPER_SIZES = {"tiny": (384, 6, 4), "base": (512, 8, 6), "small": (768, 12, 12)}


def base_model_for(size: str) -> str:
    """The base model's name: the preset, or a random Whisper of that size written into the workspace."""
    if size == "preset":
        return "tiny-whisper"
    from pipelines.speech.model import PRESETS, materialise_preset
    width, heads, layers = WHISPER_SIZES[size]
    preset = PRESETS["tiny-whisper"]
    dims = {**preset["dims"], "n_audio_state": width, "n_audio_head": heads, "n_audio_layer": layers,
            "n_text_state": width, "n_text_head": heads, "n_text_layer": layers}
    # The output logits keep the preset's scale: its embedding's spread shrinks as the width grows.
    normal = {**preset["normal"], "decoder.token_embedding.weight": 0.25 * (64 / width) ** 0.5}
    return str(materialise_preset(f"whisper-{size}-random", {**preset, "dims": dims, "normal": normal}))


def config_for(args):
    from pipelines.speech.config import SpeechConfig
    return SpeechConfig(name="bench", base_model=base_model_for(args.size), data_path=str(DATA),
                        validation_fraction=0.0, language="en", task="transcribe", decoder_only=True,
                        target="attention", lora_rank=16, lora_alpha=32.0, lora_dropout=0.0,
                        learning_rate=1e-2 if args.size == "preset" else 1e-3, max_steps=args.steps,
                        batch_size=args.batch_size, warmup_steps=0, scheduler="cosine", eval_every=0,
                        sample_every=0, sample_count=0, checkpoint_every=100_000, seed=1234, device=args.device)


def order(config, count: int, steps: int) -> list[list[int]]:
    from pipelines.training import iterate_in_batches, shuffled
    out, epoch = [], 0
    while len(out) < steps:
        out += list(iterate_in_batches(shuffled(list(range(count)), config.seed, epoch), config.batch_size))
        epoch += 1
    return out[:steps]


def plain_mel(samples, n_mels):
    """The plain recipe's encoder input: log_mel_spectrogram(pad_or_trim(audio)) (silence padded in audio)."""
    import torch
    import whisper
    return whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(samples)), n_mels)


def after_training(model, config, device: str, own_mel=None) -> dict:
    """The same evaluation for both ways: teacher-forced loss and greedy WER over the clips, with the
    encoder input whisper.transcribe uses (the studio's log_mel: the clip's mel, zero-padded in mel space),
    and, for the baseline, also with the input it trained on (silence padded in audio): "_own"."""
    import torch
    import torch.nn.functional as F
    from pipelines.speech.data import load_clips
    from pipelines.speech.model import log_mel, text_tokenizer
    from pipelines.speech.pipeline import _collate, _labels, _normalizer, decode_features, error_rates
    torch.set_grad_enabled(False)
    model.eval()
    _, clips, _ = load_clips(config)
    device = torch.device(device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tokenizer = text_tokenizer(base, config.language, config.task)
    sequences = [_labels(tokenizer, c.text) for c in clips]
    prompt = len(tokenizer.sot_sequence_including_notimestamps)
    tokens, labels = _collate(sequences, prompt, tokenizer.eot)
    out = {}
    for suffix, mel_fn in (("", log_mel), ("_own", own_mel or log_mel)):
        mels = [mel_fn(c.samples, base.dims.n_mels) for c in clips]
        logits = base.decoder(tokens.to(device), base.encoder(torch.stack(mels).to(device)))
        out["loss_after" + suffix] = F.cross_entropy(logits.float().transpose(1, 2), labels.to(device),
                                                     ignore_index=-100).item()
        texts = decode_features(model, mels, config.language, config.task, device,
                                sample_len=2 * max(len(s) for s in sequences) + 8)
        rates = error_rates([c.text for c in clips], texts, _normalizer(config.language, config.task))
        out["wer" + suffix], out["cer" + suffix] = rates.get("wer"), rates.get("cer")
    return out


def worker_studio(args, config) -> dict:
    from pipelines.speech.pipeline import load_for_transcription, train
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
    model = load_for_transcription(config, run_dir)
    return {"train_s": steps[-1]["elapsed_s"], "run_s": wall, "clips": sum(e["units"] for e in steps),
            "peak_mb": peak, "step_losses": [e["loss"] for e in steps], **after_training(model, config, args.device)}


def worker_baseline(args, config) -> dict:
    import torch
    import torch.nn.functional as F
    import whisper
    from peft import LoraConfig, get_peft_model
    from pipelines.speech.data import load_clips
    from pipelines.speech.model import base_location, lora_targets, text_tokenizer
    from pipelines.training import make_scheduler, seed_everything

    device = torch.device(args.device)
    warm_up(args.device)
    t0 = time.perf_counter()
    _, clips, _ = load_clips(config, keep_audio=False)
    paths = [str(DATA / Path(c.audio).name) for c in clips]
    texts = [c.text for c in clips]
    seed_everything(config.seed)  # as the studio does: same base load, then the same initial LoRA
    base = whisper.load_model(base_location(config.base_model), device=device)
    tokenizer = text_tokenizer(base, config.language, config.task)
    seed_everything(config.seed)
    model = get_peft_model(base, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                            lora_dropout=config.lora_dropout,
                                            target_modules=lora_targets(base, config.target, True)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    lr_scheduler = make_scheduler(optimizer, config, args.steps)
    prompt = list(tokenizer.sot_sequence_including_notimestamps)

    seed_everything(config.seed)
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    synchronize(args.device)
    losses, count, begin = [], 0, time.perf_counter()
    for batch in order(config, len(clips), args.steps):
        mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(paths[i])),
                                                        base.dims.n_mels) for i in batch]).to(device)
        sequences = [prompt + tokenizer.encode(" " + texts[i].strip()) + [tokenizer.eot] for i in batch]
        longest = max(len(s) for s in sequences) - 1
        tokens = torch.full((len(batch), longest), tokenizer.eot, dtype=torch.long)
        labels = torch.full((len(batch), longest), -100, dtype=torch.long)
        for row, seq in enumerate(sequences):
            tokens[row, :len(seq) - 1] = torch.tensor(seq[:-1])
            target = torch.tensor(seq[1:])
            target[:len(prompt) - 1] = -100
            labels[row, :len(seq) - 1] = target
        tokens, labels = tokens.to(device), labels.to(device)
        with autocast:
            logits = model(mels, tokens)
        loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        count += len(batch)
    synchronize(args.device)
    train_s = time.perf_counter() - begin
    wall = time.perf_counter() - t0
    peak = peak_memory_mb(args.device)
    return {"train_s": train_s, "run_s": wall, "clips": count, "peak_mb": peak, "step_losses": losses,
            **after_training(model, config, args.device, own_mel=plain_mel)}


def worker(args) -> None:
    import torch
    torch.manual_seed(0)
    config = config_for(args)
    result = (worker_studio if args.worker == "studio" else worker_baseline)(args, config)
    add_loss_tail(result)
    result["clips_s"] = result["clips"] / result["train_s"]
    write_result(args.out, result)


def main() -> None:
    parser = benchmark_parser(__doc__, "optimizer steps per run (default 40, quick 15)", batch_size=8)
    parser.add_argument("--size", choices=["preset", *WHISPER_SIZES], default="preset",
                        help="a random-weight Whisper of this OpenAI size instead of the tiny preset")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.steps = args.steps or (15 if args.quick else 40)
    apply_threads(args.threads)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="bench-speech-") as tmp:
        os.environ["STUDIO_HOME"] = str(Path(tmp) / "workspace")
        model = os.path.basename(base_model_for(args.size))  # built once here, before the workers load it
        print(f"Speech LoRA benchmark on {args.device}: {model}, assets/speech (8 clips), decoder only, batch "
              f"{args.batch_size}, {args.steps} steps, {args.rounds} round(s), {os.cpu_count()} CPU cores visible.",
              flush=True)
        runs = alternate(__file__, args.rounds, ["--steps", str(args.steps), "--batch-size", str(args.batch_size),
                                                 "--device", args.device, "--size", args.size])
    print("\nMedians over the rounds:\n")
    print(table(runs, [("clips_s", "samples (clips)/s"), ("train_s", "training wall time (s)"),
                       ("peak_mb", "peak memory (MB)"), ("train_loss_last", "train loss (last 25% of steps)"),
                       ("loss_after_own", "loss after (own training input)"), ("wer_own", "WER (own input)"),
                       ("cer_own", "CER (own input)"), ("loss_after", "loss after (transcribe's input)"),
                       ("wer", "WER (transcribe's input)"), ("cer", "CER (transcribe's input)")]))
    speedup, memory, delta = ratios(runs, "clips_s", ["loss_after_own"])
    print(f"\nspeedup (clips/s) {speedup:.2f}x, target >= 1.5x; peak memory ratio {memory:.2f}; "
          f"loss delta {delta:+.2f}%; WER studio {_median(runs, 'studio', 'wer_own')} vs baseline "
          f"{_median(runs, 'baseline', 'wer_own')} (target: no worse).")
    print(result_line(speedup, memory, delta))


def _median(runs, way, key):
    from bench.common import median
    value = median(runs[way], key)
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
