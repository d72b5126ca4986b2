"""One message's time between two processes on this machine, over the transport a run uses.

Two processes join a gloo group on loopback, one thread each (as torchrun gives each rank), and
move a tensor of a run's message size with isend/irecv, two ways:

  ping-pong     rank 0 isends and waits for the echo, rank 1 echoes: one way = a round trip / 2
  busy sender   rank 0 isends and at once computes (about 5 ms of matrix products, as a rank runs
                its next F or B right after a SEND) while rank 1 waits; reported is the time from
                the isend to the end of rank 1's receive (both read CLOCK_MONOTONIC, one clock):
                median, mean and 90th percentile

`python -m pipeline.simulate --measure` charges each message `message_latency_s`;
`benchmarks/latency.py` prints every figure. Both call `measure`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist


class Latency(NamedTuple):
    """Seconds one message of `nbytes` takes from one process to the other."""

    nbytes: int
    pingpong_s: float  # one way, both sides waiting on it
    busy_s: float  # median, the sender computing right after its isend
    busy_mean_s: float  # mean of the same (a step's messages add up: the mean is what they cost)
    busy_p90_s: float  # 90th percentile of the same


def measure(sizes: Sequence[int], iters: int = 200, repeats: int = 3, busy_trials: int = 40,
            timeout_s: float = 120.0) -> list[Latency]:
    """Both ways of timing a message, for each size in bytes; raises RuntimeError if a process fails."""
    sizes = [max(4, int(n)) for n in sizes]
    plan = json.dumps({"sizes": sizes, "iters": iters, "repeats": repeats, "busy_trials": busy_trials})
    with tempfile.TemporaryDirectory(prefix="pipeline-latency-") as tmp:
        store = Path(tmp) / "store"  # a file rendezvous: no port to pick, none to collide
        procs = [subprocess.Popen([sys.executable, "-m", "pipeline.runtime.latency", str(rank), str(store), plan],
                                  env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank in range(2)]
        outputs = _wait(procs, timeout_s)
    pingpong, busy = (json.loads(out.strip().splitlines()[-1]) for out in outputs)
    return [Latency(n, pingpong[i], *busy[i]) for i, n in enumerate(sizes)]


def _worker_env() -> dict[str, str]:
    """A rank's environment under torchrun: one thread; this package importable wherever it lives."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> list[str]:
    """Each process's stdout; at the deadline both are killed; raises unless both exited 0."""
    deadline = time.monotonic() + timeout_s
    outputs, errors = [], []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            out, err = proc.communicate()
        outputs.append(out)
        errors.append(err.strip().splitlines()[-1:] if err else [])
    codes = [proc.returncode for proc in procs]
    if codes != [0, 0]:
        last = "; ".join(line for lines in errors for line in lines)  # each process's last stderr line
        raise RuntimeError(f"a latency process failed or ran past {timeout_s:g} s (exit codes {codes})"
                           + (f": {last}" if last else ""))
    return outputs


def _worker(rank: int, store: str, plan: dict) -> list:
    """One of the two processes: join the group, time every size both ways; rank 0 returns the
    ping-pong seconds per size, rank 1 the busy-sender figures."""
    torch.set_num_threads(1)
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # as a single-node run does: traffic stays on loopback
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    report = []
    for nbytes in plan["sizes"]:
        buf = torch.zeros(nbytes // 4)
        pingpong = pingpong_s(rank, buf, plan["iters"], plan["repeats"])
        busy = sender_busy(rank, buf, plan["busy_trials"])
        report.append(pingpong if rank == 0 else busy)
    dist.barrier()
    dist.destroy_process_group()
    return report


def pingpong_s(rank: int, buf: torch.Tensor, iters: int, repeats: int) -> float:
    """One-way seconds of `buf`: the median over timed blocks of a round trip / 2 (the first block warms up)."""
    blocks = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        for i in range(iters):
            if rank == 0:
                dist.isend(buf, 1, tag=i).wait()
                dist.irecv(buf, 1, tag=i).wait()
            else:
                dist.irecv(buf, 0, tag=i).wait()
                dist.isend(buf, 0, tag=i).wait()
        blocks.append((time.perf_counter() - start) / iters / 2)
    return statistics.median(blocks[1:])


def sender_busy(rank: int, buf: torch.Tensor, trials: int) -> tuple[float, float, float] | None:
    """On rank 1, (median, mean, 90th percentile) seconds from rank 0's isend to the end of rank 1's
    receive, while rank 0 computes right after the isend; None on rank 0."""
    weight, x = torch.randn(1024, 1024), torch.randn(32, 1024)
    sent_at = torch.zeros(1, dtype=torch.float64)
    delays = []
    for i in range(trials + 2):  # the first two warm up
        dist.barrier()
        if rank == 0:
            time.sleep(0.005)  # rank 1 is surely waiting in its receive
            sent_at[0] = time.perf_counter()
            work = dist.isend(buf, 1, tag=i)
            for _ in range(6):
                x @ weight.T  # about 5 ms of F on 32 rows, as a rank does after sending
            work.wait()
            dist.send(sent_at, 1, tag=10_000 + i)
        else:
            dist.irecv(buf, 0, tag=i).wait()
            arrived = time.perf_counter()
            dist.recv(sent_at, 0, tag=10_000 + i)
            delays.append(arrived - sent_at.item())
    if rank == 0:
        return None
    times = sorted(delays[2:])
    return statistics.median(times), statistics.mean(times), times[int(0.9 * (len(times) - 1))]


def message_latency_s(nbytes: int) -> float:
    """The latency the simulator charges a message of `nbytes`: the mean time with the sender busy.

    Busy, because a rank computes right after its isend; the mean, because a step's messages add
    up along its critical path and a few slow ones (the 90th percentile is 2-5x the median on a
    shared machine) cost what they cost. Ping-pong and the busy median predicted traced runs' steps
    worse (see README.md, "See where the time goes").
    """
    return measure([nbytes])[0].busy_mean_s


if __name__ == "__main__":  # one of measure's two processes: RANK STORE_FILE PLAN_JSON
    print(json.dumps(_worker(int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]))))
