#!/usr/bin/env bash
# The one set-up behind `make run` and `make test`: system packages, the .venv, Python packages.
# Safe to re-run: it only installs what is missing, and skips pip when nothing it depends on changed.
#
#   WITH_BROWSER=1   also install Chromium for the browser tests and sox for the speech tests (make test sets it)
#   TORCH_SPEC       which torch to install (default torch==2.13.0; on a GPU machine that is the CUDA build)
#   TORCH_INDEX      a package index for torch, e.g. https://download.pytorch.org/whl/cpu for a small CPU-only
#                    install on a laptop, or https://download.pytorch.org/whl/cu128 for a specific CUDA version
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv

# ---- system packages: ffmpeg (audio decoding), espeak-ng (speech samples), chromium and sox (tests)
missing=()
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
if [ "${WITH_BROWSER:-0}" = 1 ]; then
  command -v chromium >/dev/null || missing+=(chromium chromium-driver)
  command -v sox >/dev/null || missing+=(sox)  # the speech tests make odd audio files (8-bit, 48 kHz stereo) with it
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo"; else sudo="none"; fi
  if [ "$sudo" = none ] || ! command -v apt-get >/dev/null; then
    echo "setup: please install these system packages: ${missing[*]}" >&2
  else
    echo "setup: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

# ---- the virtual environment
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi

stamp="$VENV/.setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

pip=("$VENV/bin/python" -m pip install -q)
# torch first, on its own: a plain `torch` requirement would pull a multi-GB CUDA build even on a CPU
# machine that has the CPU wheel at hand. torch==2.13.0 takes the CPU wheel where one lies in pip's
# find-links (as on the CI machines) and PyPI's CUDA build on a GPU machine.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
  "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
echo "setup: installing the studio and its dependencies"
"${pip[@]}" -e ".[test,deepspeed]"
# openai-whisper without its triton dependency (only its CUDA timing kernels use triton, and CUDA
# builds of torch bring triton themselves).
"${pip[@]}" --no-deps "openai-whisper==20250625"
echo "$want" > "$stamp"
