"""Run `python -m pipeline.train OVERRIDES` as a child and write its exit status to STATUS_DIR/rank-RANK.

    torchrun --standalone --nproc-per-node=2 tests/workers/exit_status.py STATUS_DIR OVERRIDES...

torchrun never says how its workers exited after a Ctrl-C; this wrapper, the process torchrun
starts (and signals: its process group holds the child too), does. It ignores SIGINT itself.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path


def main() -> int:
    status_dir = Path(sys.argv[1])
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # the child gets the same SIGINT; exec resets this
    child = subprocess.run([sys.executable, "-m", "pipeline.train", *sys.argv[2:]])
    code = child.returncode if child.returncode >= 0 else 128 - child.returncode  # killed by a signal
    (status_dir / f"rank-{os.environ['RANK']}").write_text(str(code))
    return code


if __name__ == "__main__":
    sys.exit(main())
