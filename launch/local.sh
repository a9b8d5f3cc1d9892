#!/usr/bin/env bash
# Start N processes of one command on this machine, joined into one JAX multi-process run over loopback.
# A rehearsal of a multi-host run (TPU pod, SLURM cluster) on one machine; the tests use it too.
#
#   launch/local.sh [-n PROCESSES] [-d CPU_DEVICES_PER_PROCESS] [-p PORT] -- COMMAND [ARGS...]
#   launch/local.sh -n 2 -d 2 -- python -m pf_jax.train mesh.fsdp=-1
#
# Each process gets PF_COORDINATOR_ADDRESS=127.0.0.1:PORT, PF_NUM_PROCESSES, PF_PROCESS_ID and (with -d)
# PF_LOCAL_DEVICE_COUNT, which pf_jax.sharding.distributed.initialize_distributed reads (CPU devices,
# gloo collectives). If one process fails, the others are stopped and its exit status is returned.
set -euo pipefail

num_processes=2
devices=""
port="${PF_PORT:-$((20000 + RANDOM % 20000))}"
while getopts "n:d:p:h" opt; do
  case "$opt" in
    n) num_processes="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    h) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "usage: $0 [-n PROCESSES] [-d DEVICES] [-p PORT] -- COMMAND..." >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then
  echo "$0: no command given; usage: $0 [-n PROCESSES] [-d DEVICES] [-p PORT] -- COMMAND..." >&2
  exit 2
fi
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: -n must be a positive integer, got '$num_processes'" >&2
  exit 2
fi

pids=()
# shellcheck disable=SC2317  # invoked by the traps below
stop_all() {  # each process leads its own process group (setsid below): stop the group, its children too
  for pid in "${pids[@]}"; do
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT
trap 'stop_all; exit 143' TERM INT

for ((i = 0; i < num_processes; i++)); do
  (
    export PF_COORDINATOR_ADDRESS="127.0.0.1:${port}"
    export PF_NUM_PROCESSES="$num_processes"
    export PF_PROCESS_ID="$i"
    if [[ -n "$devices" ]]; then
      export PF_LOCAL_DEVICE_COUNT="$devices"
      export JAX_PLATFORMS=cpu
    fi
    exec setsid "$@"  # not a group leader here, so setsid does not fork: $! is the group's id
  ) &
  pids+=("$!")
done

status=0
for ((done_count = 0; done_count < num_processes; done_count++)); do
  wait -n || status=$?
  if [[ "$status" -ne 0 ]]; then
    echo "$0: a process exited with status $status; stopping the others" >&2
    break
  fi
done
exit "$status"
