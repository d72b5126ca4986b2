"""The training loop, top to bottom: `train(cfg, run_dir)` returns the run's summary.

    parse and check the config -> load data -> build the model -> for each step:
    split the batch into micro-batches, accumulate dJ/dW, step the optimizer, log, evaluate
    -> checkpoint -> summary line
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from pipeline import checkpoint, config, data as datasets, microbatch, objective
from pipeline.config import Config
from pipeline.distributed import read_env
from pipeline.errors import ConfigError
from pipeline.metrics import MetricsLog, progress_bar, summary_line
from pipeline.model import MLPSpec, build_layers
from pipeline.stage import Stage


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


def make_optimizer(conf: Config, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    o = conf.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum)
    return torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps)


def as_tensors(x, y, spec: MLPSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(x, dtype=spec.torch_dtype), torch.as_tensor(y, dtype=torch.long)


def evaluate(stage: Stage, x: torch.Tensor, y: torch.Tensor, loss_name: str) -> dict[str, float]:
    """Test loss (without s) and accuracy: a forward pass that keeps nothing."""
    o = stage.predict(x)
    test_loss, _ = objective.loss_and_grad(loss_name, o, y, batch_size=len(x))
    return {"test_loss": float(test_loss), "test_accuracy": objective.predictions_correct(o, y) / len(x)}


def check_batch(conf: Config, data: datasets.Dataset) -> None:
    rows = len(data.x_train)
    if conf.train.batch_size > rows:
        raise ConfigError(f"train.batch_size={conf.train.batch_size} exceeds the {rows} training rows of "
                          f"{data.source}; use a smaller batch")


def train(cfg: DictConfig | Config, run_dir: str | Path) -> dict[str, Any]:
    """Train the configured MLP; write metrics.jsonl and checkpoints under run_dir; return the summary."""
    conf = cfg if isinstance(cfg, Config) else config.parse(cfg)
    env = read_env()
    data = load_data(conf)
    spec = model_spec(conf, data)
    check_batch(conf, data)
    torch.manual_seed(conf.train.seed)

    stage = Stage(0, 1, build_layers(spec, conf.train.seed, range(spec.num_layers)))
    optimizer = make_optimizer(conf, stage.parameters())
    sampler = datasets.BatchSampler(len(data.x_train), conf.train.batch_size, conf.train.seed, conf.data.shuffle)
    x_train, y_train = as_tensors(data.x_train, data.y_train, spec)
    has_test = data.x_test is not None and len(data.x_test) > 0
    x_test, y_test = as_tensors(data.x_test, data.y_test, spec) if has_test else (None, None)
    log = MetricsLog(Path(run_dir) / "metrics.jsonl", enabled=env.rank == 0)
    if conf.checkpoint.save_initial:
        save_checkpoint(run_dir, 0, [stage], spec)

    t = conf.train
    bar, start, row, test = progress_bar(t.steps, enabled=env.rank == 0), time.perf_counter(), {}, {}
    for step in range(1, t.steps + 1):
        tick = time.perf_counter()
        rows = torch.as_tensor(sampler.indices(step - 1))
        x, y = x_train[rows], y_train[rows]
        loss = microbatch.accumulate(stage, x, y, conf.pipeline.microbatches, conf.loss.name, conf.loss.l2)
        reg = objective.regulariser(stage.weights(), conf.loss.l2)  # s on the weights the loss saw
        optimizer.step()
        step_time = time.perf_counter() - tick
        last = step == t.steps
        if step % t.log_every == 0 or last:
            row = {"step": step, "loss": float(loss), "reg": float(reg), "objective": float(loss + reg),
                   "lr": optimizer.param_groups[0]["lr"], "step_time_s": step_time,
                   "samples_per_s": t.batch_size / step_time}
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        if has_test and (step % t.eval_every == 0 or last):
            test = {"step": step, **evaluate(stage, x_test, y_test, conf.loss.name)}
            log.write(test)
        bar.update(1)
    bar.close()
    save_checkpoint(run_dir, t.steps, [stage], spec)

    elapsed = time.perf_counter() - start
    summary = {"steps": t.steps, "loss": row["loss"], "objective": row["objective"],
               **{k: v for k, v in test.items() if k != "step"},
               "time_s": elapsed, "samples_per_s": t.steps * t.batch_size / elapsed, "run_dir": str(run_dir)}
    if env.rank == 0:
        print(summary_line(summary), flush=True)
    return summary


def save_checkpoint(run_dir: str | Path, step: int, stages: list[Stage], spec: MLPSpec) -> None:
    checkpoint.save_shards(run_dir, step, stages)
    checkpoint.commit(run_dir, step, num_stages=len(stages), num_layers=spec.num_layers)
