"""Lowering: the SEND and RECV actions a compute-only schedule needs where a stage's neighbour lives on another rank."""

from __future__ import annotations

from pipeline.schedules.actions import BACKWARD_KINDS, COMM_KINDS, Action, Schedule
from pipeline.schedules.placement import Placement


def _is_remote(stage_index: int, peer_stage: int, placement: Placement) -> bool:
    """True when peer_stage exists and lives on another rank than stage_index."""
    if not 0 <= peer_stage < placement.num_stages:
        return False
    return placement.rank_of(peer_stage) != placement.rank_of(stage_index)


def _lower_action(action: Action, placement: Placement) -> list[Action]:
    """The action with the receives it waits on before it and the sends it feeds after it."""
    s, kind, mb = action
    before: list[Action] = []
    after: list[Action] = []
    if kind == "F" and _is_remote(s, s - 1, placement):
        before.append(Action(s, "RECV_F", mb))
    if kind == "F" and _is_remote(s, s + 1, placement):
        after.append(Action(s, "SEND_F", mb))
    if kind in BACKWARD_KINDS and _is_remote(s, s + 1, placement):
        before.append(Action(s, "RECV_B", mb))
    if kind in BACKWARD_KINDS and _is_remote(s, s - 1, placement):
        after.append(Action(s, "SEND_B", mb))
    return before + [action] + after


def lower(schedule: Schedule, placement: Placement) -> Schedule:
    """Add SEND/RECV actions around compute whose neighbouring stage lives on another rank, each rank
    receiving from a peer in the order that peer sends (see _receive_in_send_order)."""
    if any(a.kind in COMM_KINDS for actions in schedule.values() for a in actions):
        raise ValueError("lower() takes a compute-only schedule; this one already has SEND/RECV")
    lowered = {rank: [out for a in actions for out in _lower_action(a, placement)] for rank, actions in schedule.items()}
    return _receive_in_send_order(lowered, placement)


def _sent_to(lowered: Schedule, placement: Placement) -> dict[tuple[int, int], list[Action]]:
    """(sender, receiver) -> the RECVs that read the sender's messages, in the order it sends them."""
    links: dict[tuple[int, int], list[Action]] = {}
    for rank, actions in lowered.items():
        for stage, kind, mb in actions:
            if kind in ("SEND_F", "SEND_B"):
                peer = stage + 1 if kind == "SEND_F" else stage - 1
                recv = Action(peer, "RECV_F" if kind == "SEND_F" else "RECV_B", mb)
                links.setdefault((rank, placement.rank_of(peer)), []).append(recv)
    return links


def _receive_in_send_order(lowered: Schedule, placement: Placement) -> Schedule:
    """Move receives earlier where a peer sends two kinds of message (a V's F and B share a link) and the
    reader would take them out of order: before reading a message, read every one its sender sent first.

    NCCL pairs the k-th send with the k-th receive (simulator.check_in_order). A message sent earlier has
    left by the time a later one arrives, so reading it early adds no wait; it only sits in memory sooner.
    Schedules already in order (every looped one) come back unchanged.
    """
    links = _sent_to(lowered, placement)
    ordered: Schedule = {}
    for rank, actions in lowered.items():
        received: set[Action] = set()
        out: list[Action] = []
        for action in actions:
            if action.kind in ("RECV_F", "RECV_B"):
                sender = placement.rank_of(action.stage_index + (-1 if action.kind == "RECV_F" else 1))
                queue = links[(sender, rank)]
                earlier = queue[:queue.index(action) + 1]
                out += [recv for recv in earlier if recv not in received]
                received.update(earlier)
            else:
                out.append(action)
        ordered[rank] = out
    return ordered


def fuse_backward(schedule: Schedule) -> Schedule:
    """Merge a B directly followed by the W of the same stage and micro-batch into one BW.

    The order of work is unchanged, but BW takes each layer's weight gradient as soon as its
    dJ/dz is known and frees it, so less is held (ZB-H1's rank 0 runs W right after B).
    """
    fused: Schedule = {}
    for rank, actions in schedule.items():
        out: list[Action] = []
        for action in actions:
            if out and action.kind == "W" and out[-1] == Action(action.stage_index, "B", action.mb_index):
                out[-1] = Action(action.stage_index, "BW", action.mb_index)
            else:
                out.append(action)
        fused[rank] = out
    return fused
