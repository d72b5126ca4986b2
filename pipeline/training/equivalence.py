"""Pipelined training equals single-device training: the small problem, the reference, the difference.

The reference is #2's single-device trainer: all layers in one stage, the whole batch at once
(`microbatch.accumulate` with m=1), the same optimizer. The pipeline runs `trainer.train` with
the in-process transport (the multi-process tests run the same comparison over gloo).
Difference = max over parameters of max |pipeline - reference| / max |reference|.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from pipeline import config
from pipeline.config import IN_PROCESS, Config
from pipeline.mlp import microbatch
from pipeline.mlp.model import build_layers
from pipeline.mlp.stage import Stage
from pipeline.schedules.registry import SCHEDULES
from pipeline.training import checkpoint, data as datasets
from pipeline.training.engine import make_optimizer
from pipeline.training.setup import as_tensors, load_data, model_spec
from pipeline.training.trainer import train

Params = dict[int, dict[str, torch.Tensor]]

# A small float64 problem with 8 layers (enough for 4 ranks x 2 virtual stages) and a batch of
# 10 rows, which 3, 4 and 8 micro-batches do not divide.
PROBLEM = {
    "model": {"in_dim": None, "out_dim": None, "hidden": [6, 5, 6, 5, 6, 5, 6], "activation": "tanh",
              "bias": True, "dtype": "float64"},
    "data": {"name": "synthetic", "n": 60, "dim": 5, "classes": 3, "noise": 0.1, "seed": 1,
             "test_fraction": 0.2, "shuffle": True},
    "optim": {"name": "sgd", "lr": 0.2, "momentum": 0.5},
    "pipeline": {"schedule": "1f1b", "microbatches": 1, "virtual_stages": 1, "partition": "uniform",
                 "transport": IN_PROCESS, "ranks": 1},
    "train": {"steps": 4, "batch_size": 10, "seed": 3, "log_every": 2, "eval_every": 4},
    "loss": {"name": "cross_entropy", "l2": 0.05},
    "checkpoint": {"save_initial": False},
    "dist": {"backend": "auto", "timeout_s": 30},
}


def problem(timeout_s: float | None = None, dp: int = 1, pp: int | None = None, **pipeline) -> Config:
    """The small problem with some pipeline keys replaced (schedule, microbatches, ranks, ...) and
    d = dp replicas of a p = pp rank pipeline."""
    conf = config.parse(PROBLEM)
    conf = replace(conf, pipeline=replace(conf.pipeline, **pipeline),
                   parallel=replace(conf.parallel, dp=dp, pp=pp))
    return replace(conf, dist=replace(conf.dist, timeout_s=timeout_s)) if timeout_s else conf


def reference(conf: Config, num_microbatches: int = 1) -> Params:
    """Single-device training: one stage holding every layer, the whole batch at once (or, as
    gradient accumulation, in `num_microbatches` micro-batches)."""
    data = load_data(conf)
    spec = model_spec(conf, data)
    stage = Stage(0, 1, build_layers(spec, conf.train.seed, range(spec.num_layers)))
    optimizer = make_optimizer(conf, stage.parameters())
    sampler = datasets.BatchSampler(len(data.x_train), conf.train.batch_size, conf.train.seed, conf.data.shuffle)
    x_train, y_train = as_tensors(data.x_train, data.y_train, spec)
    for step in range(conf.train.steps):
        rows = torch.as_tensor(sampler.indices(step))
        microbatch.accumulate(stage, x_train[rows], y_train[rows], num_microbatches, conf.loss.name, conf.loss.l2)
        optimizer.step()
        stage.cast_weights()  # model.compute_dtype: as Engine.update does
    return {layer.index: dict(layer.named_parameters()) for layer in stage.layers}


def difference(params: Params, ref: Params) -> float:
    """Worst relative difference over every parameter tensor."""
    if sorted(params) != sorted(ref):
        raise AssertionError(f"layers {sorted(params)} differ from the reference's {sorted(ref)}")
    return max(float((params[i][k] - t).abs().max() / t.abs().max()) for i in ref for k, t in ref[i].items())


def pipelined(conf: Config, run_dir: str | Path) -> tuple[Params, dict]:
    """Train through the pipeline (its summary line swallowed) and read back the final weights."""
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(conf, run_dir)
    return checkpoint.load_layers(run_dir)[1], summary


def grid(schedules=tuple(SCHEDULES), ranks=(1, 2, 3, 4), microbatches=(1, 3, 4, 8), virtual=(1, 2)) -> Iterator[dict]:
    """Every case of the table: a schedule of the registry x p x m x v (v > 1 only where the schedule has it)."""
    for schedule, p, m, v in itertools.product(schedules, ranks, microbatches, virtual):
        fixed = SCHEDULES[schedule].fixed_stages
        if (v == 1 or SCHEDULES[schedule].virtual) if fixed is None else v == fixed:
            yield {"schedule": schedule, "ranks": p, "microbatches": m, "virtual_stages": v}
