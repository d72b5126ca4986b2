"""What the simulator predicts of a run: its step time, bubbles and stashes, from costs counted,
timed on this machine, or read from the run's own trace (`python -m pipeline.simulate` prints them).

    predict(conf, ranks, measure)   FLOP counts and the latency assumed for the run's transport, or each
                                    stage timed here through the executor and a message timed between
                                    two processes over that transport (runtime.latency)
    predict_traced(run, warmup)     a traced run's costs (training.traced_run), beside its measured step
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace

import torch

from pipeline.config import IN_PROCESS, P2P, in_process
from pipeline.errors import UserError
from pipeline.mlp import objective
from pipeline.mlp.microbatch import sizes, split
from pipeline.mlp.model import MLPSpec, build_layers
from pipeline.mlp.stage import Stage
from pipeline.planning.costs import Costs, between_steps, flop_costs, from_trace, message_latency, message_sizes, \
    time_update
from pipeline.planning.memory import peak_stash_bytes
from pipeline.planning.plan import Plan, replica_batch
from pipeline.planning.planner import make_plan
from pipeline.runtime.distributed import Env, device_for
from pipeline.runtime.executor import Runtime, execute
from pipeline.runtime.inprocess import Mailboxes
from pipeline.runtime.latency import TransportCosts, resolve, transport_costs
from pipeline.schedules.actions import Action
from pipeline.schedules.placement import looped
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
    update_s: float  # the slowest rank's work between two schedules (optimizer step, the executor's setup)
    latency_s: float = 5e-5  # per message, as simulated
    latency_source: str = "assumed"  # where latency_s came from, for the printout
    transport: str = P2P  # the resolved pipeline.transport whose messages were simulated
    logged_s: float = 0.0  # what a logged step (a metrics row) adds: s, the NaN check and their all-reduce
    messages: TransportCosts | None = None  # the transport's costs as measured (--measure), to reuse

    @property
    def step_s(self) -> float:
        return self.result.makespan + self.update_s

    @property
    def logged_step_s(self) -> float:
        """A logged step's time: what step_time_s in metrics.jsonl measures."""
        return self.step_s + self.logged_s


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


def run_transport(conf, ranks: int, transport: str | None = None) -> str:
    """The transport between a run's ranks on this host: `transport` (default the config's
    pipeline.transport) with auto resolved (shm on a CPU host that can run it, else p2p)."""
    name = conf.pipeline.transport if transport is None else transport
    return resolve(name, device_for(conf.dist.device, Env(0, ranks, 0, ranks, None), ranks > 1))


def message_nbytes(message_bytes: dict[int, int], num_stages: int) -> int:
    """The largest message that crosses ranks (4 bytes when nothing does)."""
    return max(message_bytes[s] for s in range(num_stages - 1)) if num_stages > 1 else 4


def run_message_bytes(conf, ranks: int) -> int:
    """The largest message that crosses ranks in `conf` on `ranks` ranks."""
    conf, spec, plan, batch, rows = _configured(conf, ranks)
    return message_nbytes(message_sizes(spec, list(plan.stage_layers), rows), plan.num_stages)


def predict(conf, ranks: int, measure: bool, latency_s: float | None = None, bandwidth: float | None = None,
            transport: str | None = None, messages: TransportCosts | None = None) -> Prediction:
    """Simulate `conf` on `ranks` ranks with FLOP-count costs or costs measured in this process.

    transport: a pipeline.transport name, default the config's (run_transport). latency_s None:
    with `measure`, a message of the run's size timed between two processes over it, the sender's
    and receiver's own time included (runtime.latency.transport_costs, or `messages`, a Prediction's
    earlier measurement of the same); else ASSUMED_LATENCY_S. bandwidth None: infinite where the
    latency was measured on the run's messages, else 2 GB/s.
    """
    used = run_transport(conf, ranks, transport)
    conf, spec, plan, batch, rows = _configured(conf, ranks)
    stages = list(plan.stage_layers)
    costs, step_overhead = executor_costs(conf, spec, plan, batch) if measure else \
        (flop_costs(spec, stages, rows, transport=used), 0.0)
    costs, source, messages = _message_costs(costs, plan, used, measure and latency_s is None, messages)
    if latency_s is not None:
        costs, source = replace(costs, latency_s=latency_s), "given"
    measured_bytes = measure and latency_s is None
    costs = replace(costs, bandwidth=bandwidth or (math.inf if measured_bytes else 2e9))
    result, stash = _simulated(conf, spec, plan, batch, costs)
    allreduce = messages.allreduce_s if messages is not None else 0.0
    update, logged = (_update_s(conf, spec, plan) + step_overhead, _logged_s(conf, spec, plan) + allreduce) \
        if measure else (0.0, 0.0)
    return Prediction(plan, spec, result, stash, update, costs.latency_s, source, used, logged, messages)


def _message_costs(costs: Costs, plan, transport: str, measure: bool, messages: TransportCosts | None
                   ) -> tuple[Costs, str, TransportCosts | None]:
    """(costs with the transport's message costs, where the latency came from, the measured costs if any)."""
    if transport == IN_PROCESS:
        return replace(costs, latency_s=0.0), "inprocess: a mailbox hands the tensor over", \
            TransportCosts(0.0, 0.0, 0.0, 0.0)
    if not measure:
        return costs, f"assumed for {transport}; --measure measures it", None
    nbytes = message_nbytes(costs.message_bytes, plan.num_stages)
    if messages is None:
        try:
            messages = transport_costs(nbytes, transport, values=2 + plan.num_stages)
        except RuntimeError as err:
            raise UserError(f"could not measure the message latency ({err}); give --latency-us US instead") from None
    source = (f"measured: {transport} between two processes, {nbytes / 1024:g} KiB, sender busy; "
              f"send {messages.send_s * 1e6:.0f} us, receive {messages.recv_s * 1e6:.0f} us")
    return replace(costs, latency_s=messages.latency_s, send_s=messages.send_s, recv_s=messages.recv_s), source, \
        messages


def executor_costs(conf, spec: MLPSpec, plan, batch: int, repeats: int = 5) -> tuple[Costs, float]:
    """(Costs, per-step seconds outside the actions) of every stage's F, B, W and BW timed through the
    executor in this process, as a rank runs them: the loss in the last stage's F, the stash's
    bookkeeping, the executor's time between two actions (`action_s`), and its setup and end of a step.

    All stages run on one rank, one micro-batch at a time (F through every stage, then B and W, or BW,
    back), so nothing waits for a message; the first of `repeats` + 1 passes warms up."""
    m, n = plan.num_microbatches, plan.num_stages
    stages = [Stage(s, n, build_layers(spec, conf.train.seed, plan.stage_layers[s]), conf.pipeline.recompute)
              for s in range(n)]
    runtime = Runtime(0, looped(1, n), stages, Mailboxes().endpoint(0), conf.loss.name)
    runtime.events = []
    forward = [[Action(s, "F", mb) for s in range(n)] for mb in range(m)]
    back = {"B W": lambda mb: [Action(s, k, mb) for k in "BW" for s in reversed(range(n))],
            "BW": lambda mb: [Action(s, "BW", mb) for s in reversed(range(n))]}
    x = torch.randn(batch, spec.dims[0], dtype=spec.torch_dtype)
    y = torch.randint(0, spec.dims[-1], (batch,))
    outside = []
    for step in range(2 * (repeats + 1)):
        schedule = [a for mb in range(m) for a in forward[mb] + back["BW" if step % 2 else "B W"](mb)]
        start = time.perf_counter_ns()
        runtime.begin(sizes(batch, m), split(x, m), split(y, m), True, step, batch)
        execute({0: runtime}, {0: schedule})
        runtime.end()
        events = [e for e in runtime.events if e.step == step and e.name != "WAIT_SENDS"]
        outside.append((time.perf_counter_ns() - start - (events[-1].end_ns - events[0].start_ns)) / 1e9)
        for stage in stages:
            stage.zero_grad()
    spans: dict[tuple[int, str], list[float]] = {}
    gaps = []
    for prev, e in zip(runtime.events, runtime.events[1:]):
        if e.step < 2 or e.name == "WAIT_SENDS":
            continue
        action = Action.parse(e.name)
        spans.setdefault((action.stage_index, action.kind), []).append((e.end_ns - e.start_ns) / 1e9)
        if prev.step == e.step:
            gaps.append((e.start_ns - prev.end_ns) / 1e9)
    compute = {key: statistics.median(values) for key, values in spans.items()}
    costs = Costs(compute, message_sizes(spec, list(plan.stage_layers), -(-batch // m)),
                  action_s=statistics.median(gaps))
    return costs, statistics.median(outside[2:])


def _update_s(conf, spec, plan) -> float:
    """The slowest rank's optimizer step, timed here: it ends the step."""
    update = 0.0
    for r in range(plan.num_ranks):
        own = _stages_of(conf, spec, plan, r)
        optimizer = make_optimizer(conf, [p for st in own for p in st.parameters()])
        update = max(update, time_update(own, optimizer, conf.loss.l2))
    return update


def _logged_s(conf, spec, plan, repeats: int = 5) -> float:
    """The slowest rank's own work of a logged step, timed here (the trainer's: s of its weights, and
    the NaN / inf check of its loss, s and parameters); the all-reduce of both comes on top."""
    slowest = 0.0
    for r in range(plan.num_ranks):
        own = _stages_of(conf, spec, plan, r)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            float(objective.regulariser([w for st in own for w in st.weights()], conf.loss.l2))
            all(bool(torch.isfinite(p).all()) for st in own for p in st.parameters())
            times.append(time.perf_counter() - start)
        slowest = max(slowest, statistics.median(times[1:]))
    return slowest


def _stages_of(conf, spec, plan, rank: int) -> list[Stage]:
    return [Stage(s, plan.num_stages, build_layers(spec, 0, plan.stage_layers[s])) for s in plan.stages_of(rank)]


@dataclass
class TracedPrediction:
    """A traced run's prediction from its own costs, next to its measured step time."""

    pred: Prediction  # update_s: the median time between schedules after a logged step (between_steps)
    unlogged_update_s: float | None  # the same after an unlogged step (None when every step is logged)
    measured_s: float  # median step_time_s of the logged steps after the warm-up
    measured_steps: int  # how many steps that median is over
    measured_bubble: list[float] | None  # per rank, the median of the logged bubbles

    @property
    def error(self) -> float:
        return (self.pred.step_s - self.measured_s) / self.measured_s


def predict_traced(run: TracedRun, warmup: int = 5, latency_s: float | None = None,
                   bandwidth: float | None = None) -> TracedPrediction:
    """Simulate a traced run from the costs its trace shows.

    The steps after `warmup` count. Logged steps (the rows of metrics.jsonl) cost more than the
    others: after them the ranks run the row's collectives. So the time between schedules added
    to the simulated one is the median after a logged step, and the prediction is compared with
    the median step_time_s of the logged steps. bandwidth None: infinite, the trace's latency is
    that of the run's own messages.
    """
    used = run_transport(run.conf, len(run.events))
    conf, spec, plan, batch, rows = _configured(run.conf, len(run.events))
    costs, source = _traced_costs(run, spec, plan, rows, warmup, latency_s, used)
    result, stash = _simulated(conf, spec, plan, batch, replace(costs, bandwidth=bandwidth or math.inf))
    measured = [t for step, t in run.step_times.items() if step > warmup]
    if not measured:
        raise UserError(f"{run.run_dir}/metrics.jsonl has no step_time_s after step {warmup}; lower --warmup "
                        "or train longer")
    gaps = between_steps(run.events, warmup)
    logged = [gap for step, gap in gaps.items() if step in run.step_times]
    unlogged = [gap for step, gap in gaps.items() if step not in run.step_times]
    between = statistics.median(logged or list(gaps.values()) or [0.0])
    pred = Prediction(plan, spec, result, stash, between, costs.latency_s, source, used)
    bubbles = [b for step, b in run.bubbles.items() if step > warmup]
    return TracedPrediction(pred, statistics.median(unlogged) if unlogged else None, statistics.median(measured),
                            len(measured), [statistics.median(b[r] for b in bubbles) for r in range(plan.num_ranks)]
                            if bubbles else None)


def _traced_costs(run, spec, plan, rows: int, warmup: int, latency_s: float | None, transport: str):
    """(Costs, where their latency came from) of a traced run over `transport`; every stage the plan
    runs must be in it."""
    costs, _ = from_trace(run.events, spec, list(plan.stage_layers), rows, skip_steps=warmup, transport=transport)
    missing = [(s, k) for s in range(plan.num_stages) for k in ("F", "B", "W") if (s, k) not in costs.compute]
    if missing:
        stage, kind = missing[0]
        raise UserError(f"{run.run_dir}/trace.json has no {kind} of stage {stage} after step {warmup}, which its "
                        "config's plan runs; trace more steps or lower --warmup")
    if latency_s is not None:
        return replace(costs, latency_s=latency_s), "given"
    if transport == IN_PROCESS:
        return costs, "inprocess: a mailbox hands the tensor over"
    if message_latency(run.events, warmup) is None:
        return costs, f"assumed for {transport}: no receive in the trace waited for its message"
    return costs, ("from the trace: mean time from a send to the receive waiting for it, less the time in "
                   "both and one executor step")
