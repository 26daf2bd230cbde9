#!/usr/bin/env bash
# Multi-node NVIDIA GPU runs of a starling_jax entry point under SLURM.
#
#   launch/slurm.sh [FLAGS] CONFIG [key=value ...]     outside an allocation: submits itself with sbatch
#   sbatch [SBATCH OPTIONS] launch/slurm.sh CONFIG ...  the same, submitted directly (defaults: the #SBATCH lines)
#
# Inside the allocation, `srun` starts one process per node (default; it drives all the node's GPUs) or one per GPU
# (--per-gpu); each joins the run with jax.distributed.initialize from SLURM's environment
# (STARLING_JAX_DISTRIBUTED=slurm: coordinator = first node of the step, SLURM_NTASKS processes, SLURM_PROCID).
# The recommended XLA GPU flags are XLA_GPU_FLAGS below (the one place they live); XLA_FLAGS from the caller's
# environment are appended. SLURM's time-limit notice (--signal=TERM@120) is a SIGTERM: the run saves a checkpoint
# and exits; submitting the same command again resumes it from output_dir.
#
# Flags (or environment variables):
#   --nodes N           STARLING_SLURM_NODES          nodes (default 1)
#   --gpus-per-node G   STARLING_SLURM_GPUS_PER_NODE  GPUs per node (default 8)
#   --per-gpu           STARLING_SLURM_PER_GPU=1      one process per GPU instead of one per node
#   --partition P       STARLING_SLURM_PARTITION
#   --account A         STARLING_SLURM_ACCOUNT
#   --time T            STARLING_SLURM_TIME           wall-clock limit, e.g. 24:00:00
#   --job JOB           STARLING_SLURM_JOB            entry point module under starling_jax (default train_rm)
#   --venv DIR          STARLING_SLURM_VENV           virtualenv with `pip install -e ".[gpu]"` (default: .venv)
#   --dry-run           DRY_RUN=1                     print the sbatch and srun commands, run nothing
#
# Example: launch/slurm.sh --nodes 2 --partition gpu configs/rm_mistral7b_nectar.yaml output_dir=/shared/runs/rm
#
#SBATCH --job-name=starling_jax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=TERM@120
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

PROG=slurm.sh
die() { echo "$PROG: $*" >&2; exit 2; }

# Recommended XLA flags for multi-GPU training (JAX's GPU performance tips): overlap collectives with compute,
# combine small collectives, pipeline FSDP's all-gathers / reduce-scatters across the scanned layers.
XLA_GPU_FLAGS=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_highest_priority_async_stream=true
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
)

NODES=${STARLING_SLURM_NODES:-}
GPUS=${STARLING_SLURM_GPUS_PER_NODE:-}
PER_GPU=${STARLING_SLURM_PER_GPU:-0}
PARTITION=${STARLING_SLURM_PARTITION:-}
ACCOUNT=${STARLING_SLURM_ACCOUNT:-}
TIME=${STARLING_SLURM_TIME:-}
JOB=${STARLING_SLURM_JOB:-train_rm}
VENV=${STARLING_SLURM_VENV:-}
DRY=${DRY_RUN:-0}
ARGS=()

usage() { sed -n '2,/^#SBATCH/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) need_value "$@"; NODES=$2; shift 2 ;;
    --gpus-per-node) need_value "$@"; GPUS=$2; shift 2 ;;
    --partition) need_value "$@"; PARTITION=$2; shift 2 ;;
    --account) need_value "$@"; ACCOUNT=$2; shift 2 ;;
    --time) need_value "$@"; TIME=$2; shift 2 ;;
    --job) need_value "$@"; JOB=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --nodes=*|--gpus-per-node=*|--partition=*|--account=*|--time=*|--job=*|--venv=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --per-gpu) PER_GPU=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; ARGS+=("$@"); break ;;
    --*) die "unknown flag '$1' (--help lists them)" ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

[[ ${#ARGS[@]} -ge 1 ]] || die "CONFIG [key=value ...] is required (or key=value overrides alone)"
for ((i = 1; i < ${#ARGS[@]}; i++)); do
  [[ "${ARGS[i]}" == *=* ]] || die "'${ARGS[i]}': after CONFIG only key=value overrides may follow"
done
[[ "${ARGS[0]}" == *=* || "$DRY" == 1 || -f "${ARGS[0]}" ]] || die "CONFIG ${ARGS[0]}: file not found"
[[ -z "$NODES" || "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ -z "$GPUS" || "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS'"
[[ "$JOB" =~ ^[a-z_][a-z0-9_]*$ ]] || die "--job must name a module under starling_jax (e.g. train_rm), got '$JOB'"

if [[ -z "${SLURM_JOB_ID:-}" && "$DRY" != 1 ]] && ! command -v sbatch >/dev/null 2>&1; then
  die "sbatch not found on PATH: run on a SLURM login node, or use --dry-run to see the commands"
fi

show() { printf '%q' "$1"; shift; [[ $# -eq 0 ]] || printf ' %q' "$@"; printf '\n'; }
x() { if [[ "$DRY" == 1 ]]; then show "$@"; else "$@"; fi; }

# The repository: beside this script, or (inside a job, where sbatch ran a spooled copy) where it was submitted.
if [[ -n "${STARLING_SLURM_REPO:-}" ]]; then
  REPO=$STARLING_SLURM_REPO
elif [[ -f "$(dirname "$0")/../pyproject.toml" ]]; then
  REPO=$(cd "$(dirname "$0")/.." && pwd)
else
  REPO=${SLURM_SUBMIT_DIR:-$PWD}
fi
VENV=${VENV:-$REPO/.venv}

srun_command() {  # what runs inside the allocation: every task runs the entry point
  local tasks=1 gpus=${GPUS:-${SLURM_GPUS_ON_NODE:-8}} python=python
  [[ "$PER_GPU" != 1 ]] || tasks=$gpus
  [[ "$DRY" != 1 && ! -x "$VENV/bin/python" ]] || python="$VENV/bin/python"
  x srun --kill-on-bad-exit=1 --ntasks-per-node="$tasks" --chdir="$REPO" \
    env STARLING_JAX_DISTRIBUTED=slurm "XLA_FLAGS=${XLA_GPU_FLAGS[*]}${XLA_FLAGS:+ $XLA_FLAGS}" \
    "$python" -m "starling_jax.$JOB" "${ARGS[@]}"
}

if [[ -n "${SLURM_JOB_ID:-}" && "$DRY" != 1 ]]; then  # inside the allocation
  command -v srun >/dev/null 2>&1 || die "srun not found on PATH inside SLURM job $SLURM_JOB_ID"
  srun_command
  exit 0
fi

# Outside: submit this script. Flags pass through; the #SBATCH lines give what is not set here.
gpus=${GPUS:-8}
tasks=1
[[ "$PER_GPU" != 1 ]] || tasks=$gpus
submit=(sbatch "--job-name=starling_jax-$JOB" "--nodes=${NODES:-1}" "--ntasks-per-node=$tasks" "--gpus-per-node=$gpus")
[[ -z "$PARTITION" ]] || submit+=("--partition=$PARTITION")
[[ -z "$ACCOUNT" ]] || submit+=("--account=$ACCOUNT")
[[ -z "$TIME" ]] || submit+=("--time=$TIME")
submit+=("--chdir=$REPO" "--export=ALL,STARLING_SLURM_REPO=$REPO")
inner=(--gpus-per-node "$gpus" --job "$JOB" --venv "$VENV")
[[ "$PER_GPU" != 1 ]] || inner+=(--per-gpu)
x "${submit[@]}" "$REPO/launch/slurm.sh" "${inner[@]}" -- "${ARGS[@]}"
if [[ "$DRY" == 1 ]]; then
  echo "# in the allocation:"
  GPUS=$gpus srun_command
fi
