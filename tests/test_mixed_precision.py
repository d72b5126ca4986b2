"""Mixed precision (model.compute_dtype=bfloat16): float32 weights and optimizer, bfloat16 F, B, W and messages.

The strong check: a pipeline computing in bfloat16 equals single-device bfloat16 training bit for
bit, for every schedule of the registry (p = 2, in one process), because the same operations run
on the same values. Against float32 it can only agree to within bfloat16's rounding, and the test
asserts a stated bound (see `gradient_bound`).
"""

import contextlib
import io
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from pipeline import config, memory
from pipeline.config import compose
from pipeline.errors import ConfigError
from pipeline.mlp.layers import Layer
from pipeline.planning.planner import make_plan
from pipeline.runtime.distributed import connect, read_env
from pipeline.schedules.registry import SCHEDULES
from pipeline.training import checkpoint, data as datasets
from pipeline.training.engine import Engine
from pipeline.training.equivalence import pipelined, problem, reference
from pipeline.training.footprint import calculate, measure
from pipeline.training.setup import as_tensors, load_data, model_spec
from pipeline.training.trainer import train
from tests.conftest import ROOT, make_cfg

pytestmark = pytest.mark.timeout(300)
U = 2.0 ** -8  # bfloat16's unit roundoff: 8 significant bits (7 stored), round to nearest
VIRTUAL = {name: entry.fixed_stages or (2 if entry.virtual else 1) for name, entry in SCHEDULES.items()}


def bf16(conf):
    """The same run with float32 weights computing in bfloat16."""
    return replace(conf, model=replace(conf.model, dtype="float32", compute_dtype="bfloat16"))


def equal(a, b) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


# --- the config -------------------------------------------------------------------------------

def test_compute_dtype_is_null_by_default_and_takes_bfloat16():
    assert config.parse(make_cfg()).model.compute_dtype is None
    conf = config.parse(make_cfg("model.compute_dtype=bfloat16"))
    assert conf.model.compute_dtype == "bfloat16" and conf.model.dtype == "float32"
    spec = model_spec(conf, load_data(conf))
    assert spec.torch_dtype == torch.float32 and spec.torch_compute_dtype == torch.bfloat16
    assert spec.precision == "float32 weights, bfloat16 compute"


@pytest.mark.parametrize("overrides,message", [
    (["model.compute_dtype=float16"], "model.compute_dtype='float16' is unknown; pick null (compute in model.dtype) "
                                      "or bfloat16"),
    (["model.compute_dtype=bfloat16", "model.dtype=float64"],
     "model.compute_dtype=bfloat16 computes from a copy of float32 weights, but model.dtype=float64; set "
     "model.dtype=float32 or model.compute_dtype=null"),
])
def test_a_bad_compute_dtype_is_one_line_and_exit_code_2(overrides, message, capsys):
    with pytest.raises(ConfigError) as refused:
        config.parse(make_cfg(*overrides))
    assert str(refused.value) == message
    with pytest.raises(SystemExit) as stopped:
        memory.main(["--ranks", "1", *overrides])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and message in err and len(err.splitlines()) == 1


# --- one layer --------------------------------------------------------------------------------

def test_a_layer_computes_from_its_bfloat16_copy_and_sums_its_weight_gradient_in_float32():
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 5, generator=gen), torch.randn(4, generator=gen)
    layer = Layer(0, weight, bias, "relu", torch.bfloat16)
    layer.weight.grad, layer.bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
    products = []
    for _ in range(2):  # two micro-batches, float32 data and dJ/dh in
        x, dh = torch.randn(3, 5, generator=gen), torch.randn(3, 4, generator=gen)
        h, saved = layer.forward(x)
        assert h.dtype == saved.x.dtype == torch.bfloat16 and torch.equal(saved.x, x.bfloat16())
        assert torch.equal(h, torch.addmm(bias.bfloat16(), x.bfloat16(), weight.bfloat16().T).clamp_min(0))
        dx = layer.grad_input(dh, saved)
        assert dx.dtype == saved.dz.dtype == torch.bfloat16
        layer.accumulate_grad_weight(saved)
        products.append(((saved.dz.T @ saved.x).float(), saved.dz.sum(0).float()))
    assert layer.weight.grad.dtype == torch.float32  # the bfloat16 products, added in float32
    assert torch.equal(layer.weight.grad, products[0][0] + products[1][0])
    assert torch.equal(layer.bias.grad, products[0][1] + products[1][1])
    with torch.no_grad():
        layer.weight.add_(1 / 3)  # an update: the copy follows only when cast
    assert torch.equal(layer.w, (weight - 1 / 3).bfloat16())
    layer.cast_weights()
    assert torch.equal(layer.w, weight.bfloat16()) and layer.w.dtype == torch.bfloat16
    assert [t.dtype for t in layer.compute_copies()] == [torch.bfloat16, torch.bfloat16]


def test_without_a_compute_dtype_there_is_no_copy():
    layer = Layer(0, torch.ones(2, 3), None, None)
    assert layer.w is layer.weight and layer.compute_copies() == [] and layer.compute_dtype == torch.float32


# --- exact: the pipeline in bfloat16 is single-device training in bfloat16 --------------------

@pytest.fixture(scope="module")
def single_device():
    """Gradient accumulation on one stage holding every layer, 4 micro-batches, in bfloat16 and in float32."""
    conf = problem()
    return {"bf16": reference(bf16(conf), num_microbatches=4),
            "fp32": reference(replace(conf, model=replace(conf.model, dtype="float32")), num_microbatches=4)}


def test_bfloat16_training_is_not_float32_training(single_device):
    bf, fp = single_device["bf16"], single_device["fp32"]
    assert not equal(bf, fp)  # bfloat16 really ran
    worst = max(float((bf[i][k] - fp[i][k]).norm() / fp[i][k].norm()) for i in fp for k in fp[i])
    assert worst < 0.05  # 4 SGD steps apart: close, as the gradient test below bounds each step


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_schedule_in_bfloat16_equals_single_device_bfloat16_training(schedule, single_device, tmp_path):
    conf = bf16(problem(schedule=schedule, ranks=2, microbatches=4, virtual_stages=VIRTUAL[schedule]))
    params, summary = pipelined(conf, tmp_path)
    assert all(t.dtype == torch.float32 for layer in params.values() for t in layer.values())  # weights stay float32
    assert equal(params, single_device["bf16"])
    assert summary["test_accuracy"] > 0


def test_a_resumed_bfloat16_run_equals_an_uninterrupted_one(tmp_path):
    conf = bf16(problem(schedule="zb_h1", ranks=2, microbatches=4))
    whole, _ = pipelined(conf, tmp_path / "whole")
    half = replace(conf, train=replace(conf.train, steps=2))
    pipelined(half, tmp_path / "resumed")
    resumed, summary = pipelined(conf, tmp_path / "resumed")  # train.resume=auto: from step 2
    assert summary["resumed_from"] == 2 and equal(resumed, whole)


@pytest.mark.timeout(240)
def test_bfloat16_over_torchrun_with_replicas_equals_one_device(single_device, tmp_path):
    """p = 2 x d = 2 processes (pipeline.transport=auto: shared memory on one host; gloo's all-reduce), one
    micro-batch per replica: each replica's rows are one of single-device's 2 micro-batches, and float32
    sums g0 + g1 alike, so the weights are equal bit for bit."""
    overrides = ["model.hidden=[6,5,6,5,6,5,6]", "model.activation=tanh", "model.compute_dtype=bfloat16",
                 "data=synthetic", "data.n=60", "data.dim=5", "data.classes=3", "data.seed=1",
                 "optim.lr=0.2", "optim.momentum=0.5", "pipeline.microbatches=1", "parallel.dp=2",
                 "train.steps=4", "train.batch_size=10", "train.seed=3", "train.log_every=2", "train.eval_every=4",
                 "loss.l2=0.05", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                             "-m", "pipeline.train", *overrides], cwd=ROOT, capture_output=True, text=True,
                            timeout=220, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ranks=2 schedule=1f1b microbatches=1 replicas=2" in result.stdout
    assert equal(checkpoint.load_layers(tmp_path)[1], reference(bf16(problem()), num_microbatches=2))


# --- half the bytes -----------------------------------------------------------------------------

def test_stash_and_messages_take_half_the_bytes_and_the_weights_gain_a_bfloat16_copy():
    fp32 = problem(schedule="1f1b", microbatches=4)
    fp32 = replace(fp32, model=replace(fp32.model, dtype="float32"))
    figures = {}
    for name, conf in (("fp32", fp32), ("bf16", bf16(fp32))):
        calc, meas = calculate(conf, 2), measure(conf, 2)
        predicted = {"peak_stash_bytes": [m.stash for m in calc.ranks], "sent_bytes": calc.sent,
                     "param_bytes": [m.params for m in calc.ranks], "grad_bytes": [m.grads for m in calc.ranks]}
        assert {k: meas[k] for k in predicted} == predicted, name  # the memory model, exactly
        figures[name] = predicted
    f, b = figures["fp32"], figures["bf16"]
    assert all(v > 0 for v in f["peak_stash_bytes"] + f["sent_bytes"])
    assert b["peak_stash_bytes"] == [v // 2 for v in f["peak_stash_bytes"]]  # bfloat16 activations
    assert b["sent_bytes"] == [v // 2 for v in f["sent_bytes"]]  # bfloat16 messages
    assert b["grad_bytes"] == f["grad_bytes"]  # float32 gradients
    assert b["param_bytes"] == [v * 3 // 2 for v in f["param_bytes"]]  # float32 weights + their bfloat16 copy


# --- against float32: one step's gradients within bfloat16's rounding -------------------------

def gradient_bound(activation: str, num_layers: int) -> float:
    """Normwise relative error ||g_bf16 - g_fp32|| / ||g_fp32|| that bfloat16 can deliver for one
    parameter's gradient of a K-layer MLP, to first order in u = 2^-8.

    Smooth phi (tanh, sigmoid, gelu): every bfloat16 rounding changes its tensor by at most u
    relative. On the path to layer 1's dJ/dW lie at most 7K roundings: the data, per layer W, b, z
    and h forward (4K), dJ/do, then per layer back dJ/dh, phi'(z) and dJ/dz (3(K-1)), and dJ/dz x^T.
    Added up in the worst case that is 7K u; independent roundings add in quadrature (the
    probabilistic analysis of Higham and Mary), u sqrt(7K), which is at most 2K u for K >= 2.
    The matrix products accumulate in float32 inside, so their length adds nothing.

    ReLU: phi' = [z > 0] jumps at 0. Rounding moves z by about u |z|, which flips the mask of the
    elements that lie that close to 0, a fraction f of each hidden layer (f ~ 0.2u measured on the
    digits model: about 1 element in 1000); each flip changes dJ/dz_i by the whole dJ/dh_i, so a
    hidden layer with an active fraction a adds sqrt(2f/a) ~ sqrt(u) to the error, not u. The K-1
    hidden layers add in quadrature, with the smooth part below it: sqrt(K u).
    """
    if activation == "relu":
        return math.sqrt(num_layers * U)
    return 2 * num_layers * U


def one_step_gradients(overrides: list[str]) -> tuple[dict, int]:
    """dJ/dparam of the first step of the configured run, through a 2-rank pipeline in this process."""
    conf = compose(["pipeline.transport=inprocess", "pipeline.ranks=2", *overrides])
    data = load_data(conf)
    spec = model_spec(conf, data)
    plan = make_plan(conf, spec, 1, eval_rows=0)
    sampler = datasets.BatchSampler(len(data.x_train), conf.train.batch_size, conf.train.seed, conf.data.shuffle)
    x, y = as_tensors(data.x_train, data.y_train, spec)
    rows = torch.as_tensor(sampler.indices(0))
    with connect(read_env(), 2, "inprocess", conf.dist) as comm:
        engine = Engine(conf, spec, plan, comm)
        engine.train_step(x[rows], y[rows], 1)
        return {(layer.index, name): p.grad.clone() for stage in engine.stages.values()
                for layer in stage.layers for name, p in layer.named_parameters()}, spec.num_layers


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_one_step_gradients_agree_with_float32_within_the_bound(activation):
    """The default run (digits, 64-128-128-128-10), its first step at p = 2, m = 4."""
    fp32, num_layers = one_step_gradients([f"model.activation={activation}"])
    bf16_grads, _ = one_step_gradients([f"model.activation={activation}", "model.compute_dtype=bfloat16"])
    bound = gradient_bound(activation, num_layers)
    errors = {key: float((bf16_grads[key] - g).norm() / g.norm()) for key, g in fp32.items()}
    print(f"{activation}: bound {bound:.3g} = {bound / U:.1f} u; worst {max(errors.values()):.3g} = "
          f"{max(errors.values()) / U:.1f} u; " + ", ".join(f"{i}.{n} {e / U:.1f}u" for (i, n), e in errors.items()))
    assert all(g.dtype == torch.float32 for g in bf16_grads.values())
    assert 0 < max(errors.values()) <= bound, errors


# --- the default run --------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is several times faster than two on a shared machine (no waiting at barriers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_default_run_in_bfloat16_over_two_ranks_reaches_95_percent(one_thread, tmp_path):
    conf = config.parse(make_cfg("model.compute_dtype=bfloat16", "pipeline.transport=inprocess", "pipeline.ranks=2"))
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(conf, tmp_path)
    print(f"bfloat16 default run, p=2: test_accuracy={summary['test_accuracy']:.4f} loss={summary['loss']:.5f}")
    assert summary["steps"] == 600 and summary["ranks"] == 2
    assert summary["test_accuracy"] >= 0.95, summary
