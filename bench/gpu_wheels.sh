#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with what bench/gpu_check.sh installs on the device machine, whose python3
# (3.12, x86-64, with torch, transformers and accelerate of its own) lacks them: the versions this .venv has,
# as wheels for that machine, and a static ffmpeg. Run here, from the repository root, before the check:
#
#     bash bench/gpu_wheels.sh        then run `bash bench/gpu_check.sh` there with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux1_x86_64)
for name in diffusers peft more-itertools jiwer rapidfuzz soundfile cffi pycparser; do
    "$PY" -m pip download -q --no-deps "${target[@]}" -d .whl "$name==$(version "$name")"
done
# openai-whisper is published as source only; its wheel (pure Python) is built here.
"$PY" -m pip wheel -q --no-deps -w .whl "openai-whisper==$(version openai-whisper)"

# The speech baseline runs `ffmpeg` once per clip per step: a static build (from imageio-ffmpeg's wheel)
# starts in ~7 ms, where a distribution's dynamically linked one took ~70 ms.
if [ ! -f .whl/ffmpeg-4.2.2-static.xz ]; then
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 -d "$tmp" imageio-ffmpeg==0.5.1
    "$PY" - "$tmp"/imageio_ffmpeg-*.whl .whl/ffmpeg-4.2.2-static.xz <<'EOF'
import lzma, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, lzma.open(sys.argv[2], "wb") as out:
    out.write(wheel.read("imageio_ffmpeg/binaries/ffmpeg-linux64-v4.2.2"))
EOF
    rm -rf "$tmp"
fi
ls -l .whl
