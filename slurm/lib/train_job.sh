# Sourced by the sbatch scripts in slurm/: run `dist-bot train` with srun, one task per GPU; pass Slurm's
# time-limit/preemption warning on to every task; requeue the job once the tasks have checkpointed.
#
# One task per GPU, not one torchrun per node: every process is then a Slurm task that Slurm starts,
# signals, binds and accounts for itself, and a task's exit status reaches srun unchanged (torchrun turns
# dist_bot's "checkpointed, requeue me" status 75 into 1). Rank, world size and local rank come from
# SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID (dist_bot/distributed/env.py); the first node is the master.
#
# Environment (all optional): DATA, OUT_DIR, RUN_NAME, MAX_GPU_BATCH, PYTHON, SRUN_ARGS, DIST_BOT_HOME,
# DIST_BOT_COMMAND (doctor: the preflight instead of training); see the sbatch scripts. The requeued job is the same job id, so the default RUN_NAME, and with it the run
# folder, the checkpoint and the W&B run, are the same: the run resumes where it stopped.

set -euo pipefail
DIST_BOT_HOME=${DIST_BOT_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    [[ -x $DIST_BOT_HOME/.venv/bin/python ]] && PYTHON=$DIST_BOT_HOME/.venv/bin/python
fi
REQUEUE_EXIT_CODE=75  # dist_bot.train.REQUEUE_EXIT_CODE

_dist_bot_warned=0
_dist_bot_on_warning() {
    # B:USR1 reached this shell only; tell the tasks (scancel signals job steps, not this batch shell).
    _dist_bot_warned=1
    echo "dist_bot: $(date +%T) got the time-limit/preemption warning: every task checkpoints, then requeue"
    scancel --signal=USR1 "$SLURM_JOB_ID" || true
}

dist_bot_train() {  # CONFIG [key=value ...]
    local config=$1
    shift
    local job=$SLURM_JOB_ID
    [[ -n ${SLURM_ARRAY_JOB_ID:-} ]] && job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    # DIST_BOT_COMMAND=doctor: the preflight on the very nodes, tasks and CPUs of this job, into the run folder
    local args=("${DIST_BOT_COMMAND:-train}" "$config" "run.name=${RUN_NAME:-${SLURM_JOB_NAME}-${job}}")
    [[ -n ${DATA:-} ]] && args+=("data.path=$DATA")
    [[ -n ${OUT_DIR:-} ]] && args+=("run.out_dir=$OUT_DIR")
    [[ -n ${MAX_GPU_BATCH:-} ]] && args+=("data.max_batch_size=$MAX_GPU_BATCH")
    args+=("$@")

    if [[ -n ${SLURM_GPUS_ON_NODE:-} && -n ${SLURM_NTASKS_PER_NODE:-} && $SLURM_GPUS_ON_NODE != "$SLURM_NTASKS_PER_NODE" ]]; then
        echo "dist_bot: $SLURM_NTASKS_PER_NODE tasks per node but $SLURM_GPUS_ON_NODE GPUs: one task per GPU," \
             "give sbatch --gpus-per-node=G --ntasks-per-node=G together" >&2
        exit 2
    fi
    cd "$DIST_BOT_HOME"
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    # Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task: without this, a cluster binding tasks to
    # CPUs gives each task ONE core (and dist_bot one DALI thread, one worker). SRUN_CPUS_PER_TASK is srun's own
    # variable for it; each task logs the CPUs it got ("start-up: ... cpus=N affinity=..."), and sets its
    # threads (OMP_NUM_THREADS, unless set) and data workers from them.
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
    echo "dist_bot: $(date +%T) job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS tasks on" \
         "$SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"
    echo "dist_bot: $PYTHON -m dist_bot ${args[*]}"

    trap _dist_bot_on_warning USR1
    # In the background, so that the trap runs as soon as the signal comes (bash defers traps during a
    # foreground command); `wait` returns early on a trap, so wait again until srun has really ended.
    # --wait=120: once one task has ended, the others get 2 minutes to end too (after a checkpoint they all
    # exit 75 within seconds; a finished run's ranks end together, after rank 0's final export and W&B upload;
    # after a crash or a hang the others end within seconds, see FailureWatch; one that cannot, e.g. stopped,
    # is ended by srun).
    # Not --kill-on-bad-exit: it would kill the other ranks as soon as the first exits 75.
    # shellcheck disable=SC2086  # SRUN_ARGS is a list of flags; PYTHON may be a command ("apptainer exec ... python")
    srun --kill-on-bad-exit=0 --wait="${SRUN_WAIT:-120}" ${SRUN_ARGS:-} $PYTHON -u -m dist_bot "${args[@]}" &
    local pid=$! rc=0
    while :; do
        rc=0
        wait "$pid" || rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1

    if [[ $rc == "$REQUEUE_EXIT_CODE" && $_dist_bot_warned == 1 ]]; then
        echo "dist_bot: $(date +%T) checkpoint written; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    elif [[ $rc == "$REQUEUE_EXIT_CODE" ]]; then
        echo "dist_bot: stopped with a checkpoint (SIGTERM or run.stop_after_steps); not requeued by this script:" \
             "Slurm requeues a preempted job itself, or submit the same command again to resume"
    elif [[ $rc == 3 ]]; then  # dist_bot.distributed.watchdog.HANG_EXIT_CODE from every task (one that srun had
        # to end, e.g. stopped, shows as 137 instead); a hang is never requeued, so it does not hang again and again
        echo "dist_bot: a hang: nothing completed for dist.hang_timeout_min; every task's stacks are in the run" \
             "folder's hang/ (see docs/cluster.md, 'Before a long cluster run'); not requeued"
    fi
    exit "$rc"
}
