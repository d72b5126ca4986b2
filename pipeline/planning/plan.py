"""The parallel layout of a run, fixed before any process group starts: ranks, stages, placement, validated schedules.

Every impossible combination (more stages than layers, virtual stages with a schedule that has
none, a rank count that does not match the world) is a ConfigError here, on every rank alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from pipeline.config import FILE, Config
from pipeline.errors import ConfigError
from pipeline.mlp import microbatch
from pipeline.mlp.model import MLPSpec
from pipeline.planning import partition
from pipeline.planning.costs import layer_times
from pipeline.schedules import files
from pipeline.schedules.actions import Schedule
from pipeline.schedules.builders import forward_only
from pipeline.schedules.lowering import fuse_backward, lower
from pipeline.schedules.placement import Placement
from pipeline.schedules.registry import SCHEDULES, VIRTUAL, Program, build_schedule, stages_per_rank
from pipeline.schedules.simulator import validate


@dataclass(frozen=True)
class Plan:
    schedule: str
    num_ranks: int
    virtual_stages: int
    num_microbatches: int
    stage_layers: tuple[range, ...]  # global layer indices of each stage
    placement: Placement  # stage -> rank, as the schedule assumes it
    train_schedule: Schedule  # lowered: compute plus sends and receives, validated
    eval_schedule: Schedule  # forward only, lowered
    eval_microbatches: int
    origin: str = ""  # for pipeline.schedule=search: which candidate won, e.g. "greedy V, limit 4"

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def last_rank(self) -> int:
        """The rank holding the last stage: the loss, the metrics and the progress bar live there."""
        return self.placement.last_rank

    def stages_of(self, rank: int) -> list[int]:
        return self.placement.stages_of(rank)

    def layers_of(self, rank: int) -> list[int]:
        """The global layer indices a rank holds, in model order."""
        return [i for s in self.stages_of(rank) for i in self.stage_layers[s]]


def num_ranks(conf: Config, world_size: int) -> int:
    """p: pipeline ranks per replica. Under torchrun the world is p x d processes (parallel.dp = d);
    the in-process transport runs all p (pipeline.ranks or parallel.pp, default 1) in one process."""
    p, d = conf.parallel.pp or conf.pipeline.ranks, conf.parallel.dp
    if conf.pipeline.in_process:
        if world_size > 1:
            raise ConfigError(f"pipeline.transport={conf.pipeline.transport} runs every rank in one process, but the "
                              f"world size is {world_size}; launch one process or use pipeline.transport=p2p")
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


def check_virtual(name: str, virtual_stages: int) -> int:
    """The stages per rank schedule `name` runs for pipeline.virtual_stages (ConfigError where it cannot)."""
    if virtual_stages > 1 and name not in VIRTUAL and SCHEDULES[name].fixed_stages is None:
        raise ConfigError(f"pipeline.virtual_stages={virtual_stages} but pipeline.schedule={name} has no virtual "
                          f"stages; use one of {', '.join(sorted(VIRTUAL))} or pipeline.virtual_stages=1")
    try:
        return stages_per_rank(name, virtual_stages)
    except ValueError as err:
        raise ConfigError(f"pipeline.virtual_stages={virtual_stages}: {err}") from None


def layout(name: str, p: int, m: int, v: int, stage_layers: tuple[range, ...], eval_rows: int = 0) -> Plan:
    """Build, lower and validate schedule `name` for these counts and stages (ConfigError on bad counts)."""
    try:
        program = build_schedule(name, p, m, v)
    except ValueError as err:
        raise ConfigError(f"pipeline.schedule={name}: {err}") from None
    return program_layout(name, program.actions, program.placement, m, stage_layers, eval_rows)


def program_layout(name: str, compute: Schedule, placement: Placement, m: int, stage_layers: tuple[range, ...],
                   eval_rows: int = 0, origin: str = "") -> Plan:
    """The plan of a compute-only schedule and its placement: lowered, B+W fused where adjacent, validated."""
    train_schedule = fuse_backward(lower(compute, placement))
    validate(train_schedule, placement, m)  # a failure here is a bug in a builder: it raises with the grid
    eval_mbs = max(1, min(m, eval_rows))
    p = placement.num_ranks
    v = max(len(placement.stages_of(r)) for r in range(p))
    return Plan(name, p, v, m, stage_layers, placement, train_schedule,
                lower(forward_only(placement, eval_mbs), placement), eval_mbs, origin)


def file_program(path: str, p: int, m: int) -> Program:
    """The validated schedule of pipeline.schedule_file for p ranks and m micro-batches (ConfigError in one line)."""
    try:
        program = files.load(path, m, key="pipeline.microbatches")
    except ValueError as err:
        raise ConfigError(f"pipeline.schedule_file={err}") from None  # err starts with the path
    rows = program.placement.num_ranks
    if rows != p:
        raise ConfigError(f"pipeline.schedule_file={path} has {rows} rows (one per rank) but the run has {p} ranks; "
                          f"run {rows} ranks (pipeline.ranks={rows}, or {rows} processes) or write one row per rank")
    return program


def file_plan(conf: Config, spec: MLPSpec, p: int, eval_rows: int) -> Plan:
    """pipeline.schedule=file: the file's stages and placement; the partition cuts the layers into that many stages."""
    path, m = conf.pipeline.schedule_file, conf.pipeline.microbatches
    program = file_program(path, p, m)
    placement = program.placement
    v = max(len(placement.stages_of(r)) for r in range(p))
    if conf.pipeline.virtual_stages not in (1, v):
        raise ConfigError(f"pipeline.virtual_stages={conf.pipeline.virtual_stages} but pipeline.schedule_file={path} "
                          f"places up to {v} stage(s) per rank; the file fixes the stages: leave "
                          "pipeline.virtual_stages at 1")
    where = f"pipeline.schedule_file={path}"
    counts = partition.layer_counts(spec, placement.num_stages, conf.pipeline.partition, where)
    return program_layout(FILE, program.actions, placement, m, tuple(partition.stage_layers(counts)), eval_rows)


def cut(conf: Config, spec: MLPSpec, p: int, v: int, rule: str | tuple[int, ...] | None = None) -> tuple[range, ...]:
    """The layers of each of the p * v stages under pipeline.partition (or `rule`)."""
    where = f"{p} rank(s) x pipeline.virtual_stages={v}"
    counts = partition.layer_counts(spec, p * v, conf.pipeline.partition if rule is None else rule, where)
    return tuple(partition.stage_layers(counts))


def configured_plan(conf: Config, spec: MLPSpec, p: int, eval_rows: int) -> Plan:
    """The plan of the configured schedule, micro-batches and virtual stages on p ranks."""
    name, m = conf.pipeline.schedule, conf.pipeline.microbatches
    if name == FILE:
        return file_plan(conf, spec, p, eval_rows)
    v = check_virtual(name, conf.pipeline.virtual_stages)
    return layout(name, p, m, v, cut(conf, spec, p, v), eval_rows)


def retime(plan: Plan, spec: MLPSpec, conf: Config, mean_over_processes: Callable[[list[float]], list[float]]) -> Plan:
    """pipeline.partition=time: re-cut the stages to minimise the slowest one, from measured layer times.

    Every process measures every layer; the times are averaged over processes so all cut alike.
    """
    rows = math.ceil(replica_batch(conf) / plan.num_microbatches)
    times = mean_over_processes(layer_times(spec, rows, conf.train.seed))
    counts = partition.balance(times, plan.num_stages)
    return replace(plan, stage_layers=tuple(partition.stage_layers(counts)))
