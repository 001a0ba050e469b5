"""Reading user audio robustly: any file ffmpeg can decode becomes 16 kHz mono float32, as Whisper hears it.

The decoding matches `whisper.load_audio` sample for sample (ffmpeg to 16-bit mono at 16 kHz), so a
clip sounds the same to the model in the studio and in plain openai-whisper. Unlike `load_audio` it
runs ffmpeg with a timeout, stops reading long files early, and turns every failure into one sentence
(`AudioUnreadable`) the data check can show. No torch here: the data check stays light.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 30.0  # Whisper hears 30 s at a time: longer training clips must be rejected or split
# What recorders, phones and meeting tools save (a video's sound track included): ffmpeg decodes them all.
AUDIO_SUFFIXES = {".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".webm", ".aif", ".aiff",
                  ".caf", ".wma", ".amr", ".3gp", ".mp4", ".mov", ".mkv"}
SILENCE_DBFS = -60.0   # no 25 ms stretch louder than this = nothing to transcribe (Whisper hears speech recorded
# 40 dB too quietly, at -55 dBFS, as well as at full volume: its log-mel input is scaled to each clip's loudest)
MAX_DECODE_SECONDS = 3600.0
FFMPEG_TIMEOUT_S = 120


class AudioUnreadable(ValueError):
    """The file cannot be used as audio; the message is one sentence that says why."""


@dataclass
class Audio:
    samples: np.ndarray   # float32, 16 kHz, mono, in [-1, 1]
    seconds: float        # the whole file's length (more than len(samples) when reading stopped early)
    source_rate: int
    channels: int
    encoding: str         # codec or sample format as found, e.g. "pcm_u8", "mp3", "PCM_16"

    @property
    def converted(self) -> bool:
        return self.source_rate != SAMPLE_RATE or self.channels != 1 or self.encoding not in ("PCM_16", "pcm_s16le")

    def describe(self) -> str:
        channels = {1: "mono", 2: "stereo"}.get(self.channels, f"{self.channels} channels")
        return f"{self.source_rate} Hz {channels} {self.encoding}"


def read_audio(path: str | Path, max_seconds: float = MAX_DECODE_SECONDS) -> Audio:
    """Decode `path` to 16 kHz mono. Reads at most `max_seconds` (the true length is still reported).
    Raises AudioUnreadable."""
    path = Path(path)
    if not path.is_file():
        raise AudioUnreadable("the file was not found")
    if path.stat().st_size == 0:
        raise AudioUnreadable("the file is empty (0 bytes)")
    info = None
    if path.suffix.lower() in (".wav", ".wave", ".flac"):  # (libsndfile's mp3 reader prints to stderr)
        try:
            info = soundfile.info(str(path))
        except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
            pass
    if info is not None and info.samplerate == SAMPLE_RATE and info.channels == 1 \
            and info.subtype in ("PCM_16", "PCM_U8", "PCM_S8"):
        # The common case needs no subprocess. libsndfile widens 8-bit to 16-bit exactly as ffmpeg does.
        frames = min(info.frames, int(max_seconds * SAMPLE_RATE))
        try:
            data, _ = soundfile.read(str(path), frames=frames, dtype="int16", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as err:
            raise AudioUnreadable(f"the file is damaged and cannot be decoded ({err})") from None
        samples = data[:, 0].astype(np.float32) / 32768.0
        return Audio(samples, info.frames / SAMPLE_RATE, SAMPLE_RATE, 1, info.subtype)
    return _read_with_ffmpeg(path, max_seconds)


def _ffmpeg_reason(stderr: bytes, path: Path) -> str:
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    last = lines[-1] if lines else "no details"
    return last.replace(str(path), path.name)


def _run(command: list[str], path: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, timeout=FFMPEG_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise AudioUnreadable(f"it needs ffmpeg to be decoded, and {command[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise AudioUnreadable(f"decoding took longer than {FFMPEG_TIMEOUT_S} s and was stopped") from None


def _read_with_ffmpeg(path: Path, max_seconds: float) -> Audio:
    probe = _run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                  "stream=codec_name,sample_rate,channels:format=duration", "-of", "json", str(path)], path)
    if probe.returncode != 0:
        raise AudioUnreadable(f"it is not an audio file ffmpeg can read: damaged, or the wrong extension "
                              f"({_ffmpeg_reason(probe.stderr, path)})")
    try:
        found = json.loads(probe.stdout or b"{}")
    except json.JSONDecodeError:
        found = {}
    streams = found.get("streams") or []
    if not streams:
        raise AudioUnreadable("it has no audio track")
    stream = streams[0]
    codec = stream.get("codec_name")
    if not codec:
        raise AudioUnreadable("its audio codec is unknown to ffmpeg; convert it to WAV or FLAC")
    # The same conversion as whisper.load_audio, plus: first audio track only, and stop early.
    decode = _run(["ffmpeg", "-nostdin", "-v", "error", "-threads", "0", "-i", str(path), "-map", "0:a:0",
                   "-t", f"{max_seconds:.3f}", "-f", "s16le", "-ac", "1", "-acodec", "pcm_s16le",
                   "-ar", str(SAMPLE_RATE), "-"], path)
    if decode.returncode != 0:
        raise AudioUnreadable(f"ffmpeg could not decode its {codec} audio ({_ffmpeg_reason(decode.stderr, path)})")
    samples = np.frombuffer(decode.stdout, np.int16).astype(np.float32) / 32768.0
    try:
        seconds = float(found.get("format", {}).get("duration"))
    except (TypeError, ValueError):
        seconds = 0.0
    # The container's duration may be missing or rounded: trust the samples unless reading stopped early.
    if len(samples) < max_seconds * SAMPLE_RATE - 1 or seconds < len(samples) / SAMPLE_RATE:
        seconds = len(samples) / SAMPLE_RATE
    return Audio(samples, seconds, int(stream.get("sample_rate") or 0), int(stream.get("channels") or 0), codec)


def loudest_dbfs(samples: np.ndarray, window: int = SAMPLE_RATE // 40) -> float:
    """Level of the loudest 25 ms stretch, in dB below full scale."""
    if len(samples) == 0:
        return -np.inf
    usable = len(samples) // window * window
    frames = samples[:usable].reshape(-1, window) if usable else samples[None, :]
    rms = float(np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)).max())
    return 20 * np.log10(rms) if rms > 0 else -np.inf


def is_silent(samples: np.ndarray) -> bool:
    return loudest_dbfs(samples) < SILENCE_DBFS


def split_points(samples: np.ndarray, window_seconds: float = WINDOW_SECONDS) -> list[tuple[int, int]]:
    """Cut a long recording into pieces of at most `window_seconds`, each cut at the quietest 100 ms of
    the last third of the window, so cuts fall between words where the audio allows."""
    limit = int(window_seconds * SAMPLE_RATE)
    hop = SAMPLE_RATE // 10
    pieces, start = [], 0
    while len(samples) - start > limit:
        lo, hi = start + limit * 2 // 3, start + limit
        region = samples[lo:hi]
        energy = (region[:len(region) // hop * hop].reshape(-1, hop) ** 2).mean(axis=1)
        cut = lo + int(np.argmin(energy)) * hop + hop // 2
        pieces.append((start, cut))
        start = cut
    pieces.append((start, len(samples)))
    return pieces


def divide_words(text: str, lengths: list[int]) -> list[str]:
    """Share a transcript's words between pieces in proportion to their lengths."""
    words = text.split()
    total = sum(lengths)
    parts, done, used = [], 0, 0
    for i, length in enumerate(lengths):
        done += length
        end = len(words) if i == len(lengths) - 1 else round(len(words) * done / total)
        parts.append(" ".join(words[used:end]))
        used = end
    return parts
