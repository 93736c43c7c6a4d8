#!/usr/bin/env bash
# The torchrun equivalent of launch/node.sh: run once per node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 GPUS_PER_NODE=8 launch/torchrun.sh --config configs/bert-base.yaml --run-dir runs/base
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/common.sh"

require NNODES NODE_RANK MASTER_ADDR GPUS_PER_NODE
check_node_rank "$NODE_RANK" "$NNODES" "NNODES"
export_network_env

cd "$here/.."
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" -m pipeline.pretrain "$@"
