"""Run directories: two runs started in the same second never share one, a live run's directory is refused in
one line, a dead run's lock is taken over, every rank of a torchrun multirun agrees, and each segment is kept."""

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.runtime.distributed import Env
from pipeline.training import checkpoint, rundir
from pipeline.training.export import export
from pipeline.training.trainer import train
from tests.conftest import ROOT, make_cfg, run_cli

pytestmark = pytest.mark.timeout(180)
WORKER = str(ROOT / "tests" / "workers" / "held_train.py")
SMALL = ("data=synthetic", "data.n=200", "data.dim=5", "data.classes=3", "model.hidden=[6,6]",
         "train.batch_size=10", "pipeline.microbatches=2", "train.steps=20", "train.log_every=5",
         "train.eval_every=10")
LOSS_ROWS, TEST_ROWS = [5, 10, 15, 20], [10, 20]  # train.steps / train.log_every, and the two evaluations
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_one_run_logged(run_dir: Path, lr: float) -> None:
    """metrics.jsonl holds exactly one run's rows: 4 loss rows of its lr, 2 test rows and the last row."""
    logged = rows(run_dir)
    assert [r["step"] for r in logged if "loss" in r] == LOSS_ROWS, logged
    assert [r["step"] for r in logged if "test_accuracy" in r] == TEST_ROWS, logged
    assert {r["lr"] for r in logged if "loss" in r} == {lr} and len(logged) == 7


def python(*args: str, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def torchrun(*args: str, cwd: Path = ROOT) -> subprocess.Popen:
    return python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args, cwd=cwd)


def finish(proc: subprocess.Popen, timeout: float = 150) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_two_runs_started_in_the_same_second_get_two_directories(tmp_path):
    clock = str(int(time.time()))  # both processes read this very second as the time they started
    procs = [python(WORKER, clock, "-", *SMALL, f"optim.lr={lr}", cwd=tmp_path) for lr in (0.1, 0.01)]
    results = [finish(p) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    dirs = sorted((tmp_path / "runs").glob("*/*"))
    print("directories:", *(d.relative_to(tmp_path) for d in dirs))
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(int(clock)))
    assert sorted(str(d.relative_to(tmp_path / "runs")) for d in dirs) == \
        sorted(f"{stamp}-{p.pid}" for p in procs)  # the same second, told apart by the pid
    for proc, lr in zip(procs, (0.1, 0.01)):
        run_dir = tmp_path / "runs" / f"{stamp}-{proc.pid}"
        assert_one_run_logged(run_dir, lr)
        print(f"{run_dir.relative_to(tmp_path)}/metrics.jsonl: {len(rows(run_dir))} rows")


def start_held(holder: str, run_dir: Path, gate: Path) -> subprocess.Popen:
    args = [WORKER, "-", str(gate), *SMALL, "optim.lr=0.1", f"hydra.run.dir={run_dir}"]
    return torchrun(*args) if holder == "p2" else python(*args)


@pytest.mark.parametrize("holder,second", [("p2", "p1"), ("p1", "p2")])
def test_a_directory_a_live_run_holds_is_refused_in_one_line(holder, second, tmp_path):
    run_dir, gate = tmp_path / "shared", tmp_path / "gate"
    first = start_held(holder, run_dir, gate)
    try:
        assert wait_for(lambda: (run_dir / rundir.SEGMENTS).exists(), 120), "the first run never started"
        record = json.loads((run_dir / rundir.LOCK).read_text())
        args = [*SMALL, "optim.lr=0.01", f"hydra.run.dir={run_dir}"]
        code, out, err = finish(torchrun("-m", "pipeline.train", *args) if second == "p2"
                                else python("-m", "pipeline.train", *args))
    finally:
        gate.touch()
    first_code, _, first_err = finish(first)
    assert first_code == 0, first_err[-3000:]
    refusal = (f"error: hydra.run.dir={run_dir} is in use by another run (pid {record['pid']} on "
               f"{socket.gethostname()}, started {record['started']}); wait for it to finish, or pick another "
               "hydra.run.dir")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    print(*errors, sep="\n")
    assert f"{os.sep}pipeline{os.sep}" not in err  # no traceback through our code (torchrun adds its own report)
    if second == "p1":
        assert code == 2 and errors == [refusal], err[-3000:]
    else:  # each rank refuses by itself or is ended by torchrun once the other has: the reason is said once
        assert code != 0 and errors.count(refusal) == 1, err[-3000:]
    assert_one_run_logged(run_dir, 0.1)
    print(f"metrics.jsonl: {len(rows(run_dir))} rows")
    assert not (run_dir / rundir.LOCK).exists()  # the holder removed it when it finished


HOLD = "import sys, time; from pipeline.training import rundir; from pipeline.runtime.distributed import read_env\n" \
       "with rundir.hold(sys.argv[1], read_env()):\n    print('held', flush=True); time.sleep(100)"


def test_a_held_directory_is_refused_and_a_dead_holder_s_lock_is_taken_over(tmp_path, capsys):
    holder = python("-c", HOLD, str(tmp_path))
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(rundir.RunDirBusy, match=rf"^hydra.run.dir={tmp_path} is in use by another run "
                                                    rf"\(pid {holder.pid} on {socket.gethostname()}, started "):
            train(make_cfg(*SMALL, "train.steps=2"), tmp_path)
        other_job = Env(rank=1, world_size=2, local_rank=1, local_world_size=2, run_id="another")
        with pytest.raises(rundir.RunDirBusy):  # rank 1 of another job refuses without its rank 0
            with rundir.hold(tmp_path, other_job):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # it dies holding the lock: the file stays, the flock goes
        holder.communicate()
    assert (tmp_path / rundir.LOCK).exists()
    capsys.readouterr()
    with contextlib.redirect_stdout(io.StringIO()):
        train(make_cfg(*SMALL, "train.steps=2"), tmp_path)
    warning = capsys.readouterr().err.strip().splitlines()
    print(*warning)
    assert len(warning) == 1 and warning[0].startswith(
        f"warning: {tmp_path / rundir.LOCK}: taking over the lock of a run that is gone (pid {holder.pid} on "), warning
    assert checkpoint.complete_steps(tmp_path) == [2] and not (tmp_path / rundir.LOCK).exists()


def test_each_segment_is_recorded_and_hydra_keeps_the_first_config(tmp_path):
    first = run_cli("pipeline.train", *SMALL, "train.steps=4", "optim.lr=0.1", f"hydra.run.dir={tmp_path}")
    assert first.returncode == 0, first.stderr
    second = run_cli("pipeline.train", *SMALL, "train.steps=8", "optim.lr=0.05", f"hydra.run.dir={tmp_path}")
    assert second.returncode == 0, second.stderr
    segments = rundir.segments(tmp_path)
    assert [(s["segment"], s["resumed_from"], s["world_size"]) for s in segments] == [(1, None, 1), (2, 4, 1)]
    assert [s["overrides"][-2:] for s in segments] == [["train.steps=4", "optim.lr=0.1"],
                                                       ["train.steps=8", "optim.lr=0.05"]]
    assert [(s["config"]["train"]["steps"], s["config"]["optim"]["lr"]) for s in segments] == [(4, 0.1), (8, 0.05)]
    config = OmegaConf.load(tmp_path / ".hydra" / "config.yaml")
    assert (config.train.steps, config.optim.lr) == (4, 0.1)  # the first segment's, not overwritten
    assert list(OmegaConf.load(tmp_path / ".hydra" / "overrides.yaml")) == segments[0]["overrides"]
    assert OmegaConf.load(tmp_path / ".hydra" / "hydra.yaml").hydra.run.dir == str(tmp_path)


def test_a_torchrun_multirun_puts_every_rank_in_the_same_directories(tmp_path):
    code, out, err = finish(torchrun("-m", "pipeline.train", "-m", *SMALL, "train.steps=6", "optim.lr=0.1,0.01",
                                     "dist.timeout_s=30", cwd=tmp_path), timeout=170)
    assert code == 0, err[-3000:]
    sweeps = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 1 and sweeps[0].name.startswith("torchrun-"), sweeps  # one directory for both ranks
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    done = sorted(line.split("run_dir=")[1] for line in out.splitlines() if line.startswith("pipeline: done"))
    assert done == [str(p.absolute()) for p in jobs]  # rank 1 reports from where rank 0 wrote .hydra/
    for job, lr in zip(jobs, (0.1, 0.01)):
        assert checkpoint.complete_steps(job) == [6] and (job / ".hydra" / "config.yaml").is_file()
        assert sorted(p.name for p in checkpoint.step_dir(job, 6).glob("stage_*.pt")) == ["stage_000.pt",
                                                                                           "stage_001.pt"]
        assert {r["lr"] for r in rows(job) if "loss" in r} == {lr}
        assert export(str(job), str(job / "final.pt")) == 6
    print("directories:", *(j.relative_to(tmp_path) for j in jobs))


def test_the_default_name_is_resolved_once_per_process(monkeypatch):
    monkeypatch.setattr(rundir, "_names", {})
    for key in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    name = rundir.default_dir("runs")
    assert re.fullmatch(rf"runs/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d-{os.getpid()}", name), name
    monkeypatch.setattr(time, "time", lambda: 0.0)  # Hydra resolves it again after the clock moved on
    assert rundir.default_dir("runs") == name


@pytest.mark.parametrize("run_id", ["none", None])
def test_a_job_without_a_run_id_is_named_after_its_launcher(run_id, monkeypatch):
    monkeypatch.setattr(rundir, "_names", {})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    if run_id:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    started = rundir._process_started(os.getppid())
    assert rundir.default_dir() == time.strftime("runs/%Y-%m-%d/%H-%M-%S", time.localtime(started)) + \
        f"-{os.getppid()}"  # every rank is a child of the same torchrun agent


def test_a_lock_file_removed_between_open_and_flock_is_not_the_one_held(tmp_path, monkeypatch):
    real_flock, calls = rundir.fcntl.flock, []

    def flock_after_the_holder_left(fd, op):
        if not calls:  # the previous holder unlinks its file right after our open, before our flock
            (tmp_path / rundir.LOCK).unlink()
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(rundir.fcntl, "flock", flock_after_the_holder_left)
    env = Env(rank=0, world_size=1, local_rank=0, local_world_size=1, run_id=None)
    with rundir.hold(tmp_path, env):
        assert len(calls) == 2  # the orphaned inode was let go and the new file locked
        assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / rundir.LOCK).exists()
