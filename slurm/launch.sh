#!/usr/bin/env bash
# Per-node launcher: slurm/train.sbatch runs it once per node (`srun --ntasks-per-node=1`).  It
# starts one torchrun with a static rendezvous on MASTER_ADDR:MASTER_PORT (the first node of the
# allocation) and node rank SLURM_NODEID, so global rank r runs on node r / NPROC, every time.
# Arguments: what torchrun runs, e.g.  launch.sh -m calm_train train CONFIG key=value ...
# Environment:
#   CALM_TRAIN_PYTHON       Python with calm-train installed (default: python3 on PATH)
#   CALM_NPROC_PER_NODE     processes per node (default: the GPUs Slurm gave this node, else 1)
#   MASTER_ADDR MASTER_PORT rendezvous host and port (train.sbatch sets both)
#   CALM_SHUTDOWN_TIMEOUT   seconds torchrun waits for signalled workers before SIGKILL (default 120)
# torchrun forwards SIGUSR1 (and SIGTERM) to its workers, which checkpoint and exit 75.
set -euo pipefail
: "${SLURM_NODEID:?launch.sh runs inside a Slurm step: srun --ntasks-per-node=1 slurm/launch.sh ...}"
: "${MASTER_ADDR:?set MASTER_ADDR to the first node of the allocation (train.sbatch does)}"
: "${MASTER_PORT:?set MASTER_PORT (train.sbatch derives it from the job id)}"
PYTHON=${CALM_TRAIN_PYTHON:-python3}
NPROC=${CALM_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
echo "[launch.sh] node $SLURMD_NODENAME: node rank $SLURM_NODEID of $SLURM_NNODES," \
     "global ranks $((SLURM_NODEID * NPROC))-$((SLURM_NODEID * NPROC + NPROC - 1))"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$SLURM_NNODES" --nproc-per-node "$NPROC" --node-rank "$SLURM_NODEID" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown-timeout "${CALM_SHUTDOWN_TIMEOUT:-120}" \
  "$@"
