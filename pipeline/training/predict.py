"""Pipelined prediction from a run's checkpoint (`python -m pipeline.predict`): logits, labels, and the memory it holds.

    read X (and y, if there) -> x' = (x - mean) / std with the run's scaling (checkpoint.json) ->
    plan the run's layout on the P ranks this runs on -> every rank reads its layers from the
    checkpoint, whatever layout wrote it -> passes of --batch-size rows, each cut into micro-batches
    that flow forward only (Runtime.begin(training=False): no stash for backward), in the run's
    model.compute_dtype as its evaluation computed -> the last stage's o of every row: logits,
    labels = argmax o -> the bytes each rank held, beside what one training step of the same model
    on the same ranks holds

Prediction holds the parameters and the activation in flight; training adds gradients, optimizer
state and the stash (planning/memory.py, the chapter's exercise 3). Both are shown predicted (that
model) and measured (counted on the tensors, as `python -m pipeline.memory --measure` counts them):
for prediction the parameters and the largest x or h any layer's forward took or handed on; for
training the figures of Engine.stash_figures after one step (no update) from the restored
checkpoint, its optimizer state included, on a batch of train.batch_size rows of X.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline import config
from pipeline.config import AUTO, Config
from pipeline.errors import ConfigError, DataError, UserError
from pipeline.mlp import microbatch
from pipeline.mlp.model import MLPSpec
from pipeline.planning.costs import channel_bytes
from pipeline.planning.memory import held_bytes, rank_memory
from pipeline.planning.plan import Plan
from pipeline.planning.planner import make_plan
from pipeline.runtime.distributed import connect, read_env
from pipeline.schedules.builders import forward_only
from pipeline.schedules.lowering import lower
from pipeline.training import checkpoint, data as datasets, rundir
from pipeline.training.engine import Engine

KIB = 1024


@dataclass(frozen=True)
class Inputs:
    """The rows to predict, scaled as the run's training rows were, and their labels when the file has them."""

    x: np.ndarray  # n x d, float64 until it goes to the device
    y: np.ndarray | None


@dataclass(frozen=True)
class Job:
    """Everything fixed before any process group starts, identically on every rank."""

    run_dir: Path
    step: int
    conf: Config
    spec: MLPSpec
    plan: Plan
    inputs: Inputs
    batch_size: int  # rows per pass
    state: checkpoint.State  # every layer's weights and optimizer state at `step`


def predict(run_dir: str, data_path: str, out_path: str, step: int | None = None, batch_size: int | None = None,
            ranks: int | None = None) -> dict[str, Any] | None:
    """Write logits and labels of X to `out_path`; returns the summary where the last stage lives, else None."""
    job = prepare(run_dir, data_path, out_path, step, batch_size, ranks)
    p, rows = job.plan.num_ranks, job.conf.train.batch_size
    ring = max(channel_bytes(job.spec, list(job.plan.stage_layers), n, job.plan.num_microbatches)
               for n in (job.batch_size, rows))
    with connect(read_env(), p, job.conf.pipeline.transport, job.conf.dist, ring) as comm:
        engine = Engine(job.conf, job.spec, job.plan, comm)
        _load_weights(engine, job.state)
        logits, in_flight = _forward(engine, job)
        held = _prediction_bytes(engine, in_flight)
        labels = logits.argmax(1) if logits is not None else None
        trained = _training_bytes(engine, job, labels)
    if not engine.holds_last:
        return None
    logits_np = logits.to(torch.float32).cpu().numpy()
    labels_np = labels.cpu().numpy()
    checkpoint.atomic_write_bytes(Path(out_path), lambda f: np.savez(f, logits=logits_np, labels=labels_np))
    summary = {"step": job.step, "rows": len(logits_np), "classes": logits_np.shape[1], "ranks": p, "out": out_path}
    if job.inputs.y is not None:
        summary["correct"] = int((labels_np == job.inputs.y).sum())
        summary["accuracy"] = summary["correct"] / len(labels_np)
    summary["memory"] = _memory_table(job, held, trained)
    return summary


# --- before any process group -------------------------------------------------------------------

def prepare(run_dir: str, data_path: str, out_path: str, step: int | None, batch_size: int | None,
            ranks: int | None) -> Job:
    """Check the run, the checkpoint, the inputs and the layout; every mistake is a UserError here."""
    directory = Path(run_dir)
    if not directory.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    out = Path(out_path)
    if not out.parent.is_dir() or out.is_dir():
        why = f"{out} is a directory" if out.is_dir() else f"directory {out.parent} does not exist"
        raise UserError(f"--out={out_path}: {why}; name a file in an existing directory")
    for name, value in (("--batch-size", batch_size), ("--ranks", ranks), ("--step", step)):
        if value is not None and value < (0 if name == "--step" else 1):
            raise ConfigError(f"{name}={value} must be at least {0 if name == '--step' else 1}")
    step = _checkpoint_step(directory, step)
    meta = checkpoint.read_meta(directory, step)
    conf = _layout_config(run_config(directory), ranks)
    activation = meta.get("math", {}).get("model.activation", conf.model.activation)  # older checkpoints: the config's
    spec = MLPSpec(tuple(meta["dims"]), activation, meta["bias"], meta["dtype"], conf.model.compute_dtype)
    inputs = read_inputs(data_path, spec, meta.get("input_scaling"), str(directory))
    plan = _plan(conf, spec)
    state = checkpoint.read_state(directory, step, range(spec.num_layers), meta)  # damaged: refused on every rank
    return Job(directory, step, conf, spec, plan, inputs, batch_size or conf.train.batch_size, state)


def _checkpoint_step(run_dir: Path, step: int | None) -> int:
    steps = checkpoint.complete_steps(run_dir)
    if not steps:
        raise UserError(f"{run_dir}: no complete checkpoint under checkpoints/; is this a run directory of "
                        "python -m pipeline.train?")
    if step is not None and step not in steps:
        raise UserError(f"--step={step}: {run_dir} has no complete checkpoint for that step; available: {steps}")
    return steps[-1] if step is None else step


def run_config(run_dir: Path) -> Config:
    """The config the run's latest segment trained with (segments.jsonl), checked as the trainer checks it."""
    rows = [row for row in rundir.segments(run_dir) if isinstance(row.get("config"), dict)]
    if not rows:
        raise UserError(f"{run_dir}/segments.jsonl: missing or without a config; is this a run directory of "
                        "python -m pipeline.train?")
    raw = rows[-1]["config"]
    raw = {**raw, "train": {**raw.get("train", {}), "tensorboard": False}}  # prediction writes no events
    return config.parse(raw)


def _layout_config(conf: Config, ranks: int | None) -> Config:
    """The run's config on the ranks this prediction runs on: `ranks` in this process, or one rank per
    torchrun process; one replica, no trace."""
    env = read_env()
    if ranks is not None and env.world_size > 1:
        raise ConfigError(f"--ranks={ranks} runs every rank in this one process, but torchrun started "
                          f"{env.world_size}; under torchrun each process is a rank: drop --ranks")
    conf = replace(conf, parallel=replace(conf.parallel, dp=1, pp=None), trace=replace(conf.trace, enabled=False))
    if env.world_size == 1:
        return config.in_process(conf, ranks or 1)
    transport = AUTO if conf.pipeline.in_process else conf.pipeline.transport
    return replace(conf, pipeline=replace(conf.pipeline, transport=transport, ranks=None))


def _plan(conf: Config, spec: MLPSpec) -> Plan:
    """The run's schedule on these ranks; where it cannot be made there (a schedule file written for
    another rank count, virtual stages beyond the layers), 1F1B with one stage per rank."""
    world = read_env().world_size
    try:
        return make_plan(conf, spec, world, eval_rows=0)
    except ConfigError:
        plain = replace(conf.pipeline, schedule="1f1b", virtual_stages=1, schedule_file=None, partition="uniform")
        return make_plan(replace(conf, pipeline=plain), spec, world, eval_rows=0)


def read_inputs(path: str, spec: MLPSpec, scaling: dict | None, run_dir: str) -> Inputs:
    """X (n x d) and, if the file has it, y from an .npz; x' = (x - mean) / std when the run standardised
    its inputs, computed as training computed it (float64, then the model's dtype)."""
    x, y = _read_archive(path)
    if np.iscomplexobj(x) or x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: X must be a 2-D real array (n x d), got shape {x.shape} of {x.dtype}")
    if len(x) == 0:
        raise DataError(f"{path}: X holds no rows; nothing to predict")
    if x.shape[1] != spec.dims[0]:
        raise DataError(f"{path}: X has {x.shape[1]} columns but the model of {run_dir} takes {spec.dims[0]}; "
                        "pass rows of the width it was trained on")
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0][0])
        raise DataError(f"{path}: X has a NaN or infinite value (first in row {row}); clean the data")
    if y is not None and (y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x)):
        raise DataError(f"{path}: y must be a 1-D integer array with one label per row of X ({len(x)}), got shape "
                        f"{y.shape} of {y.dtype}; fix y or leave it out")
    if y is not None and (y.min() < 0 or y.max() >= spec.dims[-1]):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DataError(f"{path}: label {bad} is outside [0, {spec.dims[-1]}), the model's classes; fix y or leave it out")
    x = x.astype(np.float64)
    if scaling is not None:
        x = (x - np.array(scaling["mean"])) / np.array(scaling["std"])  # x' = (x - mean) / std
    return Inputs(x, None if y is None else y.astype(np.int64))


def _read_archive(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    if not os.path.isfile(path):
        raise DataError(f"--data={path}: no such file; pass an .npz with an array X (and, for the accuracy, y)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty; save the rows with np.savez(path, X=...)")
    arrays, files = datasets.read_npz(path, ("X", "y"), "save with np.savez(path, X=...)")
    if "X" not in arrays:
        raise DataError(f"{path}: missing array 'X' (found {files}); save with np.savez(path, X=...)")
    return arrays["X"], arrays.get("y")


# --- in the pipeline ----------------------------------------------------------------------------

def _load_weights(engine: Engine, state: checkpoint.State) -> None:
    """This process's layers from the checkpoint; no gradient is kept (prediction has none). Under the run's
    model.compute_dtype the layers compute from a copy of the weights, taken here as training takes it."""
    for stage in engine.stages.values():
        for layer in stage.layers:
            for name, param in layer.named_parameters():
                with torch.no_grad():
                    param.copy_(state.params[layer.index][name])
                param.grad = None
        stage.cast_weights()


def _forward(engine: Engine, job: Job) -> tuple[torch.Tensor | None, dict[int, int]]:
    """Every row forward through the pipeline in passes of job.batch_size rows, each cut into at most
    pipeline.microbatches micro-batches; returns the logits where the last stage lives (else None)
    and, per local rank, the largest activation a layer took or handed on (bytes)."""
    device, spec = engine.comm.device, job.spec
    x_all = None
    if engine.holds_first:  # in model.dtype as training reads it, then rounded as its first layer rounds it
        x_all = torch.as_tensor(job.inputs.x, dtype=spec.torch_dtype, device=device).to(spec.torch_compute_dtype)
    schedules: dict[int, dict] = {}
    outputs, in_flight = [], {}
    with _watching(engine, in_flight):
        for start in range(0, len(job.inputs.x), job.batch_size):
            rows = min(job.batch_size, len(job.inputs.x) - start)
            k = min(job.plan.num_microbatches, rows)  # micro-batches of this pass
            if k not in schedules:
                schedules[k] = lower(forward_only(job.plan.placement, k), job.plan.placement)
            x = x_all[start:start + rows] if x_all is not None else None
            results = engine.run(schedules[k], x, None, rows, k, training=False)
            if engine.holds_last:
                last = results[job.plan.last_rank].outputs
                outputs += [last[mb] for mb in range(k)]
    return (torch.cat(outputs) if engine.holds_last else None), in_flight


@contextmanager
def _watching(engine: Engine, peaks: dict[int, int]) -> Iterator[None]:
    """While inside, every layer forward of a local rank notes the bytes of its input x and output h
    (the tensors themselves) in peaks[rank]; the layers are as before afterwards."""
    watched = []
    for rank in engine.comm.local_ranks:
        peaks[rank] = 0
        for s in engine.plan.stages_of(rank):
            for layer in engine.stages[s].layers:
                layer.forward = _counted(layer.forward, rank, peaks)
                watched.append(layer)
    try:
        yield
    finally:
        for layer in watched:
            del layer.forward  # the class's method again


def _counted(forward, rank: int, peaks: dict[int, int]):
    def counted(x: torch.Tensor):
        h, saved = forward(x)
        peaks[rank] = max(peaks[rank], _nbytes(x), _nbytes(h))
        return h, saved
    return counted


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _prediction_bytes(engine: Engine, in_flight: dict[int, int]) -> list[list[int]]:
    """Per rank [parameters, gradients, optimizer state, in flight] as prediction held them (a collective)."""
    p, slots = engine.plan.num_ranks, [0.0] * (4 * engine.plan.num_ranks)
    for rank in engine.comm.local_ranks:
        stages = [engine.stages[s] for s in engine.plan.stages_of(rank)]
        held = held_bytes([q for st in stages for q in st.parameters()], engine.optimizers[rank],
                          [c for st in stages for c in st.compute_copies()])
        for i, n in enumerate((*held, in_flight[rank])):
            slots[4 * rank + i] = float(n)
    totals = engine.comm.sum_list(slots)
    return [[int(v) for v in totals[4 * r:4 * r + 4]] for r in range(p)]


def _training_bytes(engine: Engine, job: Job, labels: torch.Tensor | None) -> dict[str, list[int]]:
    """One training step of the same model on the same ranks, without the update: the checkpoint's
    optimizer state restored, gradients allocated, train.batch_size rows of X (repeated if X has fewer)
    under the run's schedule; Engine.stash_figures counts what every rank held (a collective)."""
    engine.restore(job.state)
    for stage in engine.stages.values():
        stage.zero_grad()
    rows = torch.arange(job.conf.train.batch_size) % len(job.inputs.x)
    x = torch.as_tensor(job.inputs.x[rows.numpy()], dtype=job.spec.torch_dtype, device=engine.comm.device)
    y = None
    if engine.holds_last:  # the labels where there are some, else the predicted ones: only the bytes matter
        y = torch.as_tensor(job.inputs.y, device=engine.comm.device) if job.inputs.y is not None else labels
        y = y[rows.to(y.device)]
    engine.train_step(x if engine.holds_first else None, y, step=job.step)
    return engine.stash_figures()


# --- the figures --------------------------------------------------------------------------------

def _memory_table(job: Job, held: list[list[int]], trained: dict[str, list[int]]) -> list[str]:
    """One line per rank: prediction and training, predicted (planning/memory.py) and measured, in KiB."""
    plan, conf = job.plan, job.conf
    mb_rows = microbatch.sizes(conf.train.batch_size, plan.num_microbatches)
    first_pass = min(job.batch_size, len(job.inputs.x))
    predict_rows = microbatch.sizes(first_pass, min(plan.num_microbatches, first_pass))[0]  # the largest micro-batch
    optim = conf.optim.name if conf.optim.name == "adam" or not conf.optim.momentum else \
        f"sgd momentum {conf.optim.momentum:g}"
    lines = [f"memory per rank in KiB, predicting {predict_rows} rows at once (forward only) against one training "
             f"step of {plan.schedule} m={plan.num_microbatches} on batches of {conf.train.batch_size} rows with "
             f"{optim}: predicted by planning/memory.py, measured on the tensors"]
    for r in range(plan.num_ranks):
        model = rank_memory(conf, plan, job.spec, r, mb_rows, predict_rows)
        measured_training = sum(trained[key][r] for key in ("param_bytes", "grad_bytes", "optimizer_bytes",
                                                            "peak_stash_bytes"))
        lines.append(f"rank {r}: prediction predicted {model.prediction / KIB:.1f} measured {sum(held[r]) / KIB:.1f} "
                     f"(parameters {held[r][0] / KIB:.1f} + in flight {held[r][3] / KIB:.1f}) | training predicted "
                     f"{model.training / KIB:.1f} measured {measured_training / KIB:.1f} | training / prediction "
                     f"{measured_training / max(1, sum(held[r])):.2f}")
    return lines
