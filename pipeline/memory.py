"""Bytes per rank: what prediction holds against what training holds (the chapter's exercise 3).

    python -m pipeline.memory --ranks 2 [OVERRIDES]                  # predicted, per rank
    python -m pipeline.memory --ranks 2 --measure [--steps 2] [...]  # and measured in a short in-process run
    python -m pipeline.memory --ranks 1 --predict-rows 64 model=seed pipeline.microbatches=1  # the chapter's model

Prediction (forward only) holds the parameters and the activation in flight: each layer's h is
the next layer's input and nothing else is kept, so at most the largest h (or the input x) of the
predicted micro-batch is alive. Training holds, on top of the parameters,

    gradients            dJ/dW and dJ/db, one tensor per parameter, summed over the micro-batches
    optimizer state      SGD with momentum: one buffer per parameter (none without momentum);
                         Adam: two buffers per parameter and a step count per tensor
    stashed activations  what each micro-batch's B and W need, from its F until its W: every
                         layer's x, z or h, later dJ/dz (peak over the schedule, as the runtime
                         counts it between two actions; pipeline.costs.peak_stash_bytes)

Both are counted between operations: what one layer computation needs for itself (z while h is
made, x and h together) is left out of both, as the runtime leaves it out of the stash. With
pipeline.recompute=true the stash shrinks to each stage's input x, and the `rebuild` column adds
what a backward briefly holds while it recomputes its micro-batch's stash (the runtime counts
between actions, so that part is predicted, not measured). Prediction's rows are the trainer's eval
micro-batch (test rows / eval micro-batches) unless --predict-rows says otherwise.

Before training, `check_fits` holds each memory's ranks' parameters, gradients and optimizer state
against what that memory has free, so an impossible model is refused before it is allocated.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from dataclasses import dataclass, replace
from typing import Iterable

import torch
from torch import Tensor

from pipeline.config import Config, compose
from pipeline.costs import live_stash_bytes, optimizer_bytes, peak_stash_bytes, stash_bytes
from pipeline.errors import ConfigError, run_command
from pipeline.microbatch import sizes
from pipeline.model import MLPSpec
from pipeline.plan import Plan, make_plan, replica_batch, retime

KIB = 1024
MEASURED = ("param_bytes", "grad_bytes", "optimizer_bytes", "peak_stash_bytes")  # as Engine.stash_figures names them


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


@dataclass(frozen=True)
class Calculation:
    """The plan the trainer would make and what each of its ranks holds."""

    conf: Config
    plan: Plan
    spec: MLPSpec
    predict_rows: int  # rows predicted at once (the eval micro-batch by default)
    ranks: list[RankMemory]


# --- measured: the real tensors -----------------------------------------------------------------

def held_bytes(params: Iterable[Tensor], optimizer: torch.optim.Optimizer) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) in bytes, counted on the tensors themselves."""
    params = list(params)
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    state = [t for p in params for t in optimizer.state.get(p, {}).values() if isinstance(t, Tensor)]
    return (sum(nbytes(p) for p in params), sum(nbytes(p.grad) for p in params if p.grad is not None),
            sum(nbytes(t) for t in state))


def measure(conf: Config, ranks: int, steps: int = 2) -> dict[str, list[int]]:
    """Train `steps` steps in this process (pipeline.transport=inprocess) and return what the ranks
    held: Engine.stash_figures' per-rank lists, named as in metrics.jsonl."""
    from pipeline.trainer import train

    train_conf = replace(conf.train, steps=steps, log_every=steps, eval_every=steps, resume="never")
    conf = replace(_inprocess(conf, ranks), train=train_conf,
                   checkpoint=replace(conf.checkpoint, save_initial=False, every=0),
                   trace=replace(conf.trace, enabled=False))
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(io.StringIO()):
        summary = train(conf, run_dir)
    return {key: summary[key] for key in MEASURED}


# --- predicted: from the model's shape and the schedule -----------------------------------------

def _inprocess(conf: Config, ranks: int) -> Config:
    """One replica's pipeline in this process: with parallel.dp = d, each replica trains on its share
    of the batch, and every replica's ranks hold the same bytes."""
    one_replica = replace(conf.train, batch_size=replica_batch(conf))
    return replace(conf, pipeline=replace(conf.pipeline, transport="inprocess", ranks=ranks), train=one_replica,
                   parallel=replace(conf.parallel, dp=1))


def in_flight_bytes(spec: MLPSpec, layers: Iterable[int], rows: int) -> int:
    """The largest activation a forward over `layers` hands on: their input x or one of their outputs."""
    element = torch.empty((), dtype=spec.torch_dtype).element_size()
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


def _rank_layers(plan: Plan, rank: int) -> list[int]:
    return [i for s in plan.stages_of(rank) for i in plan.stage_layers[s]]


def state_bytes(conf: Config, plan: Plan, spec: MLPSpec, rank: int) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) of one rank in bytes: what it holds before any micro-batch."""
    element = torch.empty((), dtype=spec.torch_dtype).element_size()
    layers = _rank_layers(plan, rank)
    params = element * sum(spec.layer_params(i) for i in layers)
    num_tensors = len(layers) * (2 if spec.bias else 1)
    return params, params, optimizer_bytes(conf, params, num_tensors)


def rank_memory(conf: Config, plan: Plan, spec: MLPSpec, rank: int, stash: int, predict_rows: int) -> RankMemory:
    recompute = conf.pipeline.recompute
    mb_sizes = sizes(conf.train.batch_size, plan.num_microbatches)
    rebuild = rebuild_bytes(plan, spec, mb_sizes, rank, stash) if recompute else 0
    return RankMemory(*state_bytes(conf, plan, spec, rank), stash, rebuild,
                      in_flight_bytes(spec, _rank_layers(plan, rank), predict_rows))


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


def memory_pools(plan: Plan, transport: str, device: torch.device, machine: range) -> list[list[int]]:
    """The pipeline ranks whose state comes out of one memory, per memory: in-process, all of them;
    under torchrun on CPUs, those of this machine's processes (`machine`: their global ranks; replicas
    count again); on GPUs, each process's own device (all ranks are listed, so every process refuses alike)."""
    if transport == "inprocess":
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


def calculate(conf: Config, ranks: int, predict_rows: int | None = None) -> Calculation:
    """Per rank, predicted bytes for prediction (of `predict_rows` rows at once, by default the trainer's
    eval micro-batch) and for training under the plan the trainer would make."""
    from pipeline.trainer import load_data, model_spec

    conf = _inprocess(conf, ranks)
    data = load_data(conf)
    spec = model_spec(conf, data)
    test_rows = 0 if data.x_test is None else len(data.x_test)
    plan = make_plan(conf, spec, 1, eval_rows=test_rows)
    if conf.pipeline.partition == "time":
        plan = retime(plan, spec, conf, list)  # measured here, as the trainer's ranks would
    predict_rows = predict_rows or sizes(test_rows or conf.train.batch_size, plan.eval_microbatches)[0]
    mb_sizes = sizes(conf.train.batch_size, plan.num_microbatches)
    stash = peak_stash_bytes(plan.train_schedule, spec, list(plan.stage_layers), mb_sizes, conf.pipeline.recompute)
    return Calculation(conf, plan, spec, predict_rows,
                       [rank_memory(conf, plan, spec, r, stash[r], predict_rows) for r in range(plan.num_ranks)])


# --- the command ---------------------------------------------------------------------------------

COLUMNS = ("params", "grads", "optimizer", "stash", "rebuild", "training", "in flight", "prediction", "ratio")


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / KIB:.1f}"


def _row(label: str, values: list[str]) -> str:
    return f"{label:<18}" + "".join(f"{v:>11}" for v in values)


def header(calc: Calculation) -> str:
    c, plan, spec = calc.conf, calc.plan, calc.spec
    optim = "adam" if c.optim.name == "adam" else f"sgd momentum {c.optim.momentum:g}"
    return (f"{plan.schedule}: p={plan.num_ranks} m={plan.num_microbatches} v={plan.virtual_stages} "
            f"recompute={'on' if c.pipeline.recompute else 'off'}; model {'-'.join(map(str, spec.dims))} "
            f"{spec.activation} {spec.dtype}, batch {c.train.batch_size}, predicting {calc.predict_rows} rows at once, "
            f"{optim}")


def format_table(calc: Calculation, measured: dict[str, list[int]] | None = None) -> str:
    """Per rank the predicted bytes (KiB) and, when given, the measured ones beneath them."""
    lines = [header(calc), _row("KiB per rank", list(COLUMNS))]
    for r, mem in enumerate(calc.ranks):
        values = [mem.params, mem.grads, mem.optimizer, mem.stash, mem.rebuild, mem.training,
                  mem.in_flight, mem.prediction]
        lines.append(_row(f"rank {r}" + (" predicted" if measured else ""),
                          [_kib(v) for v in values] + [f"{mem.training / mem.prediction:.2f}"]))
        if measured:
            held = [measured[key][r] for key in MEASURED]
            lines.append(_row(f"rank {r} measured", [_kib(v) for v in held] + ["-", _kib(sum(held))] + ["-"] * 3))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="pipeline ranks p (default 2)")
    parser.add_argument("--measure", action="store_true",
                        help="also train a few steps in this process and print the bytes the ranks really held")
    parser.add_argument("--steps", type=int, default=2, help="steps of the measuring run (default 2)")
    parser.add_argument("--predict-rows", type=int, default=None,
                        help="rows predicted at once (default: the trainer's eval micro-batch)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. pipeline.schedule=gpipe")
    args = parser.parse_args(argv)
    return run_command(_memory_command, args)


def _memory_command(args: argparse.Namespace) -> int:
    if args.ranks < 1:
        raise ConfigError(f"--ranks={args.ranks} must be at least 1")
    if args.steps < 1:
        raise ConfigError(f"--steps={args.steps} must be at least 1")
    if args.predict_rows is not None and args.predict_rows < 1:
        raise ConfigError(f"--predict-rows={args.predict_rows} must be at least 1")
    conf = compose(args.overrides)
    calc = calculate(conf, args.ranks, args.predict_rows)
    measured = measure(conf, args.ranks, args.steps) if args.measure else None
    print(format_table(calc, measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
