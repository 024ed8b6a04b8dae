# dist_bot on NVIDIA's PyTorch container, which ships a CUDA build of torch and torchvision, NCCL and DALI.
# We keep those (PyPI wheels would replace NVIDIA's tuned builds) and add dist_bot and its other extras at
# the versions of requirements.lock. Choose the container release whose PyTorch is closest to the torch in
# requirements.lock (NVIDIA's framework support matrix lists them); build with --build-arg BASE=....
#
#   docker build -t dist_bot:latest .
#   docker run --gpus all --ipc=host -v /datasets:/datasets dist_bot:latest \
#       torchrun --nproc_per_node=8 -m dist_bot train configs/resnet50d_bs1024.yaml data.path=/datasets/imagenet
#
# Under Slurm (pyxis/enroot or apptainer): README, section "Containers". Not built in CI (no Docker engine
# there): check changes by reading.
ARG BASE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE}

WORKDIR /opt/dist_bot
COPY pyproject.toml README.md requirements.lock ./
COPY dist_bot ./dist_bot
COPY launch ./launch
COPY configs ./configs
COPY slurm ./slurm

# 1. dist_bot itself without dependencies: the container's torch, torchvision, numpy, Pillow and DALI stay.
# 2. The other extras, pinned by requirements.lock minus the torch/CUDA stack (which would replace the
#    container's). DeepSpeed builds against the installed torch, so without build isolation.
RUN pip install --no-cache-dir --no-deps -e . \
 && grep -vE '^(torch|torchvision|triton|nvidia-|numpy|pillow)==' requirements.lock > /tmp/constraints.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt pyyaml wandb submitit \
 && pip install --no-cache-dir --no-build-isolation -c /tmp/constraints.txt deepspeed \
 && rm /tmp/constraints.txt \
 && python -c "import dist_bot.cli, launch.submit, deepspeed, wandb, submitit, nvidia.dali"

ENV PYTHONUNBUFFERED=1
# No ENTRYPOINT: srun --container-image and apptainer exec run their own command (python -m dist_bot ...).
CMD ["dist-bot", "models"]
