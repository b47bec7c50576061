#!/usr/bin/env bash
# launch.sh: run ucofia-jax on one host, N local CPU processes, a SLURM cluster or a TPU pod.
# `bash launch.sh help` for usage. Every process runs the same program; multi-process runs
# use jax.distributed (ucofia_jax/runtime/distributed.py reads the UCOFIA_* variables set here).
set -euo pipefail

SCRIPT_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO_DIR="$(dirname "$SCRIPT_PATH")"

usage() {
  cat <<'EOF'
Usage: bash launch.sh SUBCOMMAND [LAUNCHER OPTIONS] [--] [PROGRAM ARGS...]

Runs `python -m ucofia_jax.main PROGRAM ARGS` (e.g. --config=configs/msrvtt.py
--workdir=DIR --mode=train_and_eval --config.train.batch_size=64) in the right environment.
Arguments the launcher does not know are passed through unchanged; `--` ends launcher options.

Subcommands
  local                 One process on this host: CPU, one GPU or all local GPUs.
      --cpu                     force the CPU backend (JAX_PLATFORMS=cpu)
      --gpus=all|LIST           GPUs to use, e.g. --gpus=0 or --gpus=0,1,2,3 (default: all)
      --cpu-devices=D           with --cpu: D virtual CPU devices (sharding tests, demos)
  cpu-multiprocess N    N processes on this host, CPU only, coordinator on 127.0.0.1 and a
                        free port; each process gets D virtual CPU devices (gloo collectives).
      --devices-per-process=D   default 2
      --port=P                  coordinator port (default: a free one)
  slurm                 Run inside a SLURM allocation (sbatch/salloc): srun starts one process
                        per node (each drives all its GPUs) or one per GPU. The coordinator is
                        the first node of the job; JAX gets process ids from SLURM_PROCID.
      --per=node|gpu            default node
      --gpus-per-node=G         with --per=gpu when SLURM_GPUS_ON_NODE is not set
      --port=P                  coordinator port (default derived from SLURM_JOB_ID)
      --srun-args="..."         extra srun arguments
  tpu-pod               Same command on every worker of a Cloud TPU VM (pod slice) via
                        `gcloud compute tpus tpu-vm ssh NAME --worker=all`; each worker runs
                        `launch.sh local` and jax.distributed detects the pod by itself.
      --tpu=NAME                TPU VM name (or $TPU_NAME)
      --zone=ZONE               zone (or $ZONE / $CLOUDSDK_COMPUTE_ZONE)
      --project=PROJECT         optional (or $CLOUDSDK_CORE_PROJECT)
      --remote-dir=DIR          checkout on the workers (default ~/ucofia-jax)
  help                  This text.

Options for every subcommand
  --entry=MODULE|FILE.py  program to run instead of ucofia_jax.main
  --dry-run               print the command(s) with their environment; run nothing

Environment (set if unset; override by exporting your own)
  PYTHON                          interpreter (default: .venv/bin/python, else python3)
  XLA_PYTHON_CLIENT_MEM_FRACTION  GPU memory JAX may take (default 0.90)
  XLA_FLAGS, LIBTPU_INIT_ARGS     extra XLA flags are appended, never replaced
  TF_CPP_MIN_LOG_LEVEL            2 (quiet TensorFlow, used by tf.data only)
  UCOFIA_INIT_TIMEOUT             seconds processes wait for each other (default 300)

Examples
  bash launch.sh local --config=configs/demo.py --workdir=/tmp/demo
  bash launch.sh local --gpus=0 --config=configs/msrvtt.py --workdir=runs/msrvtt
  bash launch.sh cpu-multiprocess 2 --config=configs/demo.py --workdir=/tmp/demo2
  sbatch -N 2 --gpus-per-node=8 --wrap "bash launch.sh slurm --config=configs/msrvtt.py --workdir=/shared/runs/msrvtt"
  bash launch.sh tpu-pod --tpu=my-v4-32 --zone=us-central2-b --config=configs/msrvtt.py --workdir=gs://bucket/runs/msrvtt
EOF
}

die() {
  echo "launch.sh: error: $*" >&2
  exit 2
}

# --------------------------------------------------------------------------- helpers

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then
    PYTHON="$REPO_DIR/.venv/bin/python"
  else
    PYTHON="python3"
  fi
fi

ENTRY="ucofia_jax.main"
DRY_RUN=0
PASS=()   # program arguments

program_cmd() {
  # The program as an argv: python -m MODULE ARGS, or python FILE.py ARGS.
  if [[ "$ENTRY" == *.py ]]; then
    printf '%s\0' "$PYTHON" "$ENTRY" ${PASS[@]+"${PASS[@]}"}
  else
    printf '%s\0' "$PYTHON" -m "$ENTRY" ${PASS[@]+"${PASS[@]}"}
  fi
}

set_xla_device_count() {
  # Replace (not duplicate) --xla_force_host_platform_device_count in XLA_FLAGS.
  local count="$1" flags="${XLA_FLAGS:-}"
  flags="$(printf '%s' "$flags" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g; s/  +/ /g; s/^ //; s/ $//')"
  export XLA_FLAGS="${flags:+$flags }--xla_force_host_platform_device_count=$count"
}

common_env() {
  export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
  export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
  # tf.data must not grab accelerator memory JAX needs.
  export TF_FORCE_GPU_ALLOW_GROWTH="${TF_FORCE_GPU_ALLOW_GROWTH:-true}"
}

gpu_env() {
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
  # Overlap collectives with compute on multi-GPU meshes.
  case " ${XLA_FLAGS:-} " in
    *xla_gpu_enable_latency_hiding_scheduler*) ;;
    *) export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true" ;;
  esac
}

run_cmd() {
  # run_cmd VAR=VALUE... -- ARGV...   (env assignments for this command only)
  local envs=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do envs+=("$1"); shift; done
  shift
  if [[ "$DRY_RUN" == 1 ]]; then
    {
      printf '+ env'
      for v in UCOFIA_DISTRIBUTED UCOFIA_COORDINATOR UCOFIA_NUM_PROCESSES UCOFIA_PROCESS_ID \
               UCOFIA_LOCAL_DEVICE_IDS JAX_PLATFORMS CUDA_VISIBLE_DEVICES XLA_FLAGS \
               XLA_PYTHON_CLIENT_MEM_FRACTION; do
        [[ -n "${!v:-}" ]] && printf ' %s' "$(printf '%q' "$v=${!v}")"
      done
      for e in ${envs[@]+"${envs[@]}"}; do printf ' %q' "$e"; done
      printf ' %q' "$@"
      printf '\n'
    }
    return 0
  fi
  env ${envs[@]+"${envs[@]}"} "$@"
}

free_port() {
  "$PYTHON" - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

first_host() {
  # First host name of a SLURM node list: node001 | node[001-016],gpu2 | a,b
  local list="$1" host=""
  # scontrol needs the cluster's slurm.conf; where it cannot read one (a login shell on
  # another machine, a dry run), the node list is parsed here instead.
  if command -v scontrol >/dev/null 2>&1; then
    host="$(scontrol show hostnames "$list" 2>/dev/null)" || host=""
    host="${host%%$'\n'*}"   # the first line
  fi
  if [[ -n "$host" ]]; then
    echo "$host"
    return
  fi
  "$PYTHON" - "$list" <<'PY'
import re, sys
nodes = sys.argv[1]
m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodes)
prefix, rng = m.group(1), m.group(3)
print(prefix + (re.split(r"[,-]", rng)[0] if rng else ""))
PY
}

require_var() {
  local name="$1" why="$2"
  [[ -n "${!name:-}" ]] || die "\$$name is not set: $why"
}

# --------------------------------------------------------------------------- subcommands

cmd_local() {
  local cpu=0 gpus="" cpu_devices=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --cpu) cpu=1 ;;
      --gpus=*) gpus="${1#*=}" ;;
      --cpu-devices=*) cpu_devices="${1#*=}" ;;
      --entry=*) ENTRY="${1#*=}" ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; PASS+=("$@"); break ;;
      *) PASS+=("$1") ;;
    esac
    shift
  done
  common_env
  if [[ "$cpu" == 1 ]]; then
    export JAX_PLATFORMS=cpu
    [[ -z "$cpu_devices" ]] || set_xla_device_count "$cpu_devices"
  else
    [[ -z "$cpu_devices" ]] || die "--cpu-devices needs --cpu"
    if [[ -n "$gpus" && "$gpus" != all ]]; then
      [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must be 'all' or a list like 0,1,2 (got '$gpus')"
      export CUDA_VISIBLE_DEVICES="$gpus"
    fi
    gpu_env
  fi
  # A plain `local` run inside a SLURM job or a TPU pod worker still auto-detects (tpu-pod
  # relies on that); set UCOFIA_DISTRIBUTED=off to forbid it.
  export UCOFIA_DISTRIBUTED="${UCOFIA_DISTRIBUTED:-auto}"
  local argv=()
  while IFS= read -r -d '' a; do argv+=("$a"); done < <(program_cmd)
  run_cmd -- "${argv[@]}"
}

cmd_cpu_multiprocess() {
  local n="${1:-}"
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "cpu-multiprocess needs the number of processes, e.g. 'launch.sh cpu-multiprocess 2 ...' (got '${n}')"
  shift
  local per=2 port=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --devices-per-process=*) per="${1#*=}" ;;
      --port=*) port="${1#*=}" ;;
      --entry=*) ENTRY="${1#*=}" ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; PASS+=("$@"); break ;;
      *) PASS+=("$1") ;;
    esac
    shift
  done
  [[ "$per" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer (got '$per')"
  [[ -z "$port" || "$port" =~ ^[0-9]+$ ]] || die "--port must be a number (got '$port')"
  common_env
  export JAX_PLATFORMS=cpu
  set_xla_device_count "$per"
  [[ -n "$port" ]] || port="$(free_port)"
  export UCOFIA_DISTRIBUTED=auto UCOFIA_COORDINATOR="127.0.0.1:$port" UCOFIA_NUM_PROCESSES="$n"
  local argv=()
  while IFS= read -r -d '' a; do argv+=("$a"); done < <(program_cmd)

  if [[ "$DRY_RUN" == 1 ]]; then
    local i
    for ((i = 0; i < n; i++)); do run_cmd "UCOFIA_PROCESS_ID=$i" -- "${argv[@]}"; done
    return 0
  fi

  local pids=() i
  cleanup() {
    # TERM first; jax.distributed installs a preemption handler that may swallow it, so
    # whatever is still alive after a grace period gets KILL.
    local p t
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for ((t = 0; t < 50; t++)); do
      local alive=0
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      [[ "$alive" == 1 ]] || return 0
      sleep 0.1
    done
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  }
  trap 'cleanup; exit 130' INT TERM
  for ((i = 0; i < n; i++)); do
    # Every line tagged with its process; process 0 first in the list.
    UCOFIA_PROCESS_ID="$i" "${argv[@]}" > >(sed -u "s/^/[process $i] /") 2>&1 &
    pids+=("$!")
  done
  local status=0 finished=0 rc pid running=("${pids[@]}")
  while [[ "$finished" -lt "$n" ]]; do
    rc=0
    pid=""
    wait -n -p pid "${running[@]}" || rc=$?
    [[ -n "$pid" ]] || break   # nothing left to wait for
    finished=$((finished + 1))
    local keep=() q
    for q in "${running[@]}"; do [[ "$q" == "$pid" ]] || keep+=("$q"); done
    running=(${keep[@]+"${keep[@]}"})
    if [[ "$rc" -ne 0 ]]; then
      status="$rc"
      echo "launch.sh: process with pid $pid exited with status $rc; stopping the others" >&2
      cleanup
      break
    fi
  done
  trap - INT TERM
  wait 2>/dev/null || true  # the stopped processes and the output taggers
  return "$status"
}

cmd_slurm() {
  local per=node gpn="" port="" srun_args=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --per=*) per="${1#*=}" ;;
      --gpus-per-node=*) gpn="${1#*=}" ;;
      --port=*) port="${1#*=}" ;;
      --srun-args=*) srun_args="${1#*=}" ;;
      --entry=*) ENTRY="${1#*=}" ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; PASS+=("$@"); break ;;
      *) PASS+=("$1") ;;
    esac
    shift
  done
  [[ "$per" == node || "$per" == gpu ]] || die "--per must be 'node' or 'gpu' (got '$per')"
  local inside="run it inside an allocation: sbatch -N NODES --gpus-per-node=G --wrap 'bash launch.sh slurm ...' or salloc, then launch.sh slurm"
  require_var SLURM_JOB_ID "$inside"
  local nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
  [[ -n "$nodelist" ]] || die "\$SLURM_JOB_NODELIST is not set: $inside"
  local nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}"
  [[ -n "$nnodes" ]] || die "\$SLURM_JOB_NUM_NODES is not set: $inside"
  local tasks_per_node=1
  if [[ "$per" == gpu ]]; then
    gpn="${gpn:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}"
    gpn="${gpn##*:}"   # SLURM_GPUS_PER_NODE may read 'a100:8'
    [[ "$gpn" =~ ^[1-9][0-9]*$ ]] || die "--per=gpu needs the GPUs per node: \$SLURM_GPUS_ON_NODE is not set (allocate with --gpus-per-node=G or pass --gpus-per-node=G)"
    tasks_per_node="$gpn"
  fi
  if [[ -z "$port" ]]; then
    port=$(( SLURM_JOB_ID % 4096 + 61440 ))
  fi
  local head
  head="$(first_host "$nodelist")"
  [[ -n "$head" ]] || die "could not read the first host of SLURM_JOB_NODELIST='$nodelist'"
  common_env
  gpu_env
  export UCOFIA_COORDINATOR="${UCOFIA_COORDINATOR:-$head:$port}"
  export UCOFIA_NUM_PROCESSES=$(( nnodes * tasks_per_node ))
  export UCOFIA_SLURM_PER="$per"
  local task=(bash "$SCRIPT_PATH" _slurm-task "--entry=$ENTRY")
  [[ "$DRY_RUN" == 1 ]] && task+=(--dry-run)
  # shellcheck disable=SC2206
  local extra=($srun_args)
  local srun_cmd=(srun --nodes="$nnodes" --ntasks-per-node="$tasks_per_node"
                  --ntasks="$UCOFIA_NUM_PROCESSES" --kill-on-bad-exit=1
                  ${extra[@]+"${extra[@]}"} "${task[@]}" -- ${PASS[@]+"${PASS[@]}"})
  if [[ "$DRY_RUN" == 1 ]]; then
    run_cmd -- "${srun_cmd[@]}"
    return 0
  fi
  command -v srun >/dev/null 2>&1 || die "srun not found on PATH (is this a SLURM node?)"
  "${srun_cmd[@]}"
}

cmd_slurm_task() {
  # Internal: one srun task. Maps SLURM's per-task variables to ours, then runs the program.
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --entry=*) ENTRY="${1#*=}" ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; PASS+=("$@"); break ;;
      *) PASS+=("$1") ;;
    esac
    shift
  done
  local why="launch.sh _slurm-task runs under srun (use 'launch.sh slurm')"
  require_var SLURM_PROCID "$why"
  require_var SLURM_NTASKS "$why"
  require_var SLURM_LOCALID "$why"
  require_var UCOFIA_COORDINATOR "$why"
  export UCOFIA_DISTRIBUTED=on
  export UCOFIA_PROCESS_ID="$SLURM_PROCID" UCOFIA_NUM_PROCESSES="$SLURM_NTASKS"
  if [[ "${UCOFIA_SLURM_PER:-node}" == gpu ]]; then
    export UCOFIA_LOCAL_DEVICE_IDS="$SLURM_LOCALID"
  fi
  common_env
  local argv=()
  while IFS= read -r -d '' a; do argv+=("$a"); done < <(program_cmd)
  run_cmd -- "${argv[@]}"
}

cmd_tpu_pod() {
  local tpu="${TPU_NAME:-}" zone="${ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}"
  local project="${CLOUDSDK_CORE_PROJECT:-}" remote_dir="~/ucofia-jax"
  local entry_set=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --tpu=*) tpu="${1#*=}" ;;
      --zone=*) zone="${1#*=}" ;;
      --project=*) project="${1#*=}" ;;
      --remote-dir=*) remote_dir="${1#*=}" ;;
      --entry=*) ENTRY="${1#*=}"; entry_set="$1" ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; PASS+=("$@"); break ;;
      *) PASS+=("$1") ;;
    esac
    shift
  done
  [[ -n "$tpu" ]] || die "the TPU VM name is missing: pass --tpu=NAME or set \$TPU_NAME"
  [[ -n "$zone" ]] || die "the TPU zone is missing: pass --zone=ZONE or set \$ZONE"
  local remote="cd $remote_dir && UCOFIA_DISTRIBUTED=on bash launch.sh local"
  [[ -z "$entry_set" ]] || remote+=" $(printf '%q' "$entry_set")"
  if [[ ${#PASS[@]} -gt 0 ]]; then
    remote+=" --"
    local a
    for a in "${PASS[@]}"; do remote+=" $(printf '%q' "$a")"; done
  fi
  local cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all)
  [[ -z "$project" ]] || cmd+=(--project="$project")
  cmd+=(--command="$remote")
  if [[ "$DRY_RUN" == 1 ]]; then
    run_cmd -- "${cmd[@]}"
    return 0
  fi
  command -v gcloud >/dev/null 2>&1 || die "gcloud not found on PATH (install the Google Cloud SDK)"
  "${cmd[@]}"
}

# --------------------------------------------------------------------------- main

sub="${1:-help}"
[[ $# -gt 0 ]] && shift
case "$sub" in
  help|-h|--help) usage ;;
  local) cmd_local "$@" ;;
  cpu-multiprocess) cmd_cpu_multiprocess "$@" ;;
  slurm) cmd_slurm "$@" ;;
  _slurm-task) cmd_slurm_task "$@" ;;
  tpu-pod) cmd_tpu_pod "$@" ;;
  *) echo "launch.sh: unknown subcommand '$sub'" >&2; usage >&2; exit 2 ;;
esac
