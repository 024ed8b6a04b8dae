#!/bin/bash
# Multi-node: the same recipe as resnet50d_bs1024.sh on 4 nodes x 8 GPUs = 32 processes, 32 images per GPU
# (the global batch stays 1024, so the lr and the results are those of one node, in about a quarter of the
# time). Every variable and flag of resnet50d_bs1024.sh works here too:
#
#   DATA=/datasets/imagenet sbatch --partition=gpu slurm/resnet50d_bs1024_4nodes.sh
#
# The first node hosts the rendezvous (MASTER_ADDR); NCCL picks the network itself (set NCCL_SOCKET_IFNAME or
# NCCL_IB_HCA in the environment when a cluster needs them). Data is sharded by global rank.
#SBATCH --job-name=resnet50d_bs1024_4nodes
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=1-00:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

source "${DIST_BOT_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib/train_job.sh"
dist_bot_train "${CONFIG:-configs/resnet50d_bs1024.yaml}" "$@"
