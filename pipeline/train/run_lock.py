"""One job writes a run directory at a time: rank 0 holds an exclusive flock on `RUN/.lock`
for the job's life.

Two jobs on one run directory would each append every step to metrics.jsonl and save over
each other's checkpoints. The lock is taken (without waiting) before the job writes
anything in the directory, and `.lock` then holds the holder's host and pid, which a second
job names when it is refused. flock locks belong to the open file and the kernel drops them
when the process ends however it ends (kill -9 included), so a crashed job leaves no stale
lock behind, and a relaunch, by hand or by `alum supervise`, which waits until every process
of the previous job is gone, takes it again. The file itself stays; only the lock matters.
The descriptor is close-on-exec, so processes rank 0 starts (W&B's service) do not share
the lock; a child forked without exec would, until it ends.

On a filesystem that cannot lock (Lustre mounted with `noflock`, NFSv3 without a lock
daemon) flock fails with ENOSYS, EOPNOTSUPP or ENOLCK, and the launch stops in one line
rather than run unprotected. Filesystems that lock only per node (Lustre's `localflock`,
NFS's `local_lock=flock` or `nolock`) cannot keep apart jobs on different nodes: docs/training.md,
"One job per run directory".
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from data_prep.errors import UserError

LOCK = ".lock"
NO_LOCKS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK}


class RunLock:
    """The exclusive lock of this process on a run directory."""

    def __init__(self, run_dir: Path):
        """Take it, or raise UserError naming the job that holds it."""
        self.path = Path(run_dir) / LOCK
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_RDWR: NFS emulates flock with a POSIX lock, whose exclusive form needs a file open for writing.
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                f"{e.filename or self.path}: cannot create the run directory's lock file ({e.strerror})"
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip()
            os.close(self.fd)
            raise UserError(_refusal(Path(run_dir), self.path, e, holder)) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        """Release it for the next run in this process (several runs one after another);
        a process that ends releases it anyway."""
        os.close(self.fd)


def _refusal(run_dir: Path, path: Path, error: OSError, holder: str) -> str:
    if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
        return (
            f"{run_dir}: another job is writing to this run directory ({holder or 'one that is just starting'}, "
            f"from {path}); wait for it to end or stop it, or use another --run-dir"
        )
    if error.errno in NO_LOCKS:
        return (
            f"{run_dir}: cannot lock {path} ({error.strerror}): this filesystem gives no file locks (Lustre needs the "
            "flock mount option, NFSv3 a running lock daemon), so two jobs could write the run at once; "
            "put the run directory on a filesystem with locks"
        )
    return f"{path}: cannot lock the run directory ({error.strerror})"
