"""Regenerate assets/speech/clips/: short spoken clips made with espeak-ng and their metadata.csv.

    python scripts/make_speech_assets.py

Needs the espeak-ng and sox programs. The clips are 16 kHz mono 16-bit WAV (what Whisper hears), a
second or two each, so the folder stays small enough to commit and trains in seconds on a CPU.
"""

from __future__ import annotations

import csv
import subprocess
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "assets" / "speech" / "clips"

# Distinct words per clip, so a tiny model that memorises them shows a clear drop in word error rate.
SENTENCES = [
    ("cat.wav", "The cat sat on the mat."),
    ("window.wav", "Open the window, please."),
    ("apples.wav", "Seven green apples."),
    ("bridge.wav", "Turn left at the bridge."),
    ("battery.wav", "My phone battery is low."),
    ("meeting.wav", "The meeting starts at noon."),
    ("umbrella.wav", "Bring an umbrella today."),
    ("violin.wav", "She plays the violin."),
]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in SENTENCES:
            raw = Path(tmp) / name
            # espeak-ng writes 22050 Hz; sox resamples to 16 kHz mono 16-bit, without dither (repeatable).
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
            subprocess.run(["sox", "--no-dither", str(raw), "-r", "16000", "-c", "1", "-b", "16",
                            str(OUT / name)], check=True)
    with open(OUT / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "transcription"])
        writer.writerows(SENTENCES)
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"Wrote {len(SENTENCES)} clips and metadata.csv to {OUT} ({total / 1024:.0f} KB).")


if __name__ == "__main__":
    main()
