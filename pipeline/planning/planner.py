"""The planner: every schedule x micro-batch count x virtual stages, ranked by predicted step time among those that fit.

`pipeline.schedule=auto` trains with its choice, made from FLOP counts so every rank makes the same
choice without talking; `python -m pipeline.plan` prints the ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from pipeline.config import AUTO, Config
from pipeline.errors import ConfigError
from pipeline.mlp import microbatch
from pipeline.mlp.model import MLPSpec
from pipeline.planning.costs import Costs, flop_costs
from pipeline.planning.memory import rank_memory
from pipeline.planning.plan import Plan, configured_plan, cut, layout, num_ranks, replica_batch
from pipeline.schedules.registry import SCHEDULES
from pipeline.schedules.simulator import simulate

MICROBATCH_CHOICES = (1, 2, 4, 8, 16, 32)
VIRTUAL_CHOICES = (1, 2, 4)
GIB = 2 ** 30


@dataclass(frozen=True)
class Option:
    """One way to run the pipeline, with what the simulator predicts for it."""

    schedule: str
    microbatches: int
    virtual_stages: int
    step_s: float
    bubble: float  # the largest per-rank idle fraction
    memory: list[int]  # predicted peak training bytes per rank (planning.memory.rank_memory)
    fits: bool


def evaluate_option(conf: Config, spec: MLPSpec, p: int, name: str, m: int, v: int,
                    cost_of: Callable[[list[range], int], Costs], budget: float) -> Option:
    rule = conf.pipeline.partition if conf.pipeline.partition != "time" else "params"
    plan = layout(name, p, m, v, cut(conf, spec, p, v, rule))
    mb_sizes = microbatch.sizes(replica_batch(conf), m)
    result = simulate(plan.train_schedule, plan.placement, m, cost_of(list(plan.stage_layers), mb_sizes[0]))
    memory = [rank_memory(conf, plan, spec, r, mb_sizes).training for r in range(p)]
    return Option(name, m, v, result.makespan, max(result.bubble.values()), memory, max(memory) <= budget)


def options(conf: Config, spec: MLPSpec, p: int, cost_of: Callable[[list[range], int], Costs],
            budget_gib: float | None) -> list[Option]:
    """Every feasible schedule x m x v, fastest predicted first."""
    budget = math.inf if budget_gib is None else budget_gib * GIB
    found = []
    for name, entry in SCHEDULES.items():
        for m in (m for m in MICROBATCH_CHOICES if m <= replica_batch(conf)):
            choices = (entry.fixed_stages,) if entry.fixed_stages else VIRTUAL_CHOICES
            for v in (v for v in choices if (v == 1 or entry.virtual or entry.fixed_stages) and p * v <= spec.num_layers):
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


def make_plan(conf: Config, spec: MLPSpec, world_size: int, eval_rows: int) -> Plan:
    """The run's plan: the configured schedule, or the planner's choice for pipeline.schedule=auto."""
    p = num_ranks(conf, world_size)
    if conf.pipeline.schedule == AUTO:
        best = choose(conf, spec, p)
        conf = replace(conf, pipeline=replace(conf.pipeline, schedule=best.schedule,
                                              microbatches=best.microbatches, virtual_stages=best.virtual_stages))
    return configured_plan(conf, spec, p, eval_rows)


def format_options(ranked: list[Option], limit: int = 25) -> str:
    lines = [f"{'schedule':<17} {'m':>3} {'v':>2}  {'step (ms)':>9}  {'bubble':>6}  {'peak MiB/rank':>13}  fits"]
    for o in ranked[:limit]:
        lines.append(f"{o.schedule:<17} {o.microbatches:>3} {o.virtual_stages:>2}  {o.step_s * 1e3:>9.2f}  "
                     f"{o.bubble:>6.1%}  {max(o.memory) / 2 ** 20:>13.1f}  {'yes' if o.fits else 'no'}")
    return "\n".join(lines)
