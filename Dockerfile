# dist_bot on NVIDIA's PyTorch container, which already ships a CUDA build of torch, NCCL and DALI.
# We keep the container's torch, torchvision and DALI (replacing them with PyPI wheels would lose NVIDIA's
# tuned builds) and add dist_bot with the rest of its extras.
#
#   docker build -t dist_bot .
#   (running it under Slurm with pyxis/enroot or apptainer is documented with the launchers, issue 6)
#
# Not built in CI (no Docker engine there): check changes by reading, and against the container's
# release notes for its torch version.
ARG BASE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE}

WORKDIR /opt/dist_bot
COPY pyproject.toml README.md ./
COPY dist_bot ./dist_bot
COPY launch ./launch
COPY configs ./configs
COPY slurm ./slurm

# --no-deps: dist_bot itself without replacing the container's torch/torchvision/DALI;
# then the pure-Python dependencies at the versions of requirements.lock.
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir "pyyaml==6.0.4" "deepspeed==0.19.8" "wandb==0.31.0" "submitit==1.5.4"

ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["dist-bot"]
CMD ["models"]
