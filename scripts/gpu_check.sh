#!/usr/bin/env bash
# Does dist_bot train at GPU speed on this host? A check for any CUDA host, in at most 8 minutes:
#   1. the tests marked `gpu` (tests/system/test_gpu.py: init_distributed with NCCL and the Trainer under DDP on CUDA,
#      fp16 loss scaling with fused SGD, checkpoint round trips under DDP, FSDP2 and ZeRO-1 fp16, a resume of
#      a checkpoint whose RNG came from more GPUs, the step free of host-device syncs under CUDA's sync debug
#      mode, a run compiled with CUDA graphs (reduce-overhead) evaluated, checkpointed and resumed, DALI "mixed"
#      decoding);
#   2. ~2,000 fake JPEGs with ImageNet's spread of sizes (most 300-500 px a side, a tail to 2,500 px, a few
#      grayscale and CMYK), dropped from the page cache once written;
#   3. `dist-bot bench train` for resnet50d, 224 px, batch 256, channels_last: bf16 and fp16, eager and
#      compiled, dist_bot's step against a bare PyTorch loop (and timm's resnet50d), in a plain process and
#      under torchrun (DDP, NCCL); every loader-fed case (DALI "mixed" for bf16, the DataLoader for fp16) in a
#      run of its own, eager and compiled, warmed up over twice the loader's prefetch depth, with its data_s;
#      `dist-bot bench data`: the loaders alone (DALI with the hardware decoder off, at its default share, at
#      0.9; the DataLoader);
#   4. OUT/gpu_check.json: every part's result, or why it was not measured; each bench record names its
#      launcher, strategy, compile_mode and loader; the pass marks (bf16 eager >= 3,000 img/s, best >= 3,600,
#      dist_bot / bare loop >= 0.97, DALI-fed / synthetic >= 0.95 eager and compiled).
#
#   bash scripts/gpu_check.sh [--rehearse] [OUT]     # OUT defaults to ./gpu_check
#
# --rehearse runs the very same matrix on a CPU with a tiny model and images (CI does, so nothing a CPU could
# catch is left for the GPU). The summary is written on exit whatever happened (an EXIT trap), so a killed or
# timed-out check still says what it measured. It uses the host's Python and torch (>= 2.4, PYTHON=...),
# installs dist_bot without dependencies if it does not import, and installs wheels found in .whl/ (for
# hosts without a network: e.g. DALI carried there). GPU_CHECK_DEADLINE_S overrides the 480 s deadline.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODE=gpu
[[ "${1:-}" == "--rehearse" ]] && { MODE=rehearse; shift; }
OUT=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
START=$SECONDS
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-480}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
# one compile cache for every run: a run compiling what an earlier one compiled reads it from there
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor_cache}

finish() {
    # The summary from whatever parts finished; if even Python cannot run it, a minimal JSON saying why.
    timeout 30 "$PY" scripts/gpu_check.py summarize "$OUT" "$MODE" "$((SECONDS - START))" ||
        printf '{"mode": "%s", "passed": false, "error": "no summary: %s could not run scripts/gpu_check.py"}\n' \
            "$MODE" "$PY" > "$OUT/gpu_check.json"
    echo "summary: $OUT/gpu_check.json"
}
trap finish EXIT

source scripts/gpu_host.sh
prepare_host /tmp/gpu_check_site || exit 1
"$PY" scripts/gpu_check.py run "$OUT" "$MODE" "$((DEADLINE_S - (SECONDS - START)))"
