#!/usr/bin/env bash
# Start a multi-node job from one machine with the DeepSpeed launcher over ssh
# (passwordless ssh to every host in the hostfile, the repository at the same path on each).
#
#   HOSTFILE=hosts launch/hostfile.sh --config configs/bert-base.yaml --run-dir runs/base
#
# HOSTFILE     DeepSpeed hostfile ("host slots=N" per line); see launch/hostfile.example
# MASTER_ADDR  address of the first host as the others see it (default: DeepSpeed asks it)
# MASTER_PORT  rendezvous port (default 29500)
# NET_IFACE    network interface for NCCL/gloo traffic (optional)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/common.sh"

require HOSTFILE
check_hostfile "$HOSTFILE" > /dev/null
export_network_env
master=()
[ -n "${MASTER_ADDR:-}" ] && master=(--master_addr "$MASTER_ADDR")

cd "$here/.."
exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" "${master[@]}" \
    --master_port "${MASTER_PORT:-29500}" --module pipeline.pretrain "$@"
