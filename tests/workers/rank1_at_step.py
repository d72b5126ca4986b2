"""`python -m pipeline.train` in which rank 1, right before the all_reduce of step STEP, misbehaves.

    torchrun --standalone --nproc-per-node=2 tests/workers/rank1_at_step.py MODE STEP OVERRIDES...

With train.log_every=1 every step ends in check_finite's all_reduce. MODE is what rank 1 does
there: `stop` (SIGSTOP itself, so its peer times out inside a collective, not a receive), `kill`
(SIGKILL itself: its peer's collective fails on the closed connection), `bug`
(raise ZeroDivisionError) or `user_error` (raise a DataError, as a damaged file found by one
rank would). It first says so on stderr. Patched here, not hooked in the library.
"""

import os
import runpy
import signal
import sys

from pipeline.errors import DataError
from pipeline.training import trainer


def misbehave(mode: str, step: int) -> None:
    print(f"rank 1: {mode} before the all_reduce of step {step}", file=sys.stderr, flush=True)
    if mode in ("stop", "kill"):
        os.kill(os.getpid(), signal.SIGSTOP if mode == "stop" else signal.SIGKILL)
    elif mode == "bug":
        raise ZeroDivisionError("planted by the test")
    else:
        raise DataError("planted.npz: planted by the test; fix the file")


def main() -> None:
    mode, at = sys.argv.pop(1), int(sys.argv.pop(1))
    check_finite = trainer.check_finite

    def misbehave_then_check(engine, step, *args):
        if step == at and os.environ.get("RANK") == "1":
            misbehave(mode, step)
        return check_finite(engine, step, *args)

    trainer.check_finite = misbehave_then_check
    runpy.run_module("pipeline.train", run_name="__main__", alter_sys=True)  # as `python -m pipeline.train`


if __name__ == "__main__":
    main()
