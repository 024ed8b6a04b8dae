#!/bin/bash
# The paper's efficient recipe: ResNet-50-D, global batch 1024, fp16, 200 epochs with every refinement but
# distillation (configs/resnet50d_bs1024.yaml). One node with 8 GPUs by default; run from the repository root:
#
#   DATA=/datasets/imagenet sbatch slurm/resnet50d_bs1024.sh
#   DATA=/datasets/imagenet sbatch --nodes=4 --partition=gpu --account=vision --time=1-00:00:00 \
#       slurm/resnet50d_bs1024.sh schedule.epochs=120 wandb.project=resnet
#
# sbatch flags override the #SBATCH lines below: --nodes, --partition, --account, --time, --qos, and
# --gpus-per-node=G together with --ntasks-per-node=G (one task per GPU). Arguments after the script are
# config overrides (key=value). Environment variables:
#   DATA            data.path: train/ and val/ class folders or their pack (dist-bot data pack); unless in the config
#   CONFIG          recipe (default configs/resnet50d_bs1024.yaml)
#   RUN_NAME        run folder under OUT_DIR (default: job name-job id, which a requeue keeps: it resumes)
#   OUT_DIR         runs folder (run.out_dir; default runs/)
#   MAX_GPU_BATCH   most images per GPU per micro-batch (data.max_batch_size; the recipe says 128)
#   PYTHON          a python with dist_bot installed (default .venv/bin/python, else python3)
#   DIST_BOT_COMMAND  doctor: `dist-bot doctor`, the preflight, on this job's nodes and tasks (run it first)
#   SRUN_ARGS       more srun flags, e.g. a container: "--container-image=./dist_bot.sqsh --container-mounts=/datasets"
#   WANDB_API_KEY, WANDB_PROJECT, WANDB_MODE, ...  read by W&B itself (no key: offline runs)
#
# The GLOBAL batch stays 1024 on any number of GPUs: 1024 / GPUs images per GPU, with gradient accumulation
# when that exceeds MAX_GPU_BATCH (1 node x 4 GPUs: 2 micro-batches of 128), and the lr stays 0.4.
# Time limits and preemption: Slurm sends this script SIGUSR1 5 minutes ahead (--signal=B:USR1@300); every
# task finishes its step, they write one checkpoint together and exit 75; the script requeues the job, and
# the requeued job resumes the same run: same step, schedule position and W&B run.
#SBATCH --job-name=resnet50d_bs1024
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=2-00:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

source "${DIST_BOT_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib/train_job.sh"
dist_bot_train "${CONFIG:-configs/resnet50d_bs1024.yaml}" "$@"
