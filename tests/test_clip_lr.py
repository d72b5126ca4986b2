"""Clipping over every stage and lr schedules equal a plain-PyTorch loop with clip_grad_norm_; resumes are exact."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline import config
from pipeline.errors import ConfigError
from pipeline.mlp.model import build_layers
from pipeline.planning.planner import make_plan
from pipeline.runtime.distributed import connect, read_env
from pipeline.runtime.lifecycle import Interrupted
from pipeline.schedules.registry import SCHEDULES
from pipeline.training import checkpoint, data as datasets
from pipeline.training.engine import Engine
from pipeline.training.equivalence import PROBLEM, difference, grid, problem
from pipeline.training.lr import lr_at
from pipeline.training.setup import as_tensors, load_data, model_spec
from pipeline.training.trainer import train
from tests.conftest import ROOT, make_cfg
from tests.launch import wait

pytestmark = pytest.mark.timeout(300)
TOL = 1e-6
STEPS, LOG_EVERY = 12, 2
# SGD with momentum, cosine after 3 warm-up steps, and a clip_norm that binds on most steps but not all
SGD_COSINE = dict(name="sgd", lr=0.5, momentum=0.5, clip_norm=0.25, schedule="cosine", warmup_steps=3, min_lr=0.05)
ADAM_LINEAR = dict(name="adam", lr=0.05, clip_norm=0.2, schedule="linear", warmup_steps=2, min_lr=0.001)
ADAM_CONSTANT = dict(name="adam", lr=0.05, clip_norm=0.2, schedule="constant", warmup_steps=4)


def the_problem(optim: dict, **pipeline) -> config.Config:
    """equivalence's small float64 problem (8 tanh layers, batch 10) for STEPS steps with these optim keys."""
    train_keys = {**PROBLEM["train"], "steps": STEPS, "log_every": LOG_EVERY, "eval_every": STEPS}
    conf = config.parse({**PROBLEM, "optim": optim, "train": train_keys})
    return replace(conf, pipeline=replace(conf.pipeline, **pipeline))


def expected_lr(t: int, o: config.OptimConfig, steps: int) -> float:
    """The issue's formula, written out again: warm-up lr t / W, then the decay from lr to min_lr."""
    lr, low, w = o.lr, o.min_lr, o.warmup_steps
    if t <= w:
        return lr * t / w
    if o.schedule == "cosine":
        return low + (lr - low) * (1 + math.cos(math.pi * (t - w) / (steps - w))) / 2
    if o.schedule == "linear":
        return lr - (lr - low) * (t - w) / (steps - w)
    return lr


def reference(conf: config.Config) -> tuple[dict, dict, int]:
    """Plain PyTorch on one device: nn.Linear layers from the same initial weights, J = mean cross entropy
    + lambda/2 sum ||W||^2 by autograd, clip_grad_norm_ over all parameters, the lr formula, torch.optim.
    Returns the final weights, {step: (lr, norm before clipping)}, and how many steps clipping bound."""
    data = load_data(conf)
    spec = model_spec(conf, data)
    linears = []
    for layer in build_layers(spec, conf.train.seed, range(spec.num_layers)):
        linear = torch.nn.Linear(*reversed(layer.weight.shape), dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(layer.weight)
            linear.bias.copy_(layer.bias)
        linears.append(linear)
    params = [p for linear in linears for p in linear.parameters()]  # 0.weight, 0.bias, 1.weight, ...
    o = conf.optim
    optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum) if o.name == "sgd" else \
        torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps)
    sampler = datasets.BatchSampler(len(data.x_train), conf.train.batch_size, conf.train.seed, conf.data.shuffle)
    x_train, y_train = as_tensors(data.x_train, data.y_train, spec)
    logged, clipped = {}, 0
    for t in range(1, conf.train.steps + 1):
        rows = torch.as_tensor(sampler.indices(t - 1))
        h = x_train[rows]
        for i, linear in enumerate(linears):
            h = linear(h) if i == len(linears) - 1 else torch.tanh(linear(h))
        objective = torch.nn.functional.cross_entropy(h, y_train[rows]) + \
            conf.loss.l2 / 2 * sum((linear.weight ** 2).sum() for linear in linears)
        optimizer.zero_grad()
        objective.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, o.clip_norm))
        clipped += norm > o.clip_norm
        lr = expected_lr(t, o, conf.train.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        logged[t] = (lr, norm)
    weights = {i: {"weight": linear.weight.detach(), "bias": linear.bias.detach()} for i, linear in enumerate(linears)}
    return weights, logged, clipped


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def compare(run_dir: Path, ref: tuple[dict, dict, int]) -> tuple[float, float]:
    """(difference of the final weights, worst relative difference of the logged grad_norm); lr rows checked."""
    weights, logged, clipped = ref
    assert 0 < clipped < STEPS  # clipping bound on some steps and not on others
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert [r["lr"] for r in rows] == pytest.approx([logged[r["step"]][0] for r in rows], rel=1e-14, abs=0)
    norm_diff = max(abs(r["grad_norm"] - logged[r["step"]][1]) / logged[r["step"]][1] for r in rows)
    return difference(checkpoint.load_layers(run_dir)[1], weights), norm_diff


def pipelined(conf: config.Config, run_dir: Path) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return train(conf, run_dir)


def cases(p: int, m: int) -> list[dict]:
    return [case for case in grid(ranks=(p,), microbatches=(m,)) if case["virtual_stages"] * p <= 8]


def test_the_lr_curves_at_their_ends():
    def at(**optim):
        o = replace(config.parse(make_cfg()).optim, lr=0.4, **optim)
        return [lr_at(t, o, 10) for t in range(1, 11)]

    cosine = at(schedule="cosine", warmup_steps=4, min_lr=0.1)
    assert cosine[:4] == [0.1, 0.2, 0.30000000000000004, 0.4]  # 0.4 t / 4
    assert cosine[9] == 0.1 and cosine[6] == pytest.approx(0.25)  # min_lr at T; halfway (t - W = 3 of 6)
    linear = at(schedule="linear", min_lr=0.1)
    assert linear[9] == 0.1 and linear[4] == pytest.approx(0.25)  # 0.4 - 0.3 * 5 / 10
    assert at() == [0.4] * 10 and at(warmup_steps=2)[:3] == [0.2, 0.4, 0.4]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("clip_norm", [0.05, None])
def test_the_norm_and_the_clipping_over_four_ranks_are_torch_s_bit_for_bit(dtype, clip_norm):
    conf = problem(ranks=4, microbatches=4)
    conf = replace(conf, optim=replace(conf.optim, clip_norm=clip_norm), model=replace(conf.model, dtype=dtype))
    spec = model_spec(conf, load_data(conf))
    plan = make_plan(conf, spec, 1, eval_rows=10)
    with connect(read_env(), 4, "inprocess", conf.dist) as comm:
        engine = Engine(conf, spec, plan, comm)
        x, y = torch.randn(10, 5, dtype=spec.torch_dtype), torch.randint(0, 3, (10,))
        engine.train_step(x, y, step=1)
        layers = sorted((layer for st in engine.stages.values() for layer in st.layers), key=lambda la: la.index)
        params = [p for layer in layers for p in layer.parameters()]  # the model's order: 0.weight, 0.bias, ...
        alone = [torch.zeros_like(p) for p in params]  # the same gradients on one device
        for mine, p in zip(alone, params):
            mine.grad = p.grad.clone()
        pending = engine.update(1, measure=True)
        if clip_norm is None:
            assert torch.equal(engine.total_grad_norm(pending), torch.nn.utils.get_total_norm([a.grad for a in alone]))
            return
        norm = torch.nn.utils.clip_grad_norm_(alone, clip_norm)
        assert pending == [] and torch.equal(engine.grad_norm, norm) and norm > clip_norm  # it clipped
        assert all(torch.equal(mine.grad, p.grad) for mine, p in zip(alone, params))


@pytest.mark.parametrize("optim", [SGD_COSINE], ids=["sgd-cosine"])
def test_every_schedule_at_p2_clips_and_follows_the_lr_curve_like_one_device(optim, tmp_path):
    ref = reference(the_problem(optim))
    worst = {}
    for i, case in enumerate(cases(2, 4)):
        run_dir = tmp_path / f"case{i}"
        pipelined(the_problem(optim, **case), run_dir)
        worst["{schedule} v={virtual_stages}".format(**case)] = compare(run_dir, ref)
    assert {k.split()[0] for k in worst} == set(SCHEDULES)
    print("p=2 m=4 " + ", ".join(f"{k}: {w:.1e} (grad_norm {n:.1e})" for k, (w, n) in worst.items()))
    assert max(w for w, _ in worst.values()) <= TOL and max(n for _, n in worst.values()) <= TOL, worst


@pytest.mark.parametrize("optim, schedule, v", [(ADAM_LINEAR, "1f1b", 1), (SGD_COSINE, "interleaved_1f1b", 2),
                                                (ADAM_CONSTANT, "zb_v", 2)], ids=["adam-linear", "sgd-cosine",
                                                                                   "adam-constant-warmup"])
def test_four_ranks_clip_and_follow_the_lr_curve_like_one_device(optim, schedule, v, tmp_path):
    pipelined(the_problem(optim, ranks=4, microbatches=3, schedule=schedule, virtual_stages=v), tmp_path)
    weights, norms = compare(tmp_path, reference(the_problem(optim)))
    print(f"p=4 {schedule} v={v} {optim['name']} {optim['schedule']}: {weights:.1e} (grad_norm {norms:.1e})")
    assert weights <= TOL and norms <= TOL


def overrides(optim: dict, run_dir: Path) -> list[str]:
    """the_problem as `python -m pipeline.train` overrides."""
    conf = the_problem(optim)
    m = conf.model
    return ["data=synthetic", "data.n=60", "data.dim=5", "data.classes=3", "data.seed=1",
            f"model.hidden=[{','.join(map(str, m.hidden))}]", "model.activation=tanh", "model.dtype=float64",
            f"train.steps={STEPS}", "train.batch_size=10", "train.seed=3", f"train.log_every={LOG_EVERY}",
            f"train.eval_every={STEPS}", "loss.l2=0.05", f"optim={optim['name']}",
            *(f"optim.{k}={v}" for k, v in optim.items() if k != "name"), f"hydra.run.dir={run_dir}"]


@pytest.mark.timeout(240)
def test_two_replicas_of_a_two_rank_pipeline_clip_the_summed_gradient_under_torchrun(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "pipeline.train",
           *overrides(SGD_COSINE, run_dir), "parallel.dp=2", "pipeline.schedule=zb_h1", "pipeline.microbatches=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    results = wait([subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)], timeout=220)
    code, out = results[0]
    assert code == 0, out[-3000:]
    assert "replicas=2" in out and checkpoint.read_meta(run_dir, STEPS)["replicas"] == 2
    weights, norms = compare(run_dir, reference(the_problem(SGD_COSINE)))
    print(f"p=2 d=2 zb_h1 m=2 sgd cosine under torchrun: {weights:.1e} (grad_norm {norms:.1e})")
    assert weights <= TOL and norms <= TOL


def test_a_resumed_cosine_run_with_clipping_is_bit_for_bit_an_uninterrupted_one(tmp_path, monkeypatch):
    conf = the_problem(SGD_COSINE, ranks=2, microbatches=4, schedule="1f1b")
    conf = replace(conf, checkpoint=replace(conf.checkpoint, every=4, keep=0))
    pipelined(conf, tmp_path / "whole")
    train_step = Engine.train_step

    def stop_at_7(engine, x, y, step=0):  # Ctrl-C in step 7: the newest checkpoint is step 4's
        if step == 7:
            raise KeyboardInterrupt
        return train_step(engine, x, y, step)

    monkeypatch.setattr(Engine, "train_step", stop_at_7)
    with pytest.raises(Interrupted, match="interrupted at step 7; the last checkpoint is step 4"):
        pipelined(conf, tmp_path / "stopped")
    monkeypatch.setattr(Engine, "train_step", train_step)
    assert pipelined(conf, tmp_path / "stopped")["resumed_from"] == 4
    whole, stopped = checkpoint.load_layers(tmp_path / "whole")[1], checkpoint.load_layers(tmp_path / "stopped")[1]
    assert sorted(whole) == sorted(stopped)
    assert all(torch.equal(whole[i][k], stopped[i][k]) for i in whole for k in whole[i])
    keys = ("step", "lr", "loss", "reg", "grad_norm")
    same = [[tuple(r[k] for k in keys) for r in train_rows(tmp_path / run)] for run in ("whole", "stopped")]
    assert same[0] == same[1] and len(same[0]) == STEPS // LOG_EVERY


BAD = [("optim.clip_norm=-1", "optim.clip_norm=-1 must be null (no clipping) or a finite number > 0; "
                              "e.g. optim.clip_norm=1.0"),
       ("optim.warmup_steps=12", "optim.warmup_steps=12 must be below train.steps=12 (the schedule needs a step "
                                 "after the warm-up); e.g. optim.warmup_steps=1"),
       ("optim.schedule=bogus", "optim.schedule='bogus' is unknown; pick one of constant, cosine, linear"),
       ("optim.min_lr=0.2", "optim.min_lr=0.2 is above optim.lr=0.1; the schedule decays from optim.lr down to "
                            "optim.min_lr: set e.g. optim.min_lr=0.01")]


def test_bad_values_are_one_line_and_exit_2(tmp_path):
    for override, message in BAD:
        with pytest.raises(ConfigError) as err:
            config.parse(make_cfg("train.steps=12", "optim.schedule=cosine", override))
        assert str(err.value) == message
    with pytest.raises(ConfigError, match=r"^optim.min_lr=0.01 is read only with optim.schedule=cosine or linear"):
        config.parse(make_cfg("optim.min_lr=0.01"))
    # through the command: a key of its own and a key checked against another (parse raises both alike)
    cli = BAD[:2]
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.train", "train.steps=12", "optim.schedule=cosine",
                               override, f"hydra.run.dir={tmp_path / str(i)}"], cwd=ROOT, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i, (override, _) in enumerate(cli)]
    for proc, (_, message) in zip(procs, cli):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and err.strip().splitlines() == [f"error: {message}"], err
