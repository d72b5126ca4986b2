"""One MLP layer as the chapter writes it, z = W x (+ b), h = phi(z), with its three operations.

The chain rule of the chapter, for one layer with input x, weight W and activation phi:

    forward        z = W x + b            h = phi(z)
    grad_input     dJ/dz = dJ/dh (.) phi'(z)          dJ/dx = W^T dJ/dz
    grad_weight    dJ/dW = dJ/dz x^T                  dJ/db = dJ/dz

Tensors hold a micro-batch as rows, so `W x` is written `x @ W.T` and the outer product
`dJ/dz x^T` sums over the rows: `dz.T @ x`. The regulariser's share of dJ/dW (lambda W) is
added once per step by `objective.add_regulariser_grad`, not once per micro-batch.
No autograd: every derivative below is written by hand (autograd is the oracle in the tests).

Mixed precision (model.compute_dtype=bfloat16): W and b stay in model.dtype (float32) for the
optimizer; the three operations use a bfloat16 copy of them, refreshed by `cast_weights` once per
step after the update. Each operation rounds what enters it (the data, dJ/do) to bfloat16, so
x, z, h and dJ/dz are all bfloat16, and the bfloat16 products dJ/dz x^T are added into a float32 .grad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Fn = Callable[[Tensor], Tensor]


def _relu(z: Tensor) -> Tensor:
    return z.clamp_min(0)


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _gelu(z: Tensor) -> Tensor:
    return z * _normal_cdf(z)  # exact GELU, as torch.nn.GELU()


def _gelu_prime(z: Tensor) -> Tensor:
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return _normal_cdf(z) + z * pdf


@dataclass(frozen=True)
class Activation:
    """phi and its derivative phi'(z). Where phi' can be written through the output h = phi(z)
    (relu, sigmoid, tanh), the layer keeps h, which is the next layer's input anyway, instead of
    z: the same derivative for half the stashed memory."""

    phi: Fn
    prime: Fn  # phi'(z), computed from h when from_output, else from z
    from_output: bool
    fused: Callable[[Tensor, Tensor], Tensor] | None = None  # (dJ/dh, h or z) -> dJ/dz in one kernel


def _relu_grad(dh: Tensor, h: Tensor) -> Tensor:
    return torch.ops.aten.threshold_backward(dh, h, 0)  # dJ/dh (.) [h > 0], one pass instead of three


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(_relu, lambda h: (h > 0).to(h.dtype), True, _relu_grad),  # relu'(z) = [z > 0] = [h > 0]
    "sigmoid": Activation(torch.sigmoid, lambda h: h * (1 - h), True),  # sigmoid'(z) = h (1 - h)
    "tanh": Activation(torch.tanh, lambda h: 1 - h * h, True),  # tanh'(z) = 1 - h^2
    "gelu": Activation(_gelu, _gelu_prime, False),  # gelu'(z) = Phi(z) + z phi(z)
}


@dataclass
class Saved:
    """What one layer keeps from forward for its backward: its input x, and z or h for phi'.

    `dz` (dJ/dz) is filled by grad_input so grad_weight, which may run later (zero-bubble
    schedules defer it), does not recompute it; z and h are dropped then.
    """

    x: Tensor
    z: Tensor | None = None  # pre-activation, when phi' needs it
    h: Tensor | None = None  # output, when phi' is written through it
    dz: Tensor | None = None

    def tensors(self, into: set[tuple[int, int]]) -> None:
        """Add the tensors held here to `into` as (storage address, bytes): a tensor held twice is one entry."""
        for t in (self.x, self.z, self.h, self.dz):
            if t is not None:
                into.add((t.data_ptr(), t.numel() * t.element_size()))


class Layer:
    """A linear map followed by an optional element-wise activation (None on the output layer)."""

    def __init__(self, index: int, weight: Tensor, bias: Tensor | None, activation: str | None,
                 compute_dtype: torch.dtype | None = None):
        self.index = index  # global layer index: the same whatever the split into stages
        self.weight = weight
        self.bias = bias
        self.activation = activation
        self.act = ACTIVATIONS[activation] if activation else None
        self.compute_dtype = compute_dtype or weight.dtype  # x, z, h, dJ/dz and the messages are held in it
        self._copies: list[Tensor | None] | None = None  # W and b in compute_dtype, when it is not W's dtype
        self.cast_weights()

    def cast_weights(self) -> None:
        """Round W and b into their compute-dtype copies (in place after the first time); with one
        dtype for both there is no copy and the operations read W and b themselves."""
        if self.compute_dtype == self.weight.dtype:
            self._copies = None
        elif self._copies is None:
            self._copies = [p.to(self.compute_dtype) if p is not None else None for p in (self.weight, self.bias)]
        else:
            for copy, p in zip(self._copies, (self.weight, self.bias)):
                if copy is not None:
                    copy.copy_(p)  # round to nearest even, as .to() does

    @property
    def w(self) -> Tensor:
        """W as the operations read it: the compute-dtype copy, or W itself."""
        return self.weight if self._copies is None else self._copies[0]

    @property
    def b(self) -> Tensor | None:
        return self.bias if self._copies is None else self._copies[1]

    def compute_copies(self) -> list[Tensor]:
        """The compute-dtype copies of W and b (none without one): memory on top of the parameters."""
        return [t for t in self._copies if t is not None] if self._copies is not None else []

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        """("weight", W) and ("bias", b): the names checkpoints and exports key them by."""
        return [("weight", self.weight)] + ([("bias", self.bias)] if self.bias is not None else [])

    def parameters(self) -> list[Tensor]:
        return [p for _, p in self.named_parameters()]

    def forward(self, x: Tensor) -> tuple[Tensor, Saved]:
        x = x.to(self.compute_dtype)  # the data, under bfloat16 compute; a no-op for every other input
        if self.bias is None:
            z = x @ self.w.T  # z = W x
        else:
            z = torch.addmm(self.b, x, self.w.T)  # z = W x + b, in one fused kernel
        if self.act is None:
            return z, Saved(x)  # the output layer: o = W h, nothing but x needed for backward
        h = self.act.phi(z)  # h = phi(z)
        return h, Saved(x, h=h) if self.act.from_output else Saved(x, z=z)

    def grad_preactivation(self, dh: Tensor, saved: Saved) -> Tensor:
        dh = dh.to(self.compute_dtype)  # dJ/do from the float32 loss, under bfloat16 compute; else a no-op
        if self.act is None:
            return dh  # output layer: dJ/do is already the gradient of the linear map
        kept = saved.h if self.act.from_output else saved.z
        if self.act.fused is not None:
            return self.act.fused(dh, kept)
        return dh * self.act.prime(kept)  # dJ/dz = dJ/dh (.) phi'(z)

    def grad_input(self, dh: Tensor, saved: Saved, need_dx: bool = True) -> Tensor | None:
        """dJ/dx from dJ/dh; keeps dJ/dz in `saved` for grad_weight, which needs z and h no more."""
        saved.dz = self.grad_preactivation(dh, saved)
        saved.z = saved.h = None
        return saved.dz @ self.w if need_dx else None  # dJ/dx = W^T dJ/dz

    def grad_weight(self, dh: Tensor | None, saved: Saved) -> tuple[Tensor, Tensor | None]:
        """(dJ/dW, dJ/db) of the data term; uses dJ/dz from grad_input when it ran."""
        dz = saved.dz if saved.dz is not None else self.grad_preactivation(dh, saved)
        d_weight = dz.T @ saved.x  # dJ/dW = dJ/dz x^T
        d_bias = dz.sum(0) if self.bias is not None else None  # dJ/db = dJ/dz
        return d_weight, d_bias

    def accumulate_grad_weight(self, saved: Saved) -> None:
        """grad_weight added straight into .grad (no temporary): W.grad += dJ/dz x^T, b.grad += dJ/dz."""
        if self._copies is not None:  # mixed precision: bfloat16 products, summed over micro-batches in float32
            self.weight.grad.add_(saved.dz.T @ saved.x)  # W.grad (float32) += dJ/dz x^T (bfloat16)
            if self.bias is not None:
                self.bias.grad.add_(saved.dz.sum(0))  # b.grad (float32) += dJ/dz summed over the rows (bfloat16)
            return
        self.weight.grad.addmm_(saved.dz.T, saved.x)
        if self.bias is not None:
            ones = saved.dz.new_ones(saved.dz.shape[0])
            self.bias.grad.addmv_(saved.dz.T, ones)  # sum of dJ/dz over the rows, added in one kernel
