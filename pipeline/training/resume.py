"""Resuming a run: which checkpoints train.resume allows, and restoring the newest that every rank can read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import ConfigError, UserError
from pipeline.mlp.model import MLPSpec
from pipeline.training import checkpoint
from pipeline.training.checkpoint import DamagedCheckpoint
from pipeline.training.engine import Engine


def resume_candidates(conf: Config, spec: MLPSpec, run_dir: Path) -> list[int]:
    """The checkpoints train.resume allows, newest first; impossible resumes are refused before any work."""
    want, steps = conf.train.resume, checkpoint.complete_steps(run_dir)
    if want == "never":
        if checkpoint.any_checkpoint(run_dir):
            raise ConfigError(f"train.resume=never but {run_dir / 'checkpoints'} already holds checkpoints; "
                              "use train.resume=auto to continue that run, or a new hydra.run.dir")
        return []
    if want != "auto" and want not in steps:
        raise ConfigError(f"train.resume={want}: {run_dir / 'checkpoints'} has no complete checkpoint for that "
                          f"step (available: {steps}); pick one of those or train.resume=auto")
    chosen = steps if want == "auto" else [want]
    if chosen and chosen[-1] > conf.train.steps:
        raise ConfigError(f"train.steps={conf.train.steps} is before step {chosen[-1]} of the checkpoint in "
                          f"{run_dir}; raise train.steps, or start over in a new hydra.run.dir")
    _check_checkpoint_fits(conf, spec, run_dir, chosen)
    return chosen[::-1]


def _check_checkpoint_fits(conf: Config, spec: MLPSpec, run_dir: Path, steps: list[int]) -> None:
    """The newest readable checkpoint was trained with this model and optimizer (damaged ones are dealt with later)."""
    for step in reversed(steps):
        try:
            meta = checkpoint.read_meta(run_dir, step)
        except DamagedCheckpoint:
            continue
        shape = tuple(meta.get("dims", ())) == spec.dims
        if shape:  # the same widths: name the key that differs (model.bias, model.activation, ...)
            _check_same_math(meta.get("math", {}), checkpoint.math_record(conf, spec), run_dir, step)
        if not shape or meta.get("bias") != spec.bias:  # also checkpoints older than their math record
            raise ConfigError(f"{run_dir}: the checkpoint of step {step} holds a model of widths {meta.get('dims')} "
                              f"(bias {meta.get('bias')}) but model.* gives {list(spec.dims)} (bias {spec.bias}); "
                              "use the same model or a new hydra.run.dir")
        if meta.get("optimizer") != conf.optim.name:
            raise ConfigError(f"{run_dir}: the checkpoint of step {step} was trained with optim="
                              f"{meta.get('optimizer')} but this run uses optim={conf.optim.name}; use optim="
                              f"{meta.get('optimizer')} or a new hydra.run.dir")
        return


def _check_same_math(saved: dict, ours: dict, run_dir: Path, step: int) -> None:
    """Every key the checkpoint records (older ones record fewer) must be what this run has."""
    for key, value in saved.items():
        if key in ours and ours[key] != value:
            fix = f"data={value}" if key == "data.name" else f"{key}={_shown(value)}"  # data is a config group
            raise ConfigError(f"train.resume: the checkpoint of step {step} in {run_dir} was trained with "
                              f"{key}={_shown(value)} but this run has {key}={_shown(ours[key])}; resuming would "
                              f"change the math: use {fix} or a new hydra.run.dir")


def _shown(value) -> str:
    """A value as it is written on the command line (true, [6,5], relu)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def resume(conf: Config, engine: Engine, run_dir: Path, candidates: list[int]) -> int | None:
    """Restore the newest checkpoint every rank can read; None: there is none, start fresh.

    Each rank reads only the shards holding its layers; one sum over every process (all replicas)
    says whether all succeeded, so every rank settles on the same step. A damaged file is reported once, by the
    lowest rank that reads it, and the previous checkpoint is tried.
    """
    for step in candidates:
        try:
            state, problem = engine.read_checkpoint(run_dir, step), None
        except DamagedCheckpoint as err:
            state, problem = None, err
            _report(engine, run_dir, step, err)
        if engine.comm.sum_world([float(problem is not None)])[0] == 0:
            engine.restore(state)
            _forget_later(engine, run_dir, step)
            if engine.reports:
                print(f"pipeline: resuming {run_dir} from step {step}", flush=True)
            return step
        if conf.train.resume != "auto":
            raise UserError(f"train.resume={step}: that checkpoint is damaged (reported above); pick another step "
                            "or train.resume=auto")
    if candidates:
        raise UserError(f"{run_dir / 'checkpoints'}: no checkpoint can be read (reported above); remove them "
                        "or use a new hydra.run.dir")
    return None


def _report(engine: Engine, run_dir: Path, step: int, err: DamagedCheckpoint) -> None:
    reader = 0
    if err.shard is not None:
        reader = engine.first_reader(checkpoint.read_meta(run_dir, step), err.shard)
    if reader in engine.comm.local_ranks and engine.comm.writes_results:
        print(f"warning: {' '.join(str(err).split())}; trying the previous checkpoint", file=sys.stderr, flush=True)


def _forget_later(engine: Engine, run_dir: Path, step: int) -> None:
    """Checkpoints after the resumed one are damaged or an abandoned history: rank 0 removes them
    before anyone trains, so they can never be mistaken for this run's."""
    if engine.comm.is_root and checkpoint.discard_after(run_dir, step):
        checkpoint.point_latest(run_dir, step)
    engine.comm.barrier("resume")
