"""Hand-written Hessian-vector products equal autograd's double backward and finite differences of the
gradient; H is symmetric, H v is linear in v, micro-batches add up; the command prints and refuses."""

import re

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.hvp import main as hvp_main
from pipeline.mlp import layers as layers_module
from pipeline.mlp.gradcheck import cases
from pipeline.mlp.hvp import autograd_hvp, finite_difference_hvp, hvp, random_direction, relative_error
from pipeline.mlp.layers import Activation, Layer
from pipeline.mlp.model import MLPSpec, build_layers
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(120)
L2 = 0.05
TINY = ["data=synthetic", "data.n=64", "data.dim=5", "data.classes=3", "model.hidden=[6,5]", "train.batch_size=16"]


def problem(activation="tanh", bias=True, dims=(6, 7, 5, 4), rows=10, seed=0):
    spec = MLPSpec(dims, activation, bias, "float64")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dims[0], generator=gen, dtype=torch.float64)
    y = torch.randint(0, dims[-1], (rows,), generator=gen)
    return spec, build_layers(spec, seed, range(spec.num_layers)), x, y


def dot(a, b):
    return sum(float((s * t).sum()) for s, t in zip(a, b))


@pytest.mark.parametrize("activation,bias,loss_name", list(cases()))
def test_hvp_matches_autograd_double_backward(activation, bias, loss_name):
    spec, layers, x, y = problem(activation, bias)
    v = random_direction(layers, seed=1)
    expected = autograd_hvp(spec, layers, x, y, loss_name, L2, v)
    assert relative_error(hvp(layers, x, y, loss_name, L2, v), expected) <= 1e-10


@pytest.mark.parametrize("activation", sorted(layers_module.ACTIVATIONS))
@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse"])
def test_hvp_matches_finite_differences_of_the_gradient(activation, loss_name):
    _, layers, x, y = problem(activation, seed=2)
    v = random_direction(layers, seed=3)
    numeric = finite_difference_hvp(layers, x, y, loss_name, L2, v, eps=1e-5)
    assert relative_error(hvp(layers, x, y, loss_name, L2, v), numeric) <= 1e-6


@pytest.mark.parametrize("activation", ["gelu", "sigmoid"])
def test_hessian_is_symmetric(activation):
    _, layers, x, y = problem(activation, dims=(5, 6, 6, 3))
    v1, v2 = random_direction(layers, seed=4), random_direction(layers, seed=5)
    a = dot(v1, hvp(layers, x, y, "cross_entropy", L2, v2))
    b = dot(v2, hvp(layers, x, y, "cross_entropy", L2, v1))
    assert a != 0 and abs(a - b) <= 1e-12 * max(abs(a), abs(b))


def test_hvp_is_linear_in_v():
    _, layers, x, y = problem("gelu")
    v1, v2 = random_direction(layers, seed=6), random_direction(layers, seed=7)
    combined = [2.5 * s - 0.75 * t for s, t in zip(v1, v2)]
    h1, h2 = hvp(layers, x, y, "mse", L2, v1), hvp(layers, x, y, "mse", L2, v2)
    expected = [2.5 * s - 0.75 * t for s, t in zip(h1, h2)]
    assert relative_error(hvp(layers, x, y, "mse", L2, combined), expected) <= 1e-12


@pytest.mark.parametrize("num_microbatches", [3, 4])
def test_microbatches_add_up_to_the_batch_hvp(num_microbatches):
    _, layers, x, y = problem("sigmoid")
    v = random_direction(layers, seed=8)
    whole = hvp(layers, x, y, "cross_entropy", L2, v)
    parts = hvp(layers, x, y, "cross_entropy", L2, v, num_microbatches=num_microbatches)
    assert relative_error(parts, whole) <= 1e-12


def test_regulariser_adds_lambda_v_on_weights_only():
    _, layers, x, y = problem("tanh", bias=True)
    v = random_direction(layers, seed=9)
    difference = [a - b for a, b in zip(hvp(layers, x, y, "mse", L2, v), hvp(layers, x, y, "mse", 0.0, v))]
    for i, layer in enumerate(layers):
        weight_part, bias_part = difference[2 * i], difference[2 * i + 1]
        assert torch.allclose(weight_part, L2 * v[2 * i], rtol=0, atol=1e-15)
        assert bias_part.abs().max() <= 1e-15


def test_activation_without_a_second_derivative_is_refused(monkeypatch):
    softplus = torch.nn.functional.softplus
    monkeypatch.setitem(layers_module.ACTIVATIONS, "softplus", Activation(softplus, torch.sigmoid, False))
    _, layers, x, y = problem("tanh")
    layers[0] = Layer(0, layers[0].weight, layers[0].bias, "softplus")
    with pytest.raises(ConfigError, match="model.activation='softplus' has no second derivative"):
        hvp(layers, x, y, "mse", L2, random_direction(layers, seed=0))


def test_command_prints_both_errors_and_the_time_ratio(capsys):
    assert hvp_main(["--repeats", "3", *TINY, "model.activation=gelu", "loss.l2=0.01"]) == 0
    out = capsys.readouterr().out
    autograd = re.search(r"hvp vs autograd double backward \(float64\): relative error (\S+)", out)
    numeric = re.search(r"hvp vs finite differences of the gradient \(float64, eps=1e-05\): relative error (\S+)", out)
    ratio = re.search(r"gradient (\S+) ms, hvp (\S+) ms, hvp/gradient (\S+)", out)
    assert autograd and numeric and ratio, out
    assert float(autograd[1]) <= 1e-10 and float(numeric[1]) <= 1e-6
    gradient_ms, hvp_ms, shown = map(float, ratio.groups())
    assert gradient_ms > 0 and hvp_ms > 0 and shown == pytest.approx(hvp_ms / gradient_ms, rel=0.05)


@pytest.mark.parametrize("args,message", [
    (["--eps", "0"], "--eps=0.0 --repeats=20 --threads=1: use a finite --eps > 0"),
    (["model.activation=swish"], "model.activation='swish' is unknown; pick one of"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        hvp_main([*args, *TINY])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_bad_override_on_the_command_line_exits_2():
    result = run_cli("pipeline.hvp", "train.batch_size=0", timeout=100)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.batch_size=0 must be an integer >= 1")
