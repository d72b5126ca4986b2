"""Multi-process pipelines over gloo: equivalence, a peer that never answers, the torchrun CLI."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline.runtime import distributed
from pipeline.training import checkpoint
from pipeline.training.equivalence import difference, grid, problem, reference
from tests.conftest import run_cli, write_npz
from tests.launch import ROOT, kill, start, wait

pytestmark = pytest.mark.timeout(300)
TOL = 1e-6


def differences_from_single_device(p: int, transport: str, out_dir) -> tuple[dict[str, float], str]:
    """Every case of the grid at p, trained in one launch of p processes over `transport`: the difference of
    each case's final weights from single-device training, and rank 0's output."""
    cases = [{**case, "transport": transport} for case in grid(ranks=(p,))]
    procs = start(p, lambda rank: ["tests/workers/rank.py", "train", json.dumps(cases), str(out_dir)])
    results = wait(procs, timeout=240)
    assert all(code == 0 for code, _ in results), "\n".join(out for _, out in results)
    ref = reference(problem())
    worst = {}
    for i, case in enumerate(cases):
        params = checkpoint.load_layers(out_dir / f"case{i}")[1]
        worst["{schedule} m={microbatches} v={virtual_stages}".format(**case)] = difference(params, ref)
    return worst, results[0][1]


@pytest.mark.parametrize("p", [2, 3, 4])
def test_gloo_pipelines_equal_single_device_training(p, tmp_path):
    worst, _ = differences_from_single_device(p, "p2p", tmp_path)
    assert max(worst.values()) <= TOL, worst


def test_a_peer_that_never_answers_fails_the_others_within_the_timeout(tmp_path):
    case = json.dumps([{"schedule": "1f1b", "microbatches": 4, "timeout_s": 3}])
    procs = start(3, lambda rank: ["tests/workers/rank.py", "silent"] if rank == 1 else
                  ["tests/workers/rank.py", "train", case, str(tmp_path)])
    began = time.monotonic()
    try:
        results = wait([procs[0], procs[2]], timeout=60)
    finally:
        kill(procs)
    assert time.monotonic() - began < 45  # 3 s timeout + start-up, not the 60 s of a hang
    (code0, out0), (code2, out2) = results
    assert code0 == 3 and "PeerTimeout: rank 0: no answer within 3 s (dist.timeout_s) at 0RECV_B0 waiting for " \
                           "stage 1 on rank 1; last completed action: 0SEND_F2" in out0, out0
    assert code2 == 3 and "PeerTimeout: rank 2: no answer within 3 s (dist.timeout_s) at 2RECV_F0 waiting for " \
                           "stage 1 on rank 1; last completed action: none" in out2, out2


def autograd_sgd(data_path, init, hidden, steps, batch, lr, l2):
    """Plain nn.Sequential + autograd full-batch SGD on J = L + l2/2 sum ||W||^2 (file order, drop-last)."""
    z = np.load(data_path)
    x, y = torch.tensor(z["X"]), torch.tensor(z["y"])
    dims = [x.shape[1], *hidden, int(y.max()) + 1]
    mods = []
    for i in range(len(dims) - 1):
        mods += [torch.nn.Linear(dims[i], dims[i + 1], bias=False, dtype=torch.float64), torch.nn.Tanh()]
    net = torch.nn.Sequential(*mods[:-1])
    net.load_state_dict(init)
    for t in range(steps):
        i = (t % (len(x) // batch)) * batch
        net.zero_grad()
        J = torch.nn.functional.cross_entropy(net(x[i:i + batch]), y[i:i + batch])
        J = J + l2 / 2 * sum((m.weight ** 2).sum() for m in net if isinstance(m, torch.nn.Linear))
        J.backward()
        with torch.no_grad():
            for param in net.parameters():
                param -= lr * param.grad
    return net.state_dict()


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_contract_run_equals_plain_autograd_sgd(nproc, tmp_path):
    data = write_npz(tmp_path / "d.npz")
    run = tmp_path / "R"
    result = run_cli("torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "pipeline.train",
                     "data=npz", f"data.path={data}", "data.shuffle=false", "model.hidden=[8,7,6]",
                     "model.activation=tanh", "model.bias=false", "model.dtype=float64", "loss.l2=0.05", "optim=sgd",
                     "optim.lr=0.2", "train.steps=3", "train.batch_size=12", "pipeline.schedule=1f1b",
                     "pipeline.microbatches=5", "pipeline.virtual_stages=1", "checkpoint.save_initial=true",
                     f"hydra.run.dir={run}", timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ranks={nproc} schedule=1f1b microbatches=5" in result.stdout
    for step, name in ((0, "init.pt"), (None, "final.pt")):
        args = ["pipeline.export", str(run), str(tmp_path / name)] + ([] if step is None else ["--step", str(step)])
        assert run_cli(*args).returncode == 0
    init = torch.load(tmp_path / "init.pt", weights_only=True)
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    ref = autograd_sgd(data, init, [8, 7, 6], steps=3, batch=12, lr=0.2, l2=0.05)
    assert sorted(final) == sorted(ref) == ["0.weight", "2.weight", "4.weight", "6.weight"]
    worst = max(float((final[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)
    assert worst <= TOL and not torch.equal(final["0.weight"], init["0.weight"])
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000003").glob("stage_*.pt")) == \
        [f"stage_{s:03d}.pt" for s in range(nproc)]


def test_torchrun_refuses_an_impossible_layout_on_every_rank_with_one_line(tmp_path):
    result = run_cli("torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "pipeline.train",
                     "model.hidden=[8]", f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: 3 rank(s) x pipeline.virtual_stages=1 gives 3 stages but the model has 2 layers; "
                      "add layers to model.hidden or use fewer stages"]
    assert "exitcode  : 2" in result.stderr  # every rank exited with the user-error code


def test_time_partition_splits_the_large_layers_that_uniform_puts_on_one_rank(tmp_path):
    """benchmarks/partition.py, one round: layers 0-4 are small and 5-8 are 768 x 768, so the uniform cut
    (5 | 5 layers) puts all four large ones on rank 1 and the measured times put two on each rank. Which is
    faster is the benchmark's to say, not a test's: it read time / uniform 0.62 (0.61-0.65 over 3 rounds) on
    2026-12-03, and the timed test this replaces failed in CI that day at 1.09 (177.9 against 163.6 ms)."""
    out = tmp_path / "raw.json"
    result = subprocess.run([sys.executable, "benchmarks/partition.py", "--rounds", "1", "--steps", "6",
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=250)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert runs["uniform"][0]["cut"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert runs["time"][0]["cut"] == [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9]]
    assert all(0 < r[0]["fastest_s"] <= r[0]["median_s"] for r in runs.values()), runs
    ratio = [line for line in result.stdout.splitlines() if line.startswith("- time / uniform, fastest step: ")]
    shown = float(ratio[0].split("**")[1])
    assert shown == pytest.approx(runs["time"][0]["fastest_s"] / runs["uniform"][0]["fastest_s"], abs=0.006)


class _Work:
    """A collective that completes `after_s` from now (or never)."""

    def __init__(self, after_s: float | None):
        self.at = None if after_s is None else time.monotonic() + after_s
        self.looks = 0

    def is_completed(self) -> bool:
        self.looks += 1
        return self.at is not None and time.monotonic() >= self.at


def test_a_collective_is_polled_until_it_completes_and_no_longer_than_asked():
    began, soon = time.monotonic(), _Work(0.01)
    distributed.poll(soon, 1.0)
    assert 0.01 <= time.monotonic() - began < 0.5 and soon.looks > 1  # it looked until the work was done
    began, never = time.monotonic(), _Work(None)
    distributed.poll(never, 0.05)
    assert 0.05 <= time.monotonic() - began < 0.5  # then the caller's wait, with its timeout, takes over
    began, unpolled = time.monotonic(), _Work(None)
    distributed.poll(unpolled, 0.0)  # a host with fewer cores than ranks: block at once
    assert unpolled.looks == 0 and time.monotonic() - began < 0.05


def test_a_core_for_each_rank_is_what_the_affinity_mask_allows():
    cores = len(os.sched_getaffinity(0))
    assert distributed.core_each(cores) and distributed.core_each(1) and not distributed.core_each(cores + 1)


def test_a_wait_in_python_returns_when_the_work_is_done_and_refuses_past_its_timeout():
    began = time.monotonic()
    distributed.wait_in_python(_Done(_Work(0.05)), 5.0, 0.0)
    assert 0.05 <= time.monotonic() - began < 1.0
    with pytest.raises(TimeoutError, match=r"^no answer within 0.1 s \(dist.timeout_s\)$"):
        distributed.wait_in_python(_Done(_Work(None)), 0.1, 0.0)


class _Done:
    """A _Work that can also be waited for (as dist.Work)."""

    def __init__(self, work: _Work):
        self.work = work

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def wait(self) -> None:
        assert self.work.is_completed()
