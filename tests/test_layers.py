"""Each layer's forward, grad_input and grad_weight equal torch.autograd's (float64)."""

import pytest
import torch

from pipeline.mlp.gradcheck import relative_error
from pipeline.mlp.layers import ACTIVATIONS, Layer
from pipeline.mlp.model import MLPSpec, init_layer

pytestmark = pytest.mark.timeout(60)
TOL = 1e-6


def make_layer(activation, bias, index=0):
    spec = MLPSpec((5, 4, 3), activation, bias, "float64")
    return init_layer(spec, index, seed=3)


@pytest.mark.parametrize("activation", [*ACTIVATIONS, None])
@pytest.mark.parametrize("bias", [False, True])
def test_three_operations_match_autograd(activation, bias):
    layer = make_layer(activation or "relu", bias)
    layer = Layer(0, layer.weight, layer.bias, activation)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    dh = torch.randn(6, 4, dtype=torch.float64, generator=gen)

    h, saved = layer.forward(x)
    dx = layer.grad_input(dh, saved)
    d_weight, d_bias = layer.grad_weight(dh, saved)

    params = [t.clone().requires_grad_() for t in layer.parameters()]
    xr = x.clone().requires_grad_()
    z = xr @ params[0].T + (params[1] if bias else 0)
    ref = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
           "gelu": torch.nn.functional.gelu, None: lambda t: t}[activation](z)
    ref.backward(dh)

    assert relative_error(h, ref.detach()) <= TOL
    assert relative_error(dx, xr.grad) <= TOL
    assert relative_error(d_weight, params[0].grad) <= TOL
    if bias:
        assert relative_error(d_bias, params[1].grad) <= TOL
    else:
        assert d_bias is None


def test_grad_weight_without_grad_input_recomputes_dz():
    layer = make_layer("tanh", True)
    x = torch.randn(4, 5, dtype=torch.float64)
    dh = torch.randn(4, 4, dtype=torch.float64)
    _, saved = layer.forward(x)
    deferred = layer.grad_weight(dh, saved)  # no grad_input first
    layer.grad_input(dh, saved)
    after = layer.grad_weight(None, saved)
    assert torch.equal(deferred[0], after[0]) and torch.equal(deferred[1], after[1])


def test_first_layer_can_skip_input_gradient():
    layer = make_layer("relu", False)
    _, saved = layer.forward(torch.randn(3, 5, dtype=torch.float64))
    assert layer.grad_input(torch.ones(3, 4, dtype=torch.float64), saved, need_dx=False) is None
    assert saved.dz is not None
