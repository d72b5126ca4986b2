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
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from pipeline import config
from pipeline.config import SEARCH, Config
from pipeline.mlp.model import MLPSpec
from pipeline.planning.costs import channel_bytes
from pipeline.planning.plan import retime
from pipeline.planning.planner import make_plan, measured_search
from pipeline.runtime.distributed import connect, plan_devices, read_env
from pipeline.runtime.lifecycle import Interrupted
from pipeline.schedules.simulator import check_in_order
from pipeline.training import checkpoint, data as datasets, rundir
from pipeline.training.engine import Engine
from pipeline.training.metrics import MetricsLog, progress_bar, summary_line
from pipeline.training.resume import resume, resume_candidates
from pipeline.training.setup import as_tensors, check_batch, check_memory, check_run_dir, load_data, model_spec


def train(cfg: DictConfig | Config, run_dir: str | Path) -> dict[str, Any]:
    """Train the configured MLP; write metrics.jsonl and checkpoints under run_dir; return the summary."""
    conf = cfg if isinstance(cfg, Config) else config.parse(cfg)
    env = read_env()
    data = load_data(conf, warn=True)
    spec = model_spec(conf, data)
    check_batch(conf, data)
    test_rows = 0 if data.x_test is None else len(data.x_test)
    plan = make_plan(conf, spec, env.world_size, eval_rows=test_rows)
    device, backend = plan_devices(env, conf.pipeline.in_process, conf.dist)  # refuses an impossible device or backend
    check_memory(conf, env, plan, spec, data, device)
    if backend == "nccl":  # NCCL pairs messages by order, not tag
        for schedule in (plan.train_schedule, plan.eval_schedule):
            check_in_order(schedule, plan.placement)
    check_run_dir(run_dir)
    with rundir.hold(run_dir, env):  # before anything is written: another live run there is refused
        candidates = resume_candidates(conf, spec, Path(run_dir))
        torch.manual_seed(conf.train.seed)
        ring_bytes = _ring_bytes(conf, spec, plan, test_rows)
        with connect(env, plan.num_ranks, conf.pipeline.transport, conf.dist, ring_bytes) as comm:
            if comm.is_root and comm.distributed and plan.num_ranks > 1:  # the run's first line
                print(f"pipeline: messages {comm.links}", flush=True)
            if conf.pipeline.schedule == SEARCH and _measured_search(conf):
                plan = measured_search(conf, spec, plan, test_rows, comm.mean_list, comm.transport)
                if backend == "nccl":
                    check_in_order(plan.train_schedule, plan.placement)
                if comm.is_root:
                    print(f"pipeline: search from measured costs: {plan.origin} (messages priced as "
                          f"{comm.transport})", flush=True)
            elif conf.pipeline.partition == "time":
                plan = retime(plan, spec, conf, comm.mean_list)
            engine = Engine(conf, spec, plan, comm)
            engine.input_scaling = datasets.scaling_record(data)  # checkpoint.json keeps it for export
            resumed = resume(conf, engine, Path(run_dir), candidates)
            if comm.is_root:
                rundir.record_segment(run_dir, cfg, resumed, env.world_size)
            return _fit(conf, spec, engine, data, test_rows, Path(run_dir), resumed)


def _measured_search(conf: Config) -> bool:
    """Does the search build from measured costs? pipeline.search_costs=measured says so, and so does
    pipeline.partition=time: the search picks the cut with the schedule, so it cuts by the times too (a re-cut
    after it would keep a schedule built for another cut)."""
    return conf.pipeline.search_costs == "measured" or conf.pipeline.partition == "time"


def _ring_bytes(conf: Config, spec: MLPSpec, plan, test_rows: int) -> int:
    """What a shared-memory channel holds: a training step's messages, or an evaluation pass's."""
    train = channel_bytes(spec, list(plan.stage_layers), conf.train.batch_size, plan.num_microbatches)
    evaluation = channel_bytes(spec, list(plan.stage_layers), test_rows, plan.eval_microbatches) if test_rows else 0
    return max(train, evaluation)


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
                 last_saved: int | None, extra: Sequence[float] = ()) -> tuple[float, list[float]]:
    """s summed over the ranks, in the same collective that tells every rank whether the loss (on
    the last stage's rank), s or any stage's parameters went NaN or inf; raises NonFiniteLoss then.
    `extra` (grad_norm's per-tensor slots) rides along: returns s and the extra values summed."""
    plan = engine.plan
    sums = engine.comm.sum_list([local_reg, first_bad.value(), *engine.nonfinite_stages(), *extra])
    reg, bad_step = sums[0], int(sums[1])
    bad_stages = [s for s, flag in enumerate(sums[2:2 + plan.num_stages]) if flag]
    if bad_step:
        what = (f"step {bad_step}: the loss on stage {plan.num_stages - 1} (rank {plan.last_rank}) is NaN or inf; "
                "lower optim.lr or check the data")
    elif not math.isfinite(reg):
        what = f"step {step}: s (the L2 term) is NaN or inf; lower optim.lr or loss.l2"
    elif bad_stages:
        what = (f"step {step}: the parameters of stage {bad_stages[0]} are NaN or inf after the update; "
                "lower optim.lr or check the data")
    else:
        return reg, sums[2 + plan.num_stages:]
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
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=engine.reports, keep_until=resumed,
                     tensorboard=t.tensorboard)
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
            pending = engine.update(step, measure=logging)  # lr of this step (training.lr); optim.clip_norm clips
            # log and checkpoint steps check for NaN/inf on every rank; s and grad_norm's slots ride the same collective
            reg, norms = check_finite(engine, step, local_reg, first_bad, last_saved, pending) \
                if logging or saving else (0.0, [])
            step_time = time.perf_counter() - tick
            batch_loss = engine.batch_loss(loss) if logging and engine.holds_last else 0.0  # L = sum over replicas
            if logging and engine.reports:
                row = {"step": step, "loss": batch_loss, "reg": reg, "objective": batch_loss + reg,
                       "lr": engine.optimizers[engine.plan.last_rank].param_groups[0]["lr"],
                       "grad_norm": engine.logged_grad_norm(norms),  # ||dJ/dtheta|| over every stage, before clipping
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
    log.close()

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
