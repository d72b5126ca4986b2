"""A stopped (SIGSTOP) or killed (SIGKILL) rank under torchrun: every other rank exits within the
timeout with one line naming itself, what it waited on and its last action; hang_report.json."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("nproc,sig", [(2, signal.SIGSTOP), (3, signal.SIGSTOP), (2, signal.SIGKILL),
                                       (3, signal.SIGKILL)], ids=["p2-stop", "p3-stop", "p2-kill", "p3-kill"])
def test_a_lost_peer_makes_the_others_exit_with_a_clear_message(nproc, sig, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "pipeline.train", "train.steps=1000000", "train.log_every=20", "train.eval_every=1000000",
           f"dist.timeout_s={TIMEOUT_S}", f"hydra.run.dir={run_dir}"]
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
        _, stderr = launcher.communicate(timeout=60)
    assert took < TIMEOUT_S + 20
    print(f"p={nproc} {signal.Signals(sig).name}: the other ranks exited {took:.1f} s after rank 1 was lost")
    errors = [line for line in stderr.splitlines() if line.startswith("error: rank ")]
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
