#!/usr/bin/env bash
# The sbatch script: one task per device through srun, preemptible, requeued into the same run.
#   make slurm RECIPE=<name> NODES=<n> GPUS=<g> [PARTITION=.. ACCOUNT=.. QOS=.. TIME=.. CPUS=.. MEM=..] ARGS="key=value ..."
#   make sweep RECIPE=<name> SWEEP=<file.yaml> SLURM=1 [...]         (an array job, one task per sweep point)
# or directly:
#   sbatch --nodes=1 --gres=gpu:4 --ntasks-per-node=4 --cpus-per-task=8 launch.sh <recipe> [key=value ...]
#SBATCH --job-name=lm-recipes
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --time=04:00:00
# --signal=SIGUSR1@120 (not B:USR1) sends the signal to the srun tasks, i.e. the training processes, which write
# a checkpoint at the next step boundary and requeue the job; B: would signal only this batch shell. SIGTERM
# (preemption, scancel, the time limit without an earlier signal) is handled the same way.
# The job's own output (sbatch --output, default slurm-<job>.out in the submit directory) gets only a pointer:
# everything else is appended to <run dir>/slurm.log, across every requeued segment.
set -euo pipefail
RECIPE=${1:?usage: launch.sh <recipe> [key=value ...]}
shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
PY=${PY:-.venv/bin/python}
NODES=${SLURM_JOB_NUM_NODES:-1}
# Lightning checks ntasks-per-node == devices: derive devices from the allocation so they agree.
DEVICES=${SLURM_NTASKS_PER_NODE:-1}
# One run per job, and per array task: a requeued job keeps its id, so it finds its run again.
JOB=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:?launch.sh runs under sbatch}}
RUN_ID="slurm-${JOB}${SLURM_ARRAY_TASK_ID:+-${SLURM_ARRAY_TASK_ID}}"
RUN_ROOT=${RUN_ROOT:-runs}  # where run directories live (run.root); every segment must agree on it
RUN_DIR="${RUN_ROOT}/${RECIPE}/${RUN_ID}"
mkdir -p "$RUN_DIR"
echo "[launch.sh] job ${SLURM_JOB_ID} on $(hostname): log in ${RUN_DIR}/slurm.log"
exec >> "${RUN_DIR}/slurm.log" 2>&1

# Threads per process = CPUs per task (without --cpus-per-task, one); a faulthandler traceback on a hang or a
# crash; NCCL errors raised instead of hanging; W&B offline on compute nodes unless the user chose a mode.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONFAULTHANDLER=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export WANDB_MODE=${WANDB_MODE:-offline}
export TOKENIZERS_PARALLELISM=false

COMMON=("trainer.num_nodes=${NODES}" "trainer.devices=${DEVICES}")
if [ -n "${SWEEP_FILE:-}" ]; then  # an array task of `make sweep ... SLURM=1`: its point of the sweep
  echo "[launch.sh] $(date -Is) sweep ${SWEEP_FILE} point ${SLURM_ARRAY_TASK_ID} (segment ${SLURM_RESTART_COUNT:-0})"
  exec srun --kill-on-bad-exit=1 "$PY" -m recipes sweep "$RECIPE" "$SWEEP_FILE" --index "${SLURM_ARRAY_TASK_ID:?}" \
    "run.root=${RUN_ROOT}" "${COMMON[@]}" "$@"
elif [ -f "${RUN_DIR}/config.yaml" ]; then
  echo "[launch.sh] $(date -Is) requeued segment ${SLURM_RESTART_COUNT:-0}: resuming ${RUN_DIR}"
  exec srun --kill-on-bad-exit=1 "$PY" -m recipes resume "$RUN_DIR" "$@"
else
  echo "[launch.sh] $(date -Is) new run ${RUN_DIR}"
  exec srun --kill-on-bad-exit=1 "$PY" -m recipes train "$RECIPE" "run.run_id=${RUN_ID}" "run.root=${RUN_ROOT}" \
    "${COMMON[@]}" "$@"
fi
