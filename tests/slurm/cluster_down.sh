#!/usr/bin/env bash
# Stop the cluster cluster_up.sh started under SLURM_CI_BASE, using only the PIDs it saved.
# Cancels every job first: slurmstepd and job processes outlive slurmd.
set -uo pipefail
BASE=${SLURM_CI_BASE:?set SLURM_CI_BASE to the cluster_up.sh scratch directory}
RUN=$BASE/run
t0=$EPOCHREALTIME

alive() {  # running and not a zombie (PID 1 may be no init that reaps promptly)
  local s; s=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [ -n "$s" ] && [ "${s:0:1}" != Z ]
}
stop_pid() {  # stop_pid PIDFILE EXPECTED_COMM
  local f=$1 comm=$2 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if alive "$pid" && [ "$(ps -o comm= -p "$pid")" = "$comm" ]; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null; fi
  fi
  rm -f "$f"
}

# 1. cancel every job and wait (<= KillWait + a bit) for them to leave the queue
if [ -s "$RUN/slurmctld.pid" ] && alive "$(cat "$RUN/slurmctld.pid")"; then
  ids=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${ids// /}" ]; then
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null
    for _ in $(seq 200); do
      [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1
    done
  fi
fi

# 2. daemons, nodes first; munged only if cluster_up.sh started it
for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f" slurmd; done
stop_pid "$RUN/slurmctld.pid" slurmctld
stop_pid "$RUN/munged.pid" munged
printf '[slurm-down] done in %.1fs\n' "$(awk -v a="$EPOCHREALTIME" -v b="$t0" 'BEGIN{print a-b}')"
