"""The whole network's gradient of J = L + s equals autograd's; finite differences agree; micro-batches add up."""

import itertools

import pytest
import torch

from pipeline.gradcheck import main as gradcheck_main
from pipeline.mlp import microbatch, objective
from pipeline.mlp.gradcheck import cases, network_error
from pipeline.mlp.model import MLPSpec, build_layers
from pipeline.mlp.stage import Stage

pytestmark = pytest.mark.timeout(120)
TOL = 1e-6


@pytest.mark.parametrize("activation,bias,loss_name", list(cases()))
def test_network_gradient_matches_autograd(activation, bias, loss_name):
    spec = MLPSpec((6, 7, 5, 4), activation, bias, "float64")
    assert network_error(spec, loss_name, l2=0.05) <= TOL


def test_gradcheck_cli_reports_worst_error(capsys):
    assert gradcheck_main([]) == 0
    out = capsys.readouterr().out
    assert "worst relative error" in out and len(out.splitlines()) == 18


def objective_value(layers, x, y, loss_name, l2):
    o = x
    for layer in layers:
        o, _ = layer.forward(o)
    loss, _ = objective.loss_and_grad(loss_name, o, y, len(x))
    return loss + objective.regulariser([layer.weight for layer in layers], l2)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_the_regulariser_is_lambda_half_the_sum_of_squared_entries(dtype, tol):
    # s = lambda/2 sum_ij W_ij^2, here computed as vec(W) . vec(W); a transposed (non-contiguous) W too
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(40, 30, dtype=dtype, generator=g), torch.randn(30, 20, dtype=dtype, generator=g).T]
    exact = 0.05 / 2 * sum(float((w.double() ** 2).sum()) for w in weights)
    assert abs(float(objective.regulariser(weights, 0.05)) - exact) <= tol * exact
    assert float(objective.regulariser([], 0.05)) == 0.0


@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse"])
def test_finite_differences_on_a_tiny_net(loss_name):
    spec = MLPSpec((3, 4, 2), "tanh", True, "float64")
    layers = build_layers(spec, 1, range(spec.num_layers))
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 1, 0, 1])
    microbatch.accumulate(Stage(0, 1, layers), x, y, 1, loss_name, l2=0.1)
    eps, worst = 1e-6, 0.0
    for param in (p for layer in layers for p in layer.parameters()):
        for idx in itertools.product(*map(range, param.shape)):
            saved = param[idx].item()
            param[idx] = saved + eps
            up = objective_value(layers, x, y, loss_name, 0.1)
            param[idx] = saved - eps
            down = objective_value(layers, x, y, loss_name, 0.1)
            param[idx] = saved
            numeric = (up - down) / (2 * eps)
            worst = max(worst, abs(float(numeric) - float(param.grad[idx])) / max(abs(float(numeric)), 1e-3))
    assert worst < 1e-6


@pytest.mark.parametrize("num_microbatches", [1, 3, 4])
def test_microbatches_accumulate_to_the_full_batch_gradient(num_microbatches):
    spec = MLPSpec((6, 8, 5, 3), "gelu", True, "float64")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 6, dtype=torch.float64, generator=gen)  # 10 rows: not divisible by 3 or 4
    y = torch.randint(0, 3, (10,), generator=gen)
    full = build_layers(spec, 0, range(3))
    split = build_layers(spec, 0, range(3))
    loss_full = microbatch.accumulate(Stage(0, 1, full), x, y, 1, "cross_entropy", 0.05)
    loss_split = microbatch.accumulate(Stage(0, 1, split), x, y, num_microbatches, "cross_entropy", 0.05)
    assert abs(float(loss_full - loss_split)) <= 1e-12
    for a, b in zip(Stage(0, 1, split).parameters(), Stage(0, 1, full).parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-12 * b.grad.abs().max()


def test_microbatch_sizes_are_balanced():
    assert microbatch.sizes(10, 4) == [3, 3, 2, 2]
    assert microbatch.sizes(10, 3) == [4, 3, 3]
    assert microbatch.sizes(8, 8) == [1] * 8
    assert [len(p) for p in microbatch.split(torch.arange(10), 4)] == [3, 3, 2, 2]
