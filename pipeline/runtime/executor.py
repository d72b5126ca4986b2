"""Executes a rank's actions over its stages: compute (F, B, W, BW) and transfers (SEND_*, RECV_*).

The runtime never decides order: the schedule does. Per (stage, micro-batch) it keeps

    inputs       the stage's input, from the data, a receive, or the previous stage on this rank
    stash        what the stage's backward needs (each layer's x, z, later dJ/dz), from F until W;
                 its bytes are counted per tensor, so an output handed to the next stage on this
                 rank, which both stashes hold, counts once (as it is held once)
    grads        dJ/d(stage output), from the loss (last stage), a receive, or the next local stage
    outbox       an output or input gradient waiting for its SEND

and frees each entry as soon as the action that consumes it is done. Under model.compute_dtype
(bfloat16) inputs, stashes and messages are bfloat16; the loss and dJ/do are computed in
model.dtype (float32) from the last stage's bfloat16 output, and its B rounds dJ/do to bfloat16.

`execute` drives one or more ranks' runtimes through a schedule: under torchrun each process
drives one rank and a receive blocks; in-process, one process drives every rank and a receive
waits its turn.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from pipeline.mlp import objective
from pipeline.mlp.stage import Stage
from pipeline.runtime.transport import ACTIVATION, GRADIENT, PeerTimeout, Transport, tag
from pipeline.schedules.actions import COMM_KINDS, COMPUTE_KINDS, Action, Schedule
from pipeline.schedules.placement import Placement

Key = tuple[int, int]  # (stage_index, mb_index)


class TraceEvent(NamedTuple):
    """One action as a rank ran it: `name` is the action ("1F0", "0SEND_B3") or "WAIT_SENDS"
    (waiting at the end of a step for this rank's sends to complete); times from time.perf_counter_ns,
    a clock all processes of one machine share."""

    step: int
    name: str
    start_ns: int
    end_ns: int


class Stuck(RuntimeError):
    """The schedule cannot progress (a bug in a schedule that skipped validation)."""


@dataclass
class StepResult:
    """What one rank learned from one step: its share of the loss (last stage only) and its peak stash."""

    loss: Tensor | None = None
    correct: int = 0
    peak_stash: int = 0  # most micro-batches held at once between their F and their W
    peak_awaiting_b: int = 0  # most micro-batches held at once between their F and their B
    peak_stash_bytes: int = 0  # most bytes of stashed activations held at once
    sent_bytes: int = 0  # bytes of the activations and gradients this rank sent (SEND_F, SEND_B)
    last_action: str = "none"
    outputs: dict[int, Tensor] = field(default_factory=dict)  # forward only: the last stage's o per micro-batch


@dataclass
class _StepState:
    mb_sizes: list[int]
    batch_size: int
    training: bool
    inputs: dict[Key, Tensor] = field(default_factory=dict)
    labels: dict[int, Tensor] = field(default_factory=dict)
    stash: dict[Key, list] = field(default_factory=dict)
    grads: dict[Key, Tensor] = field(default_factory=dict)
    outbox: dict[Key, Tensor] = field(default_factory=dict)
    awaiting_b: set[Key] = field(default_factory=set)
    stash_tensors: dict[Key, set[tuple[int, int]]] = field(default_factory=dict)  # per stash: (address, bytes)
    held: dict[tuple[int, int], int] = field(default_factory=dict)  # every stashed tensor: how many stashes hold it
    held_bytes: int = 0  # the bytes of `held`: what the stashes hold, each tensor once
    weights_done: dict[int, int] = field(default_factory=dict)  # per stage: micro-batches past W (or BW)


class Runtime:
    """One rank: its stages, its transport, and the state of the step in progress."""

    def __init__(self, rank: int, placement: Placement, stages: list[Stage], transport: Transport, loss_name: str):
        self.rank, self.placement = rank, placement
        self.stages = {stage.stage_index: stage for stage in stages}
        self.num_stages = stages[0].num_stages
        self.transport, self.loss_name = transport, loss_name
        self.state: _StepState | None = None
        self.result = StepResult()
        self.events: list[TraceEvent] | None = None  # a list records every action's span (trace.enabled)
        self.step = 0
        self.recent: deque[str] = deque(maxlen=12)  # the last completed actions, for hang reports
        self.on_grads_ready: Callable[[int], None] | None = None  # called with a stage after its last W
        self._kinds = {kind: getattr(self, "_" + kind) for kind in COMPUTE_KINDS + COMM_KINDS}  # kind -> its method

    def begin(self, mb_sizes: list[int], inputs: list[Tensor] | None, labels: list[Tensor] | None,
              training: bool = True, step: int = 0, batch_size: int | None = None) -> None:
        """Start a step (training) or an evaluation pass (training=False keeps nothing for backward).

        Every micro-batch's loss is divided by `batch_size`: the global batch (all replicas), by
        default the rows of this pass. A forward-only pass may come without labels (prediction)."""
        self.state = _StepState(mb_sizes, batch_size or sum(mb_sizes), training)
        self.result = StepResult()
        self.step = step
        if 0 in self.stages:
            self.state.inputs.update({(0, mb): x for mb, x in enumerate(inputs)})
        if self.num_stages - 1 in self.stages and labels is not None:
            self.state.labels.update(enumerate(labels))

    def end(self) -> StepResult:
        """Finish the step: wait for this rank's sends; everything received must have been consumed."""
        start = time.perf_counter_ns()
        try:
            self.transport.flush()
        except PeerTimeout as err:
            self._report(err, "WAIT_SENDS")
            raise
        if self.events is not None and self.state.training:
            self.events.append(TraceEvent(self.step, "WAIT_SENDS", start, time.perf_counter_ns()))
        leftovers = {name: keys for name in ("inputs", "stash", "grads", "outbox")
                     if (keys := sorted(getattr(self.state, name)))}
        if leftovers:
            raise Stuck(f"rank {self.rank}: step ended with unconsumed state {leftovers}")
        self.state = None
        return self.result

    def ready(self, action: Action) -> bool:
        """Can `action` run now? Only a receive whose message has not arrived can wait."""
        if action.kind == "RECV_F":
            return self.transport.can_recv(*self._route(action, -1, ACTIVATION))
        if action.kind == "RECV_B":
            return self.transport.can_recv(*self._route(action, +1, GRADIENT))
        return True

    def run(self, action: Action) -> None:
        start, name = time.perf_counter_ns(), str(action)  # (a step runs dozens: no context manager, one str)
        try:
            self._kinds[action.kind](action.stage_index, action.mb_index)
        except PeerTimeout as err:
            self._report(err, name)
            raise
        if self.events is not None and self.state.training:
            self.events.append(TraceEvent(self.step, name, start, time.perf_counter_ns()))
        self.result.last_action = name
        self.recent.append(name)

    def _report(self, err: PeerTimeout, doing: str) -> None:
        """A peer that stops answering: note in its report what this rank was doing and had done."""
        err.report.update(rank=self.rank, step=self.step, waiting_on=doing, last_completed=self.result.last_action,
                          recent_actions=list(self.recent), pending_sends=self.transport.pending_sends())

    # --- compute --------------------------------------------------------------------------

    def _F(self, s: int, mb: int) -> None:
        stage, st = self.stages[s], self.state
        x = st.inputs.pop((s, mb))
        if st.training:
            y, st.stash[(s, mb)] = stage.forward(x)
            st.awaiting_b.add((s, mb))
            self._recount((s, mb))
            self._note_peaks()
        else:
            y = stage.predict(x)
        if stage.is_last:
            self._loss(s, mb, y)
        elif s + 1 in self.stages:
            st.inputs[(s + 1, mb)] = y  # next stage lives here too: hand over locally
        else:
            st.outbox[(s, mb)] = y

    def _note_peaks(self) -> None:
        st, r = self.state, self.result
        r.peak_stash = max(r.peak_stash, len(st.stash))
        r.peak_awaiting_b = max(r.peak_awaiting_b, len(st.awaiting_b))
        r.peak_stash_bytes = max(r.peak_stash_bytes, st.held_bytes)

    def _recount(self, key: Key) -> None:
        """Update the held tensors after stash `key` changed (F made it, B shrank it, W or BW freed it)."""
        st = self.state
        before = st.stash_tensors.pop(key, set())
        after = Stage.stash_tensors(st.stash[key]) if key in st.stash else set()
        for tensor in after - before:
            st.held[tensor] = st.held.get(tensor, 0) + 1
            st.held_bytes += tensor[1] if st.held[tensor] == 1 else 0
        for tensor in before - after:
            st.held[tensor] -= 1
            if st.held[tensor] == 0:
                st.held_bytes -= tensor[1]
                del st.held[tensor]
        if after:
            st.stash_tensors[key] = after

    def _loss(self, s: int, mb: int, o: Tensor) -> None:
        o = o.to(self.stages[s].dtype)  # L and dJ/do in model.dtype (float32) from the compute-dtype output
        if not self.state.training:
            self.result.outputs[mb] = o  # forward only: o is what prediction returns
            if mb not in self.state.labels:
                return  # no labels (prediction): no loss
        y = self.state.labels.pop(mb)
        share, d_o = objective.loss_and_grad(self.loss_name, o, y, self.state.batch_size)
        self.result.loss = share if self.result.loss is None else self.result.loss + share
        if self.state.training:
            self.state.grads[(s, mb)] = d_o  # dJ/do starts the backward pass
        else:
            self.result.correct += objective.predictions_correct(o, y)

    def _B(self, s: int, mb: int) -> None:
        st = self.state
        dx = self.stages[s].backward_input(st.grads.pop((s, mb)), st.stash[(s, mb)])
        st.awaiting_b.discard((s, mb))
        self._recount((s, mb))  # z, h gone; dJ/dz kept for W
        self._note_peaks()
        self._hand_back(s, mb, dx)

    def _W(self, s: int, mb: int) -> None:
        self.stages[s].backward_weight(self.state.stash.pop((s, mb)))
        self._recount((s, mb))
        self._weight_done(s)

    def _BW(self, s: int, mb: int) -> None:
        st = self.state
        dx = self.stages[s].backward(st.grads.pop((s, mb)), st.stash.pop((s, mb)))
        st.awaiting_b.discard((s, mb))
        self._recount((s, mb))
        self._weight_done(s)
        self._hand_back(s, mb, dx)

    def _weight_done(self, s: int) -> None:
        """After the stage's last W of the step its dJ/dW is complete (data parallelism starts its sum)."""
        done = self.state.weights_done[s] = self.state.weights_done.get(s, 0) + 1
        if done == len(self.state.mb_sizes) and self.on_grads_ready is not None:
            self.on_grads_ready(s)

    def _hand_back(self, s: int, mb: int, dx: Tensor | None) -> None:
        """dJ/d(input of stage s) goes to stage s-1: here, or into the outbox for SEND_B."""
        if s == 0:
            return
        if s - 1 in self.stages:
            self.state.grads[(s - 1, mb)] = dx
        else:
            self.state.outbox[(s, mb)] = dx

    # --- transfers ------------------------------------------------------------------------

    def _route(self, action: Action, peer_offset: int, kind: int) -> tuple[int, int]:
        """(peer rank, message tag) of a transfer; the tag names the sending stage."""
        s, mb = action.stage_index, action.mb_index
        sender = s if action.kind.startswith("SEND") else s + peer_offset
        return self.placement.rank_of(s + peer_offset), tag(kind, sender, mb, self.num_stages)

    def _SEND_F(self, s: int, mb: int) -> None:
        dst, t = self._route(Action(s, "SEND_F", mb), +1, ACTIVATION)
        self._send(self.state.outbox.pop((s, mb)), dst, t, f"{s}SEND_F{mb} to rank {dst}")

    def _SEND_B(self, s: int, mb: int) -> None:
        dst, t = self._route(Action(s, "SEND_B", mb), -1, GRADIENT)
        self._send(self.state.outbox.pop((s, mb)), dst, t, f"{s}SEND_B{mb} to rank {dst}")

    def _send(self, message: Tensor, dst: int, t: int, what: str) -> None:
        self.transport.send(message, dst, t, what)
        self.result.sent_bytes += message.numel() * message.element_size()  # bfloat16: half of float32

    def _RECV_F(self, s: int, mb: int) -> None:
        self.state.inputs[(s, mb)] = self._receive(Action(s, "RECV_F", mb))

    def _RECV_B(self, s: int, mb: int) -> None:
        self.state.grads[(s, mb)] = self._receive(Action(s, "RECV_B", mb))

    def _incoming(self, action: Action) -> tuple[int, int, Callable[[], Tensor]]:
        """(peer, tag, a maker of an empty buffer of the right shape): shape and dtype come from the model."""
        forward = action.kind == "RECV_F"
        src, t = self._route(action, -1 if forward else +1, ACTIVATION if forward else GRADIENT)
        stage = self.stages[action.stage_index]
        shape = (self.state.mb_sizes[action.mb_index], stage.in_dim if forward else stage.out_dim)
        return src, t, lambda: torch.empty(shape, dtype=stage.compute_dtype, device=stage.device)

    def post_receives(self, actions: list[Action]) -> None:
        """Post every receive of this step up front into its own buffer (see runtime.p2p.P2PTransport.post)."""
        for action in actions:
            if action.kind in ("RECV_F", "RECV_B"):
                src, t, make_buffer = self._incoming(action)
                self.transport.post(make_buffer, src, t)

    def _receive(self, action: Action) -> Tensor:
        src, t, make_buffer = self._incoming(action)
        peer = action.stage_index + (-1 if action.kind == "RECV_F" else 1)
        what = f"{action} waiting for stage {peer} on rank {src}; last completed action: {self.result.last_action}"
        return self.transport.recv(src, t, what, make_buffer)


def execute(runtimes: dict[int, Runtime], schedule: Schedule) -> None:
    """Run every local rank's actions in order; in-process ranks take turns until all are done."""
    for rank, runtime in runtimes.items():
        runtime.post_receives(schedule[rank])
    position = {rank: 0 for rank in runtimes}
    while any(position[rank] < len(schedule[rank]) for rank in runtimes):
        progressed = False
        for rank, runtime in runtimes.items():
            actions = schedule[rank]
            while position[rank] < len(actions) and runtime.ready(actions[position[rank]]):
                runtime.run(actions[position[rank]])
                position[rank] += 1
                progressed = True
        if not progressed:
            waiting = ", ".join(f"rank {r} at {schedule[r][i]}" for r, i in position.items() if i < len(schedule[r]))
            raise Stuck(f"no rank can progress; waiting: {waiting}")
