# Shared checks for the launch scripts: every problem is one line naming the variable or file.

PYTHON="${PYTHON:-python}"

die() { echo "launch: error: $*" >&2; exit 2; }

require() {
    for name in "$@"; do
        [ -n "${!name:-}" ] || die "$name is not set (see the header of $(basename "$0"))"
    done
}

# Prints the number of nodes; dies on a malformed line.
check_hostfile() {
    local file="$1" count=0 line_no=0 line
    [ -f "$file" ] || die "$file: hostfile not found"
    while IFS= read -r line || [ -n "$line" ]; do
        line_no=$((line_no + 1))
        line="${line%%#*}"
        [[ "$line" =~ ^[[:space:]]*$ ]] && continue
        [[ "$line" =~ ^[[:space:]]*[A-Za-z0-9._-]+[[:space:]]+slots=[1-9][0-9]*[[:space:]]*$ ]] \
            || die "$file:$line_no: expected '<hostname> slots=<N>', got '$line'"
        count=$((count + 1))
    done < "$file"
    [ "$count" -gt 0 ] || die "$file: no hosts listed"
    echo "$count"
}

check_node_rank() {
    local rank="$1" nodes="$2" file="$3"
    [[ "$rank" =~ ^[0-9]+$ ]] && [ "$rank" -lt "$nodes" ] \
        || die "NODE_RANK=$rank is out of range: $file lists $nodes node(s), ranks 0..$((nodes - 1))"
}

export_network_env() {
    if [ -n "${NET_IFACE:-}" ]; then
        export NCCL_SOCKET_IFNAME="$NET_IFACE" GLOO_SOCKET_IFNAME="$NET_IFACE"
    fi
}

# The command every launcher runs under (pipeline/train/supervise.py): it stops the ranks cleanly on
# SIGTERM/SIGUSR1/SIGINT and relaunches a failed job RESTARTS times. Sets SUPERVISE.
supervisor() {
    local name
    for name in RESTARTS STOP_TIMEOUT; do
        [[ -z "${!name:-}" || "${!name}" =~ ^[0-9]+$ ]] || die "$name=${!name} is not a whole number"
    done
    [ "${STOP_TIMEOUT:-600}" -gt 0 ] || die "STOP_TIMEOUT=$STOP_TIMEOUT must be at least 1 (seconds)"
    SUPERVISE=("$PYTHON" -m pipeline.supervise --restarts "${RESTARTS:-0}" --stop-timeout "${STOP_TIMEOUT:-600}" --)
}
