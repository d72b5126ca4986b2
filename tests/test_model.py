"""Initialisation depends only on (seed, layer index); the export twin is the same network."""

import pytest
import torch

from pipeline.mlp.model import MLPSpec, build_layers, init_layer, torch_sequential

pytestmark = pytest.mark.timeout(60)


def test_init_of_a_layer_ignores_the_layers_after_it():
    short = MLPSpec((6, 8, 5, 3), "relu", True, "float64")
    long = MLPSpec((6, 8, 5, 9, 9, 3), "relu", True, "float64")
    for i in (0, 1):
        a, b = init_layer(short, i, seed=7), init_layer(long, i, seed=7)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_init_ignores_which_layers_are_built_together():
    spec = MLPSpec((6, 8, 8, 8, 3), "tanh", False, "float64")
    everything = build_layers(spec, 5, range(4))
    split = build_layers(spec, 5, [0, 1]) + build_layers(spec, 5, [2, 3])
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(everything, split))


def test_init_depends_on_seed_and_index():
    spec = MLPSpec((8, 8, 8, 8), "relu", False, "float64")
    assert not torch.equal(init_layer(spec, 0, 0).weight, init_layer(spec, 0, 1).weight)
    assert not torch.equal(init_layer(spec, 1, 0).weight, init_layer(spec, 2, 0).weight)


def test_float32_init_is_float64_init_rounded():
    f64 = init_layer(MLPSpec((4, 3), "relu", True, "float64"), 0, 0)
    f32 = init_layer(MLPSpec((4, 3), "relu", True, "float32"), 0, 0)
    assert f32.weight.dtype == torch.float32 and torch.equal(f32.weight, f64.weight.float())


def test_bias_off_means_no_bias_and_output_layer_is_linear():
    spec = MLPSpec((4, 5, 3), "sigmoid", False, "float32")
    layers = build_layers(spec, 0, range(2))
    assert [layer.bias for layer in layers] == [None, None]
    assert [layer.activation for layer in layers] == ["sigmoid", None]
    net = torch_sequential(spec)
    assert [type(m).__name__ for m in net] == ["Linear", "Sigmoid", "Linear"]
