"""How a rank's process ends: within seconds after a lost peer (even one stopped inside a collective),
when torchrun is killed, on Ctrl-C and SIGTERM; one line each, a failing peer named, nothing left behind."""

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.errors import disk_error
from pipeline.runtime import lifecycle
from pipeline.runtime.distributed import Comm
from pipeline.runtime.p2p import P2PTransport
from pipeline.runtime.transport import PeerTimeout, Terminated
from pipeline.training import checkpoint
from pipeline.training.watchdog import write_hang_report
from tests.conftest import ROOT
from tests.test_watchdog import alive, wait_for, workers

TIMEOUT_S = 4
LONG_RUN = ["train.steps=1000000", "train.log_every=1", "train.eval_every=1000000"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


class Lines:
    """A process's stderr, read line by line as it comes, each line with its arrival time."""

    def __init__(self, stream):
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def first(self, prefix: str) -> tuple[float, str] | None:
        return next(((t, line) for t, line in list(self.lines) if line.startswith(prefix)), None)

    def text(self) -> str:
        self.reader.join(timeout=30)
        return "\n".join(line for _, line in self.lines)


def torchrun(nproc: int, program: list[str], *torchrun_args: str, **popen) -> subprocess.Popen:
    """torchrun --standalone (a free port) with `program` (a script or -m module and its arguments)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *torchrun_args, *program]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, **popen)


def training(run_dir: Path, rows: int = 1) -> bool:
    """metrics.jsonl holds at least `rows` rows."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and metrics.read_text().count("\n") >= rows


def kill_all(launcher: subprocess.Popen, run_dir: Path, program: bytes = b"pipeline.train") -> None:
    for pid in workers(run_dir, program).values():
        os.kill(pid, signal.SIGKILL)
    if launcher.poll() is None:
        launcher.kill()
    launcher.wait(timeout=60)


@contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (root only), unmounted afterwards."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount_read_only(path: Path, within_s: float = 30.0) -> None:
    """Remount `path` read-only. The kernel refuses (EBUSY) while a file there is open for writing, and
    rank 1 opens metrics.jsonl for each row (log_every=1), so try again until the remount falls between two rows."""
    deadline = time.monotonic() + within_s
    while True:
        result = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
        if result.returncode == 0:
            return
        assert "busy" in result.stderr and time.monotonic() < deadline, result.stderr
        time.sleep(0.001)


# --- a survivor that never exits (issue 12, item 1) ----------------------------------------------

@pytest.mark.timeout(240)
def test_a_peer_stopped_inside_a_collective_leaves_a_survivor_that_exits(tmp_path):
    """Rank 1 stops itself right before the all_reduce of step 20 (log_every=1: one every step), so
    rank 0's gloo thread sits in that collective; rank 0 says so at dist.timeout_s and exits at once."""
    run_dir, script = tmp_path / "run", "tests/workers/rank1_at_step.py"
    launcher = torchrun(2, [script, "stop", "20", *LONG_RUN, f"dist.timeout_s={TIMEOUT_S}",
                            f"hydra.run.dir={run_dir}"])
    stderr = Lines(launcher.stderr)
    try:
        assert wait_for(lambda: stderr.first("rank 1: stop before the all_reduce"), 150), stderr.text()
        stopped, _ = stderr.first("rank 1: stop before the all_reduce")
        survivor = workers(run_dir, script.encode())[0]
        assert wait_for(lambda: not alive(survivor), TIMEOUT_S + 30), "rank 0 never exited"
        exited = time.monotonic()
    finally:
        kill_all(launcher, run_dir, script.encode())
    said, line = stderr.first("error: rank 0: ")
    print(f"stop -> error line {said - stopped:.2f} s, stop -> exit {exited - stopped:.2f} s: {line}")
    assert line.startswith(f"error: rank 0: no answer within {TIMEOUT_S} s (dist.timeout_s) at an all_reduce")
    assert said - stopped < TIMEOUT_S + 3
    assert exited - said < 3


# --- orphaned workers (item 3) -------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_workers_stop_when_torchrun_is_killed(tmp_path):
    run_dir = tmp_path / "run"
    launcher = torchrun(2, ["-m", "pipeline.train", *LONG_RUN, f"hydra.run.dir={run_dir}"])
    stderr = Lines(launcher.stderr)
    try:
        assert wait_for(lambda: training(run_dir), 150), stderr.text()
        pids = workers(run_dir)
        assert sorted(pids) == [0, 1]
        launcher.kill()
        killed, gone = time.monotonic(), {}
        while len(gone) < 2 and time.monotonic() - killed < 20:
            gone.update({rank: time.monotonic() - killed for rank, pid in pids.items()
                         if rank not in gone and not alive(pid)})
            time.sleep(0.05)
        metrics = (run_dir / "metrics.jsonl").stat().st_size
        time.sleep(1.5)
        assert (run_dir / "metrics.jsonl").stat().st_size == metrics, "metrics.jsonl still grows"
    finally:
        kill_all(launcher, run_dir)
    print("workers exited " + ", ".join(f"rank {rank} {took:.2f} s" for rank, took in sorted(gone.items()))
          + " after kill -9 of torchrun")
    assert sorted(gone) == [0, 1] and max(gone.values()) < 5, gone
    text = stderr.text()
    for rank in (0, 1):
        assert f"error: rank {rank}: the launcher (torchrun, pid {launcher.pid}) is gone; stopping" in text, text


# --- Ctrl-C (item 6) -----------------------------------------------------------------------------

INTERRUPTED = re.compile(r"interrupted at step (\d+); the last checkpoint is step (\d+)")


@pytest.mark.timeout(180)
def test_ctrl_c_of_one_process_is_one_line_and_exit_130(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *LONG_RUN, "checkpoint.every=3",
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (run_dir / "checkpoints" / "latest").exists() and training(run_dir, 5), 150)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = stderr.splitlines()
    assert proc.returncode == 130 and len(lines) == 1, stderr
    found = INTERRUPTED.fullmatch(lines[0])
    assert found, lines
    newest = checkpoint.complete_steps(run_dir)[-1]  # what train.resume=auto would continue from
    assert int(found[2]) == newest and int(found[1]) >= newest


@pytest.mark.timeout(240)
def test_ctrl_c_of_torchrun_ends_every_worker_with_130_and_one_line(tmp_path):
    """A terminal's Ctrl-C reaches torchrun's process group; torchrun passes SIGINT on to each
    worker's own session. Local rank 0 says where the run stood; both exit 130, no traceback."""
    run_dir, status, logs = tmp_path / "run", tmp_path / "status", tmp_path / "logs"
    status.mkdir()
    launcher = torchrun(2, ["tests/workers/exit_status.py", str(status), *LONG_RUN, "checkpoint.every=3",
                            f"hydra.run.dir={run_dir}"], f"--log-dir={logs}", "--redirects=2",
                        start_new_session=True)
    try:
        assert wait_for(lambda: training(run_dir, 5), 150)
        os.killpg(launcher.pid, signal.SIGINT)
        _, launcher_err = launcher.communicate(timeout=90)
    finally:
        kill_all(launcher, run_dir)
    assert {p.name: p.read_text() for p in status.iterdir()} == {"rank-0": "130", "rank-1": "130"}, launcher_err
    worker_err = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(worker_err) == [0, 1]
    assert INTERRUPTED.fullmatch(worker_err[0].rstrip("\n")), worker_err[0]
    assert worker_err[1] == "", worker_err[1]


# --- a failing peer tells the others why; full and read-only file systems (item 6) --------------

@pytest.mark.timeout(240)
def test_a_read_only_run_directory_mid_run_is_named_by_both_ranks(tmp_path):
    """Rank 1 (it writes metrics.jsonl) fails on the read-only remount, says why in one line and
    leaves a note; rank 0 names rank 1's failure at once instead of waiting dist.timeout_s=60."""
    with tmpfs(tmp_path / "fs", "4m") as fs:
        run_dir = fs / "run"
        launcher = torchrun(2, ["-m", "pipeline.train", *LONG_RUN, "dist.timeout_s=60", f"hydra.run.dir={run_dir}"])
        stderr = Lines(launcher.stderr)
        try:
            assert wait_for(lambda: training(run_dir, 3), 150), stderr.text()
            remount_read_only(fs)
            assert wait_for(lambda: launcher.poll() is not None, 60), stderr.text()
        finally:
            kill_all(launcher, run_dir)
        leftovers = sorted(p.name for p in run_dir.iterdir())
    failed = (f"read-only file system writing {run_dir}/metrics.jsonl; pick a writable hydra.run.dir")
    errors = {int(line.split()[2].rstrip(":")): (t, line) for t, line in stderr.lines
              if line.startswith("error: rank ")}
    print("\n".join(line for _, line in errors.values()), f"\n{errors[0][0] - errors[1][0]:.2f} s apart")
    assert errors[1][1] == f"error: rank 1: {failed}", stderr.text()
    assert errors[0][1].startswith(f"error: rank 0: stopped because rank 1 failed: {failed}"), errors[0][1]
    assert errors[0][0] - errors[1][0] < 10
    assert str(ROOT / "pipeline") not in stderr.text()  # no traceback from our code (torchrun prints its own)
    # the lock and the segment record were written before the remount; the next run takes the stale lock over
    assert leftovers == [".hydra", "metrics.jsonl", "run.lock", "segments.jsonl"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode,code,said", [
    ("bug", 1, "ZeroDivisionError: planted by the test"),
    ("user_error", 2, "planted.npz: planted by the test; fix the file")])
def test_a_rank_that_fails_after_connect_is_named_by_its_peer_at_once(mode, code, said, tmp_path):
    """Rank 1 fails on its own (a bug: its traceback, then its line) and leaves a note; rank 0, waiting
    in the all_reduce, reads it and says why at once, not after dist.timeout_s=60."""
    run_dir, script = tmp_path / "run", "tests/workers/rank1_at_step.py"
    launcher = torchrun(2, [script, mode, "5", *LONG_RUN, "dist.timeout_s=60", "train.eval_every=1000000",
                            f"hydra.run.dir={run_dir}"], "--log-dir", str(tmp_path / "logs"), "--redirects=2")
    try:
        _, launcher_err = launcher.communicate(timeout=200)
    finally:
        kill_all(launcher, run_dir, script.encode())
    worker_err = {int(p.parent.name): p.read_text().splitlines() for p in (tmp_path / "logs").rglob("stderr.log")}
    if mode == "bug":
        assert worker_err[1][-1] == f"error: rank 1: {said}" and "Traceback (most recent call last):" in worker_err[1]
    else:  # a user error is said by local rank 0 only (see errors.say): here, through the note
        assert not [line for line in worker_err[1] if line.startswith(("error:", "Traceback"))], worker_err[1]
    assert worker_err[0][-1] == f"error: rank 0: stopped because rank 1 failed: {said}", worker_err[0]
    assert "Traceback (most recent call last):" not in worker_err[0]
    assert f"exitcode  : {code}" in launcher_err  # torchrun's summary names rank 1's exit code
    report = json.loads((run_dir / "hang_report.json").read_text())["ranks"]
    assert report["0"]["waiting_on"] == "all_reduce"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport,gone", [("shm", r"rank 1 \(pid (\d+)\) is gone"), ("p2p", "a peer is gone")])
def test_a_rank_killed_before_the_all_reduce_is_named_gone_by_its_peer(transport, gone, tmp_path):
    """Rank 1 SIGKILLs itself right before the all_reduce of step 5, so rank 0 sits in that collective when the
    connection closes: rank 0 says at once that the peer is gone (with its pid, where shm knows the pids of its
    host), not that it had no answer within dist.timeout_s=60. torchrun looks at its workers every 5 s here,
    so its SIGTERM does not end rank 0 before rank 0 has said so."""
    run_dir, script = tmp_path / "run", "tests/workers/rank1_at_step.py"
    launcher = torchrun(2, [script, "kill", "5", *LONG_RUN, "dist.timeout_s=60", f"pipeline.transport={transport}",
                            f"hydra.run.dir={run_dir}"], "--log-dir", str(tmp_path / "logs"), "--redirects=2",
                        "--monitor-interval=5")
    began = time.monotonic()
    try:
        launcher.communicate(timeout=200)
    finally:
        kill_all(launcher, run_dir, script.encode())
    took = time.monotonic() - began
    worker_err = {int(p.parent.name): p.read_text().splitlines() for p in (tmp_path / "logs").rglob("stderr.log")}
    assert "rank 1: kill before the all_reduce of step 5" in worker_err[1]
    line = worker_err[0][-1]
    print(f"{took:.1f} s: {line}")
    assert took < 60
    tail = "; its own log says why" if transport == "p2p" else ""
    assert re.fullmatch(rf"error: rank 0: {gone} at an all_reduce \(.*(closed|reset) by peer[^()]*\){tail}",
                        line), worker_err[0][-5:]
    assert "Traceback (most recent call last):" not in worker_err[0]
    report = json.loads((run_dir / "hang_report.json").read_text())["ranks"]
    assert report["0"]["waiting_on"] == "all_reduce"


@pytest.mark.timeout(120)
def test_a_full_run_directory_is_one_line_naming_the_file_and_leaves_no_tmp(tmp_path):
    with tmpfs(tmp_path / "fs", "128k") as fs:
        run_dir = fs / "run"
        result = subprocess.run([sys.executable, "-m", "pipeline.train", "train.steps=20", "checkpoint.every=5",
                                 f"hydra.run.dir={run_dir}"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                                timeout=100)
        left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    shard = run_dir / "checkpoints" / "step_00000005" / "stage_000.pt"
    assert result.returncode == 1 and result.stderr.splitlines() == [
        f"error: rank 0: no space left on device writing {shard}; free space there or pick another hydra.run.dir"
    ], result.stderr
    assert not [name for name in left if name.endswith((".tmp", ".lock"))], left


@pytest.mark.timeout(120)
def test_a_run_directory_on_a_full_file_system_is_one_line_and_leaves_nothing(tmp_path):
    """Full before the run starts: the first file written is the lock, and it is named, not left behind empty."""
    with tmpfs(tmp_path / "fs", "64k") as fs:
        (fs / "fill").write_bytes(b"\0" * (64 * 1024 - 4096))  # what tmpfs does not round up fills it
        with contextlib.suppress(OSError):
            with open(fs / "fill", "ab") as f:
                f.write(b"\0" * 8192)
        run_dir = fs / "run"
        result = subprocess.run([sys.executable, "-m", "pipeline.train", "train.steps=5", f"hydra.run.dir={run_dir}"],
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=100)
        left = sorted(p.name for p in run_dir.iterdir())
    assert result.returncode == 1 and result.stderr.splitlines() == [
        f"error: rank 0: no space left on device writing {run_dir / 'run.lock'}; free space there or pick another "
        "hydra.run.dir"], result.stderr
    assert left == []


def test_disk_errors_name_the_cause_the_path_and_the_fix(tmp_path):
    assert disk_error(OSError(errno.ENOSPC, "No space left on device", "/d/a.pt"), tmp_path) == \
        "no space left on device writing /d/a.pt; free space there or pick another hydra.run.dir"
    assert disk_error(OSError(errno.EROFS, "Read-only file system"), tmp_path) == \
        f"read-only file system writing {tmp_path}; pick a writable hydra.run.dir"  # write() names no file
    assert disk_error(OSError(errno.ENOENT, "No such file or directory", "/d/a.pt"), tmp_path) is None


def test_a_failure_note_reaches_the_peers_and_only_them(monkeypatch):
    monkeypatch.setattr(lifecycle, "_store", None)
    assert lifecycle.failed_peers(0, 2) == []  # one process: no store, no notes
    lifecycle.keep_store(dist.HashStore())
    lifecycle.note_failure(1, "rank 1: no space left on device writing /d/metrics.jsonl")
    assert lifecycle.failed_peers(0, 3) == [(1, "no space left on device writing /d/metrics.jsonl")]
    assert lifecycle.failed_peers(1, 3) == []  # its own note is no news to rank 1


# --- hang_report.json: keyed by the writer's global rank, nothing left behind (item 8) ------------

def test_hang_report_entries_are_keyed_by_the_global_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    write_hang_report(tmp_path, Terminated("rank 3: terminated by the launcher (SIGTERM)"))  # no report at all
    lost = PeerTimeout("rank 3: no answer")
    lost.report.update(rank=1, waiting_on="1RECV_F0")  # the runtime's rank is the pipeline rank
    monkeypatch.setenv("RANK", "2")
    write_hang_report(tmp_path, lost, "rank 2: stopped because rank 3 failed: it did")
    ranks = json.loads((tmp_path / "hang_report.json").read_text())["ranks"]
    assert sorted(ranks) == ["2", "3"]
    assert ranks["2"]["rank"] == 2 and ranks["2"]["pipeline_rank"] == 1
    assert ranks["2"]["message"] == "rank 2: stopped because rank 3 failed: it did"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hang_report.json"]  # no .lock, no .tmp


def test_a_hang_report_that_cannot_be_written_leaves_nothing(tmp_path):
    with tmpfs(tmp_path / "fs", "64k") as fs:
        with open(fs / "filler", "wb", buffering=0) as filler, pytest.raises(OSError):  # fill it up
            while True:
                filler.write(b"x" * 4096)
        with pytest.raises(OSError) as caught:
            write_hang_report(fs, PeerTimeout("rank 0: no answer"))
        left = sorted(p.name for p in fs.iterdir())
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(fs / "hang_report.json")
    assert left == ["filler"]


# --- SIGTERM to torchrun (item 8) ----------------------------------------------------------------

class Terminating:
    """A gloo Work whose wait is cut short by torchrun's SIGTERM (the handler raises Terminated)."""

    def wait(self, timeout=None):
        raise Terminated("rank 0: terminated by the launcher (SIGTERM)")


def test_a_sigterm_inside_a_wait_stays_a_termination_not_a_timeout(monkeypatch):
    transport = P2PTransport(0, 60)
    transport.posted[(1, 3)] = (Terminating(), torch.zeros(1))
    with pytest.raises(Terminated, match=r"^rank 0: terminated by the launcher \(SIGTERM\)$"):
        transport.recv(1, 3, "0RECV_B0", lambda: torch.zeros(1))
    monkeypatch.setattr(dist, "all_reduce", lambda *args, **kwargs: Terminating())
    comm = Comm([0], {0: transport}, True, 60, torch.device("cpu"))
    with pytest.raises(Terminated, match=r"^rank 0: terminated by the launcher \(SIGTERM\)$"):
        comm.sum(1.0)


@pytest.mark.timeout(240)
def test_sigterm_to_torchrun_says_the_launcher_was_stopped_not_that_a_rank_failed(tmp_path):
    run_dir = tmp_path / "run"
    launcher = torchrun(2, ["-m", "pipeline.train", *LONG_RUN, f"hydra.run.dir={run_dir}"])
    try:
        assert wait_for(lambda: training(run_dir), 150)
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=90)
    finally:
        kill_all(launcher, run_dir)
    errors = sorted(line for line in stderr.splitlines() if line.startswith("error: rank "))
    said = ("terminated by the launcher (SIGTERM); no rank reported a failure, so the launcher itself was "
            "stopped (or a rank was killed without a word)")
    assert errors == [f"error: rank {rank}: {said}" for rank in (0, 1)], stderr
    assert sorted(json.loads((run_dir / "hang_report.json").read_text())["ranks"]) == ["0", "1"]
