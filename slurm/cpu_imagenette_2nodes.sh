#!/bin/bash
# The CPU variant that CI runs against its test cluster: Imagenette on 2 nodes x 1 CPU process (gloo),
# preemption-safe exactly like resnet50d_bs1024.sh (same launcher, slurm/lib/train_job.sh).
#
#   sbatch slurm/cpu_imagenette_2nodes.sh
#   DATA=/data/imagenette sbatch --nodes=1 --ntasks-per-node=2 slurm/cpu_imagenette_2nodes.sh schedule.epochs=1
#
# Environment variables as in resnet50d_bs1024.sh; DATA defaults to ../shared/data/imagenette and CONFIG to
# configs/imagenette_cpu.yaml.
#SBATCH --job-name=cpu_imagenette
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=02:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

DIST_BOT_HOME=${DIST_BOT_HOME:-${SLURM_SUBMIT_DIR:-.}}
DATA=${DATA:-$DIST_BOT_HOME/../shared/data/imagenette}
source "$DIST_BOT_HOME/slurm/lib/train_job.sh"
dist_bot_train "${CONFIG:-configs/imagenette_cpu.yaml}" "$@"
