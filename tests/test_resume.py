"""Resuming: a stopped run ends bit for bit where an uninterrupted one does, under any other layout to 1e-6,
after a SIGKILL under torchrun's restarts too; train.resume's refusals; a NaN loss stops every rank."""

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import config
from pipeline.errors import ConfigError
from pipeline.mlp.model import MLPSpec
from pipeline.training import checkpoint
from pipeline.training.trainer import NonFiniteLoss, train
from tests.conftest import make_cfg, write_npz
from tests.launch import ROOT, kill, start, wait

pytestmark = pytest.mark.timeout(120)

# 8 layers (enough for 4 ranks x 2 virtual stages), float64, a batch of 10 in 4 micro-batches
SMALL = ("data=synthetic", "data.n=120", "data.dim=5", "data.classes=3", "model.hidden=[6,5,6,5,6,5,6]",
         "model.activation=tanh", "model.dtype=float64", "loss.l2=0.05", "train.batch_size=10",
         "pipeline.microbatches=4", "train.log_every=2", "train.eval_every=100")
SGD = ("optim=sgd", "optim.lr=0.2", "optim.momentum=0.5")
ADAM = ("optim=adam", "optim.lr=0.01")


def layout(p: int, v: int) -> list[str]:
    schedule = "interleaved_1f1b" if v > 1 else "1f1b"
    return ["pipeline.transport=inprocess", f"pipeline.ranks={p}", f"pipeline.virtual_stages={v}",
            f"pipeline.schedule={schedule}"]


def run(run_dir: Path, *overrides: str) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return train(make_cfg(*SMALL, *overrides), run_dir)


def final(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    return checkpoint.load_layers(run_dir)[1]


def relative_difference(a, b) -> float:
    return max(float((a[i][k] - t).abs().max() / t.abs().max()) for i in b for k, t in b[i].items())


def identical(a, b) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[i][k], b[i][k]) for i in b for k in b[i])


def uninterrupted_runs(tmp_path_factory):
    """Final weights and logged losses of an uninterrupted run, trained once per set of overrides."""
    done: dict[tuple, tuple] = {}

    def get(*overrides: str) -> tuple[dict, list]:
        if overrides not in done:
            run_dir = tmp_path_factory.mktemp("uninterrupted")
            run(run_dir, *overrides)
            done[overrides] = final(run_dir), loss_rows(run_dir)
        return done[overrides]

    return get


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return uninterrupted_runs(tmp_path_factory)


def loss_rows(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["reg"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("optim", [SGD, ADAM], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("p,v", [(1, 1), (2, 2)])
def test_a_stopped_and_resumed_run_ends_bit_for_bit_like_an_uninterrupted_one(optim, p, v, tmp_path,
                                                                              uninterrupted):
    params, losses = uninterrupted(*optim, *layout(p, v), "train.steps=9")
    run(tmp_path, *optim, *layout(p, v), "train.steps=4")
    summary = run(tmp_path, *optim, *layout(p, v), "train.steps=9")
    assert summary["resumed_from"] == 4
    assert identical(final(tmp_path), params)
    assert loss_rows(tmp_path) == losses  # appended, not truncated: steps 2, 4, 6, 8, 9


# (p, v) -> (p', v'), interleaved_1f1b where v = 2; Adam on a few, SGD with momentum on all
RESHARDS = [(SGD, (2, 1), (1, 1)), (SGD, (2, 1), (4, 1)), (SGD, (2, 2), (3, 1)), (SGD, (4, 1), (2, 2)),
            (SGD, (1, 1), (2, 2)), (SGD, (3, 1), (4, 2)), (ADAM, (2, 2), (3, 1)), (ADAM, (4, 1), (1, 1))]


@pytest.mark.parametrize("optim,before,after", RESHARDS,
                         ids=[f"{o[0][6:]}-{a}->{b}" for o, a, b in RESHARDS])
def test_a_checkpoint_resumes_under_any_other_layout(optim, before, after, tmp_path, uninterrupted):
    params, _ = uninterrupted(*optim, *layout(1, 1), "train.steps=8")
    run(tmp_path, *optim, *layout(*before), "train.steps=3")
    summary = run(tmp_path, *optim, *layout(*after), "train.steps=8")
    assert summary["resumed_from"] == 3 and summary["ranks"] == after[0]
    assert relative_difference(final(tmp_path), params) <= 1e-6


def test_an_in_process_checkpoint_resumes_over_gloo(tmp_path, uninterrupted):
    params, _ = uninterrupted(*SGD, *layout(1, 1), "train.steps=8")
    run(tmp_path, *SGD, *layout(3, 1), "train.steps=3")
    overrides = [*SMALL, *SGD, "train.steps=8", f"hydra.run.dir={tmp_path}"]
    results = wait(start(2, lambda rank: ["-m", "pipeline.train", *overrides]), timeout=100)
    assert all(code == 0 for code, _ in results), "\n".join(out for _, out in results)
    assert "pipeline: resuming" in results[1][1] and "ranks=2" in results[1][1] and "resumed_from=3" in results[1][1]
    assert relative_difference(final(tmp_path), params) <= 1e-6


def test_replicas_resume_any_checkpoint_and_theirs_resume_anywhere(tmp_path, uninterrupted):
    params, _ = uninterrupted(*SGD, *layout(1, 1), "train.steps=8")
    run(tmp_path, *SGD, *layout(2, 1), "train.steps=3")  # one process, p = 2
    overrides = [*SMALL, *SGD, "parallel.dp=2", "train.steps=6", f"hydra.run.dir={tmp_path}"]
    results = wait(start(4, lambda rank: ["-m", "pipeline.train", *overrides]), timeout=110)  # p = 2 x d = 2
    assert all(code == 0 for code, _ in results), "\n".join(out for _, out in results)
    summaries = [line for _, out in results for line in out.splitlines() if line.startswith("pipeline: done")]
    assert len(summaries) == 1 and "replicas=2 resumed_from=3" in summaries[0]
    assert checkpoint.read_meta(tmp_path, 6)["replicas"] == 2
    run(tmp_path, *SGD, *layout(3, 1), "train.steps=8")  # replica 0's shards, read by another layout
    assert relative_difference(final(tmp_path), params) <= 1e-6


def test_resuming_from_an_earlier_step_replaces_the_later_history(tmp_path, uninterrupted):
    params, losses = uninterrupted(*SGD, *layout(1, 1), "train.steps=8")
    run(tmp_path, *SGD, *layout(1, 1), "train.steps=8", "checkpoint.every=2", "checkpoint.keep=0")
    assert checkpoint.complete_steps(tmp_path) == [2, 4, 6, 8]
    summary = run(tmp_path, *SGD, *layout(1, 1), "train.steps=8", "train.resume=4")
    assert summary["resumed_from"] == 4 and checkpoint.complete_steps(tmp_path) == [2, 4, 8]
    assert identical(final(tmp_path), params) and loss_rows(tmp_path) == losses


def test_a_run_resumed_at_its_last_step_has_nothing_to_do(tmp_path):
    run(tmp_path, *SGD, "train.steps=3")
    before = final(tmp_path)
    summary = run(tmp_path, *SGD, "train.steps=3")
    assert summary["resumed_from"] == 3 and "loss" not in summary
    assert identical(final(tmp_path), before) and checkpoint.complete_steps(tmp_path) == [3]


@pytest.mark.parametrize("overrides,message", [
    (["train.resume=never"], "train.resume=never but {ckpt} already holds checkpoints; use train.resume=auto"),
    (["train.resume=2"], "train.resume=2: {ckpt} has no complete checkpoint for that step (available: [4])"),
    (["train.steps=3"], "train.steps=3 is before step 4 of the checkpoint in {run}; raise train.steps"),
    (["model.hidden=[6,5]"], "{run}: the checkpoint of step 4 holds a model of widths [5, 6, 5, 6, 5, 6, 5, 6, 3]"),
    (list(ADAM), "{run}: the checkpoint of step 4 was trained with optim=sgd but this run uses optim=adam"),
])
def test_impossible_resumes_are_refused_before_any_work(overrides, message, tmp_path):
    run(tmp_path, *SGD, "train.steps=4")
    optim = [] if overrides == list(ADAM) else list(SGD)
    with pytest.raises(ConfigError) as err:
        run(tmp_path, *optim, "train.steps=6", *overrides)
    assert message.format(run=tmp_path, ckpt=tmp_path / "checkpoints") in str(err.value)


MATH_CHANGES = [  # SMALL trains tanh, float64, with bias, cross_entropy, l2 0.05 on synthetic data of seed 0
    ("model.activation=sigmoid", "model.activation=tanh but this run has model.activation=sigmoid"),
    ("model.dtype=float32", "model.dtype=float64 but this run has model.dtype=float32"),
    ("model.bias=false", "model.bias=true but this run has model.bias=false"),
    ("loss.name=mse", "loss.name=cross_entropy but this run has loss.name=mse"),
    ("loss.l2=0.01", "loss.l2=0.05 but this run has loss.l2=0.01"),
    ("train.seed=1", "train.seed=0 but this run has train.seed=1"),
    ("data.seed=1", "data.seed=0 but this run has data.seed=1"),
    ("data.noise=0.5", "data.noise=0.1 but this run has data.noise=0.5"),
    ("data.n=150", "data.n=120 but this run has data.n=150"),
    ("data.test_fraction=0.3", "data.test_fraction=0.2 but this run has data.test_fraction=0.3"),
    ("data.standardize=true", "data.standardize=false but this run has data.standardize=true"),
    ("data=npz", "data.name=synthetic but this run has data.name=npz"),
]


@pytest.mark.parametrize("override,message", MATH_CHANGES, ids=[o for o, _ in MATH_CHANGES])
def test_a_resume_that_would_change_the_math_is_refused_naming_the_key(override, message, tmp_path):
    run(tmp_path, *SGD, "train.steps=4")
    with pytest.raises(ConfigError) as err:
        if override == "data=npz":  # 5 features, 3 classes: the widths stay, only the source changes
            data = write_npz(tmp_path / "same_shape.npz", n=120, d=5, classes=3)
            model = [o for o in SMALL if not o.startswith("data")]
            train(make_cfg(*model, *SGD, "train.steps=6", override, f"data.path={data}"), tmp_path)
        else:
            run(tmp_path, *SGD, "train.steps=6", override)
    key, _, want = message.partition("=")
    fix = "data=synthetic" if key == "data.name" else f"{key}={want.split(' but ')[0]}"
    assert str(err.value) == (f"train.resume: the checkpoint of step 4 in {tmp_path} was trained with {message}; "
                              f"resuming would change the math: use {fix} or a new hydra.run.dir"), str(err.value)
    print(f"{override}: error: {err.value}")


def test_another_npz_file_is_another_data_source(tmp_path):
    first, second = write_npz(tmp_path / "a.npz", n=60, d=5), write_npz(tmp_path / "b.npz", n=60, d=5, seed=3)
    model = [o for o in SMALL if not o.startswith("data")]
    with contextlib.redirect_stdout(io.StringIO()):
        train(make_cfg(*model, *SGD, "data=npz", f"data.path={first}", "train.steps=4"), tmp_path)
    with pytest.raises(ConfigError, match=f"was trained with data.path={first} but this run has "
                                          f"data.path={second}; resuming would change the math"):
        train(make_cfg(*model, *SGD, "data=npz", f"data.path={second}", "train.steps=6"), tmp_path)


def test_the_math_record_holds_data_standardize():
    conf = config.parse(make_cfg(*SMALL))
    spec = MLPSpec((5, 6, 3), "tanh", True, "float64")
    record = checkpoint.math_record(conf, spec)
    assert record["data.standardize"] is conf.data.standardize
    flipped = dataclasses.replace(conf, data=dataclasses.replace(conf.data, standardize=not conf.data.standardize))
    assert checkpoint.math_record(flipped, spec)["data.standardize"] is not conf.data.standardize
    assert checkpoint.fingerprint(checkpoint.math_record(flipped, spec)) != checkpoint.fingerprint(record)


def strip_new_keys(run_dir: Path, step: int) -> None:
    """Make a checkpoint look like one written before checkpoint.json recorded the math and shards a fingerprint."""
    directory = checkpoint.step_dir(run_dir, step)
    meta = json.loads((directory / checkpoint.META).read_text())
    del meta["math"], meta["fingerprint"]
    (directory / checkpoint.META).write_text(json.dumps(meta))
    for path in directory.glob("stage_*.pt"):
        shard = torch.load(path, weights_only=True)
        del shard["fingerprint"]
        torch.save(shard, path)


def test_a_checkpoint_from_before_the_math_record_still_resumes(tmp_path, uninterrupted):
    params, losses = uninterrupted(*SGD, *layout(2, 1), "train.steps=9")
    run(tmp_path, *SGD, *layout(2, 1), "train.steps=4")
    strip_new_keys(tmp_path, 4)
    summary = run(tmp_path, *SGD, *layout(2, 1), "train.steps=9")
    assert summary["resumed_from"] == 4
    assert identical(final(tmp_path), params) and loss_rows(tmp_path) == losses


def test_a_fresh_run_with_resume_never_starts_from_scratch(tmp_path):
    summary = run(tmp_path, *SGD, "train.steps=3", "train.resume=never")
    assert "resumed_from" not in summary and checkpoint.complete_steps(tmp_path) == [3]


NAN_RUN = ("data=synthetic", "data.n=120", "data.dim=5", "data.classes=3", "model.hidden=[6,6,6]",
           "train.batch_size=10", "pipeline.microbatches=2", "optim.lr=1e30", "train.steps=20",
           "train.log_every=5", "checkpoint.every=1", "checkpoint.save_initial=true")


def test_all_finite_is_isfinites_answer_also_where_a_finite_tensor_sums_to_inf():
    from pipeline.training.engine import all_finite

    huge = torch.full((1000,), 3e38)  # every value finite, the sum overflows
    cases = [torch.zeros(5), huge, -huge, torch.tensor([1.0, float("inf")]), torch.tensor([float("nan"), 2.0]),
             torch.tensor([float("inf"), float("-inf")]), torch.tensor([1e308, 1e308], dtype=torch.float64),
             torch.tensor([[0.5, float("-inf")]], dtype=torch.float64)]
    assert [all_finite(t) for t in cases] == [bool(torch.isfinite(t).all()) for t in cases] \
        == [True, True, True, False, False, False, True, False]


def test_weights_that_went_non_finite_in_the_update_are_named_by_stage(tmp_path, monkeypatch):
    """The loss of step 2 is finite; its update leaves an inf in stage 1's weights (planted after the real
    update): the check names the stage and the step, and the last good checkpoint."""
    from pipeline.training.engine import Engine

    update = Engine.update

    def planting(self, step, measure=False):
        pending = update(self, step, measure)
        if step == 2:
            self.stages[1].layers[0].weight.data[0, 0] = float("inf")
        return pending
    monkeypatch.setattr(Engine, "update", planting)
    with pytest.raises(NonFiniteLoss, match=r"^step 2: the parameters of stage 1 are NaN or inf after the update; "
                                            r".*\(the last good checkpoint is step 1\)$"):
        train(make_cfg(*NAN_RUN, "optim.lr=0.1", "train.log_every=1", "pipeline.transport=inprocess",
                       "pipeline.ranks=2"), tmp_path)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss) as err:
        train(make_cfg(*NAN_RUN, "train.log_every=1"), tmp_path)
    assert str(err.value) == ("step 2: the loss on stage 0 (rank 0) is NaN or inf; lower optim.lr or check the data; "
                              "the run stopped (the last good checkpoint is step 1)")
    assert checkpoint.complete_steps(tmp_path) == [0, 1]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000001"
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()


def test_between_checks_the_first_non_finite_step_is_named(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"^step 2: the loss on stage 2 \(rank 2\) is NaN or inf; .*\(the last "
                                            r"good checkpoint is step 0\)$"):
        train(make_cfg(*NAN_RUN, "checkpoint.every=0", "pipeline.transport=inprocess", "pipeline.ranks=3"), tmp_path)
    assert checkpoint.complete_steps(tmp_path) == [0]


def test_a_non_finite_loss_stops_every_rank_of_a_gloo_pipeline(tmp_path):
    # checkpoint.every=1 makes every step a check, but the loss is only known on rank 1: rank 0
    # learns it through the check's sum and stops at once, not after dist.timeout_s
    overrides = [*NAN_RUN, "dist.timeout_s=60", f"hydra.run.dir={tmp_path}"]
    began = time.monotonic()
    procs = start(2, lambda rank: ["-m", "pipeline.train", *overrides])
    try:
        (code0, out0), (code1, out1) = wait(procs, timeout=90)
    finally:
        kill(procs)
    assert time.monotonic() - began < 45
    assert code0 == code1 == 1, out0 + out1
    errors = [line for line in (out0 + out1).splitlines() if line.startswith("error:")]
    assert errors == ["error: step 2: the loss on stage 1 (rank 1) is NaN or inf; lower optim.lr or check the data; "
                      "the run stopped (the last good checkpoint is step 1)"], out0 + out1
    assert "Traceback" not in out0 + out1
    assert checkpoint.complete_steps(tmp_path) == [0, 1]


def children(pid: int) -> list[int]:
    """Direct children of a process, from /proc (psutil is not a dependency)."""
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()] if tasks.exists() else []


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


ELASTIC = ("data=synthetic", "data.n=200", "data.dim=5", "data.classes=3", "model.hidden=[6,5,6]",
           "model.dtype=float64", "optim.momentum=0.5", "train.steps=40", "train.batch_size=10",
           "pipeline.microbatches=2", "train.log_every=5", "train.eval_every=20", "checkpoint.every=5")


@pytest.mark.timeout(240)
def test_a_rank_killed_under_torchrun_restarts_and_ends_like_an_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "elastic"
    # every step pauses 50 ms in the worker, so the kill lands mid-run, after step 5's checkpoint
    # torch 2.13 shares torchrun's TCPStore with the workers across restarts, and a restarted rank
    # can read the dead group's gloo addresses from it; opting out gives every restart a fresh store
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
         "tests/workers/slow_train.py", "0.05", *ELASTIC, "pipeline.transport=shm", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "step_00000005" / "checkpoint.json").exists():
            assert torchrun.poll() is None and time.monotonic() < deadline, "no checkpoint of step 5"
            time.sleep(0.01)
        victim = next(pid for pid in children(torchrun.pid) if environ(pid).get("RANK") == "1")
        os.kill(victim, signal.SIGKILL)
        out, err = torchrun.communicate(timeout=180)
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.communicate()
    assert torchrun.returncode == 0, err[-3000:]
    assert "pipeline: resuming" in out and "resumed_from=" in out, out
    assert out.count("pipeline: messages among ranks 0 1 (one host): shm") == 2, out  # the first run and the restart
    resumed = int(out.split("resumed_from=")[1].split()[0])
    assert 5 <= resumed < 40
    whole = tmp_path / "whole"
    with contextlib.redirect_stdout(io.StringIO()):
        train(make_cfg(*ELASTIC, "pipeline.transport=inprocess", "pipeline.ranks=2"), whole)
    assert identical(final(run_dir), final(whole))
    steps = [r[0] for r in loss_rows(run_dir)]
    assert steps == sorted(set(steps)) == [r[0] for r in loss_rows(whole)]  # no step logged twice
