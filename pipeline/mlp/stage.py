"""A stage: a contiguous run of layers, with forward (F), input-gradient (B) and weight-gradient (W) passes.

    F  y, stash = forward(x)            keeps each layer's (x, z) for this micro-batch
    B  dx = backward_input(dy, stash)   dJ/dz and dJ/dx through the layers, last to first
    W  backward_weight(stash)           dJ/dW += dJ/dz x^T for every layer; the stash can go

B is on the critical path (the previous stage waits for dx); W is not, which is what lets
zero-bubble schedules defer it. Gradients accumulate in each parameter's .grad.

With `recompute` (pipeline.recompute, GPipe's re-materialisation) F runs like prediction and keeps
only the stage's input x; B (or BW) first runs the forward again from x to rebuild the stash, then
goes on as above. The same operations on the same x give the same numbers, so training stays exact;
the price is one more F per micro-batch, the saving every x, z, h between a stage's F and its B.

With model.compute_dtype=bfloat16 the parameters (and .grad) stay in `dtype`, float32, while F, B
and W run in `compute_dtype` from the layers' bfloat16 copies (see mlp.layers): what a stage
stashes, hands on and receives is bfloat16, half the bytes. `cast_weights` refreshes the copies;
the engine calls it once per step, after the optimizer's update, and after a resume.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.mlp.layers import Layer, Saved

Stash = list[Saved]


class Stage:
    """Layers [first, last] of the model, numbered globally."""

    def __init__(self, stage_index: int, num_stages: int, layers: list[Layer], recompute: bool = False):
        if not layers:
            raise ValueError(f"stage {stage_index} has no layers")
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.layers = layers
        self.recompute = recompute  # keep only each micro-batch's input from F to B
        self.zero_grad()

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    @property
    def in_dim(self) -> int:
        return self.layers[0].weight.shape[1]

    @property
    def out_dim(self) -> int:
        return self.layers[-1].weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (model.dtype), which their gradients and the optimizer share."""
        return self.layers[0].weight.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of activations, their gradients, the stash and the messages (model.compute_dtype)."""
        return self.layers[0].compute_dtype

    def cast_weights(self) -> None:
        """Refresh every layer's compute-dtype copy of W and b from the parameters (a no-op without one)."""
        for layer in self.layers:
            layer.cast_weights()

    def compute_copies(self) -> list[Tensor]:
        return [t for layer in self.layers for t in layer.compute_copies()]

    @property
    def device(self) -> torch.device:
        return self.layers[0].weight.device

    def parameters(self) -> list[Tensor]:
        return [p for layer in self.layers for p in layer.parameters()]

    def weights(self) -> list[Tensor]:
        return [layer.weight for layer in self.layers]

    def zero_grad(self) -> None:
        for p in self.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()  # in place: no new allocation every step

    def forward(self, x: Tensor) -> tuple[Tensor, Stash]:
        """F: the stage's output and its stash; under recompute the stash is the input x alone."""
        if self.recompute:
            return self.predict(x), [Saved(x.to(self.compute_dtype))]  # kept as layer 0's forward keeps it
        return self._forward_keeping(x)

    def _forward_keeping(self, x: Tensor) -> tuple[Tensor, Stash]:
        stash = []
        for layer in self.layers:
            x, saved = layer.forward(x)
            stash.append(saved)
        return x, stash

    def _rematerialise(self, stash: Stash) -> None:
        """Under recompute, F again from the kept input x: the stash is refilled in place, as F would have left it."""
        if self.recompute:
            stash[:] = self._forward_keeping(stash[0].x)[1]

    @staticmethod
    def stash_nbytes(stash: Stash) -> int:
        """Bytes a micro-batch's stash holds (a tensor shared by two layers counts once)."""
        return sum(n for _, n in Stage.stash_tensors(stash))

    @staticmethod
    def stash_tensors(stash: Stash) -> set[tuple[int, int]]:
        """The tensors a micro-batch's stash holds, as (storage address, bytes): a tensor shared by two layers
        is one entry, and one shared with the next stage's stash, when that stage is on this rank, is the
        same entry there (the runtime counts it once)."""
        held: set[tuple[int, int]] = set()
        for saved in stash:
            if saved is not None:
                saved.tensors(held)
        return held

    def predict(self, x: Tensor) -> Tensor:
        """Forward without keeping anything: what prediction needs."""
        for layer in self.layers:
            x, _ = layer.forward(x)
        return x

    def backward_input(self, dy: Tensor, stash: Stash) -> Tensor | None:
        """B: dJ/d(input) from dJ/d(output); None on the first stage, whose input is data."""
        self._rematerialise(stash)
        for i in reversed(range(len(self.layers))):
            need_dx = i > 0 or not self.is_first
            dy = self.layers[i].grad_input(dy, stash[i], need_dx)
        return dy

    def backward(self, dy: Tensor, stash: Stash) -> Tensor | None:
        """B and W together (BW), layer by layer, so only one layer's dJ/dz is alive at a time."""
        self._rematerialise(stash)
        for i in reversed(range(len(self.layers))):
            layer, saved = self.layers[i], stash[i]
            dy = layer.grad_input(dy, saved, need_dx=i > 0 or not self.is_first)
            layer.accumulate_grad_weight(saved)
            stash[i] = None  # this layer's x, z, h and dJ/dz can go now
        stash.clear()
        return dy

    def backward_weight(self, stash: Stash) -> None:
        """W: accumulate dJ/dW (and dJ/db) of this micro-batch; needs backward_input first."""
        for layer, saved in zip(self.layers, stash):
            layer.accumulate_grad_weight(saved)
        stash.clear()  # x, z and dz of this micro-batch are no longer needed
