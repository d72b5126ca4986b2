"""Micro-batches: a minibatch split into m parts whose gradients add up to the full-batch gradient.

Sizes differ by at most one (the first B mod m parts get one more row), and every part's loss
is divided by the full batch size B, so uneven splits stay exact. `accumulate` is gradient
accumulation on one device: the chapter's "smaller minibatch" alternative to pipelining.
"""

from __future__ import annotations

from torch import Tensor

from pipeline.mlp.objective import add_regulariser_grad, loss_and_grad
from pipeline.mlp.stage import Stage


def sizes(batch_size: int, num_microbatches: int) -> list[int]:
    """Rows in each micro-batch, e.g. sizes(10, 4) == [3, 3, 2, 2]."""
    base, extra = divmod(batch_size, num_microbatches)
    return [base + (mb_index < extra) for mb_index in range(num_microbatches)]


def split(x: Tensor, num_microbatches: int) -> list[Tensor]:
    """x's rows cut into num_microbatches consecutive parts of `sizes`."""
    return list(x.split(sizes(len(x), num_microbatches)))


def accumulate(stage: Stage, x: Tensor, y: Tensor, num_microbatches: int, loss_name: str, l2: float) -> Tensor:
    """Fill every parameter's .grad with dJ/dparam over the batch, one micro-batch at a time; returns L."""
    stage.zero_grad()
    loss = x.new_zeros(())
    for x_mb, y_mb in zip(split(x, num_microbatches), split(y, num_microbatches)):
        o, stash = stage.forward(x_mb)
        loss_mb, d_o = loss_and_grad(loss_name, o.to(stage.dtype), y_mb, batch_size=len(x))  # in model.dtype
        stage.backward_input(d_o, stash)
        stage.backward_weight(stash)
        loss += loss_mb
    add_regulariser_grad(stage.weights(), l2)
    return loss
