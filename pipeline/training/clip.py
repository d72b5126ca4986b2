"""Gradient-norm clipping across stages: torch.nn.utils.clip_grad_norm_ over the whole pipeline's parameters.

    ||g|| = || (||g_1||_2, ..., ||g_n||_2) ||_2   over every parameter tensor of every stage, in model order
    g_k  <- g_k * min(c / (||g|| + 1e-6), 1)       c = optim.clip_norm, every tensor of every stage

The g_k are gradients of J (dJ/dW includes lambda W) and, with replicas, already summed over them.
Each process writes the norms of the tensors it holds into a vector with one slot per tensor of
the model, 0 in the others; one sum over the pipeline fills every slot exactly (x + 0 = x), so
every rank stacks the same norms in torch's order and computes the same total, bit for bit as
clip_grad_norm_ does on one device (torch._foreach_norm per tensor, vector_norm of their stack).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from pipeline.mlp.layers import Layer

EPS = 1e-6  # clip_grad_norm_'s: the coefficient is max_norm / (total_norm + 1e-6)


def slot_norms(layers: Iterable[Layer], num_layers: int, bias: bool) -> list[float]:
    """||g_k||_2 of each parameter tensor these layers hold, at slot (layer index, weight / bias); 0 elsewhere."""
    per_layer = 2 if bias else 1
    slots = [0.0] * (num_layers * per_layer)
    held = [(layer.index * per_layer + j, p.grad) for layer in layers for j, p in enumerate(layer.parameters())]
    if held:
        norms = torch.stack(torch._foreach_norm([g for _, g in held], 2.0)).tolist()  # one copy to the host
        for (slot, _), norm in zip(held, norms):
            slots[slot] = norm
    return slots


def total_norm(slots: list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """||g|| from every tensor's norm (the slots summed over the pipeline), in the parameters' dtype."""
    return torch.linalg.vector_norm(torch.tensor(slots, dtype=dtype, device=device), 2.0)


def clip_(grads: list[Tensor], max_norm: float, norm: Tensor) -> None:
    """Scale the gradients in place by min(max_norm / (||g|| + 1e-6), 1), as clip_grad_norm_ does."""
    coefficient = torch.clamp(max_norm / (norm + EPS), max=1.0)
    torch._foreach_mul_(grads, coefficient)
