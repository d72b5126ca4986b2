"""The hand-written chain rule held against torch.autograd: relative errors over every activation, bias and loss.

`python -m pipeline.gradcheck` prints one row per case and the worst relative error.

Relative error of a gradient = max |hand - autograd| / max |autograd|, in float64.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch

from pipeline.mlp import microbatch
from pipeline.mlp.layers import ACTIVATIONS, Layer
from pipeline.mlp.model import MLPSpec, build_layers, torch_sequential
from pipeline.mlp.objective import LOSSES
from pipeline.mlp.stage import Stage


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-300))


def load_into(net: torch.nn.Sequential, layers: list[Layer]) -> None:
    """Copy our layers' parameters into the nn.Sequential twin (Linear i at index 2*i)."""
    with torch.no_grad():
        for layer in layers:
            net[2 * layer.index].weight.copy_(layer.weight)
            if layer.bias is not None:
                net[2 * layer.index].bias.copy_(layer.bias)


def autograd_objective(net: torch.nn.Sequential, x: torch.Tensor, y: torch.Tensor, loss_name: str, l2: float) -> torch.Tensor:
    """J = L + lambda/2 sum ||W||^2 with torch.nn.functional, the independent oracle."""
    o = net(x)
    if loss_name == "cross_entropy":
        loss = torch.nn.functional.cross_entropy(o, y)
    else:
        loss = torch.nn.functional.mse_loss(o, torch.nn.functional.one_hot(y, o.shape[1]).to(o.dtype))
    weights = [m.weight for m in net if isinstance(m, torch.nn.Linear)]
    return loss + l2 / 2 * sum((w * w).sum() for w in weights)


def network_error(spec: MLPSpec, loss_name: str, l2: float, batch: int = 10, num_microbatches: int = 1,
                  seed: int = 0) -> float:
    """Worst relative error over all parameter gradients of the whole network."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.dims[0], generator=gen, dtype=spec.torch_dtype)
    y = torch.randint(0, spec.dims[-1], (batch,), generator=gen)
    layers = build_layers(spec, seed, range(spec.num_layers))
    microbatch.accumulate(Stage(0, 1, layers), x, y, num_microbatches, loss_name, l2)
    net = torch_sequential(spec)
    load_into(net, layers)
    autograd_objective(net, x, y, loss_name, l2).backward()
    ours = [p.grad for layer in layers for p in layer.parameters()]
    return max(relative_error(a, b.grad) for a, b in zip(ours, net.parameters()))


def cases() -> Iterator[tuple[str, bool, str]]:
    return itertools.product(ACTIVATIONS, (False, True), LOSSES)
