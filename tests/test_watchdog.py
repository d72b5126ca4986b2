"""A stopped (SIGSTOP) or killed (SIGKILL) rank under torchrun, over shm and over p2p: every other rank exits
within the timeout + 5 s with one line naming itself, what it waited on and its last action; hang_report.json;
nothing left in /dev/shm."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.runtime.distributed import Comm
from pipeline.runtime.transport import Terminated
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(240)
TIMEOUT_S = 4


def workers(run_dir: Path, program: bytes = b"pipeline.train") -> dict[int, int]:
    """rank -> pid of this run's processes running `program` (found through /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(line.split("=", 1) for line in (entry / "environ").read_text().split("\0") if "=" in line)
        except (OSError, ValueError):
            continue
        if any(program in part for part in cmdline) and f"hydra.run.dir={run_dir}".encode() in cmdline and "RANK" in environ:
            found[int(environ["RANK"])] = int(entry.name)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def held_in_dev_shm() -> set[str]:
    """Names in /dev/shm that a live process maps or holds open (another job's, on a shared machine)."""
    held = set()
    for proc in Path("/proc").iterdir():
        try:
            paths = [line.split(maxsplit=5)[-1] for line in (proc / "maps").read_text().splitlines()]
            paths += [readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:  # not a process, gone meanwhile, or not ours to read
            continue
        held |= {path.split()[0].split("/dev/shm/", 1)[1] for path in paths if path.startswith("/dev/shm/")}
    return held


def readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


def left_in_dev_shm(before: set[str]) -> list[str]:
    """What appeared in /dev/shm since `before` and nobody holds: what a finished run left behind."""
    return sorted(dev_shm() - before - held_in_dev_shm())


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


# both transports at p = 2; at p = 3 (a middle rank lost: two survivors, one on each side) shm, the default's choice
CASES = [(2, signal.SIGSTOP, "shm"), (2, signal.SIGSTOP, "p2p"), (2, signal.SIGKILL, "shm"), (2, signal.SIGKILL, "p2p"),
         (3, signal.SIGSTOP, "shm"), (3, signal.SIGKILL, "shm")]


@pytest.mark.parametrize("nproc,sig,transport", CASES,
                         ids=[f"p{p}-{'stop' if s == signal.SIGSTOP else 'kill'}-{t}" for p, s, t in CASES])
def test_a_lost_peer_makes_the_others_exit_with_a_clear_message(nproc, sig, transport, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "pipeline.train", "train.steps=1000000", "train.log_every=20", "train.eval_every=1000000",
           f"dist.timeout_s={TIMEOUT_S}", f"pipeline.transport={transport}", f"hydra.run.dir={run_dir}"]
    before = dev_shm()
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size,
                        150), "training never started"
        pids = workers(run_dir)
        assert sorted(pids) == list(range(nproc))
        victim = 1
        os.kill(pids[victim], sig)
        lost_at = time.monotonic()
        others = [pid for rank, pid in pids.items() if rank != victim]
        assert wait_for(lambda: not any(alive(pid) for pid in others), TIMEOUT_S + 20)
        took = time.monotonic() - lost_at
    finally:
        for pid in workers(run_dir).values():
            os.kill(pid, signal.SIGKILL)
        stdout, stderr = launcher.communicate(timeout=60)
    print(f"p={nproc} {signal.Signals(sig).name} {transport}: the other ranks exited {took:.1f} s after rank 1 "
          "was lost")
    assert took < TIMEOUT_S + 5
    links = {"shm": f"among ranks {' '.join(map(str, range(nproc)))} (one host): shm", "p2p": "every pair: p2p (gloo)"}
    assert stdout.splitlines()[0] == f"pipeline: messages {links[transport]}", stdout[:500]
    errors = [line for line in stderr.splitlines() if line.startswith("error: rank ")]
    print("\n".join(errors))
    survivors = sorted(set(range(nproc)) - {victim})
    assert sorted(int(line.split()[2].rstrip(":")) for line in errors) == survivors, stderr[-4000:]
    report = json.loads((run_dir / "hang_report.json").read_text())["ranks"]
    assert sorted(map(int, report)) == survivors
    for rank in survivors:
        entry = report[str(rank)]
        assert entry["waiting_on"] and entry["message"].startswith(f"rank {rank}: ")
        assert "recent_actions" in entry or entry["waiting_on"] in ("all_reduce", "init_process_group")
    if sig == signal.SIGSTOP:  # nobody tells them: their own timeout does, naming what they waited on
        assert all("no answer within 4 s (dist.timeout_s) at " in line for line in errors), errors
    else:  # a survivor waiting on rank 1 names it (gloo: the reset; shm: its pid), else torchrun's SIGTERM says it
        assert all(re.fullmatch(KILLED, line) for line in errors), errors
    assert left_in_dev_shm(before) == []  # nothing of a stopped or killed run (shm's memory is memfds)


KILLED = (r"error: rank \d: (a peer is gone at .*; its own log says why|rank \d \(pid \d+\) is gone at .*"
          r"|terminated by the launcher \(SIGTERM\); no rank reported a failure, so the launcher itself was stopped "
          r"\(or a rank was killed without a word\))")


class _TerminatedWait:
    def is_completed(self):  # the SIGTERM lands while the collective is polled (Comm.poll_s)
        raise Terminated("rank 0: terminated by the launcher (SIGTERM)")

    def wait(self, timeout):
        raise Terminated("rank 0: terminated by the launcher (SIGTERM)")


def test_a_sigterm_inside_a_collective_still_says_what_the_rank_waited_on(monkeypatch):
    """torchrun's SIGTERM can land in the all_reduce before gloo notices the peer that left: hang_report.json
    still names the collective."""
    monkeypatch.setattr(dist, "all_reduce", lambda *args, **kwargs: _TerminatedWait())
    comm = Comm([0], {}, True, 5.0, torch.device("cpu"), 0, 1, None, None)
    for poll_s in (0.0, 1.0):  # blocked in the wait, or still polling
        comm.poll_s = poll_s
        with pytest.raises(Terminated) as caught:
            comm.sum_world([1.0])
        assert caught.value.report["waiting_on"] == "all_reduce"
