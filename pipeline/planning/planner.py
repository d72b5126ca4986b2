"""The planner: every schedule x micro-batch count x virtual stages, ranked by predicted step time among those that fit.

`pipeline.schedule=auto` trains with its choice, made from FLOP counts so every rank makes the same
choice without talking; `python -m pipeline.plan` prints the ranking. `pipeline.schedule=search` builds
a schedule from the costs instead (`search`): greedy list schedules (schedules.search) on the looped
and the V placement, held against every schedule of the registry, the fastest that fits kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from pipeline.config import AUTO, SEARCH, Config
from pipeline.errors import ConfigError
from pipeline.mlp import microbatch
from pipeline.mlp.model import MLPSpec
from pipeline.planning import partition
from pipeline.planning.costs import KINDS, Costs, flop_costs, layer_kind_times, summed_costs
from pipeline.planning.memory import rank_memory
from pipeline.planning.plan import Plan, configured_plan, cut, layout, num_ranks, program_layout, replica_batch
from pipeline.schedules import search as list_scheduling
from pipeline.schedules.placement import Placement, looped, v_shape
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


def _rule(conf: Config) -> str | tuple[int, ...]:
    """The partition the planner cuts by: time is measured only once the ranks can agree, so params stands in."""
    return conf.pipeline.partition if conf.pipeline.partition != "time" else "params"


def _judge(conf: Config, spec: MLPSpec, plan: Plan, costs: Costs, budget: float) -> Option:
    """What the simulator predicts for `plan` under `costs`, and whether its peak memory fits `budget`."""
    m = plan.num_microbatches
    result = simulate(plan.train_schedule, plan.placement, m, costs)
    mb_sizes = microbatch.sizes(replica_batch(conf), m)
    memory = [rank_memory(conf, plan, spec, r, mb_sizes).training for r in range(plan.num_ranks)]
    return Option(plan.schedule, m, plan.virtual_stages, result.makespan, max(result.bubble.values()), memory,
                  max(memory) <= budget)


def _cuts(conf: Config, num_stages: int) -> bool:
    """Can pipeline.partition cut the layers into `num_stages` stages? (A list of counts names one number.)"""
    return not isinstance(conf.pipeline.partition, tuple) or len(conf.pipeline.partition) == num_stages


def _family_plans(conf: Config, spec: MLPSpec, p: int, m: int, eval_rows: int) -> list[Plan]:
    """Every schedule of the registry at m micro-batches, with each number of stages per rank it can take."""
    plans = []
    for name, entry in SCHEDULES.items():
        for v in (entry.fixed_stages,) if entry.fixed_stages else (VIRTUAL_CHOICES if entry.virtual else (1,)):
            if p * v <= spec.num_layers and _cuts(conf, p * v):
                plans.append(layout(name, p, m, v, cut(conf, spec, p, v, _rule(conf)), eval_rows))
    return plans


def search(conf: Config, spec: MLPSpec, p: int, m: int, cost_of: Callable[[list[range], int], Costs],
           budget_gib: float | None, eval_rows: int = 0) -> tuple[Plan, Option]:
    """pipeline.schedule=search: the fastest predicted plan that fits, among greedy list schedules built from
    the costs (looped and V placements, every stash limit) and every schedule of the registry; ConfigError
    when none fits the budget."""
    return pick(conf, p, m, weigh(conf, spec, p, m, cost_of, eval_rows=eval_rows), budget_gib)


def pick(conf: Config, p: int, m: int, judged: list[tuple[Plan, Option]],
         budget_gib: float | None) -> tuple[Plan, Option]:
    """search's choice among plans weighed once (weigh), under a memory budget: what fits is judged again
    here, so one weighing answers for any budget."""
    budget = math.inf if budget_gib is None else budget_gib * GIB
    return _chosen(conf, p, m, [(plan, replace(o, fits=max(o.memory) <= budget)) for plan, o in judged], budget_gib)


def measured_search(conf: Config, spec: MLPSpec, plan: Plan, eval_rows: int,
                    mean_over_processes: Callable[[list[float]], list[float]], transport: str) -> Plan:
    """pipeline.search_costs=measured: the search again, from every layer's F, B and W timed on this
    hardware; every process times them and the times are averaged over the processes, so all build the
    same schedule (as pipeline.partition=time re-cuts). Messages cost what `transport` is assumed to."""
    rows = microbatch.sizes(replica_batch(conf), plan.num_microbatches)[0]
    layer_s = mean_over_processes(layer_kind_times(spec, rows, conf.train.seed))
    cost_of = lambda stages, r: summed_costs(spec, stages, r, layer_s, transport)  # noqa: E731
    return search(conf, spec, plan.num_ranks, plan.num_microbatches, cost_of, conf.pipeline.memory_gib, eval_rows)[0]


def _rank(option: Option) -> tuple[bool, float, float]:
    """What makes an option better: it fits, then a shorter step (to the nanosecond: predictions equal but for
    the order their floats were added in tie), then less memory on its fullest rank."""
    return not option.fits, round(option.step_s, 9), max(option.memory)


def _chosen(conf: Config, p: int, m: int, judged: list[tuple[Plan, Option]],
            budget_gib: float | None) -> tuple[Plan, Option]:
    """The fastest of the weighed plans that fits, named search (ConfigError when none fits)."""
    if not judged:
        raise ConfigError(f"pipeline.partition={list(conf.pipeline.partition)} cuts {len(conf.pipeline.partition)} "
                          f"stages, which no schedule the search weighs runs on {p} ranks; use pipeline.partition=uniform")
    plan, option = min(judged, key=lambda j: _rank(j[1]))
    if not option.fits:
        raise ConfigError(f"pipeline.memory_gib={budget_gib}: no schedule fits; the smallest needs "
                          f"{min(max(o.memory) for _, o in judged) / 2 ** 20:.2f} MiB per rank; raise the budget or "
                          "add ranks")
    found = plan if plan.schedule == SEARCH else replace(plan, schedule=SEARCH, origin=plan.schedule)  # a family won
    return found, Option(SEARCH, m, found.virtual_stages, option.step_s, option.bubble, option.memory, option.fits)


def weigh(conf: Config, spec: MLPSpec, p: int, m: int, cost_of: Callable[[list[range], int], Costs],
          budget: float = math.inf, eval_rows: int = 0) -> list[tuple[Plan, Option]]:
    """Every plan the search weighs at m micro-batches, with what the simulator predicts for it under the costs."""
    rows, cost_of = microbatch.sizes(replica_batch(conf), m)[0], _once_per_cut(cost_of)
    judged = []
    for plan in _family_plans(conf, spec, p, m, eval_rows):
        judged.append((plan, _judge(conf, spec, plan, cost_of(list(plan.stage_layers), rows), budget)))
    placements = {"greedy looped": looped(p), **({"greedy looped v=2": looped(p, 2), "greedy V": v_shape(p)}
                                                 if 2 * p <= spec.num_layers else {})}
    layer_s = _layer_seconds(spec, cost_of, rows)
    for name, placement in ((n, pl) for n, pl in placements.items() if _cuts(conf, pl.num_stages)):
        for stages, cut_label in _search_cuts(conf, spec, p, placement, layer_s):
            costs = cost_of(list(stages), rows)
            for label, _, actions in list_scheduling.candidates({name: placement}, m, costs.duration, costs.transfer):
                plan = program_layout(SEARCH, actions, placement, m, stages, eval_rows, origin=label + cut_label)
                judged.append((plan, _judge(conf, spec, plan, costs, budget)))
    return judged


def _once_per_cut(cost_of: Callable[[list[range], int], Costs]) -> Callable[[list[range], int], Costs]:
    """cost_of, asked once per cut and row count: the schedules on one cut share its costs (measured ones are
    timed once, and every schedule is judged by the same timings)."""
    known: dict[tuple, Costs] = {}

    def once(stages: list[range], rows: int) -> Costs:
        key = (tuple((r.start, r.stop) for r in stages), rows)
        if key not in known:
            known[key] = cost_of(stages, rows)
        return known[key]
    return once


def _layer_seconds(spec: MLPSpec, cost_of: Callable[[list[range], int], Costs], rows: int) -> list[float]:
    """F + B + W of each layer alone under the costs: what a rank's share of a cut weighs."""
    costs = cost_of([range(i, i + 1) for i in range(spec.num_layers)], rows)
    return [sum(costs.compute[(i, kind)] for kind in KINDS) for i in range(spec.num_layers)]


def _search_cuts(conf: Config, spec: MLPSpec, p: int, placement: Placement,
                 layer_s: list[float]) -> list[tuple[tuple[range, ...], str]]:
    """The cuts the search builds schedules on: pipeline.partition's, and (unless it lists the counts itself)
    the ones that leave the busiest rank the least work (partition.rank_balanced), each with its label."""
    configured = cut(conf, spec, p, placement.num_stages // p, _rule(conf))
    found = [(configured, "")]
    if not isinstance(conf.pipeline.partition, tuple):
        ranks = [placement.rank_of(s) for s in range(placement.num_stages)]
        for counts in partition.rank_balanced(layer_s, ranks):
            stages = tuple(partition.stage_layers(counts))
            if stages != configured:
                found.append((stages, f", cut {list(counts)}"))
    return found



def options(conf: Config, spec: MLPSpec, p: int, cost_of: Callable[[list[range], int], Costs],
            budget_gib: float | None) -> list[Option]:
    """Every feasible schedule x m x v, fastest predicted first."""
    budget = math.inf if budget_gib is None else budget_gib * GIB
    found = []
    for m in (m for m in MICROBATCH_CHOICES if m <= replica_batch(conf)):
        judged = weigh(conf, spec, p, m, cost_of, budget)  # every family and the search's own, simulated once
        found += [option for plan, option in judged if not plan.origin]
        try:
            found.append(_chosen(conf, p, m, judged, budget_gib)[1])
        except ConfigError:  # nothing the search weighs fits the budget at this m
            pass
    return sorted(found, key=_rank)


def _flop_costs(spec: MLPSpec) -> Callable[[list[range], int], Costs]:
    return lambda stages, rows: flop_costs(spec, stages, rows)


def choose(conf: Config, spec: MLPSpec, p: int) -> Option:
    """The planner's pick for pipeline.schedule=auto (FLOP-count costs: the same on every rank)."""
    ranked = options(conf, spec, p, _flop_costs(spec), conf.pipeline.memory_gib)
    if not ranked or not ranked[0].fits:
        least = min((max(o.memory) for o in ranked), default=0) / 2 ** 20
        raise ConfigError(f"pipeline.memory_gib={conf.pipeline.memory_gib}: no schedule fits; the smallest "
                          f"needs {least:.2f} MiB per rank; raise the budget or add ranks")
    return ranked[0]


def make_plan(conf: Config, spec: MLPSpec, world_size: int, eval_rows: int) -> Plan:
    """The run's plan: the configured schedule, the planner's choice for pipeline.schedule=auto, or the schedule
    it builds for pipeline.schedule=search (both from FLOP-count costs, the same on every rank)."""
    p = num_ranks(conf, world_size)
    if conf.pipeline.schedule == AUTO:
        best = choose(conf, spec, p)
        conf = replace(conf, pipeline=replace(conf.pipeline, schedule=best.schedule,
                                              microbatches=best.microbatches, virtual_stages=best.virtual_stages))
    if conf.pipeline.schedule == SEARCH:
        return search(conf, spec, p, conf.pipeline.microbatches, _flop_costs(spec), conf.pipeline.memory_gib,
                      eval_rows)[0]
    return configured_plan(conf, spec, p, eval_rows)


def format_options(ranked: list[Option], limit: int = 25) -> str:
    lines = [f"{'schedule':<17} {'m':>3} {'v':>2}  {'step (ms)':>9}  {'bubble':>6}  {'peak MiB/rank':>13}  fits"]
    for o in ranked[:limit]:
        lines.append(f"{o.schedule:<17} {o.microbatches:>3} {o.virtual_stages:>2}  {o.step_s * 1e3:>9.2f}  "
                     f"{o.bubble:>6.1%}  {max(o.memory) / 2 ** 20:>13.1f}  {'yes' if o.fits else 'no'}")
    return "\n".join(lines)
