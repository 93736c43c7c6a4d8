"""The CPUs this process may run on: what worker and thread counts are sized from.

A batch scheduler (SLURM's cgroups and CPU binding, `taskset`, a container's cpuset) gives a
job some of the machine's cores; os.cpu_count() still counts all of them, so sizing by it
oversubscribes the cores the job has. The affinity mask is the job's share.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The number of CPUs in this process's affinity mask (all CPUs where the platform has none)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
