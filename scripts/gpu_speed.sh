#!/usr/bin/env bash
# Which setting trains ResNet-50-D fastest on this GPU, and does DALI feed it at that speed? A sweep for any CUDA
# host, in at most 5 minutes (GPU_SPEED_DEADLINE_S overrides 300 s): dist_bot's own training step (`dist-bot bench
# train`, synthetic data, 224 px, channels_last) at per-GPU batch 256 / 384 / 512, eager and under torch.compile's
# modes (default, reduce-overhead: CUDA graphs, max-autotune-no-cudagraphs), bf16 and fp16, in a plain process and
# under torchrun (DDP); the eager case against the bare PyTorch loop and timm's resnet50d; then DALI "mixed" on
# ~2,000 JPEGs of ImageNet's spread of sizes with the hardware decoder off, at DALI's share and at 0.9, and the
# compiled step fed by DALI in a run of its own. Most informative first: the deadline cuts the least.
#
#   bash scripts/gpu_speed.sh [--rehearse] [OUT]     # OUT defaults to ./gpu_speed
#
# Writes OUT/gpu_speed.json (a record per case: img/s, step ms, peak GPU memory, warm-up seconds with the
# compilation in them; the fastest case and its mark: 7,500 img/s on an H200, 7,500 / 1.11 on an H100) and a table on
# stdout, on exit whatever happened (an EXIT trap). --rehearse runs the same matrix on a CPU with a tiny model (CI
# does). Like gpu_check.sh it uses the host's Python and torch (PYTHON=...) and installs wheels found in .whl/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODE=gpu
[[ "${1:-}" == "--rehearse" ]] && { MODE=rehearse; shift; }
OUT=${1:-${OUT:-gpu_speed}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
START=$SECONDS
DEADLINE_S=${GPU_SPEED_DEADLINE_S:-300}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor_cache}

finish() {
    timeout 30 "$PY" scripts/gpu_speed.py summarize "$OUT" "$MODE" "$((SECONDS - START))" ||
        printf '{"mode": "%s", "passed": false, "error": "no summary: %s could not run scripts/gpu_speed.py"}\n' \
            "$MODE" "$PY" > "$OUT/gpu_speed.json"
    echo "summary: $OUT/gpu_speed.json"
}
trap finish EXIT

source scripts/gpu_host.sh
prepare_host /tmp/gpu_speed_site || exit 1
"$PY" scripts/gpu_speed.py run "$OUT" "$MODE" "$((DEADLINE_S - (SECONDS - START)))"
