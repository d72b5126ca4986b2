"""The parallel layout of a run, fixed before any process group starts: ranks, stages, schedules.

Every impossible combination (more stages than layers, virtual stages with a schedule that has
none, a rank count that does not match the world) is a ConfigError here, on every rank alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import partition
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.model import MLPSpec
from pipeline.schedule import VIRTUAL, Action, Schedule, build_schedule, lower, stages_of_rank
from pipeline.simulate import validate


@dataclass(frozen=True)
class Plan:
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
    """p: the world size under torchrun, pipeline.ranks (default 1) for the in-process transport."""
    p = conf.pipeline
    if p.transport == "inprocess":
        if world_size > 1:
            raise ConfigError(f"pipeline.transport=inprocess runs every rank in one process, but the world size is "
                              f"{world_size}; launch one process or use pipeline.transport=p2p")
        return p.ranks or 1
    if p.ranks is not None and p.ranks != world_size:
        raise ConfigError(f"pipeline.ranks={p.ranks} does not match the world size {world_size}; set "
                          f"--nproc-per-node={p.ranks} or drop pipeline.ranks")
    return world_size


def forward_only(num_ranks: int, num_microbatches: int, virtual_stages: int) -> Schedule:
    """Evaluation: every micro-batch forward through every stage, in (micro-batch, stage) order."""
    return {rank: [Action(s, "F", mb) for mb in range(num_microbatches)
                   for s in stages_of_rank(rank, num_ranks, virtual_stages)]
            for rank in range(num_ranks)}


def make_plan(conf: Config, spec: MLPSpec, world_size: int, eval_rows: int) -> Plan:
    """Cut the model, build and validate the schedules; raises ConfigError on impossible layouts."""
    p, v, m = num_ranks(conf, world_size), conf.pipeline.virtual_stages, conf.pipeline.microbatches
    name = conf.pipeline.schedule
    if v > 1 and name not in VIRTUAL:
        raise ConfigError(f"pipeline.virtual_stages={v} but pipeline.schedule={name} has no virtual stages; "
                          f"use one of {', '.join(sorted(VIRTUAL))} or pipeline.virtual_stages=1")
    where = f"{p} rank(s) x pipeline.virtual_stages={v}"
    counts = partition.layer_counts(spec, p * v, conf.pipeline.partition, where)
    try:
        compute = build_schedule(name, p, m, v)
    except ValueError as err:
        raise ConfigError(f"pipeline.schedule={name}: {err}") from None
    train_schedule = lower(compute, p)
    validate(train_schedule, p, m, v)  # a failure here is a bug in a generator: it raises with the grid
    eval_mbs = max(1, min(m, eval_rows))
    return Plan(p, v, m, tuple(partition.stage_layers(counts)), train_schedule,
                lower(forward_only(p, eval_mbs, v), p), eval_mbs)
