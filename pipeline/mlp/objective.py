"""The objective J = L + s: the batch-mean loss L = l(o, y) and the regulariser s = lambda/2 sum ||W||_F^2.

With micro-batches, each one contributes its share of the batch mean: the loss sums over
its rows and divides by the size of the whole batch, so the shares add up to exactly L and
their gradients to exactly dL/do, however unevenly the batch was split.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

LOSSES = ("cross_entropy", "mse")


def _one_hot(y: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    return torch.nn.functional.one_hot(y, num_classes).to(dtype)


def loss_and_grad(name: str, o: Tensor, y: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """This micro-batch's share of L = l(o, y) and dJ/do = dL/do (dJ/dL = 1)."""
    if name == "cross_entropy":
        log_p = torch.log_softmax(o, dim=1)  # log p = o - log sum exp(o)
        loss = -log_p.gather(1, y[:, None]).sum() / batch_size  # L = mean -log p_y
        d_o = log_p.exp_()  # softmax(o), reusing log_p's memory
        d_o[torch.arange(len(y), device=y.device), y] -= 1  # dL/do = softmax(o) - e_y
        return loss, d_o.div_(batch_size)
    if name == "mse":
        err = o - _one_hot(y, o.shape[1], o.dtype)  # targets are one-hot labels
        scale = batch_size * o.shape[1]  # mean over rows and outputs, as F.mse_loss
        return (err * err).sum() / scale, 2 * err / scale  # L = mean (o - t)^2; dL/do = 2 (o - t)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


def regulariser(weights: Iterable[Tensor], l2: float) -> Tensor:
    """s = lambda/2 * sum ||W||_F^2 over weight matrices (biases are not regularised); ||W||_F^2 = vec(W) . vec(W)."""
    return l2 / 2 * sum(torch.dot(w.reshape(-1), w.reshape(-1)) for w in weights)


def add_regulariser_grad(weights: Iterable[Tensor], l2: float) -> None:
    """dJ/dW += ds/dW = lambda W, once per step (the data term was accumulated per micro-batch)."""
    if l2 == 0:
        return
    for w in weights:
        w.grad.add_(w, alpha=l2)


def predictions_correct(o: Tensor, y: Tensor) -> int:
    """How many rows of o put their largest output on the label."""
    return int((o.argmax(dim=1) == y).sum())
