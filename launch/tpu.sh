#!/usr/bin/env bash
# Cloud TPU front door for starling_jax runs: create a slice (on-demand, spot or reserved; one or several slices),
# install this checkout (or a wheel) on every worker, run one multi-host job on all workers, follow it, copy its
# results, delete the slice, or supervise a spot/queued slice through preemptions until the run completes.
#
#   launch/tpu.sh SUBCOMMAND [FLAGS] [ARGS]
#
#   create                         create the slice (on-demand: tpu-vm create; --spot/--reserved/--slices N>1:
#                                  a queued resource)
#   setup [--wheel FILE]           package this checkout (git archive of HEAD plus uncommitted tracked changes) or
#                                  the wheel, upload it to the bucket, install it with the `tpu` extra on every worker
#   run CONFIG [key=value ...]     start `python -m starling_jax.JOB CONFIG ...` on every worker as one distributed
#                                  job (STARLING_JAX_DISTRIBUTED=1), output_dir=gs://BUCKET/runs/NAME unless given;
#                                  worker logs are copied to gs://BUCKET/launch/NAME/logs/ every 60 s and at the end,
#                                  the job's JSON summary line to gs://BUCKET/launch/NAME/summary.json
#   logs [WORKER]                  follow a worker's log (default 0) over ssh
#   ssh [WORKER] [-- COMMAND...]   a shell (or COMMAND) on a worker (default 0)
#   copy-results [DEST]            gs://BUCKET/runs/NAME and the launch logs → DEST (default runs/)
#   delete                         delete the slice (and its queued resource)
#   supervise CONFIG [key=value ...]
#                                  until the summary says "completed": create the slice when it is missing, re-create
#                                  it after a preemption (PREEMPTED, SUSPENDED, FAILED, TERMINATED), then setup and
#                                  the same run; the run resumes from its latest checkpoint in output_dir
#
# Flags (or environment variables):
#   --name NAME        STARLING_TPU_NAME       slice (queued resource / node) name
#   --zone ZONE        STARLING_TPU_ZONE       e.g. us-east5-a
#   --type TYPE        STARLING_TPU_TYPE       accelerator type: v4-N, v5p-N, v5litepod-N, v6e-N (create, supervise)
#   --project PROJECT  STARLING_TPU_PROJECT    GCP project (default: gcloud's configured project)
#   --bucket gs://B    STARLING_TPU_BUCKET     Cloud Storage bucket for code, config, logs and outputs
#   --spot             STARLING_TPU_SPOT=1     spot capacity (queued resource)
#   --reserved         STARLING_TPU_RESERVED=1 reserved capacity (queued resource)
#   --slices N         STARLING_TPU_SLICES     several slices joined over DCN (queued resource; adds mesh.dcn=N)
#   --job JOB          STARLING_TPU_JOB        entry point module under starling_jax (default train_rm)
#   --interval S       STARLING_TPU_POLL_S     supervise: seconds between checks (default 60)
#   --max-runs N       STARLING_TPU_MAX_RUNS   supervise: give up after N starts of the run (default 20)
#   --dry-run          DRY_RUN=1               print the exact commands (gcloud, git) and run nothing
#
# Example (the Starling-RM-7B-alpha recipe on a spot v5p-32, supervised through preemptions):
#   launch/tpu.sh supervise --name rm7b --zone us-east5-a --type v5p-32 --project P --bucket gs://B --spot \
#       configs/rm_llama2_7b_starling.yaml data.train=gs://B/nectar_llama2
set -euo pipefail

PROG=tpu.sh
die() { echo "$PROG: $*" >&2; exit 2; }

NAME=${STARLING_TPU_NAME:-}
ZONE=${STARLING_TPU_ZONE:-}
TYPE=${STARLING_TPU_TYPE:-}
PROJECT=${STARLING_TPU_PROJECT:-}
BUCKET=${STARLING_TPU_BUCKET:-}
SPOT=${STARLING_TPU_SPOT:-0}
RESERVED=${STARLING_TPU_RESERVED:-0}
SLICES=${STARLING_TPU_SLICES:-1}
JOB=${STARLING_TPU_JOB:-train_rm}
INTERVAL=${STARLING_TPU_POLL_S:-60}
MAX_RUNS=${STARLING_TPU_MAX_RUNS:-20}
DRY=${DRY_RUN:-0}
WHEEL=""
ARGS=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

# ------------------------------------------------------------------------------------------------ command line
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
SUB=$1; shift
case "$SUB" in
  -h|--help|help) usage; exit 0 ;;
  create|setup|run|logs|ssh|copy-results|delete|supervise) ;;
  *) die "unknown subcommand '$SUB' (create, setup, run, logs, ssh, copy-results, delete, supervise; --help)" ;;
esac

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --type) need_value "$@"; TYPE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --bucket) need_value "$@"; BUCKET=$2; shift 2 ;;
    --job) need_value "$@"; JOB=$2; shift 2 ;;
    --slices) need_value "$@"; SLICES=$2; shift 2 ;;
    --interval) need_value "$@"; INTERVAL=$2; shift 2 ;;
    --max-runs) need_value "$@"; MAX_RUNS=$2; shift 2 ;;
    --wheel) need_value "$@"; WHEEL=$2; shift 2 ;;
    --name=*|--zone=*|--type=*|--project=*|--bucket=*|--job=*|--slices=*|--interval=*|--max-runs=*|--wheel=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --spot) SPOT=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; ARGS+=("$@"); break ;;
    --*) die "unknown flag '$1' (--help lists them)" ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

require() {  # require VAR FLAG ENV: a missing setting names its flag
  [[ -n "${!1}" ]] || die "$2 is required for '$SUB' (or set $3)"
}
require NAME --name STARLING_TPU_NAME
require ZONE --zone STARLING_TPU_ZONE
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '$SLICES'"
[[ "$INTERVAL" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--interval must be a number of seconds, got '$INTERVAL'"
[[ "$MAX_RUNS" =~ ^[1-9][0-9]*$ ]] || die "--max-runs must be a positive integer, got '$MAX_RUNS'"
[[ "$JOB" =~ ^[a-z_][a-z0-9_]*$ ]] || die "--job must name a module under starling_jax (e.g. train_rm), got '$JOB'"
[[ "$SPOT" == 1 && "$RESERVED" == 1 ]] && die "--spot and --reserved exclude each other"
QUEUED=0
[[ "$SPOT" == 1 || "$RESERVED" == 1 || "$SLICES" -gt 1 ]] && QUEUED=1
if [[ -n "$BUCKET" ]]; then
  [[ "$BUCKET" == gs://* ]] || BUCKET="gs://$BUCKET"
  BUCKET=${BUCKET%/}
fi
LAUNCH_URL="$BUCKET/launch/$NAME"  # code, config, logs, summary
RUN_URL="$BUCKET/runs/$NAME"       # the run's output_dir unless one is given

if [[ "$DRY" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found on PATH: install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install) or use --dry-run"
fi

# ------------------------------------------------------------------------------------------------ helpers
show() { printf '%q' "$1"; shift; [[ $# -eq 0 ]] || printf ' %q' "$@"; printf '\n'; }
x() { if [[ "$DRY" == 1 ]]; then show "$@"; else "$@"; fi; }  # run a command, or print it (--dry-run)
scope=()  # --zone/--project for every gcloud call
scope+=("--zone=$ZONE")
[[ -z "$PROJECT" ]] || scope+=("--project=$PROJECT")

runtime_for() {  # the TPU VM software version for an accelerator type
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "--type '$1': unknown accelerator type (v4-N, v5p-N, v5litepod-N, v6e-N)" ;;
  esac
}

on_workers() {  # on_workers WORKER COMMAND: run COMMAND over ssh on worker WORKER (all: every worker of every slice)
  if [[ "$QUEUED" == 1 && "$SLICES" -gt 1 ]]; then
    x gcloud compute tpus queued-resources ssh "$NAME" "${scope[@]}" --node=all --worker="$1" --command="$2"
  else
    x gcloud compute tpus tpu-vm ssh "$NAME" "${scope[@]}" --worker="$1" --command="$2"
  fi
}

do_create() {
  require TYPE --type STARLING_TPU_TYPE
  local version
  version=$(runtime_for "$TYPE")
  if [[ "$QUEUED" == 1 ]]; then
    local nodes=(--node-id="$NAME") capacity=()
    [[ "$SLICES" -eq 1 ]] || nodes=(--node-count="$SLICES" --node-prefix="$NAME")
    [[ "$SPOT" != 1 ]] || capacity=(--spot)
    [[ "$RESERVED" != 1 ]] || capacity=(--reserved)
    x gcloud compute tpus queued-resources create "$NAME" "${scope[@]}" --accelerator-type="$TYPE" \
      --runtime-version="$version" "${nodes[@]}" "${capacity[@]}"
  else
    x gcloud compute tpus tpu-vm create "$NAME" "${scope[@]}" --accelerator-type="$TYPE" --version="$version"
  fi
}

do_delete() {
  if [[ "$QUEUED" == 1 ]]; then
    x gcloud compute tpus queued-resources delete "$NAME" "${scope[@]}" --force --quiet
  else
    x gcloud compute tpus tpu-vm delete "$NAME" "${scope[@]}" --quiet
  fi
}

slice_state() {  # prints READY, CREATING, PREEMPTED, ... or NOT_FOUND (queued: ACTIVE → READY)
  local state
  if [[ "$QUEUED" == 1 ]]; then
    state=$(gcloud compute tpus queued-resources describe "$NAME" "${scope[@]}" --format='value(state.state)' \
      2>/dev/null) || state=NOT_FOUND
    [[ "$state" != ACTIVE ]] || state=READY
  else
    state=$(gcloud compute tpus tpu-vm describe "$NAME" "${scope[@]}" --format='value(state)' 2>/dev/null) \
      || state=NOT_FOUND
  fi
  echo "${state:-NOT_FOUND}"
}

do_setup() {
  require BUCKET --bucket STARLING_TPU_BUCKET
  local package install
  if [[ -n "$WHEEL" ]]; then
    [[ "$DRY" == 1 || -f "$WHEEL" ]] || die "--wheel $WHEEL: file not found"
    package=$(basename "$WHEEL")
    x gcloud storage cp "$WHEEL" "$LAUNCH_URL/code/$package"
    install=".venv/bin/pip install -q \"./${package}[tpu]\""
  else
    local repo tree tarball
    repo=$(cd "$(dirname "$0")/.." && pwd)
    package=starling_jax.tar.gz
    tarball="${TMPDIR:-/tmp}/starling_jax-$NAME.tar.gz"
    # HEAD plus uncommitted changes to tracked files (a stash commit that touches no branch, stash or work tree)
    tree=""
    [[ "$DRY" == 1 ]] || tree=$(git -C "$repo" stash create 2>/dev/null || true)
    x git -C "$repo" archive --format=tar.gz -o "$tarball" "${tree:-HEAD}"
    x gcloud storage cp "$tarball" "$LAUNCH_URL/code/$package"
    install="tar -xzf $package && .venv/bin/pip install -q \".[tpu]\""
  fi
  # Every worker: fetch the package into ~/starling_jax, a Python 3.11 virtualenv (TPU VM images ship 3.10), install.
  on_workers all "set -e; mkdir -p starling_jax && cd starling_jax && \
gcloud storage cp $LAUNCH_URL/code/$package $package && \
{ command -v python3.11 >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv; }; } && \
{ [ -x .venv/bin/python ] || python3.11 -m venv .venv; } && $install"
}

run_args() {  # the entry point's arguments on the workers: config copy, the overrides, output_dir, mesh.dcn
  local first=1 has_output=0 has_dcn=0 a
  REMOTE_ARGS=()
  CONFIG=""
  for a in "${ARGS[@]}"; do
    if [[ $first == 1 && "$a" != *=* ]]; then
      CONFIG=$a
    else
      [[ "$a" == *=* ]] || die "'$a': after CONFIG only key=value overrides may follow"
      [[ "$a" != output_dir=* ]] || has_output=1
      [[ "$a" != mesh.dcn=* ]] || has_dcn=1
      REMOTE_ARGS+=("$a")
    fi
    first=0
  done
  [[ $has_output == 1 ]] || REMOTE_ARGS+=("output_dir=$RUN_URL")
  [[ $has_dcn == 1 || "$SLICES" -eq 1 ]] || REMOTE_ARGS+=("mesh.dcn=$SLICES")
  if [[ -n "$CONFIG" ]]; then
    [[ "$DRY" == 1 || -f "$CONFIG" ]] || die "CONFIG $CONFIG: file not found"
    REMOTE_ARGS=("run_config.yaml" "${REMOTE_ARGS[@]}")
  fi
}

job_script() {  # what every worker runs (bash ~/starling_jax/job.sh): the job, its log to the bucket, its summary
  local quoted
  printf -v quoted ' %q' "${REMOTE_ARGS[@]}"
  cat <<EOF_JOB
#!/usr/bin/env bash
# starling_jax job '$NAME' (written by launch/tpu.sh run): one process of the distributed run on this worker.
cd "\$HOME/starling_jax" || exit 1
log="$LAUNCH_URL/logs/\$(hostname).log"
( while sleep 60; do gcloud storage cp -q run.log "\$log" >/dev/null 2>&1; done ) &
sync=\$!
STARLING_JAX_DISTRIBUTED=1 .venv/bin/python -m starling_jax.$JOB$quoted > run.log 2>&1
rc=\$?
kill "\$sync"
gcloud storage cp -q run.log "\$log"
tail -n 1 run.log | gcloud storage cp - "$LAUNCH_URL/summary.json"
exit "\$rc"
EOF_JOB
}

do_run() {
  require BUCKET --bucket STARLING_TPU_BUCKET
  run_args
  local job fetch=""
  job="${TMPDIR:-/tmp}/starling_jax-$NAME-job.sh"
  if [[ "$DRY" == 1 ]]; then
    job_script | sed 's/^/# job.sh| /'
  else
    job_script > "$job"
  fi
  x gcloud storage cp "$job" "$LAUNCH_URL/job.sh"
  if [[ -n "$CONFIG" ]]; then
    x gcloud storage cp "$CONFIG" "$LAUNCH_URL/config.yaml"
    fetch=" && gcloud storage cp $LAUNCH_URL/config.yaml run_config.yaml"
  fi
  x gcloud storage rm --quiet "$LAUNCH_URL/summary.json" 2>/dev/null || true  # absent on a first run
  # On each worker: stop this launcher's previous run (its process group) if one is alive — a restart after one
  # worker failed — fetch job and config, start the job detached in its own process group.
  # shellcheck disable=SC2016  # expanded on the workers
  local stop='if [ -f run.pid ] && kill -0 "$(cat run.pid)" 2>/dev/null; then kill -TERM -- "-$(cat run.pid)"; sleep 30; kill -KILL -- "-$(cat run.pid)" 2>/dev/null || true; fi'
  # shellcheck disable=SC2016
  local start='{ setsid nohup bash job.sh > /dev/null 2>&1 & echo $! > run.pid; }'
  on_workers all "cd starling_jax && { $stop; } && gcloud storage cp $LAUNCH_URL/job.sh job.sh$fetch && $start"
}

run_completed() {  # the run's JSON summary (last line of its output) says "completed"
  local summary
  summary=$(gcloud storage cat "$LAUNCH_URL/summary.json" 2>/dev/null) || return 1
  [[ "$summary" =~ \"status\":\ *\"completed\" ]]
}

run_alive() {  # the job's process is alive on every worker
  # shellcheck disable=SC2016  # expanded on the workers
  on_workers all 'kill -0 "$(cat starling_jax/run.pid)"' >/dev/null 2>&1
}

do_supervise() {
  require TYPE --type STARLING_TPU_TYPE
  require BUCKET --bucket STARLING_TPU_BUCKET
  run_args
  if [[ "$DRY" == 1 ]]; then  # one cycle: a missing or preempted slice is (re-)created, set up and the run started
    echo "# supervise: poll $(show gcloud storage cat "$LAUNCH_URL/summary.json") until status completed; on a missing/preempted slice:"
    do_delete
    do_create
    do_setup
    do_run
    return 0
  fi
  local runs=0 fresh=1 state
  while :; do
    if run_completed; then
      echo "$PROG: $NAME: run completed ($LAUNCH_URL/summary.json)"
      return 0
    fi
    state=$(slice_state)
    if [[ "$state" == READY && $fresh == 0 ]] && ! run_alive; then
      state=$(slice_state)  # the job is gone: was the slice preempted meanwhile?
      [[ "$state" != READY ]] || run_completed || state=RESTART
    fi
    case "$state" in
      READY|RESTART)
        if [[ $fresh == 1 || "$state" == RESTART ]]; then
          [[ $runs -lt $MAX_RUNS ]] || die "$NAME: the run was started $runs times without completing (--max-runs)"
          if [[ $fresh == 1 ]]; then
            echo "$PROG: $NAME: slice ready: setup" >&2
            self setup || { echo "$PROG: $NAME: setup failed; retrying" >&2; sleep "$INTERVAL"; continue; }
            fresh=0
          fi
          runs=$((runs + 1))
          echo "$PROG: $NAME: starting the run (start $runs of at most $MAX_RUNS)" >&2
          self run -- "${ARGS[@]}" || echo "$PROG: $NAME: starting the run failed; retrying" >&2
        fi
        ;;
      NOT_FOUND)
        echo "$PROG: $NAME: no slice: creating it" >&2
        self create || echo "$PROG: $NAME: create failed; retrying" >&2
        fresh=1
        ;;
      PREEMPTED|SUSPENDED|SUSPENDING|FAILED|TERMINATED|STOPPED)
        echo "$PROG: $NAME: slice $state: deleting and re-creating it" >&2
        self delete || true
        self create || echo "$PROG: $NAME: create failed; retrying" >&2
        fresh=1
        ;;
      *) ;;  # CREATING, WAITING_FOR_RESOURCES, PROVISIONING, ACCEPTED, DELETING, ...: wait
    esac
    sleep "$INTERVAL"
  done
}

self() {  # this script as a separate process (its own `set -e`) with the same settings
  STARLING_TPU_NAME="$NAME" STARLING_TPU_ZONE="$ZONE" STARLING_TPU_TYPE="$TYPE" STARLING_TPU_PROJECT="$PROJECT" \
    STARLING_TPU_BUCKET="$BUCKET" STARLING_TPU_SPOT="$SPOT" STARLING_TPU_RESERVED="$RESERVED" \
    STARLING_TPU_SLICES="$SLICES" STARLING_TPU_JOB="$JOB" DRY_RUN="$DRY" bash "$0" "$@"
}

# ------------------------------------------------------------------------------------------------ subcommands
case "$SUB" in
  create) do_create ;;
  delete) do_delete ;;
  setup) do_setup ;;
  run)
    [[ ${#ARGS[@]} -ge 1 ]] || die "run needs CONFIG [key=value ...]"
    do_run
    ;;
  supervise)
    [[ ${#ARGS[@]} -ge 1 ]] || die "supervise needs CONFIG [key=value ...]"
    do_supervise
    ;;
  logs)
    [[ ${#ARGS[@]} -le 1 ]] || die "logs takes at most one WORKER number"
    on_workers "${ARGS[0]:-0}" "tail -n 200 -F starling_jax/run.log"
    ;;
  ssh)
    worker=0
    if [[ ${#ARGS[@]} -ge 1 && "${ARGS[0]}" =~ ^[0-9]+$ ]]; then worker=${ARGS[0]}; ARGS=("${ARGS[@]:1}"); fi
    if [[ ${#ARGS[@]} -ge 1 ]]; then
      printf -v remote ' %q' "${ARGS[@]}"
      on_workers "$worker" "${remote# }"
    elif [[ "$QUEUED" == 1 && "$SLICES" -gt 1 ]]; then
      x gcloud compute tpus queued-resources ssh "$NAME" "${scope[@]}" --node=0 --worker="$worker"
    else
      x gcloud compute tpus tpu-vm ssh "$NAME" "${scope[@]}" --worker="$worker"
    fi
    ;;
  copy-results)
    require BUCKET --bucket STARLING_TPU_BUCKET
    [[ ${#ARGS[@]} -le 1 ]] || die "copy-results takes at most one DEST folder"
    dest=${ARGS[0]:-runs}
    x mkdir -p "$dest/$NAME"
    x gcloud storage cp -r "$RUN_URL" "$dest/"
    x gcloud storage cp -r "$LAUNCH_URL/logs" "$dest/$NAME/launch_logs"
    ;;
esac
