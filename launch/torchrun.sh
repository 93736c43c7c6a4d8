#!/usr/bin/env bash
# The torchrun equivalent of launch/node.sh: run once per node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 GPUS_PER_NODE=8 launch/torchrun.sh --config configs/bert-base.yaml --run-dir runs/base
#
# MASTER_PORT, NET_IFACE, RESTARTS and STOP_TIMEOUT as in launch/node.sh: torchrun runs under
# pipeline.train.supervise (this script's pid), so SIGTERM/SIGUSR1/SIGINT to it stops the ranks with
# a checkpoint and a failed job is relaunched RESTARTS times. torchrun reports any failed rank
# as exit 1, so a bad input (exit 2 of the ranks) is retried under torchrun, and fails again.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/common.sh"

require NNODES NODE_RANK MASTER_ADDR GPUS_PER_NODE
check_node_rank "$NODE_RANK" "$NNODES" "NNODES"
supervisor
export_network_env

cd "$here/.."
exec "${SUPERVISE[@]}" "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" -m pipeline.pretrain "$@"
