"""What each action costs: per-stage F, B and W times and transfers, counted from FLOPs, timed here, or read from a trace.

Two sources, one shape: `flop_costs` counts multiply-adds (deterministic, the same on every rank,
so `pipeline.schedule=auto` can use it without talking), and `measured_costs` times each stage's
three operations on this machine. The simulator turns either into a predicted timeline.

Per layer with n rows, fan-in a, fan-out b:  F = B = W = 2 n a b flops (one matrix product each).
What a micro-batch stashes is counted in pipeline.planning.memory.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from pipeline.mlp.model import MLPSpec, build_layers
from pipeline.mlp.objective import add_regulariser_grad
from pipeline.mlp.stage import Stage
from pipeline.schedules.actions import Action

KINDS = ("F", "B", "W")


@dataclass(frozen=True)
class Costs:
    """Seconds per action and per transfer, for one micro-batch size."""

    compute: dict[tuple[int, str], float]  # (stage_index, "F" | "B" | "W") -> seconds
    message_bytes: dict[int, int]  # stage_index -> bytes of its output activation (= of its output gradient)
    latency_s: float = 0.0  # per message
    bandwidth: float = math.inf  # bytes per second
    send_s: float = 0.0  # time a rank spends posting a send
    extra: dict[str, float] = field(default_factory=dict)  # e.g. {"update": optimizer step seconds}

    def duration(self, action: Action) -> float:
        s, kind = action.stage_index, action.kind
        if kind == "BW":
            return self.compute[(s, "B")] + self.compute[(s, "W")]
        if kind in KINDS:
            return self.compute[(s, kind)]
        return self.send_s if kind.startswith("SEND") else 0.0

    def transfer(self, producer: Action) -> float:
        """Time from a producer finishing on one rank to its output being usable on another."""
        forward = producer.kind in ("F", "SEND_F")  # an activation leaving stage s, else a gradient entering s-1
        boundary = producer.stage_index if forward else producer.stage_index - 1
        return self.latency_s + self.message_bytes.get(boundary, 0) / self.bandwidth


def layer_flops(spec: MLPSpec, index: int, rows: int) -> float:
    return 2.0 * rows * spec.dims[index] * spec.dims[index + 1]


def _message_bytes(spec: MLPSpec, stage_layers: list[range], rows: int) -> dict[int, int]:
    element = torch.empty((), dtype=spec.torch_dtype).element_size()
    return {s: rows * spec.dims[layers[-1] + 1] * element for s, layers in enumerate(stage_layers)}


def channel_bytes(spec: MLPSpec, stage_layers: list[range], rows: int, num_microbatches: int) -> int:
    """An upper bound on the bytes one pass of `rows` rows in `num_microbatches` sends from one rank to
    another: every boundary's activations (or their gradients, as large), each message with a 128-byte header."""
    per_stage = _message_bytes(spec, stage_layers, rows)
    return sum(per_stage[s] + num_microbatches * 128 for s in range(len(stage_layers) - 1))


def flop_costs(spec: MLPSpec, stage_layers: list[range], rows: int, flops_per_s: float = 5e10,
               overhead_s: float = 2e-5) -> Costs:
    """Costs in proportion to multiply-adds, plus a fixed overhead per layer operation."""
    compute = {(s, kind): sum(layer_flops(spec, i, rows) / flops_per_s + overhead_s for i in layers)
               for s, layers in enumerate(stage_layers) for kind in KINDS}
    return Costs(compute, _message_bytes(spec, stage_layers, rows), latency_s=5e-5, bandwidth=2e9)


def time_stage(stage: Stage, rows: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds of F, B and W of one stage on a micro-batch of `rows` random rows."""
    x = torch.randn(rows, stage.in_dim, dtype=stage.dtype, device=stage.device)
    dy = torch.randn(rows, stage.out_dim, dtype=stage.dtype, device=stage.device)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for round_index in range(repeats + 1):  # round 0 warms up caches and the allocator
        t0 = time.perf_counter()
        _, stash = stage.forward(x)
        t1 = time.perf_counter()
        stage.backward_input(dy, stash)
        t2 = time.perf_counter()
        stage.backward_weight(stash)
        t3 = time.perf_counter()
        if round_index:
            for kind, seconds in zip(KINDS, (t1 - t0, t2 - t1, t3 - t2)):
                times[kind].append(seconds)
    stage.zero_grad()
    return {kind: statistics.median(values) for kind, values in times.items()}


def measured_costs(spec: MLPSpec, stage_layers: list[range], rows: int, seed: int = 0, repeats: int = 5,
                   latency_s: float = 5e-5, bandwidth: float = 2e9) -> Costs:
    """Time every stage's F, B and W here, on this process's threads."""
    compute = {}
    for s, layers in enumerate(stage_layers):
        stage = Stage(s, len(stage_layers), build_layers(spec, seed, layers))
        for kind, seconds in time_stage(stage, rows, repeats).items():
            compute[(s, kind)] = seconds
    return Costs(compute, _message_bytes(spec, stage_layers, rows), latency_s=latency_s, bandwidth=bandwidth)


def layer_times(spec: MLPSpec, rows: int, seed: int = 0, repeats: int = 5) -> list[float]:
    """Measured seconds of F + B + W of every layer alone, on a micro-batch of `rows` rows."""
    times = []
    for i in range(spec.num_layers):
        stage = Stage(1, 2, build_layers(spec, seed, [i]))  # not the first stage: B computes dJ/dx too
        times.append(sum(time_stage(stage, rows, repeats).values()))
    return times


def time_update(stages: list[Stage], optimizer: torch.optim.Optimizer, l2: float, repeats: int = 5) -> float:
    """Median seconds of a rank's per-step work outside the schedule: zero_grad, lambda W, optimizer step."""

    def update() -> None:
        for stage in stages:
            stage.zero_grad()
            add_regulariser_grad(stage.weights(), l2)
        optimizer.step()

    update()  # warm-up: the optimizer allocates its state on the first step
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        update()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def from_trace(events_by_rank, spec: MLPSpec, stage_layers: list[range], rows: int,
               skip_steps: int = 1) -> tuple[Costs, float]:
    """(Costs, update seconds) measured in a traced run: median span of each stage's F, B and W.

    A BW span is split evenly between B and W; a SEND costs the median time to post one. The update
    time is the median gap between a rank's last action of one step and its first of the next
    (optimizer step, zero_grad, the batch). A transfer's latency is measured too (`message_latency`);
    bandwidth is taken as 2 GB/s, as the latency of these small messages already includes it.
    """
    spans: dict[tuple[int, str], list[float]] = {}
    sends: list[float] = []
    for events in events_by_rank.values():
        for e in (e for e in events if e.step > skip_steps):
            if e.name == "WAIT_SENDS":
                continue
            action = Action.parse(e.name)
            seconds = (e.end_ns - e.start_ns) / 1e9
            if action.kind.startswith("SEND"):
                sends.append(seconds)
            kinds = {"BW": ("B", "W")}.get(action.kind, (action.kind,))
            for kind in kinds:
                spans.setdefault((action.stage_index, kind), []).append(seconds / len(kinds))
    gaps = [gap for after in step_gaps(events_by_rank, skip_steps).values() for gap in after]
    compute = {key: statistics.median(values) for key, values in spans.items() if key[1] in KINDS}
    send_s = statistics.median(sends) if sends else 0.0
    latency = message_latency(events_by_rank, skip_steps)
    costs = Costs(compute, _message_bytes(spec, stage_layers, rows), latency_s=5e-5 if latency is None else latency,
                  bandwidth=2e9, send_s=send_s)
    return costs, statistics.median(gaps) if gaps else 0.0


def step_gaps(events_by_rank, skip_steps: int = 1) -> dict[int, list[float]]:
    """Per step after `skip_steps`, each rank's seconds from its last action of that step to its
    first of the next: the work between two schedules (optimizer step, the next batch, and on a
    logged step the collectives of its metrics row)."""
    gaps: dict[int, list[float]] = {}
    for events in events_by_rank.values():
        events = sorted((e for e in events if e.step > skip_steps), key=lambda e: e.start_ns)
        for prev, nxt in zip(events, events[1:]):
            if nxt.step == prev.step + 1:
                gaps.setdefault(prev.step, []).append((nxt.start_ns - prev.end_ns) / 1e9)
    return gaps


def message_latency(events_by_rank, skip_steps: int = 1) -> float | None:
    """Mean seconds from a SEND starting on one rank to its RECV ending on the other, over the
    messages whose receiver was already waiting (otherwise the receive ends when it is reached,
    not when the data arrives); None when there is no such message. The ranks of one machine
    share the clock (time.perf_counter_ns). The mean, not the median: a step pays for every
    message on its critical path, the slow tail included (on a shared 2-core machine the mean
    was 2x the median, and the median predicted traced steps 7-47 % short)."""
    sent: dict[tuple, int] = {}
    waiting: dict[tuple, tuple[int, int]] = {}
    for events in events_by_rank.values():
        for e in events:
            if e.step <= skip_steps or e.name == "WAIT_SENDS":
                continue
            a = Action.parse(e.name)
            if a.kind in ("SEND_F", "SEND_B"):
                sent[(e.step, a.kind[-1], a.stage_index, a.mb_index)] = e.start_ns
            elif a.kind in ("RECV_F", "RECV_B"):
                sender = a.stage_index + (-1 if a.kind == "RECV_F" else 1)
                waiting[(e.step, a.kind[-1], sender, a.mb_index)] = (e.start_ns, e.end_ns)
    latencies = [(end - sent[key]) / 1e9 for key, (start, end) in waiting.items()
                 if key in sent and start <= sent[key] < end]
    return statistics.mean(latencies) if latencies else None


def add_arguments(parser) -> None:
    """The options `python -m pipeline.plan` and `python -m pipeline.simulate` share."""
    parser.add_argument("--ranks", type=int, default=2, help="pipeline ranks p (default 2)")
    parser.add_argument("--measure", action="store_true", help="time each stage here instead of counting FLOPs")
    parser.add_argument("--threads", type=int, default=1, help="threads while measuring (torchrun gives each rank 1)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.hidden=[1024,1024]")
