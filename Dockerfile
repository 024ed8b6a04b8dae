# dist_bot on NVIDIA's PyTorch container, which ships a CUDA build of torch and torchvision, NCCL and DALI.
# We keep those (PyPI wheels would replace NVIDIA's tuned builds) and add dist_bot and its other extras at
# the versions of requirements.lock. Any release whose PyTorch is 2.7 or newer works (pyproject.toml's range);
# CI tests the torch of requirements.lock, so the closest release is the safest (NVIDIA's framework support
# matrix lists them); build with --build-arg BASE=....
#
#   docker build -t dist_bot:latest .
#   docker run --gpus all --ipc=host -v /datasets:/datasets dist_bot:latest \
#       torchrun --nproc_per_node=8 -m dist_bot train configs/resnet50d_bs1024.yaml data.path=/datasets/imagenet
#
# Under Slurm (pyxis/enroot or apptainer): docs/cluster.md, section "Containers". Not built in CI (no Docker engine
# there): check changes by reading.
ARG BASE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE}

WORKDIR /opt/dist_bot
COPY pyproject.toml README.md requirements.lock ./
COPY dist_bot ./dist_bot
COPY launch ./launch
COPY configs ./configs
COPY slurm ./slurm

# dist_bot WITH its dependencies, without replacing the container's own builds: keep.txt pins torch, torchvision,
# triton, numpy and Pillow to the versions installed here (NVIDIA's, e.g. torch==2.9.0a0+...), so pip satisfies
# dist_bot's ranges (torch>=2.7) with them; lock.txt holds requirements.lock's pins for the packages the container
# lacks (those it has stay, unless a new package needs another version: pip's resolver keeps torch's own needs).
# DALI comes with the container (nvidia-dali-cuda1xx): the `dali` extra is left out. DeepSpeed builds against the
# installed torch, so without build isolation. The diff fails the build if the torch stack changed anyway.
RUN pip list --format=freeze > /tmp/installed.txt \
 && grep -iE '^(torch|torchvision|triton|numpy|pillow)==' /tmp/installed.txt > /tmp/keep.txt \
 && awk -F'==' 'function norm(s) { s = tolower(s); gsub(/[-_.]+/, "-", s); return s } \
        NR == FNR { have[norm($1)]; next } /^[A-Za-z0-9]/ && !(norm($1) in have)' \
        /tmp/installed.txt requirements.lock > /tmp/lock.txt \
 && pip install --no-cache-dir -c /tmp/keep.txt -c /tmp/lock.txt ".[wandb,slurm,report]" \
 && pip install --no-cache-dir --no-build-isolation -c /tmp/keep.txt -c /tmp/lock.txt ".[deepspeed]" \
 && pip list --format=freeze | grep -iE '^(torch|torchvision|triton|numpy|pillow)==' | diff /tmp/keep.txt - \
 && rm /tmp/installed.txt /tmp/keep.txt /tmp/lock.txt \
 && python -c "import dist_bot.cli, launch.submit, deepspeed, wandb, submitit, nvidia.dali" \
 && dist-bot config resnet50d_bs1024 > /dev/null

ENV PYTHONUNBUFFERED=1
# No ENTRYPOINT: srun --container-image and apptainer exec run their own command (python -m dist_bot ...).
CMD ["dist-bot", "models"]
