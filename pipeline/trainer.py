"""The training loop, top to bottom: `train(cfg, run_dir)` returns the run's summary.

    check the config, the data, the parallel layout, the run directory and what train.resume asks
    for (before any process group starts) -> connect the ranks -> build this process's stages ->
    resume from the newest readable checkpoint -> for each step: the first stage reads the batch,
    micro-batches flow under the schedule, each rank steps its own optimizer; on log and checkpoint
    steps all ranks check for NaN/inf; the rank with the last stage logs and evaluates; every
    checkpoint.every steps and at the end a checkpoint -> summary line

Everything a user can get wrong is refused before `connect`, identically on every rank.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from pipeline import checkpoint, config, data as datasets, memory, rundir
from pipeline.config import Config
from pipeline.distributed import Env, connect, plan_devices, read_env
from pipeline.engine import Engine
from pipeline.errors import ConfigError
from pipeline.lifecycle import Interrupted
from pipeline.metrics import MetricsLog, progress_bar, summary_line
from pipeline.model import MLPSpec
from pipeline.plan import Plan, make_plan, retime
from pipeline.resume import resume, resume_candidates
from pipeline.simulate import check_in_order


def load_data(conf: Config, warn: bool = False) -> datasets.Dataset:
    """The configured data set, standardised with data.standardize; with `warn`, local rank 0 says on
    stderr when it is not and its features are far from standardised (see data.scale_warning)."""
    d = conf.data
    if d.name == "digits":
        data = datasets.digits(d.test_fraction, d.split_seed)
    elif d.name == "synthetic":
        data = datasets.synthetic(d.n, d.dim, d.classes, d.noise, d.seed, d.test_fraction)
    else:
        data = datasets.npz(d.path, d.test_path, d.test_fraction, d.split_seed)
    if d.standardize:
        return datasets.standardised(data)
    if warn and os.environ.get("LOCAL_RANK", "0") == "0":  # the other commands load the data without it
        warning = datasets.scale_warning(data, f"data.path={d.path}" if d.name == "npz" else f"data={d.name}")
        if warning:
            print(warning, file=sys.stderr, flush=True)
    return data


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


def check_memory(conf: Config, env: Env, plan: Plan, spec: MLPSpec, data: datasets.Dataset,
                 device: torch.device) -> None:
    """Refuse a model whose parameters, gradients and optimizer state cannot fit, before any is allocated."""
    hint = "use smaller model.hidden widths or more pipeline ranks"
    if conf.model.out_dim is None and spec.dims[-1] == max(spec.dims):
        hint = (f"model.out_dim={spec.dims[-1]} was inferred from the largest label ({spec.dims[-1] - 1}) of "
                f"{data.source}; labels must be 0 .. classes-1, or set model.out_dim")
    first = env.rank - env.local_rank  # torchrun numbers a machine's processes consecutively
    pools = memory.memory_pools(plan, conf.pipeline.transport, device, range(first, first + env.local_world_size))
    memory.check_fits(conf, plan, spec, pools, device, hint)


def as_tensors(x, y, spec: MLPSpec, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(x, dtype=spec.torch_dtype, device=device),
            torch.as_tensor(y, dtype=torch.long, device=device))


def check_run_dir(run_dir: str | Path, create: bool = True) -> None:
    """hydra.run.dir must be a directory this process can write; refused before any work.

    Walking up to the first existing ancestor catches a path under a regular file, which stops even
    root; with `create`, making the directory and a probe file in it catches the rest.
    """
    path = Path(run_dir).absolute()
    ancestor = next(a for a in (path, *path.parents) if a.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"hydra.run.dir={run_dir}: {ancestor} is a file, not a directory; "
                          "pick another hydra.run.dir")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"hydra.run.dir={run_dir}: {ancestor} is not writable; pick a writable hydra.run.dir")
    if not create:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"hydra.run.dir={run_dir} cannot be written ({err.strerror}); "
                          "pick a writable hydra.run.dir") from None


def train(cfg: DictConfig | Config, run_dir: str | Path) -> dict[str, Any]:
    """Train the configured MLP; write metrics.jsonl and checkpoints under run_dir; return the summary."""
    conf = cfg if isinstance(cfg, Config) else config.parse(cfg)
    env = read_env()
    data = load_data(conf, warn=True)
    spec = model_spec(conf, data)
    check_batch(conf, data)
    test_rows = 0 if data.x_test is None else len(data.x_test)
    plan = make_plan(conf, spec, env.world_size, eval_rows=test_rows)
    device, backend = plan_devices(env, conf.pipeline.transport, conf.dist)  # refuses an impossible device or backend
    check_memory(conf, env, plan, spec, data, device)
    if backend == "nccl":  # NCCL pairs messages by order, not tag
        for schedule in (plan.train_schedule, plan.eval_schedule):
            check_in_order(schedule, plan.num_ranks)
    check_run_dir(run_dir)
    with rundir.hold(run_dir, env):  # before anything is written: another live run there is refused
        candidates = resume_candidates(conf, spec, Path(run_dir))
        torch.manual_seed(conf.train.seed)
        with connect(env, plan.num_ranks, conf.pipeline.transport, conf.dist) as comm:
            if conf.pipeline.partition == "time":
                plan = retime(plan, spec, conf, comm.mean_list)
            engine = Engine(conf, spec, plan, comm)
            engine.input_scaling = datasets.scaling_record(data)  # checkpoint.json keeps it for export
            resumed = resume(conf, engine, Path(run_dir), candidates)
            if comm.is_root:
                rundir.record_segment(run_dir, cfg, resumed, env.world_size)
            return _fit(conf, spec, engine, data, test_rows, Path(run_dir), resumed)


class NonFiniteLoss(Exception):
    """The loss, s or the parameters became NaN or inf: the data or the learning rate (exit code 1)."""


class FirstBadLoss:
    """The first step whose loss was NaN or inf, kept as a tensor so that no step waits on the device."""

    def __init__(self) -> None:
        self.step: torch.Tensor | None = None

    def see(self, loss: torch.Tensor | None, step: int) -> None:
        if loss is None:
            return
        bad = torch.where(torch.isfinite(loss), math.inf, float(step))
        self.step = bad if self.step is None else torch.minimum(self.step, bad)

    def value(self) -> float:
        """The step, or 0.0 when every loss so far was finite (what this rank adds to the check's sum)."""
        found = math.inf if self.step is None else float(self.step)
        return found if math.isfinite(found) else 0.0


def check_finite(engine: Engine, step: int, local_reg: float, first_bad: FirstBadLoss,
                 last_saved: int | None) -> float:
    """s summed over the ranks, in the same collective that tells every rank whether the loss (on
    the last stage's rank), s or any stage's parameters went NaN or inf; raises NonFiniteLoss then."""
    sums = engine.comm.sum_list([local_reg, first_bad.value(), *engine.nonfinite_stages()])
    reg, bad_step, bad_stages = sums[0], int(sums[1]), [s for s, flag in enumerate(sums[2:]) if flag]
    plan = engine.plan
    if bad_step:
        what = (f"step {bad_step}: the loss on stage {plan.num_stages - 1} (rank {plan.last_rank}) is NaN or inf; "
                "lower optim.lr or check the data")
    elif not math.isfinite(reg):
        what = f"step {step}: s (the L2 term) is NaN or inf; lower optim.lr or loss.l2"
    elif bad_stages:
        what = (f"step {step}: the parameters of stage {bad_stages[0]} are NaN or inf after the update; "
                "lower optim.lr or check the data")
    else:
        return reg
    kept = "no checkpoint was written" if last_saved is None else f"the last good checkpoint is step {last_saved}"
    raise NonFiniteLoss(f"{what}; the run stopped ({kept})")


def _fit(conf: Config, spec: MLPSpec, engine: Engine, data: datasets.Dataset, test_rows: int,
         run_dir: Path, resumed: int | None) -> dict[str, Any]:
    t, ck = conf.train, conf.checkpoint
    if resumed == t.steps:
        return _nothing_to_do(engine, run_dir, t.steps)
    comm = engine.comm  # with replicas, the sampler hands each its share of the global batch
    sampler = datasets.BatchSampler(len(data.x_train), t.batch_size, t.seed, conf.data.shuffle,
                                    comm.replica, comm.num_replicas)
    # only the first stage reads inputs and only the last reads labels; they go to the device once
    x_train, y_train = as_tensors(data.x_train, data.y_train, spec, engine.comm.device)
    x_test, y_test = as_tensors(data.x_test, data.y_test, spec, engine.comm.device) if test_rows else (None, None)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=engine.reports, keep_until=resumed)
    last_saved = resumed
    if ck.save_initial and resumed is None:
        engine.save(run_dir, 0)
        last_saved = 0

    first = (resumed or 0) + 1
    bar, start, row, test = progress_bar(t.steps, enabled=engine.reports, initial=first - 1), \
        time.perf_counter(), {}, {}
    first_bad = FirstBadLoss()
    step = first
    try:  # Ctrl-C: say where the run stood (lifecycle.report_interrupt)
        for step in range(first, t.steps + 1):
            tick = time.perf_counter()
            rows = torch.as_tensor(sampler.indices(step - 1), device=x_train.device)
            x = x_train[rows] if engine.holds_first else None
            y = y_train[rows] if engine.holds_last else None
            loss = engine.train_step(x, y, step)  # this replica's share of L where the last stage lives, else None
            first_bad.see(loss, step)
            last = step == t.steps
            logging, saving = step % t.log_every == 0 or last, last or (ck.every > 0 and step % ck.every == 0)
            local_reg = engine.local_regulariser() if logging or saving else 0.0  # on the weights the loss saw
            bubble = engine.measured_bubble(step) if logging and conf.trace.enabled else None
            engine.update()
            # log and checkpoint steps check for NaN/inf on every rank; s rides the same collective
            reg = check_finite(engine, step, local_reg, first_bad, last_saved) if logging or saving else 0.0
            step_time = time.perf_counter() - tick
            batch_loss = engine.batch_loss(loss) if logging and engine.holds_last else 0.0  # L = sum over replicas
            if logging and engine.reports:
                row = {"step": step, "loss": batch_loss, "reg": reg, "objective": batch_loss + reg,
                       "lr": engine.optimizers[engine.plan.last_rank].param_groups[0]["lr"],
                       "step_time_s": step_time, "samples_per_s": t.batch_size / step_time,
                       **({"bubble": bubble} if bubble else {})}
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if test_rows and (step % t.eval_every == 0 or last) and comm.writes_results:  # replica 0 evaluates
                result = engine.evaluate(x_test if engine.holds_first else None,
                                         y_test if engine.holds_last else None, test_rows)
                if result is not None:
                    test = {"step": step, **result}
                    log.write(test)
            if saving:
                engine.save(run_dir, step)
                last_saved = step
            bar.update(1)
    except KeyboardInterrupt:  # the newest complete checkpoint: Ctrl-C may cut a save short after its commit
        saved = checkpoint.complete_steps(run_dir)
        raise Interrupted(step, saved[-1] if saved else None) from None
    bar.close()
    traced = engine.save_trace(run_dir, conf.trace.step) if conf.trace.enabled else None
    stash = engine.stash_figures()
    log.write({"step": t.steps, **stash})

    elapsed = time.perf_counter() - start
    plan = engine.plan
    summary = {"steps": t.steps, "ranks": plan.num_ranks, "schedule": plan.schedule,
               "microbatches": plan.num_microbatches}
    if comm.num_replicas > 1:
        summary["replicas"] = comm.num_replicas
    if plan.virtual_stages > 1:
        summary["virtual_stages"] = plan.virtual_stages
    if resumed is not None:
        summary["resumed_from"] = resumed
    if engine.reports:
        summary.update(loss=row["loss"], objective=row["objective"], **{k: v for k, v in test.items() if k != "step"})
    trained = t.steps - first + 1
    summary.update(time_s=elapsed, samples_per_s=trained * t.batch_size / elapsed, run_dir=str(run_dir))
    if engine.reports:
        print(summary_line(summary), flush=True)
    if traced:
        bubbles = " ".join(f"{b:.1%}" for _, b in sorted(traced["bubble"].items()))
        print(f"pipeline: trace {traced['trace']} timeline {traced['timeline']} (step {traced['step']}, "
              f"measured bubble per rank {bubbles})", flush=True)
    return {**summary, **stash}


def _nothing_to_do(engine: Engine, run_dir: Path, steps: int) -> dict[str, Any]:
    """A run resumed at its last step (restarted after its final checkpoint): done already."""
    if engine.reports:
        print(f"pipeline: {run_dir} already holds the checkpoint of step {steps}, the last; nothing to train "
              "(raise train.steps to continue)", flush=True)
    plan = engine.plan
    return {"steps": steps, "ranks": plan.num_ranks, "schedule": plan.schedule,
            "microbatches": plan.num_microbatches, "resumed_from": steps, "run_dir": str(run_dir)}
