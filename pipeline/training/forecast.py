"""What the simulator predicts of a run: its step time, bubbles and stashes, from costs counted,
timed on this machine, or read from the run's own trace (`python -m pipeline.simulate` prints them).

    predict(conf, ranks, measure)   FLOP counts (50 us a message), or each stage timed here and a
                                    message timed between two processes (runtime.latency)
    predict_traced(run, warmup)     a traced run's costs (training.traced_run), beside its measured step
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from pipeline.config import in_process
from pipeline.errors import UserError
from pipeline.mlp.microbatch import sizes
from pipeline.mlp.model import MLPSpec, build_layers
from pipeline.mlp.stage import Stage
from pipeline.planning.costs import flop_costs, from_trace, measured_costs, message_latency, step_gaps, time_update
from pipeline.planning.memory import peak_stash_bytes
from pipeline.planning.plan import Plan, replica_batch
from pipeline.planning.planner import make_plan
from pipeline.runtime.latency import message_latency_s
from pipeline.schedules.simulator import SimResult, simulate
from pipeline.training.engine import make_optimizer
from pipeline.training.setup import load_data, model_spec
from pipeline.training.traced_run import TracedRun


@dataclass
class Prediction:
    """What the simulator expects of a configured run: step time, bubbles, stashes, the timeline."""

    plan: Plan
    spec: MLPSpec
    result: SimResult
    stash_bytes: dict[int, int]
    update_s: float  # the slowest rank's optimizer step, outside the schedule
    latency_s: float = 5e-5  # per message, as simulated
    latency_source: str = "assumed"  # where latency_s came from, for the printout

    @property
    def step_s(self) -> float:
        return self.result.makespan + self.update_s


def _configured(conf, ranks: int):
    """(conf, spec, plan, one replica's batch rows, rows per micro-batch) of `conf` on `ranks` ranks."""
    conf = in_process(conf, ranks)
    spec = model_spec(conf, load_data(conf))
    plan = make_plan(conf, spec, 1, eval_rows=0)
    batch = replica_batch(conf)
    return conf, spec, plan, batch, -(-batch // plan.num_microbatches)


def _simulated(conf, spec, plan, batch: int, costs) -> tuple[SimResult, dict[int, int]]:
    """The simulated step under `costs`, and each rank's peak stashed bytes."""
    result = simulate(plan.train_schedule, plan.placement, plan.num_microbatches, costs)
    stash = peak_stash_bytes(plan.train_schedule, spec, list(plan.stage_layers), sizes(batch, plan.num_microbatches),
                             conf.pipeline.recompute)
    return result, stash


def predict(conf, ranks: int, measure: bool, latency_s: float | None = None, bandwidth: float = 2e9) -> Prediction:
    """Simulate `conf` on `ranks` ranks with FLOP-count costs or costs measured in this process.

    latency_s None: with `measure`, a message of the run's size timed between two processes
    (runtime.latency.message_latency_s); else the FLOP model's 50 us.
    """
    conf, spec, plan, batch, rows = _configured(conf, ranks)
    stages = list(plan.stage_layers)
    costs = measured_costs(spec, stages, rows, conf.train.seed) if measure else flop_costs(spec, stages, rows)
    source = "given"
    if latency_s is None and measure:
        latency_s, source = _measure_latency(costs.message_bytes, plan.num_stages)
    elif latency_s is None:
        latency_s, source = costs.latency_s, "assumed; --measure measures it"
    costs = replace(costs, latency_s=latency_s, bandwidth=bandwidth)
    result, stash = _simulated(conf, spec, plan, batch, costs)
    update = _update_s(conf, spec, plan) if measure else 0.0
    return Prediction(plan, spec, result, stash, update, latency_s, source)


def _measure_latency(message_bytes: dict[int, int], num_stages: int) -> tuple[float, str]:
    """(seconds, how) of the largest message that crosses ranks, timed between two processes."""
    nbytes = max(message_bytes[s] for s in range(num_stages - 1)) if num_stages > 1 else 4
    try:
        return message_latency_s(nbytes), f"measured: gloo between two processes, {nbytes / 1024:g} KiB, sender busy"
    except RuntimeError as err:
        raise UserError(f"could not measure the message latency ({err}); give --latency-us US instead") from None


def _update_s(conf, spec, plan) -> float:
    """The slowest rank's optimizer step, timed here: it ends the step."""
    update = 0.0
    for r in range(plan.num_ranks):
        own = [Stage(s, plan.num_stages, build_layers(spec, 0, plan.stage_layers[s])) for s in plan.stages_of(r)]
        optimizer = make_optimizer(conf, [p for st in own for p in st.parameters()])
        update = max(update, time_update(own, optimizer, conf.loss.l2))
    return update


@dataclass
class TracedPrediction:
    """A traced run's prediction from its own costs, next to its measured step time."""

    pred: Prediction  # update_s: the median time between schedules after a logged step
    unlogged_update_s: float | None  # the same after an unlogged step (None when every step is logged)
    measured_s: float  # median step_time_s of the logged steps after the warm-up
    measured_steps: int  # how many steps that median is over
    measured_bubble: list[float] | None  # per rank, the median of the logged bubbles

    @property
    def error(self) -> float:
        return (self.pred.step_s - self.measured_s) / self.measured_s


def predict_traced(run: TracedRun, warmup: int = 5, latency_s: float | None = None, bandwidth: float = 2e9) -> TracedPrediction:
    """Simulate a traced run from the costs its trace shows.

    The steps after `warmup` count. Logged steps (the rows of metrics.jsonl) cost more than the
    others: after them the ranks run the row's collectives. So the time between schedules added
    to the simulated one is the median after a logged step, and the prediction is compared with
    the median step_time_s of the logged steps.
    """
    conf, spec, plan, batch, rows = _configured(run.conf, len(run.events))
    costs, source = _traced_costs(run, spec, plan, rows, warmup, latency_s)
    result, stash = _simulated(conf, spec, plan, batch, replace(costs, bandwidth=bandwidth))
    measured = [t for step, t in run.step_times.items() if step > warmup]
    if not measured:
        raise UserError(f"{run.run_dir}/metrics.jsonl has no step_time_s after step {warmup}; lower --warmup "
                        "or train longer")
    gaps = step_gaps(run.events, warmup)
    logged = [g for step, after in gaps.items() if step in run.step_times for g in after]
    unlogged = [g for step, after in gaps.items() if step not in run.step_times for g in after]
    between = statistics.median(logged or [g for after in gaps.values() for g in after] or [0.0])
    pred = Prediction(plan, spec, result, stash, between, costs.latency_s, source)
    bubbles = [b for step, b in run.bubbles.items() if step > warmup]
    return TracedPrediction(pred, statistics.median(unlogged) if unlogged else None, statistics.median(measured),
                            len(measured), [statistics.median(b[r] for b in bubbles) for r in range(plan.num_ranks)]
                            if bubbles else None)


def _traced_costs(run, spec, plan, rows: int, warmup: int, latency_s: float | None):
    """(Costs, where their latency came from) of a traced run; every stage the plan runs must be in it."""
    costs, _ = from_trace(run.events, spec, list(plan.stage_layers), rows, skip_steps=warmup)
    missing = [(s, k) for s in range(plan.num_stages) for k in ("F", "B", "W") if (s, k) not in costs.compute]
    if missing:
        stage, kind = missing[0]
        raise UserError(f"{run.run_dir}/trace.json has no {kind} of stage {stage} after step {warmup}, which its "
                        "config's plan runs; trace more steps or lower --warmup")
    if latency_s is not None:
        return replace(costs, latency_s=latency_s), "given"
    if message_latency(run.events, warmup) is None:  # e.g. one process: every message was there in time
        return costs, "assumed: no receive in the trace waited for its message"
    return costs, "from the trace: mean time from a send to the receive waiting for it"
