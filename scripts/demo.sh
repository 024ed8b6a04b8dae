#!/usr/bin/env bash
# The demo: set up, write the bundled handwritten digits as JPEG folders (once), and train a ResNet-18-D on
# them with the paper's recipe, 2 processes on CPU (or GPUs), a few minutes. Extra key=value args override
# configs/demo.yaml. Each call is a new run folder under runs/.
#
#   bash scripts/demo.sh [key=value ...]      # e.g. schedule.epochs=4 precision=fp32
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
[[ -d data/digits/train ]] || .venv/bin/dist-bot data digits data/digits
exec .venv/bin/torchrun --standalone --nproc_per_node="${NPROC:-2}" -m dist_bot train configs/demo.yaml \
    data.path=data/digits run.name="demo-$(date +%Y%m%d-%H%M%S)" "$@"
