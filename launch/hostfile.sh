#!/usr/bin/env bash
# Start a multi-node job from one machine with the DeepSpeed launcher over ssh
# (passwordless ssh to every host in the hostfile, the repository at the same path on each).
#
#   HOSTFILE=hosts launch/hostfile.sh --config configs/bert-base.yaml --run-dir runs/base
#
# HOSTFILE      DeepSpeed hostfile ("host slots=N" per line); see launch/hostfile.example
# MASTER_ADDR   address of the first host as the others see it (default: DeepSpeed asks it)
# MASTER_PORT   rendezvous port (default 29500)
# NET_IFACE     network interface for NCCL/gloo traffic (optional)
# RESTARTS      relaunch the job up to N times after a failure (default 0); it resumes from
#               the latest complete checkpoint. Exit codes 2 (bad input) and 3 (non-finite
#               loss) are never retried.
# STOP_TIMEOUT  seconds the job gets to stop after a stop signal before it is killed (default 600)
#
# The launcher runs under pipeline.train.supervise, which is this script's pid (exec). Over ssh the
# ranks are not its descendants (pdsh starts them through each host's sshd, this host's too),
# so a stop signal to it can only reach DeepSpeed's runner: it SIGTERMs the launchers on every
# host, which SIGTERM their ranks (they save at the next step boundary) and SIGKILL whatever
# still runs 30 s later. To stop with a checkpoint for sure, send SIGUSR1 to one rank (any
# rank's stop stops all), or use launch/node.sh per node.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/common.sh"

require HOSTFILE
check_hostfile "$HOSTFILE" > /dev/null
supervisor
export_network_env
master=()
[ -n "${MASTER_ADDR:-}" ] && master=(--master_addr "$MASTER_ADDR")

cd "$here/.."
exec "${SUPERVISE[@]}" "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" "${master[@]}" \
    --master_port "${MASTER_PORT:-29500}" --module pipeline.pretrain "$@"
