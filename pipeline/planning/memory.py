"""The one per-rank memory model: bytes for prediction against bytes for training (the chapter's exercise 3).

The planner, `python -m pipeline.memory`, the trainer's memory check and its stash figures all
count with the functions here.

Prediction (forward only) holds the parameters and the activation in flight: each layer's h is
the next layer's input and nothing else is kept, so at most the largest h (or the input x) of the
predicted micro-batch is alive. Training holds, on top of the parameters,

    gradients            dJ/dW and dJ/db, one tensor per parameter, summed over the micro-batches
    optimizer state      SGD with momentum: one buffer per parameter (none without momentum);
                         Adam: two buffers per parameter and a step count per tensor
    stashed activations  what each micro-batch's B and W need, from its F until its W: every
                         layer's x, z or h, later dJ/dz (peak over the schedule, as the runtime
                         counts it between two actions; peak_stash_bytes)

Under model.compute_dtype=bfloat16 the parameters, gradients and optimizer state stay float32 and
the parameters gain a bfloat16 copy (2 bytes per parameter) that F, B and W read; every stashed
activation, the activation in flight and every message is bfloat16, half its float32 bytes.

Both are counted between operations: what one layer computation needs for itself (z while h is
made, x and h together) is left out of both, as the runtime leaves it out of the stash. With
pipeline.recompute=true the stash shrinks to each stage's input x, and the `rebuild` column adds
what a backward briefly holds while it recomputes its micro-batch's stash (the runtime counts
between actions, so that part is predicted, not measured). Prediction's rows are the trainer's eval
micro-batch (test rows / eval micro-batches) unless told otherwise (training.footprint).

Before training, `check_fits` holds each memory's ranks' parameters, gradients and optimizer state
against what that memory has free, so an impossible model is refused before it is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.mlp.layers import ACTIVATIONS
from pipeline.mlp.model import MLPSpec
from pipeline.planning.plan import Plan
from pipeline.schedules.actions import Action, Schedule

KIB = 1024


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds at its peak, by kind."""

    params: int
    grads: int
    optimizer: int
    stash: int  # stashed activations at their peak, between two actions
    rebuild: int  # recompute: the extra bytes while a backward rebuilds its stash (0 without)
    in_flight: int  # prediction: the largest activation handed from layer to layer

    @property
    def training(self) -> int:
        return self.params + self.grads + self.optimizer + self.stash + self.rebuild

    @property
    def prediction(self) -> int:
        return self.params + self.in_flight


# --- measured: the real tensors -----------------------------------------------------------------

def held_bytes(params: Iterable[Tensor], optimizer: torch.optim.Optimizer,
               copies: Iterable[Tensor] = ()) -> tuple[int, int, int]:
    """(parameters with their compute-dtype `copies`, gradients, optimizer state) in bytes, counted on the tensors."""
    params = list(params)
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    state = [t for p in params for t in optimizer.state.get(p, {}).values() if isinstance(t, Tensor)]
    return (sum(nbytes(p) for p in [*params, *copies]), sum(nbytes(p.grad) for p in params if p.grad is not None),
            sum(nbytes(t) for t in state))


# --- predicted: from the model's shape and the schedule -----------------------------------------

def _element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def stash_bytes(spec: MLPSpec, layers: range, rows: int, after_b: bool = False, recompute: bool = False) -> int:
    """Bytes one micro-batch keeps stashed on a stage (see mlp.layers.Saved and mlp.stage.Stage).

    Before B: each layer's input x, plus z where phi' needs it (gelu), plus the stage's output h
    where phi' is written through h (relu, sigmoid, tanh; inside the stage h is the next input);
    under recompute only the stage's input x (B rebuilds the rest).
    After B (split B and W): each layer's x and dJ/dz, with or without recompute.
    All of it in the compute dtype (model.compute_dtype, else model.dtype).
    """
    widths = _stash_tensors(spec, layers, 0, after_b, recompute).values()
    return rows * _element(spec.torch_compute_dtype) * sum(widths)


def optimizer_bytes(conf, param_bytes: int, num_tensors: int) -> int:
    """Optimizer state for `param_bytes` of parameters in `num_tensors` tensors. SGD: a momentum
    buffer per parameter when momentum > 0; Adam: exp_avg and exp_avg_sq per parameter and a 0-d
    step tensor per parameter tensor."""
    if conf.optim.name == "adam":
        return 2 * param_bytes + num_tensors * torch.tensor(0.0).element_size()
    return param_bytes if conf.optim.momentum else 0


def live_stash_bytes(actions: list[Action], spec: MLPSpec, stage_layers: list[range], mb_sizes: list[int],
                     recompute: bool = False) -> list[int]:
    """Stashed bytes one rank holds after each of its actions, counted as the runtime counts them:
    F adds a micro-batch's stash, B swaps it for its after-B contents (x and dJ/dz), W and BW free it.
    Each activation counts once: a stage's output h handed to the next stage on this rank is that
    stage's input x, in both stashes (the V's turn, or every stage at p = 1), until both let it go."""
    element = _element(spec.torch_compute_dtype)
    held: dict[tuple, int] = {}  # tensor -> how many stashes hold it
    stashes: dict[tuple[int, int], dict[tuple, int]] = {}  # (stage, mb) -> its tensors and their bytes
    live, out = 0, []
    for a in actions:
        if a.kind in ("F", "B", "W", "BW"):
            key, rows = (a.stage_index, a.mb_index), mb_sizes[a.mb_index]
            before = stashes.pop(key, {})
            after = {} if a.kind in ("W", "BW") else {
                t: rows * element * width for t, width in
                _stash_tensors(spec, stage_layers[a.stage_index], a.mb_index, a.kind == "B", recompute).items()}
            for t in after.keys() - before.keys():
                held[t] = held.get(t, 0) + 1
                live += after[t] if held[t] == 1 else 0
            for t in before.keys() - after.keys():
                held[t] -= 1
                live -= before[t] if held[t] == 0 else 0
            if after:
                stashes[key] = after
        out.append(live)
    return out


def _stash_tensors(spec: MLPSpec, layers: range, mb: int, after_b: bool, recompute: bool) -> dict[tuple, int]:
    """What one micro-batch's stash on a stage holds (see stash_bytes), each tensor named by what it is:
    ("a", i, mb) is layer i's input (layer i-1's h), ("z", i, mb) its pre-activation, ("dz", i, mb) its
    dJ/dz; the values are their widths."""
    dims, first, last = spec.dims, layers[0], layers[-1]
    if recompute and not after_b:
        return {("a", first, mb): dims[first]}
    named = {("a", i, mb): dims[i] for i in layers}  # each layer's x
    if after_b:
        return {**named, **{("dz", i, mb): dims[i + 1] for i in layers}}
    has_act = [i < spec.num_layers - 1 for i in range(spec.num_layers)]
    if ACTIVATIONS[spec.activation].from_output:
        if has_act[last]:
            named[("a", last + 1, mb)] = dims[last + 1]  # the stage's output h (inside, h is the next x)
    else:
        named.update({("z", i, mb): dims[i + 1] for i in layers if has_act[i]})
    return named


def peak_stash_bytes(schedule: Schedule, spec: MLPSpec, stage_layers: list[range],
                     mb_sizes: list[int], recompute: bool = False) -> dict[int, int]:
    """Per rank, the most stashed bytes held at once between two actions (see live_stash_bytes)."""
    return {rank: max([0, *live_stash_bytes(actions, spec, stage_layers, mb_sizes, recompute)])
            for rank, actions in schedule.items()}


def in_flight_bytes(spec: MLPSpec, layers: Iterable[int], rows: int) -> int:
    """The largest activation a forward over `layers` hands on: their input x or one of their outputs,
    in the compute dtype (the layers round a float32 input on entry)."""
    element = _element(spec.torch_compute_dtype)
    return rows * element * max(max(spec.dims[i], spec.dims[i + 1]) for i in layers)


def rebuild_bytes(plan: Plan, spec: MLPSpec, mb_sizes: list[int], rank: int, kept_peak: int) -> int:
    """Under recompute: how far above `kept_peak` the rank goes while a B or BW holds the rebuilt
    stash of its micro-batch beside everything else still stashed."""
    stages, actions = list(plan.stage_layers), plan.train_schedule[rank]
    held = live_stash_bytes(actions, spec, stages, mb_sizes, recompute=True)
    highest = 0
    for i, a in enumerate(actions):
        if a.kind in ("B", "BW"):
            layers, rows = stages[a.stage_index], mb_sizes[a.mb_index]
            extra = stash_bytes(spec, layers, rows) - stash_bytes(spec, layers, rows, recompute=True)
            highest = max(highest, (held[i - 1] if i else 0) + extra)
    return max(0, highest - kept_peak)


def state_bytes(conf: Config, plan: Plan, spec: MLPSpec, rank: int) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) of one rank in bytes: what it holds before any micro-batch;
    the parameters with their compute-dtype copy under model.compute_dtype."""
    layers = plan.layers_of(rank)
    count = sum(spec.layer_params(i) for i in layers)
    params = _element(spec.torch_dtype) * count
    copies = _element(spec.torch_compute_dtype) * count if spec.compute_dtype else 0
    num_tensors = len(layers) * (2 if spec.bias else 1)
    return params + copies, params, optimizer_bytes(conf, params, num_tensors)


def sent_bytes(plan: Plan, spec: MLPSpec, mb_sizes: list[int], rank: int) -> int:
    """Bytes `rank` sends in one training step: per SEND_F its stage's output activation, per SEND_B
    the gradient of its stage's input, rows x width in the compute dtype (bfloat16: half of float32)."""
    element, total = _element(spec.torch_compute_dtype), 0
    for a in plan.train_schedule[rank]:
        layers = plan.stage_layers[a.stage_index]
        if a.kind in ("SEND_F", "SEND_B"):
            width = spec.dims[layers[-1] + 1] if a.kind == "SEND_F" else spec.dims[layers[0]]
            total += mb_sizes[a.mb_index] * width * element
    return total


def rank_memory(conf: Config, plan: Plan, spec: MLPSpec, rank: int, mb_sizes: list[int],
                predict_rows: int = 1) -> RankMemory:
    """What `rank` holds training `plan` on micro-batches of `mb_sizes` rows, and predicting `predict_rows` at once."""
    recompute = conf.pipeline.recompute
    held = live_stash_bytes(plan.train_schedule[rank], spec, list(plan.stage_layers), mb_sizes, recompute)
    stash = max([0, *held])
    rebuild = rebuild_bytes(plan, spec, mb_sizes, rank, stash) if recompute else 0
    return RankMemory(*state_bytes(conf, plan, spec, rank), stash, rebuild,
                      in_flight_bytes(spec, plan.layers_of(rank), predict_rows))


# --- before training: does the model fit at all? ------------------------------------------------

def available_bytes(device: torch.device) -> int | None:
    """Free memory of the CUDA device, or the machine's MemAvailable (Linux); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            info = dict(line.split(":", 1) for line in meminfo)
        return int(info["MemAvailable"].split()[0]) * KIB
    except (OSError, KeyError, ValueError):
        return None


def memory_pools(plan: Plan, in_process: bool, device: torch.device, machine: range) -> list[list[int]]:
    """The pipeline ranks whose state comes out of one memory, per memory: in-process, all of them;
    under torchrun on CPUs, those of this machine's processes (`machine`: their global ranks; replicas
    count again); on GPUs, each process's own device (all ranks are listed, so every process refuses alike)."""
    if in_process:
        return [list(range(plan.num_ranks))]
    if device.type == "cuda":
        return [[rank] for rank in range(plan.num_ranks)]
    return [[g % plan.num_ranks for g in machine]]


def _gib(n: float) -> str:
    gib = n / 2 ** 30
    return f"{gib:.0f}" if gib >= 100 else f"{gib:.3g}"


def check_fits(conf: Config, plan: Plan, spec: MLPSpec, pools: list[list[int]], device: torch.device,
               hint: str) -> None:
    """Refuse (ConfigError) when one memory cannot hold its ranks' parameters, gradients and optimizer state."""
    available = available_bytes(device)
    if available is None:
        return
    need = {rank: sum(state_bytes(conf, plan, spec, rank)) for rank in range(plan.num_ranks)}
    for pool in pools:
        total = sum(need[rank] for rank in pool)
        if total > available:
            worst = max(pool, key=need.get)
            shared = f" ({_gib(total)} GiB with the other ranks in this memory)" if len(pool) > 1 else ""
            raise ConfigError(f"model {'-'.join(map(str, spec.dims))}: rank {worst} needs {_gib(need[worst])} GiB "
                              f"for parameters, gradients and optimizer state{shared} but {_gib(available)} GiB of "
                              f"memory is available; {hint}")


