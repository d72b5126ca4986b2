"""The parallel layout of a run, fixed before any process group starts, and the planner that picks one.

Every impossible combination (more stages than layers, virtual stages with a schedule that has
none, a rank count that does not match the world) is a ConfigError here, on every rank alike.

    python -m pipeline.plan --ranks 2 --memory-gib 1 [--measure] [OVERRIDES]

ranks every schedule x micro-batch count x virtual stages by predicted step time among those
whose peak memory per rank fits the budget; `pipeline.schedule=auto` trains with its choice
(made from FLOP counts, so every rank makes the same choice without talking).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from typing import Callable

from pipeline import microbatch, partition
from pipeline.config import AUTO, Config, compose
from pipeline.costs import (Costs, add_arguments, flop_costs, layer_times, measured_costs, optimizer_bytes,
                            peak_stash_bytes)
from pipeline.errors import ConfigError, run_command
from pipeline.model import MLPSpec
from pipeline.schedule import (SCHEDULES, VIRTUAL, Action, Schedule, build_schedule, fuse_backward, lower,
                               stages_of_rank)
from pipeline.simulate import simulate, validate

MICROBATCH_CHOICES = (1, 2, 4, 8, 16, 32)
VIRTUAL_CHOICES = (1, 2, 4)
GIB = 2 ** 30


@dataclass(frozen=True)
class Plan:
    schedule: str
    num_ranks: int
    virtual_stages: int
    num_microbatches: int
    stage_layers: tuple[range, ...]  # global layer indices of each stage
    train_schedule: Schedule  # lowered: compute plus sends and receives, validated
    eval_schedule: Schedule  # forward only, lowered
    eval_microbatches: int

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def last_rank(self) -> int:
        """The rank holding the last stage: the loss, the metrics and the progress bar live there."""
        return (self.num_stages - 1) % self.num_ranks

    def stages_of(self, rank: int) -> list[int]:
        return stages_of_rank(rank, self.num_ranks, self.virtual_stages)


def num_ranks(conf: Config, world_size: int) -> int:
    """p: pipeline ranks per replica. Under torchrun the world is p x d processes (parallel.dp = d);
    the in-process transport runs all p (pipeline.ranks or parallel.pp, default 1) in one process."""
    p, d = conf.parallel.pp or conf.pipeline.ranks, conf.parallel.dp
    if conf.pipeline.transport == "inprocess":
        if world_size > 1:
            raise ConfigError(f"pipeline.transport=inprocess runs every rank in one process, but the world size is "
                              f"{world_size}; launch one process or use pipeline.transport=p2p")
        return p or 1
    if p is None:
        if world_size % d:
            raise ConfigError(f"the world size {world_size} is not a multiple of parallel.dp={d}; launch a multiple "
                              f"of {d} processes or change parallel.dp")
        return world_size // d
    if p * d != world_size:
        key = "parallel.pp" if conf.parallel.pp else "pipeline.ranks"
        raise ConfigError(f"{key}={p} x parallel.dp={d} needs {p * d} processes but the world size is {world_size}; "
                          f"launch {p * d} processes (e.g. --nproc-per-node={p * d}) or drop {key}")
    return p


def replica_batch(conf: Config) -> int:
    """Rows of the global batch one replica trains on per step (the largest of the d shares)."""
    return microbatch.sizes(conf.train.batch_size, conf.parallel.dp)[0]


def forward_only(num_ranks: int, num_microbatches: int, virtual_stages: int) -> Schedule:
    """Evaluation: every micro-batch forward through every stage, in (micro-batch, stage) order."""
    return {rank: [Action(s, "F", mb) for mb in range(num_microbatches)
                   for s in stages_of_rank(rank, num_ranks, virtual_stages)]
            for rank in range(num_ranks)}


def make_plan(conf: Config, spec: MLPSpec, world_size: int, eval_rows: int) -> Plan:
    """Cut the model, build and validate the schedules; raises ConfigError on impossible layouts."""
    p = num_ranks(conf, world_size)
    if conf.pipeline.schedule == AUTO:
        best = choose(conf, spec, p)
        conf = replace(conf, pipeline=replace(conf.pipeline, schedule=best.schedule,
                                              microbatches=best.microbatches, virtual_stages=best.virtual_stages))
    name, v, m = conf.pipeline.schedule, conf.pipeline.virtual_stages, conf.pipeline.microbatches
    if v > 1 and name not in VIRTUAL:
        raise ConfigError(f"pipeline.virtual_stages={v} but pipeline.schedule={name} has no virtual stages; "
                          f"use one of {', '.join(sorted(VIRTUAL))} or pipeline.virtual_stages=1")
    where = f"{p} rank(s) x pipeline.virtual_stages={v}"
    counts = partition.layer_counts(spec, p * v, conf.pipeline.partition, where)
    try:
        compute = build_schedule(name, p, m, v)
    except ValueError as err:
        raise ConfigError(f"pipeline.schedule={name}: {err}") from None
    train_schedule = fuse_backward(lower(compute, p))
    validate(train_schedule, p, m, v)  # a failure here is a bug in a generator: it raises with the grid
    eval_mbs = max(1, min(m, eval_rows))
    return Plan(name, p, v, m, tuple(partition.stage_layers(counts)), train_schedule,
                lower(forward_only(p, eval_mbs, v), p), eval_mbs)


def retime(plan: Plan, spec: MLPSpec, conf: Config, mean_over_processes: Callable[[list[float]], list[float]]) -> Plan:
    """pipeline.partition=time: re-cut the stages to minimise the slowest one, from measured layer times.

    Every process measures every layer; the times are averaged over processes so all cut alike.
    """
    rows = math.ceil(replica_batch(conf) / plan.num_microbatches)
    times = mean_over_processes(layer_times(spec, rows, conf.train.seed))
    counts = partition.balance(times, plan.num_stages)
    return replace(plan, stage_layers=tuple(partition.stage_layers(counts)))


# --- the planner ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One way to run the pipeline, with what the simulator predicts for it."""

    schedule: str
    microbatches: int
    virtual_stages: int
    step_s: float
    bubble: float  # the largest per-rank idle fraction
    memory: list[int]  # predicted peak bytes per rank
    fits: bool


def rank_memory(conf: Config, spec: MLPSpec, stages: tuple[range, ...], stages_of: list[int], stash: int) -> int:
    """Parameters, gradients and optimizer state of the rank's stages, plus its peak stash."""
    element = 8 if spec.dtype == "float64" else 4
    layers = [i for s in stages_of for i in stages[s]]
    params = element * sum(spec.layer_params(i) for i in layers)
    return 2 * params + optimizer_bytes(conf, params, len(layers) * (2 if spec.bias else 1)) + stash


def evaluate_option(conf: Config, spec: MLPSpec, p: int, name: str, m: int, v: int,
                    cost_of: Callable[[list[range], int], Costs], budget: float) -> Option:
    rule = conf.pipeline.partition if conf.pipeline.partition != "time" else "params"
    stages = tuple(partition.stage_layers(partition.layer_counts(spec, p * v, rule, f"{p} ranks x v={v}")))
    rows = math.ceil(replica_batch(conf) / m)
    schedule = fuse_backward(lower(build_schedule(name, p, m, v), p))
    result = simulate(schedule, p, m, v, cost_of(list(stages), rows))
    stash = peak_stash_bytes(schedule, spec, list(stages), microbatch.sizes(replica_batch(conf), m),
                             conf.pipeline.recompute)
    memory = [rank_memory(conf, spec, stages, stages_of_rank(r, p, v), stash[r]) for r in range(p)]
    return Option(name, m, v, result.makespan, max(result.bubble.values()), memory, max(memory) <= budget)


def options(conf: Config, spec: MLPSpec, p: int, cost_of: Callable[[list[range], int], Costs],
            budget_gib: float | None) -> list[Option]:
    """Every feasible schedule x m x v, fastest predicted first."""
    budget = math.inf if budget_gib is None else budget_gib * GIB
    found = []
    for name in SCHEDULES:
        for m in (m for m in MICROBATCH_CHOICES if m <= replica_batch(conf)):
            for v in (v for v in VIRTUAL_CHOICES if (v == 1 or name in VIRTUAL) and p * v <= spec.num_layers):
                if isinstance(conf.pipeline.partition, tuple) and len(conf.pipeline.partition) != p * v:
                    continue
                found.append(evaluate_option(conf, spec, p, name, m, v, cost_of, budget))
    return sorted(found, key=lambda o: (not o.fits, o.step_s, max(o.memory)))


def choose(conf: Config, spec: MLPSpec, p: int) -> Option:
    """The planner's pick for pipeline.schedule=auto (FLOP-count costs: the same on every rank)."""
    ranked = options(conf, spec, p, lambda stages, rows: flop_costs(spec, stages, rows), conf.pipeline.memory_gib)
    if not ranked or not ranked[0].fits:
        least = min((max(o.memory) for o in ranked), default=0) / 2 ** 20
        raise ConfigError(f"pipeline.memory_gib={conf.pipeline.memory_gib}: no schedule fits; the smallest "
                          f"needs {least:.2f} MiB per rank; raise the budget or add ranks")
    return ranked[0]


def format_options(ranked: list[Option], limit: int = 25) -> str:
    lines = [f"{'schedule':<17} {'m':>3} {'v':>2}  {'step (ms)':>9}  {'bubble':>6}  {'peak MiB/rank':>13}  fits"]
    for o in ranked[:limit]:
        lines.append(f"{o.schedule:<17} {o.microbatches:>3} {o.virtual_stages:>2}  {o.step_s * 1e3:>9.2f}  "
                     f"{o.bubble:>6.1%}  {max(o.memory) / 2 ** 20:>13.1f}  {'yes' if o.fits else 'no'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--memory-gib", type=float, default=None, help="memory budget per rank in GiB")
    parser.add_argument("--top", type=int, default=25, help="rows to print")
    args = parser.parse_args(argv)
    return run_command(_plan_command, args)


def _plan_command(args: argparse.Namespace) -> int:
    import torch

    from pipeline.trainer import load_data, model_spec

    if args.ranks < 1 or (args.memory_gib is not None and args.memory_gib <= 0):
        raise ConfigError("--ranks must be >= 1 and --memory-gib > 0")
    conf = compose(args.overrides)
    spec = model_spec(conf, load_data(conf))
    torch.set_num_threads(args.threads)
    cost_of = ((lambda stages, rows: measured_costs(spec, stages, rows, conf.train.seed)) if args.measure
               else (lambda stages, rows: flop_costs(spec, stages, rows)))
    ranked = options(conf, spec, args.ranks, cost_of, args.memory_gib)
    budget = "no budget" if args.memory_gib is None else f"{args.memory_gib:g} GiB per rank"
    print(f"model {'-'.join(map(str, spec.dims))} {spec.dtype}, batch {conf.train.batch_size}, p={args.ranks}, "
          f"{budget}, costs {'measured here' if args.measure else 'from FLOP counts'}")
    print(format_options(ranked, args.top))
    best = ranked[0] if ranked and ranked[0].fits else None
    print("choice: " + (f"pipeline.schedule={best.schedule} pipeline.microbatches={best.microbatches} "
                        f"pipeline.virtual_stages={best.virtual_stages}" if best else "none fits the budget"))
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
