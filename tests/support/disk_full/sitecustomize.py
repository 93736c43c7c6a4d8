"""A full disk for one checkpoint file: Python loads this at start-up when the folder is on
PYTHONPATH, and while ALUM_TEST_DISK_FULL is set, a torch.save whose path contains that
string writes part of the file and then fails with ENOSPC, as a full filesystem does."""

import errno
import os

_target = os.environ.get("ALUM_TEST_DISK_FULL")
if _target:
    import torch

    _save = torch.save

    def _save_on_a_full_disk(obj, f, *args, **kwargs):
        if _target in str(f):
            with open(f, "wb") as out:
                out.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return _save(obj, f, *args, **kwargs)

    torch.save = _save_on_a_full_disk
