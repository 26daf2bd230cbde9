#!/usr/bin/env bash
# Cloud TPU VM lifecycle for starling_jax runs: create a slice, install this checkout on every host, run an entry
# point on all hosts at once (multi-host: each host joins with jax.distributed.initialize()), tail, delete.
#
#   launch/tpu_vm.sh create NAME ZONE TYPE [--spot]   TYPE e.g. v5p-32, v5litepod-32, v6e-16
#   launch/tpu_vm.sh setup  NAME ZONE                 copy this checkout to every worker and pip install it
#   launch/tpu_vm.sh run    NAME ZONE -- CMD...       run CMD on every worker (logs in ~/starling_jax/run.log)
#   launch/tpu_vm.sh logs   NAME ZONE [WORKER]        follow worker 0's (or WORKER's) log
#   launch/tpu_vm.sh delete NAME ZONE
#
# Example (the Starling-RM-7B-alpha recipe):
#   launch/tpu_vm.sh create rm7b us-east5-a v5p-32 --spot
#   launch/tpu_vm.sh setup  rm7b us-east5-a
#   launch/tpu_vm.sh run    rm7b us-east5-a -- python -m starling_jax.train_rm configs/rm_llama2_7b_starling.yaml \
#       data.train=/gcs/BUCKET/nectar_llama2 output_dir=/gcs/BUCKET/runs/rm_llama2_7b
#
# output_dir (checkpoints) must be one folder that every host sees: a Cloud Storage bucket mounted with gcsfuse
# at the same path on all workers (as above), or a Filestore/NFS share.
# Spot/preemptible slices: the preemption notice is a SIGTERM, on which train_rm saves a checkpoint and exits;
# running the same `run` command again resumes from it. DRY_RUN=1 prints the gcloud commands instead.
set -euo pipefail

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
gc() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf 'gcloud'; printf ' %q' "$@"; printf '\n'; else gcloud "$@"; fi; }

runtime_for() {  # the TPU VM software version for an accelerator type
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "unknown accelerator type '$1' (v4-N, v5litepod-N, v5p-N, v6e-N)" ;;
  esac
}

cmd="${1:-}"; shift || true
case "$cmd" in
  create)
    [[ $# -ge 3 ]] || die "usage: create NAME ZONE TYPE [--spot]"
    name=$1 zone=$2 type=$3; shift 3
    version=$(runtime_for "$type") || exit 2
    gc compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$type" --version="$version" "$@"
    ;;
  setup)
    [[ $# -eq 2 ]] || die "usage: setup NAME ZONE"
    name=$1 zone=$2
    repo=$(cd "$(dirname "$0")/.." && pwd)
    tarball=$(mktemp -d)/starling_jax.tar.gz
    git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
    gc compute tpus tpu-vm scp "$tarball" "$name":/tmp/starling_jax.tar.gz --zone="$zone" --worker=all
    gc compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command \
      "mkdir -p ~/starling_jax && tar -xzf /tmp/starling_jax.tar.gz -C ~/starling_jax && cd ~/starling_jax && \
       python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  run)
    [[ $# -ge 3 && "$3" == "--" ]] || die "usage: run NAME ZONE -- CMD..."
    name=$1 zone=$2; shift 3
    printf -v remote ' %q' "$@"
    gc compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command \
      "cd ~/starling_jax && STARLING_JAX_DISTRIBUTED=1 nohup .venv/bin/${remote# } > run.log 2>&1 &"
    ;;
  logs)
    [[ $# -ge 2 ]] || die "usage: logs NAME ZONE [WORKER]"
    gc compute tpus tpu-vm ssh "$1" --zone="$2" --worker="${3:-0}" --command "tail -f ~/starling_jax/run.log"
    ;;
  delete)
    [[ $# -eq 2 ]] || die "usage: delete NAME ZONE"
    gc compute tpus tpu-vm delete "$1" --zone="$2" --quiet
    ;;
  *) die "usage: tpu_vm.sh create|setup|run|logs|delete ... (see the header of this script)" ;;
esac
