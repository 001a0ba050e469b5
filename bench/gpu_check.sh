#!/usr/bin/env bash
# One GPU check of the language model's attention tests, the three training benchmarks (studio vs plain
# recipe, --quick, --device cuda) and the fp16 path, sized to finish in about 9.5 minutes on one H100/H200 of
# the device machine, run from the repository root:
#
#     bash bench/gpu_check.sh          (carry: [".whl"])
#
# .whl/ (ignored by git) holds what the device's python3 lacks: diffusers, peft, openai-whisper,
# more-itertools, jiwer, rapidfuzz, soundfile, cffi, pycparser as wheels, and ffmpeg-4.2.2-static.xz (a
# static ffmpeg from the imageio-ffmpeg 0.5.1 wheel: the speech baseline decodes with whisper.load_audio).
# Each benchmark's output goes to $OUT/<name>.log, their RESULT lines to $OUT/summary.txt.
#
# For a dry run elsewhere: PY=<python with torch> BENCH_DEVICE=cpu SKIP_WHEELS=1 SITE=<folder with the
# wheels installed> OUT=<folder> bash bench/gpu_check.sh

cd "$(dirname "$0")/.." || exit 1
PY=${PY:-python3}
DEVICE=${BENCH_DEVICE:-cuda}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
T0=$SECONDS

if [ -z "$SKIP_WHEELS" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH="$SITE:$PWD"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 STUDIO_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
WORK=$(mktemp -d /tmp/gpu-check-XXXXXX)
export STUDIO_HOME="$WORK/studio" HF_HOME="$WORK/hf" XDG_CACHE_HOME="$WORK/cache" MPLCONFIGDIR="$WORK/mpl"

# whisper.load_audio runs `ffmpeg`, once per clip per step in the speech baseline: the carried static build,
# so every run here uses the same one (it starts in ~7 ms where a distribution's dynamically linked ffmpeg
# took ~70 ms: the faster one is the stronger baseline). USE_SYSTEM_FFMPEG=1 keeps the machine's own.
if { [ -z "$USE_SYSTEM_FFMPEG" ] || ! command -v ffmpeg >/dev/null 2>&1; } && [ -f .whl/ffmpeg-4.2.2-static.xz ]; then
    mkdir -p "$WORK/bin"
    "$PY" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
        .whl/ffmpeg-4.2.2-static.xz "$WORK/bin/ffmpeg" && chmod +x "$WORK/bin/ffmpeg"
    export PATH="$WORK/bin:$PATH"
fi

# openai-whisper imports numba at import time (only its word-timestamp DTW uses it). If the machine's numba
# does not import (e.g. a numpy it does not support), a stub lets whisper load; nothing here calls the DTW.
if ! "$PY" -c "import numba" >/dev/null 2>&1; then
    echo "NOTE: numba does not import here; using a stub numba for openai-whisper" | tee -a "$OUT/env.log"
    mkdir -p "$WORK/stub/numba"
    printf 'def jit(*a, **k):\n    return a[0] if a and callable(a[0]) else (lambda f: f)\n' > "$WORK/stub/numba/__init__.py"
    export PYTHONPATH="$PYTHONPATH:$WORK/stub"
fi

{
    echo "== $(date -u)  $(uname -srm)  $(nproc) CPUs  device=$DEVICE"
    command -v nvidia-smi >/dev/null && nvidia-smi
    echo "== ffmpeg: $(command -v ffmpeg) $(ffmpeg -version 2>/dev/null | head -1)"
    timeout 90 "$PY" - <<'EOF'
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "accelerate", "peft", "diffusers", "openai-whisper", "huggingface_hub",
             "safetensors", "tokenizers", "numpy", "numba", "soundfile", "jiwer", "rapidfuzz", "tiktoken"):
    try:
        print(f"  {name:16} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name:16} MISSING")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
      "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "")
for module in ("peft", "diffusers", "whisper", "jiwer", "soundfile",
               "pipelines.llm.pipeline", "pipelines.image.pipeline", "pipelines.speech.pipeline"):
    try:
        m = importlib.import_module(module)
        print(f"  import {module:28} ok  {getattr(m, '__file__', '')}")
    except Exception as err:
        print(f"  import {module:28} FAILED {type(err).__name__}: {err}")
EOF
    echo "== setup took $((SECONDS - T0)) s"
} 2>&1 | tee -a "$OUT/env.log"

set -o pipefail
: > "$OUT/summary.txt"
run() {  # name, time limit (s), command...
    local name=$1 limit=$2 started=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    rc=$?
    local line
    line=$(grep '^RESULT' "$OUT/$name.log" | tail -1)
    echo "$name rc=$rc $((SECONDS - started))s ${line:-no RESULT$([ $rc = 124 ] && echo ' (timed out)')}" \
        | tee -a "$OUT/summary.txt"
}

ONLY=${ONLY:-attention llm image speech fp16}  # e.g. ONLY="llm image" to rerun some
for name in $ONLY; do
    case $name in
        # The language model's attention tests, with the one on the GPU: torch's variable-length flash kernel
        # against the model's own masked attention (bench/llm.py's studio runs take that kernel). No conftest:
        # it wants the browser tests' playwright, which this machine lacks.
        attention) run attention 120 "$PY" -m pytest --noconftest -q -p no:cacheprovider tests/test_llm_attention.py ;;
        llm) run llm 230 "$PY" bench/llm.py --quick --device "$DEVICE" ;;
        # Not by default (about 4 more minutes): the studio with its torch_compile setting; read its figure
        # after step 1, which holds the compile. Eager launches one kernel per operation, and at this size
        # the CPU's launching bounds a step (bench/llm_kernel_count.py).
        llm-compile) run llm-compile 300 "$PY" bench/llm.py --quick --device "$DEVICE" --compile ;;
        image) run image 110 "$PY" bench/image.py --quick --device "$DEVICE" ;;
        speech) run speech 110 "$PY" bench/speech.py --quick --device "$DEVICE" ;;
        # The fp16 path of GPUs without bf16 (T4, V100), forced on this one: the image sample run in fp16
        # (loss scaled) and bf16, same seed; the two final losses should be close, and the log shows the scale.
        fp16) run fp16 90 "$PY" - "$DEVICE" <<'PYEOF'
import sys, tempfile
from pathlib import Path
from pipelines import load_config
from pipelines.image.pipeline import train
from pipelines.training import Events, read_events
final = {}
for precision in ("fp16", "bf16"):
    config = load_config("assets/image/config.yaml").changed(mixed_precision=precision, device=sys.argv[1],
                                                             max_steps=100, sample_every=0)
    run_dir = Path(tempfile.mkdtemp())
    print(precision, train(config, run_dir, Events(run_dir), lambda: False))
    steps = [e for e in read_events(run_dir)[0] if e["type"] == "step"]
    final[precision] = sum(e["loss"] for e in steps[-25:]) / 25
print(f"RESULT fp16_loss={final['fp16']:.4f} bf16_loss={final['bf16']:.4f}")
PYEOF
        ;;
    esac
done

echo "== total $((SECONDS - T0)) s" | tee -a "$OUT/summary.txt"
rm -rf "$WORK"
