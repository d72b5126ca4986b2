"""One rank of a multi-process test, started by tests/launch.py with torchrun's variables set.

    python tests/workers/rank.py train CASES_JSON OUT_DIR   # train each case in one gloo group
                                                            # (over p2p, or the case's "transport")
    python tests/workers/rank.py silent                     # join the group, then never answer

After training it says how many shared-memory segments this process still maps (0: every run let go).
"""

import json
import os
import sys
import time
from datetime import timedelta

import torch.distributed as dist

from pipeline.runtime.transport import PeerTimeout
from pipeline.training.equivalence import problem
from pipeline.training.trainer import train
from pipeline.training.watchdog import write_hang_report


def main() -> int:
    mode = sys.argv[1]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    if mode == "silent":
        time.sleep(120)  # the test kills this process long before
        return 0
    cases, out_dir = json.loads(sys.argv[2]), sys.argv[3]
    try:
        for i, case in enumerate(cases):
            case = {"transport": "p2p", **case, "ranks": None}  # p is the world size here
            train(problem(**case), os.path.join(out_dir, f"case{i}"))
    except PeerTimeout as err:
        print(f"PeerTimeout: {err}", flush=True)
        write_hang_report(out_dir, err)
        os._exit(3)  # the peer is gone: no barrier, no clean shutdown to wait for
    dist.destroy_process_group()
    maps = open("/proc/self/maps").read().splitlines()
    print(f"shared-memory segments still mapped: {sum('memfd:pipeline-rank' in line for line in maps)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
