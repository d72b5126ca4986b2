"""`python -m pipeline.train` in which rank 1 cannot get, or cannot map, shared memory.

    torchrun --standalone --nproc-per-node=2 tests/workers/shm_refused.py MODE OVERRIDES...

MODE `create`: rank 1's segment cannot be made (ENOMEM, as a full memory does); `map`: rank 1 may not
open its peers' segments through /proc (EACCES, as a hardened container does). Patched here, not
hooked in the library.
"""

import errno
import os
import runpy
import sys

from pipeline.runtime import shm


def refuse(mode: str) -> None:
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
