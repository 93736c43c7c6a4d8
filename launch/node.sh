#!/usr/bin/env bash
# Start this node's share of a multi-node job with the DeepSpeed launcher, without ssh:
# run it once on every node (by hand, from a scheduler, or with launch/slurm.sbatch).
#
#   HOSTFILE=hosts NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/node.sh --config configs/bert-base.yaml --run-dir runs/base
#
# HOSTFILE      DeepSpeed hostfile listing every node ("host slots=N"), the same on all nodes
# NODE_RANK     this node's line in the hostfile, from 0
# MASTER_ADDR   address of the node with rank 0, reachable from every node
# MASTER_PORT   rendezvous port (default 29500)
# NET_IFACE     network interface for NCCL/gloo traffic (optional, e.g. ib0 or eth0)
# RESTARTS      relaunch this node's launcher up to N times after a failure (default 0); it
#               resumes from the latest complete checkpoint. Exit codes 2 (bad input) and
#               3 (non-finite loss) are never retried.
# STOP_TIMEOUT  seconds the ranks get to save and exit after a stop signal (default 600)
# The run directory must be on a filesystem every node sees (checkpoints are written by all ranks).
#
# The launcher runs under pipeline.train.supervise, which is this script's pid (exec): SIGTERM,
# SIGUSR1 or SIGINT to it makes every rank of the job save one checkpoint at the next step
# boundary and exit 0 (then this script exits 0); a job still running STOP_TIMEOUT seconds
# later is killed (exit 1). Re-running the same command continues where it stopped.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/common.sh"

require HOSTFILE NODE_RANK MASTER_ADDR
nodes=$(check_hostfile "$HOSTFILE")
check_node_rank "$NODE_RANK" "$nodes" "$HOSTFILE"
supervisor
export_network_env

cd "$here/.."
exec "${SUPERVISE[@]}" "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    --module pipeline.pretrain "$@"
