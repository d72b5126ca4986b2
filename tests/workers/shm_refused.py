"""`python -m pipeline.train` where shared memory cannot be had: on this machine, or on rank 1.

    torchrun --standalone --nproc-per-node=2 tests/workers/shm_refused.py MODE OVERRIDES...

MODE `unsupported`: shm.unsupported() gives a reason on every rank (as on a machine without memfd and
futex); `create`: rank 1's segment cannot be made (ENOMEM, as a full memory does); `map`: rank 1 may
not open its peers' segments through /proc (EACCES, as a hardened container does). Patched here,
not hooked in the library.
"""

import errno
import os
import runpy
import sys

from pipeline.runtime import shm

UNSUPPORTED = "it needs Linux (memfd and futex), and this is a test"


def refuse(mode: str) -> None:
    if mode == "unsupported":
        shm.unsupported = lambda: UNSUPPORTED
        return
    method = {"create": "create", "map": "open"}[mode]
    original = getattr(shm.Segment, method).__func__
    code = errno.ENOMEM if mode == "create" else errno.EACCES

    def refused(cls, *args):
        if os.environ.get("RANK") == "1":
            raise OSError(code, os.strerror(code))
        return original(cls, *args)

    setattr(shm.Segment, method, classmethod(refused))


def main() -> None:
    refuse(sys.argv.pop(1))
    runpy.run_module("pipeline.train", run_name="__main__", alter_sys=True)  # as `python -m pipeline.train`


if __name__ == "__main__":
    main()
