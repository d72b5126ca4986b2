"""What each action costs: per-stage F, B and W times and transfers, counted from FLOPs, timed here, or read from a trace.

Two sources, one shape: `flop_costs` counts multiply-adds (deterministic, the same on every rank,
so `pipeline.schedule=auto` can use it without talking), and `measured_costs` times each stage's
three operations on this machine (the last stage's F with its loss, as the executor runs it).
`from_trace` reads them, and what the executor adds around them, off a traced run. The simulator
turns any of them into a predicted timeline. A message costs what its transport charges: the
sender's time in its send, the latency, the receiver's time in its receive (`ASSUMED_LATENCY_S`
when nothing was measured).

Per layer with n rows, fan-in a, fan-out b:  F = B = W = 2 n a b flops (one matrix product each).
What a micro-batch stashes is counted in pipeline.planning.memory.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from pipeline.config import IN_PROCESS, P2P, SHM
from pipeline.mlp.model import MLPSpec, build_layers
from pipeline.mlp.objective import add_regulariser_grad, loss_and_grad
from pipeline.mlp.stage import Stage
from pipeline.schedules.actions import Action

KINDS = ("F", "B", "W")
# Seconds per message each transport is charged when nothing was measured (pipeline.transport names, as
# resolved: auto is shm on one CPU host). p2p: the 50 us this model always assumed (gloo's ping-pong on loopback
# measured 61 us, issue #15); shm: the 10.8 us ping-pong of issue #15; inprocess: a mailbox hands the tensor over.
ASSUMED_LATENCY_S = {P2P: 5e-5, SHM: 1.1e-5, IN_PROCESS: 0.0}


@dataclass(frozen=True)
class Costs:
    """Seconds per action and per transfer, for one micro-batch size."""

    compute: dict[tuple[int, str], float]  # (stage_index, "F" | "B" | "W") -> seconds
    message_bytes: dict[int, int]  # stage_index -> bytes of its output activation (= of its output gradient)
    latency_s: float = 0.0  # per message, from the end of its send to the end of the receive waiting for it
    bandwidth: float = math.inf  # bytes per second
    send_s: float = 0.0  # time a rank spends in a send
    recv_s: float = 0.0  # time a rank spends in a receive whose message has arrived
    action_s: float = 0.0  # the executor's time between two actions of a rank, charged to each action
    comm: dict[tuple[int, str], float] = field(default_factory=dict)  # (stage, "SEND_F" ...) -> its own send_s / recv_s
    extra: dict[str, float] = field(default_factory=dict)  # e.g. {"update": optimizer step seconds}

    def duration(self, action: Action) -> float:
        s, kind = action.stage_index, action.kind
        if kind == "BW":  # timed as one action where it was (one call, one executor step), else B + W
            own = self.compute.get((s, "BW"))
            return self.action_s + (self.compute[(s, "B")] + self.compute[(s, "W")] if own is None else own)
        if kind in KINDS:
            return self.action_s + self.compute[(s, kind)]
        return self.action_s + self.comm.get((s, kind), self.send_s if kind.startswith("SEND") else self.recv_s)

    def transfer(self, producer: Action) -> float:
        """Time from a producer finishing on one rank to its output being usable on another."""
        forward = producer.kind in ("F", "SEND_F")  # an activation leaving stage s, else a gradient entering s-1
        boundary = producer.stage_index if forward else producer.stage_index - 1
        return self.latency_s + self.message_bytes.get(boundary, 0) / self.bandwidth


def layer_flops(spec: MLPSpec, index: int, rows: int) -> float:
    return 2.0 * rows * spec.dims[index] * spec.dims[index + 1]


def _message_bytes(spec: MLPSpec, stage_layers: list[range], rows: int) -> dict[int, int]:
    element = torch.empty((), dtype=spec.torch_compute_dtype).element_size()  # messages travel in the compute dtype
    return {s: rows * spec.dims[layers[-1] + 1] * element for s, layers in enumerate(stage_layers)}


def message_sizes(spec: MLPSpec, stage_layers: list[range], rows: int) -> dict[int, int]:
    """stage_index -> bytes of its output activation (= of its output gradient) on `rows` rows."""
    return _message_bytes(spec, stage_layers, rows)


def channel_bytes(spec: MLPSpec, stage_layers: list[range], rows: int, num_microbatches: int) -> int:
    """An upper bound on the bytes one pass of `rows` rows in `num_microbatches` sends from one rank to
    another: every boundary's activations (or their gradients, as large), each message with a 128-byte header."""
    per_stage = _message_bytes(spec, stage_layers, rows)
    return sum(per_stage[s] + num_microbatches * 128 for s in range(len(stage_layers) - 1))


def assumed_latency_s(transport: str) -> float:
    """ASSUMED_LATENCY_S of a resolved pipeline.transport name; ValueError for another."""
    if transport not in ASSUMED_LATENCY_S:
        raise ValueError(f"no latency for transport {transport!r}; one of {', '.join(ASSUMED_LATENCY_S)}")
    return ASSUMED_LATENCY_S[transport]


def flop_costs(spec: MLPSpec, stage_layers: list[range], rows: int, flops_per_s: float = 5e10,
               overhead_s: float = 2e-5, transport: str = P2P) -> Costs:
    """Costs in proportion to multiply-adds, plus a fixed overhead per layer operation; each message
    the latency assumed for `transport`."""
    compute = {(s, kind): sum(layer_flops(spec, i, rows) / flops_per_s + overhead_s for i in layers)
               for s, layers in enumerate(stage_layers) for kind in KINDS}
    return Costs(compute, _message_bytes(spec, stage_layers, rows), latency_s=assumed_latency_s(transport),
                 bandwidth=2e9)


def time_stage(stage: Stage, rows: int, repeats: int = 5, loss_name: str | None = None) -> dict[str, float]:
    """Median seconds of F, B and W of one stage on a micro-batch of `rows` random rows; with
    `loss_name`, the last stage's F includes the loss and dJ/do, as the executor's F does."""
    own = torch.Generator(device=stage.device).manual_seed(0)  # torch's global RNG stays the run's
    x = torch.randn(rows, stage.in_dim, dtype=stage.compute_dtype, device=stage.device, generator=own)
    dy = torch.randn(rows, stage.out_dim, dtype=stage.compute_dtype, device=stage.device, generator=own)
    labels = torch.randint(0, stage.out_dim, (rows,), device=stage.device, generator=own)
    with_loss = loss_name is not None and stage.is_last
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for round_index in range(repeats + 1):  # round 0 warms up caches and the allocator
        t0 = time.perf_counter()
        y, stash = stage.forward(x)
        if with_loss:
            loss_and_grad(loss_name, y.to(stage.dtype), labels, rows)  # in model.dtype, as the executor's
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
                   latency_s: float = 5e-5, bandwidth: float = 2e9, loss_name: str | None = None) -> Costs:
    """Time every stage's F, B and W here, on this process's threads (with `loss_name`, the last
    stage's F with its loss)."""
    compute = {}
    for s, layers in enumerate(stage_layers):
        stage = Stage(s, len(stage_layers), build_layers(spec, seed, layers))
        for kind, seconds in time_stage(stage, rows, repeats, loss_name).items():
            compute[(s, kind)] = seconds
    return Costs(compute, _message_bytes(spec, stage_layers, rows), latency_s=latency_s, bandwidth=bandwidth)


def layer_kind_times(spec: MLPSpec, rows: int, seed: int = 0, repeats: int = 5) -> list[float]:
    """Measured seconds of F, B and W of every layer alone on a micro-batch of `rows` rows, flat:
    [F of layer 0, B of layer 0, W of layer 0, F of layer 1, ...] (a list the ranks can average)."""
    times = []
    for i in range(spec.num_layers):
        stage = Stage(1, 2, build_layers(spec, seed, [i]))  # not the first stage: B computes dJ/dx too
        measured = time_stage(stage, rows, repeats)
        times += [measured[kind] for kind in KINDS]
    return times


def summed_costs(spec: MLPSpec, stage_layers: list[range], rows: int, layer_s: Sequence[float],
                 transport: str = P2P) -> Costs:
    """Costs of any cut from per-layer seconds (layer_kind_times): each stage's F, B, W the sum of its
    layers'; each message the latency assumed for `transport`."""
    compute = {(s, kind): sum(layer_s[len(KINDS) * i + k] for i in layers)
               for s, layers in enumerate(stage_layers) for k, kind in enumerate(KINDS)}
    return Costs(compute, _message_bytes(spec, stage_layers, rows), latency_s=assumed_latency_s(transport),
                 bandwidth=2e9)


def layer_times(spec: MLPSpec, rows: int, seed: int = 0, repeats: int = 5) -> list[float]:
    """Measured seconds of F + B + W of every layer alone, on a micro-batch of `rows` rows."""
    kinds = layer_kind_times(spec, rows, seed, repeats)
    return [sum(kinds[i:i + len(KINDS)]) for i in range(0, len(kinds), len(KINDS))]


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
               skip_steps: int = 1, transport: str = P2P) -> tuple[Costs, float]:
    """(Costs, update seconds) measured in a traced run over `transport` (a resolved pipeline.transport).

    Means, not medians, as a step pays for each of its actions, the slow ones included (a step's
    first F runs cold, and a send that wakes its receiver can cost 10x one that does not):
      compute  each stage's F, B and W (a BW span split evenly between B and W, and kept whole as BW)
      comm     per stage, a SEND's time, and a RECV's whose message was sent before it began
      action_s the median gap between two actions of a rank in one step: the executor's own time
      latency  over the receives that were waiting when their send began, the time from the send's
               start to the receive's end (`message_latency`), less the send's, one executor step's
               and the receive's own time; where no receive waited (one process), the transport's
               ASSUMED_LATENCY_S (0 in process: a mailbox hands the tensor over)
    Bandwidth is infinite: the latency is measured on the run's own messages, their bytes included.
    The update time is the median time between two schedules on the rank that ends each step
    (`between_steps`: optimizer step, zero_grad, the batch, and on a logged step its metrics row).
    """
    spans: dict[tuple[int, str], list[float]] = {}
    for events in events_by_rank.values():
        for e in (e for e in events if e.step > skip_steps and e.name != "WAIT_SENDS"):
            action, seconds = Action.parse(e.name), (e.end_ns - e.start_ns) / 1e9
            if action.kind in KINDS + ("BW", "SEND_F", "SEND_B"):
                spans.setdefault((action.stage_index, action.kind), []).append(seconds)
            if action.kind == "BW":
                for kind in ("B", "W"):
                    spans.setdefault((action.stage_index, kind), []).append(seconds / 2)
    transfers = _transfers(events_by_rank, skip_steps)
    for (_, sent_end), (start, end), receive in transfers:
        if start >= sent_end:  # its message was (nearly) there: the receive's own work
            spans.setdefault(receive, []).append((end - start) / 1e9)
    means = {key: statistics.mean(values) for key, values in spans.items()}
    compute = {key: value for key, value in means.items() if key[1] in KINDS + ("BW",)}
    comm = {key: value for key, value in means.items() if key not in compute}
    sends = [t for key, values in spans.items() if key[1].startswith("SEND") for t in values]
    send_s, recv_s = (statistics.mean(sends) if sends else 0.0), receive_s(events_by_rank, skip_steps)
    action_s = action_gap_s(events_by_rank, skip_steps)
    waited = [(end - sent_start) / 1e9 - comm.get(_sender(receive), send_s) - action_s - comm.get(receive, recv_s)
              for (sent_start, _), (start, end), receive in transfers if start <= sent_start < end]
    latency = max(0.0, statistics.mean(waited)) if waited and transport != IN_PROCESS else assumed_latency_s(transport)
    costs = Costs(compute, _message_bytes(spec, stage_layers, rows), latency_s=latency, send_s=send_s,
                  recv_s=recv_s, action_s=action_s, comm=comm)
    gaps = list(between_steps(events_by_rank, skip_steps).values())
    return costs, statistics.median(gaps) if gaps else 0.0


def between_steps(events_by_rank, skip_steps: int = 1) -> dict[int, float]:
    """Per step after `skip_steps` that has a next one, the seconds between schedules on the rank that
    ended it (its last action is the step's last): from that action to its own first of the next
    step. A rank that finished earlier waits out the difference in a collective or a receive, which
    the simulated step already holds; the rank that ends it does the work between two schedules
    (optimizer step, the next batch, on a logged step its metrics row) on the critical path."""
    ends: dict[int, tuple[int, int]] = {}  # step -> (its last end, the rank)
    starts: dict[tuple[int, int], int] = {}  # (rank, step) -> its first start
    for rank, events in events_by_rank.items():
        for e in events:
            if e.step > skip_steps:
                ends[e.step] = max(ends.get(e.step, (e.end_ns, rank)), (e.end_ns, rank))
                starts[(rank, e.step)] = min(starts.get((rank, e.step), e.start_ns), e.start_ns)
    return {step: (starts[(rank, step + 1)] - end) / 1e9 for step, (end, rank) in sorted(ends.items())
            if (rank, step + 1) in starts}


def message_latency(events_by_rank, skip_steps: int = 1) -> float | None:
    """Mean seconds from a SEND starting on one rank to its RECV ending on the other, over the
    messages whose receiver was already waiting (otherwise the receive ends when it is reached,
    not when the data arrives); None when there is no such message. The ranks of one machine
    share the clock (time.perf_counter_ns). The mean, not the median: a step pays for every
    message on its critical path, the slow tail included (on a shared 2-core machine the mean
    was 2x the median, and the median predicted traced steps 7-47 % short)."""
    latencies = [(end - sent_start) / 1e9 for (sent_start, _), (start, end), _ in _transfers(events_by_rank, skip_steps)
                 if start <= sent_start < end]
    return statistics.mean(latencies) if latencies else None


def _sender(receive: tuple[int, str]) -> tuple[int, str]:
    """(stage, SEND kind) of the send that a (stage, RECV kind) receives."""
    stage, kind = receive
    return (stage - 1, "SEND_F") if kind == "RECV_F" else (stage + 1, "SEND_B")


def _transfers(events_by_rank, skip_steps: int) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, str]]]:
    """((send start, send end), (receive start, receive end), (receiving stage, RECV kind)) in ns of
    every message after `skip_steps`."""
    sent: dict[tuple, tuple[int, int]] = {}
    received: dict[tuple, tuple[tuple[int, int], tuple[int, str]]] = {}
    for events in events_by_rank.values():
        for e in events:
            if e.step <= skip_steps or e.name == "WAIT_SENDS":
                continue
            a = Action.parse(e.name)
            if a.kind in ("SEND_F", "SEND_B"):
                sent[(e.step, a.kind[-1], a.stage_index, a.mb_index)] = (e.start_ns, e.end_ns)
            elif a.kind in ("RECV_F", "RECV_B"):
                sender = a.stage_index + (-1 if a.kind == "RECV_F" else 1)
                received[(e.step, a.kind[-1], sender, a.mb_index)] = ((e.start_ns, e.end_ns), (a.stage_index, a.kind))
    return [(sent[key], span, receive) for key, (span, receive) in received.items() if key in sent]


def receive_s(events_by_rank, skip_steps: int = 1) -> float:
    """Mean seconds of a receive that began after its send had ended (its message there, or
    nearly: the receiver's own work of taking it); 0 when there is none."""
    spans = [(end - start) / 1e9 for (_, sent_end), (start, end), _ in _transfers(events_by_rank, skip_steps)
             if start >= sent_end]
    return statistics.mean(spans) if spans else 0.0


def action_gap_s(events_by_rank, skip_steps: int = 1) -> float:
    """Median seconds between one action's end and the next one's start on a rank, within a step:
    the executor's own time per action (nothing waits there: a receive waits inside its span)."""
    gaps = []
    for events in events_by_rank.values():
        events = sorted((e for e in events if e.step > skip_steps), key=lambda e: e.start_ns)
        gaps += [(nxt.start_ns - prev.end_ns) / 1e9 for prev, nxt in zip(events, events[1:])
                 if nxt.step == prev.step and nxt.name != "WAIT_SENDS"]
    return statistics.median(gaps) if gaps else 0.0


def add_arguments(parser) -> None:
    """The options `python -m pipeline.plan` and `python -m pipeline.simulate` share."""
    parser.add_argument("--ranks", type=int, default=2, help="pipeline ranks p (default 2)")
    parser.add_argument("--measure", action="store_true", help="time each stage here instead of counting FLOPs")
    parser.add_argument("--threads", type=int, default=1, help="threads while measuring (torchrun gives each rank 1)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.hidden=[1024,1024]")
