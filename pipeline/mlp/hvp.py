"""Hessian-vector products H v of J = L + s by Pearlmutter's R-operator, written by hand through the layers.

R{f} = d/dt f(theta + t v) at t = 0 is the directional derivative along v, so R{dJ/dtheta} = H v.
Applying R to every line of the forward and the backward pass (forward-over-reverse) gives, for a
layer with input x, weight W, bias b and v's blocks V (for W) and R{b} (for b):

    R-forward    R{z} = V x + W R{x} + R{b}           R{h} = phi'(z) (.) R{z}         R{x} = 0 for the data
    R-loss       R{dL/do} = (p (.) R{o} - p (p . R{o})) / B         cross-entropy, p = softmax(o)
                 R{dL/do} = 2 R{o} / (B k)                           mse, mean over B rows and k outputs
    R-backward   R{dJ/dz} = R{dJ/dh} (.) phi'(z) + dJ/dh (.) phi''(z) (.) R{z}
                 R{dJ/dx} = V^T dJ/dz + W^T R{dJ/dz}
                 (H v)_W = R{dJ/dW} = R{dJ/dz} x^T + dJ/dz R{x}^T + lambda V      (H v)_b = R{dJ/dz}

Rows are a micro-batch, as in pipeline/mlp/layers.py: `W x` is `x @ W.T`, `dJ/dz x^T` is `dz.T @ x`.
`python -m pipeline.hvp` checks H v against central finite differences of the hand-written gradient
and against autograd's double backward (the oracle), both in float64, and times one H v against one gradient.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from pipeline.errors import ConfigError
from pipeline.mlp import microbatch
from pipeline.mlp.gradcheck import autograd_objective, load_into
from pipeline.mlp.layers import Layer
from pipeline.mlp.model import MLPSpec, torch_sequential
from pipeline.mlp.objective import loss_and_grad
from pipeline.mlp.stage import Stage

Block = tuple[Tensor, Tensor | None]  # v's part for one layer: (V, R{b}), R{b} None without bias


def _gelu_second(z: Tensor) -> Tensor:
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return pdf * (2 - z * z)  # d/dz (Phi(z) + z pdf(z)) = 2 pdf(z) - z^2 pdf(z)


# phi''(z), from the same tensor as Activation.prime takes: h where phi' is written through h, else z.
# None: phi'' = 0, the term drops (relu is linear on both sides of its kink; at z = 0 it has no phi'').
SECOND: dict[str, Callable[[Tensor], Tensor] | None] = {
    "relu": None,
    "sigmoid": lambda h: h * (1 - h) * (1 - 2 * h),  # sigmoid''(z) = h (1 - h) (1 - 2h)
    "tanh": lambda h: -2 * h * (1 - h * h),  # tanh''(z) = -2 h (1 - h^2)
    "gelu": _gelu_second,  # gelu''(z) = pdf(z) (2 - z^2)
}


def check_supported(activation: str) -> None:
    """H v needs phi''; an activation without one in SECOND is refused with one line."""
    if activation not in SECOND:
        raise ConfigError(f"model.activation={activation!r} has no second derivative in pipeline/mlp/hvp.py; "
                          f"pick one of {', '.join(SECOND)}")


@dataclass
class RSaved:
    """What one layer keeps from F and R-forward for the two backward passes (see the docs' memory note)."""

    x: Tensor  # input: the previous layer's h
    r_x: Tensor | None  # R{x}; None on the first layer, whose input is data
    r_z: Tensor  # R{z}
    d1: Tensor | None  # phi'(z); None on the output layer
    d2: Tensor | None  # phi''(z); None on the output layer and where phi'' = 0
    dz: Tensor | None = None  # dJ/dz, filled by the backward pass
    r_dz: Tensor | None = None  # R{dJ/dz}


def r_forward(layer: Layer, x: Tensor, r_x: Tensor | None, block: Block) -> tuple[Tensor, Tensor, RSaved]:
    """F and R-forward of one layer: (h, R{h}, what the backward passes need)."""
    v_w, v_b = block
    h, saved = layer.forward(x)  # z = W x + b, h = phi(z): the project's own F
    r_z = x @ v_w.T  # R{z} = V x ...
    if r_x is not None:
        r_z = r_z.addmm_(r_x, layer.weight.T)  # ... + W R{x}
    if v_b is not None:
        r_z = r_z.add_(v_b)  # ... + R{b}
    if layer.act is None:
        return h, r_z, RSaved(x, r_x, r_z, None, None)  # output layer: o = z, R{o} = R{z}
    kept = saved.h if layer.act.from_output else saved.z
    second = SECOND[layer.activation]
    d1 = layer.act.prime(kept)  # phi'(z)
    d2 = second(kept) if second is not None else None  # phi''(z)
    return h, d1 * r_z, RSaved(x, r_x, r_z, d1, d2)  # R{h} = phi'(z) (.) R{z}


def r_loss_grad(loss_name: str, o: Tensor, r_o: Tensor, y: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """(dJ/do, R{dJ/do}) of this micro-batch's share of the batch-mean loss."""
    _, d_o = loss_and_grad(loss_name, o, y, batch_size)  # dJ/do, as training computes it
    if loss_name == "cross_entropy":
        p = torch.softmax(o, dim=1)
        p_r_o = p * r_o
        return d_o, (p_r_o - p * p_r_o.sum(1, keepdim=True)) / batch_size  # R{dL/do} = (diag p - p p^T) R{o} / B
    return d_o, 2 * r_o / (batch_size * o.shape[1])  # mse: R{dL/do} = 2 R{o} / (B k)


def r_backward_input(layer: Layer, dh: Tensor, r_dh: Tensor, rs: RSaved, v_w: Tensor,
                     need_dx: bool) -> tuple[Tensor | None, Tensor | None]:
    """B and R-B of one layer: (dJ/dx, R{dJ/dx}) from (dJ/dh, R{dJ/dh}); keeps dJ/dz and R{dJ/dz} in rs."""
    if rs.d1 is None:
        rs.dz, rs.r_dz = dh, r_dh  # output layer: dJ/do and R{dJ/do} are already the linear map's
    else:
        rs.dz = dh * rs.d1  # dJ/dz = dJ/dh (.) phi'(z)
        rs.r_dz = r_dh * rs.d1  # R{dJ/dz} = R{dJ/dh} (.) phi'(z) ...
        if rs.d2 is not None:
            rs.r_dz += dh * rs.d2 * rs.r_z  # ... + dJ/dh (.) phi''(z) (.) R{z}
    if not need_dx:
        return None, None
    dx = rs.dz @ layer.weight  # dJ/dx = W^T dJ/dz
    r_dx = (rs.dz @ v_w).addmm_(rs.r_dz, layer.weight)  # R{dJ/dx} = V^T dJ/dz + W^T R{dJ/dz}
    return dx, r_dx


def r_backward_weight(layer: Layer, rs: RSaved) -> Block:
    """R-W of one layer, the data term: (R{dJ/dW}, R{dJ/db}); lambda V is added once per batch."""
    hv_w = rs.r_dz.T @ rs.x  # R{dJ/dW} = R{dJ/dz} x^T ...
    if rs.r_x is not None:
        hv_w.addmm_(rs.dz.T, rs.r_x)  # ... + dJ/dz R{x}^T
    hv_b = rs.r_dz.sum(0) if layer.bias is not None else None  # R{dJ/db} = R{dJ/dz}
    return hv_w, hv_b


def blocks_of(layers: list[Layer], v: list[Tensor]) -> list[Block]:
    """v, ordered like the layers' parameters (W, then b, layer by layer), cut into per-layer blocks."""
    it = iter(v)
    return [(next(it), next(it) if layer.bias is not None else None) for layer in layers]


def _microbatch_hvp(layers: list[Layer], x: Tensor, y: Tensor, batch_size: int, loss_name: str,
                    blocks: list[Block]) -> list[Block]:
    h, r_h, stash = x, None, []
    for layer, block in zip(layers, blocks):  # F and R-forward, first layer to last
        h, r_h, rs = r_forward(layer, h, r_h, block)
        stash.append(rs)
    dh, r_dh = r_loss_grad(loss_name, h, r_h, y, batch_size)
    hv: list[Block] = [None] * len(layers)  # type: ignore[list-item]
    for i in reversed(range(len(layers))):  # B, R-B and R-W, last layer to first
        dh, r_dh = r_backward_input(layers[i], dh, r_dh, stash[i], blocks[i][0], need_dx=i > 0)
        hv[i] = r_backward_weight(layers[i], stash[i])
        stash[i] = None  # this layer's x, R{x}, R{z}, phi', phi'', dJ/dz can go
    return hv


def hvp(layers: list[Layer], x: Tensor, y: Tensor, loss_name: str, l2: float, v: list[Tensor],
        num_microbatches: int = 1) -> list[Tensor]:
    """H v of J = L + s over the batch (x, y), ordered like the layers' parameters; micro-batches add up."""
    for layer in layers:
        if layer.activation is not None:
            check_supported(layer.activation)
    blocks = blocks_of(layers, v)
    total = [torch.zeros_like(t) for t in v]
    for x_mb, y_mb in zip(microbatch.split(x, num_microbatches), microbatch.split(y, num_microbatches)):
        parts = [t for block in _microbatch_hvp(layers, x_mb, y_mb, len(x), loss_name, blocks)
                 for t in block if t is not None]
        for acc, part in zip(total, parts):
            acc += part
    for (acc_w, _), (v_w, _) in zip(blocks_of(layers, total), blocks):
        acc_w.add_(v_w, alpha=l2)  # R{ds/dW} = R{lambda W} = lambda V, once per batch
    return total


def gradient(layers: list[Layer], x: Tensor, y: Tensor, loss_name: str, l2: float) -> list[Tensor]:
    """dJ/dtheta by the project's hand-written chain rule (one stage, the whole batch)."""
    stage = Stage(0, 1, layers)
    microbatch.accumulate(stage, x, y, 1, loss_name, l2)
    return [p.grad.clone() for p in stage.parameters()]


def shifted(layers: list[Layer], v: list[Tensor], t: float) -> list[Layer]:
    """The layers at theta + t v, as new tensors (the originals are untouched)."""
    return [Layer(layer.index, layer.weight + t * v_w, None if v_b is None else layer.bias + t * v_b,
                  layer.activation) for layer, (v_w, v_b) in zip(layers, blocks_of(layers, v))]


def finite_difference_hvp(layers: list[Layer], x: Tensor, y: Tensor, loss_name: str, l2: float,
                          v: list[Tensor], eps: float) -> list[Tensor]:
    """H v ~ (g(theta + eps v) - g(theta - eps v)) / (2 eps), g the hand-written gradient."""
    up = gradient(shifted(layers, v, eps), x, y, loss_name, l2)
    down = gradient(shifted(layers, v, -eps), x, y, loss_name, l2)
    return [(a - b) / (2 * eps) for a, b in zip(up, down)]


def autograd_hvp(spec: MLPSpec, layers: list[Layer], x: Tensor, y: Tensor, loss_name: str, l2: float,
                 v: list[Tensor]) -> list[Tensor]:
    """The oracle: autograd differentiates its own gradient graph, H v = d/dtheta (dJ/dtheta . v)."""
    net = torch_sequential(spec)
    load_into(net, layers)
    params = list(net.parameters())
    grads = torch.autograd.grad(autograd_objective(net, x, y, loss_name, l2), params, create_graph=True)
    g_dot_v = sum((g * t).sum() for g, t in zip(grads, v))
    return list(torch.autograd.grad(g_dot_v, params))


def random_direction(layers: list[Layer], seed: int) -> list[Tensor]:
    """A direction of unit length, shaped like the layers' parameters, drawn in float64 then cast."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for layer in layers for p in layer.parameters()]
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    norm = math.sqrt(sum(float((t * t).sum()) for t in v))
    return [(t / norm).to(device=p.device, dtype=p.dtype) for t, p in zip(v, params)]


def relative_error(value: list[Tensor], reference: list[Tensor]) -> float:
    """max |value - reference| / max |reference|, over every entry of every block."""
    diff = max(float((a - b).abs().max()) for a, b in zip(value, reference))
    return diff / max(max(float(b.abs().max()) for b in reference), 1e-300)


def median_times(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function; one warm-up round first, then rounds that alternate them."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(repeats + 1):  # round 0 warms up caches and the allocator
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
