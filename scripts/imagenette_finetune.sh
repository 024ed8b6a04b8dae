#!/usr/bin/env bash
# Fine-tuning measured on Imagenette (configs/imagenette/finetune/): two 5-class folders of symlinks into
# ../shared/data/imagenette, a pretraining run on the first, then the second trained from its weights, from
# scratch and as a linear probe, each with 2 processes. Runs go to runs/finetune/; an existing run is resumed.
#
#   bash scripts/imagenette_finetune.sh [key=value ...]     # overrides for every run, e.g. wandb.mode=offline
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
src=$(cd ../shared/data/imagenette && pwd)
classes=($(ls "$src/train"))
for split in train val; do
    for i in "${!classes[@]}"; do
        half=$([[ $i -lt 5 ]] && echo first5 || echo second5)
        mkdir -p "runs/finetune/data/$half/$split"
        ln -sfn "$src/$split/${classes[$i]}" "runs/finetune/data/$half/$split/${classes[$i]}"
    done
done
for run in pretrain finetune scratch linear_probe; do
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=2 -m dist_bot train \
        "configs/imagenette/finetune/$run.yaml" "$@"
done
.venv/bin/dist-bot report runs/finetune/{finetune,scratch,linear_probe} --out runs/finetune/report.png
