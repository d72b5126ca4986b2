"""`python -m pipeline.train` on a frozen clock, or held before its first update, for the run-directory tests.

    python tests/workers/held_train.py CLOCK GATE OVERRIDES...
    CLOCK: seconds since the epoch that time.time, time.localtime and time.strftime report, or -
    GATE:  a file; every optimizer step waits (at most 120 s) until it exists, or -

The frozen clock makes two runs start in the same second on purpose; the gate keeps a run alive,
holding its run directory, until the test has tried a second run there. Neither changes what is computed.
"""

import runpy
import sys
import time
from pathlib import Path

from pipeline.training import engine


def freeze_clock(epoch: float) -> None:
    localtime, strftime = time.localtime, time.strftime
    time.time = lambda: epoch
    time.localtime = lambda t=None: localtime(epoch if t is None else t)
    time.strftime = lambda fmt, t=None: strftime(fmt, localtime(epoch) if t is None else t)


def hold_at(gate: Path) -> None:
    update = engine.Engine.update

    def gated_update(self, *args, **kwargs) -> list[float]:
        deadline = time.monotonic() + 120
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return update(self, *args, **kwargs)

    engine.Engine.update = gated_update


def main() -> None:
    clock, gate = sys.argv.pop(1), sys.argv.pop(1)
    if gate != "-":
        hold_at(Path(gate))
    if clock != "-":
        freeze_clock(float(clock))
    runpy.run_module("pipeline.train", run_name="__main__", alter_sys=True)  # as `python -m pipeline.train`


if __name__ == "__main__":
    main()
