"""The training loop, top to bottom: `train(cfg, run_dir)` returns the run's summary.

    check the config, the data and the parallel layout (before any process group starts)
    -> connect the ranks -> build this process's stages -> for each step: the first stage reads
    the batch, micro-batches flow under the schedule, each rank steps its own optimizer;
    the rank with the last stage logs and evaluates -> checkpoint -> summary line

Everything a user can get wrong is refused before `connect`, identically on every rank.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from pipeline import config, data as datasets
from pipeline.config import Config
from pipeline.distributed import connect, plan_devices, read_env
from pipeline.engine import Engine
from pipeline.errors import ConfigError
from pipeline.metrics import MetricsLog, progress_bar, summary_line
from pipeline.model import MLPSpec
from pipeline.plan import make_plan, retime


def load_data(conf: Config) -> datasets.Dataset:
    d = conf.data
    if d.name == "digits":
        return datasets.digits(d.test_fraction, d.split_seed)
    if d.name == "synthetic":
        return datasets.synthetic(d.n, d.dim, d.classes, d.noise, d.seed, d.test_fraction)
    return datasets.npz(d.path, d.test_path)


def model_spec(conf: Config, data: datasets.Dataset) -> MLPSpec:
    """The network's shape, with in_dim and out_dim inferred from the data where null."""
    m = conf.model
    in_dim = m.in_dim or data.in_dim
    out_dim = m.out_dim or data.num_classes
    datasets.check_model_fits(data, in_dim, out_dim)
    return MLPSpec((in_dim, *m.hidden, out_dim), m.activation, m.bias, m.dtype)


def check_batch(conf: Config, data: datasets.Dataset) -> None:
    rows = len(data.x_train)
    if conf.train.batch_size > rows:
        raise ConfigError(f"train.batch_size={conf.train.batch_size} exceeds the {rows} training rows of "
                          f"{data.source}; use a smaller batch")


def as_tensors(x, y, spec: MLPSpec, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(x, dtype=spec.torch_dtype, device=device),
            torch.as_tensor(y, dtype=torch.long, device=device))


def train(cfg: DictConfig | Config, run_dir: str | Path) -> dict[str, Any]:
    """Train the configured MLP; write metrics.jsonl and checkpoints under run_dir; return the summary."""
    conf = cfg if isinstance(cfg, Config) else config.parse(cfg)
    env = read_env()
    data = load_data(conf)
    spec = model_spec(conf, data)
    check_batch(conf, data)
    test_rows = 0 if data.x_test is None else len(data.x_test)
    plan = make_plan(conf, spec, env.world_size, eval_rows=test_rows)
    plan_devices(env, conf.pipeline.transport, conf.dist)  # a device or backend that cannot work: refuse now
    torch.manual_seed(conf.train.seed)

    with connect(env, plan.num_ranks, conf.pipeline.transport, conf.dist) as comm:
        if conf.pipeline.partition == "time":
            plan = retime(plan, spec, conf, comm.mean_list)
        engine = Engine(conf, spec, plan, comm)
        return _fit(conf, spec, engine, data, test_rows, Path(run_dir))


def _fit(conf: Config, spec: MLPSpec, engine: Engine, data: datasets.Dataset, test_rows: int,
         run_dir: Path) -> dict[str, Any]:
    t = conf.train
    sampler = datasets.BatchSampler(len(data.x_train), t.batch_size, t.seed, conf.data.shuffle)
    # only the first stage reads inputs and only the last reads labels; they go to the device once
    x_train, y_train = as_tensors(data.x_train, data.y_train, spec, engine.comm.device)
    x_test, y_test = as_tensors(data.x_test, data.y_test, spec, engine.comm.device) if test_rows else (None, None)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=engine.holds_last)
    if conf.checkpoint.save_initial:
        engine.save(run_dir, 0)

    bar, start, row, test = progress_bar(t.steps, enabled=engine.holds_last), time.perf_counter(), {}, {}
    for step in range(1, t.steps + 1):
        tick = time.perf_counter()
        rows = torch.as_tensor(sampler.indices(step - 1), device=x_train.device)
        x = x_train[rows] if engine.holds_first else None
        y = y_train[rows] if engine.holds_last else None
        loss = engine.train_step(x, y, step)  # L where the last stage lives, else None
        logging, last = step % t.log_every == 0 or step == t.steps, step == t.steps
        reg = engine.regulariser() if logging else 0.0  # s on the weights the loss saw (all ranks)
        bubble = engine.measured_bubble(step) if logging and conf.trace.enabled else None
        engine.update()
        step_time = time.perf_counter() - tick
        if logging and engine.holds_last:
            row = {"step": step, "loss": float(loss), "reg": reg, "objective": float(loss) + reg,
                   "lr": engine.optimizers[engine.plan.last_rank].param_groups[0]["lr"],
                   "step_time_s": step_time, "samples_per_s": t.batch_size / step_time,
                   **({"bubble": bubble} if bubble else {})}
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        if test_rows and (step % t.eval_every == 0 or last):
            result = engine.evaluate(x_test if engine.holds_first else None,
                                     y_test if engine.holds_last else None, test_rows)
            if result is not None:
                test = {"step": step, **result}
                log.write(test)
        bar.update(1)
    bar.close()
    engine.save(run_dir, t.steps)
    traced = engine.save_trace(run_dir, conf.trace.step) if conf.trace.enabled else None
    stash = engine.stash_figures()
    log.write({"step": t.steps, **stash})

    elapsed = time.perf_counter() - start
    plan = engine.plan
    summary = {"steps": t.steps, "ranks": plan.num_ranks, "schedule": plan.schedule,
               "microbatches": plan.num_microbatches}
    if plan.virtual_stages > 1:
        summary["virtual_stages"] = plan.virtual_stages
    if engine.holds_last:
        summary.update(loss=row["loss"], objective=row["objective"], **{k: v for k, v in test.items() if k != "step"})
    summary.update(time_s=elapsed, samples_per_s=t.steps * t.batch_size / elapsed, run_dir=str(run_dir))
    if engine.holds_last:
        print(summary_line(summary), flush=True)
    if traced:
        bubbles = " ".join(f"{b:.1%}" for _, b in sorted(traced["bubble"].items()))
        print(f"pipeline: trace {traced['trace']} timeline {traced['timeline']} (step {traced['step']}, "
              f"measured bubble per rank {bubbles})", flush=True)
    return {**summary, **stash}
