"""The MLP: its shape from the config, and the seeded initialisation of each layer.

Layer i maps dims[i] -> dims[i+1]; every layer but the last applies the activation, so the
seed network (one hidden layer, no bias) is z = W1 x, h = phi(z), o = W2 h.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from pipeline.mlp.layers import Layer

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# model.compute_dtype: F, B and W run in it from a copy of the weights, which stay in model.dtype
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MLPSpec:
    """Everything that fixes the network: widths, activation, bias, dtype (and the dtype it computes in)."""

    dims: tuple[int, ...]  # (in_dim, *hidden, out_dim)
    activation: str
    bias: bool
    dtype: str  # the weights, their gradients and the optimizer state
    compute_dtype: str | None = None  # F, B, W and the messages between stages; None: dtype

    @property
    def num_layers(self) -> int:
        return len(self.dims) - 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        """What activations, their gradients, stashes and messages are held in."""
        return COMPUTE_DTYPES[self.compute_dtype] if self.compute_dtype else self.torch_dtype

    @property
    def precision(self) -> str:
        """How the run's numbers are held, for headers: float32, or float32 weights, bfloat16 compute."""
        return f"{self.dtype} weights, {self.compute_dtype} compute" if self.compute_dtype else self.dtype

    def layer_params(self, index: int) -> int:
        """Number of parameters of layer `index` (weights, plus bias when enabled)."""
        return self.dims[index + 1] * (self.dims[index] + int(self.bias))


def layer_generator(seed: int, index: int) -> torch.Generator:
    """A generator that depends only on (seed, layer index), never on how layers are split."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def init_layer(spec: MLPSpec, index: int, seed: int, device: torch.device | str = "cpu") -> Layer:
    """Layer `index`, drawn like torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), in float64 on the CPU
    (so every device and dtype starts from the same numbers), then cast and moved."""
    fan_in, fan_out = spec.dims[index], spec.dims[index + 1]
    gen, bound = layer_generator(seed, index), 1 / math.sqrt(fan_in)

    def draw(*shape: int) -> torch.Tensor:
        values = torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 * bound - bound
        return values.to(dtype=spec.torch_dtype, device=device)

    weight = draw(fan_out, fan_in)
    bias = draw(fan_out) if spec.bias else None
    activation = spec.activation if index < spec.num_layers - 1 else None
    return Layer(index, weight, bias, activation, spec.torch_compute_dtype)


def build_layers(spec: MLPSpec, seed: int, indices: Iterable[int], device: torch.device | str = "cpu") -> list[Layer]:
    """The layers with the given global indices, freshly initialised."""
    return [init_layer(spec, i, seed, device) for i in indices]


def torch_sequential(spec: MLPSpec) -> torch.nn.Sequential:
    """The same network as plain torch.nn: Linear at even indices, the activation between them."""
    act = {"relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh, "gelu": torch.nn.GELU}
    modules: list[torch.nn.Module] = []
    for i in range(spec.num_layers):
        modules.append(torch.nn.Linear(spec.dims[i], spec.dims[i + 1], bias=spec.bias, dtype=spec.torch_dtype))
        if i < spec.num_layers - 1:
            modules.append(act[spec.activation]())
    return torch.nn.Sequential(*modules)
