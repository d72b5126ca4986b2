"""`python -m pipeline.train` with a pause before every optimizer step, so a test can kill a rank mid-run.

    torchrun --standalone --nproc-per-node=2 --max-restarts=1 tests/workers/slow_train.py SECONDS OVERRIDES...

The pause changes nothing the run computes; it only gives the test time to act.
"""

import runpy
import sys
import time

from pipeline.training import engine


def main() -> None:
    pause = float(sys.argv.pop(1))
    update = engine.Engine.update

    def slow_update(self, *args, **kwargs) -> list[float]:
        time.sleep(pause)
        return update(self, *args, **kwargs)

    engine.Engine.update = slow_update
    runpy.run_module("pipeline.train", run_name="__main__", alter_sys=True)  # as `python -m pipeline.train`


if __name__ == "__main__":
    main()
