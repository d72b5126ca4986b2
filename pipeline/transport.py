"""Moving activations and gradients between ranks: torch.distributed P2P, or in-process mailboxes.

Both carry a tensor from one rank to another under a tag that names what it is (forward
activation or input gradient, stage, micro-batch), so receives match sends in any order.
Shapes are known from the model config: receives fill preallocated buffers and no message
carries metadata. Sends never block (isend semantics); every wait is bounded by a timeout.
"""

from __future__ import annotations

import re
from collections import defaultdict, deque
from datetime import timedelta
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist

ACTIVATION, GRADIENT = 0, 1


class PeerTimeout(RuntimeError):
    """A peer did not answer within dist.timeout_s, or its connection broke.

    `report` gathers what the waiting rank knew (its last actions, its pending sends) on the way
    up, for hang_report.json.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.report: dict = {}


class Terminated(PeerTimeout):
    """The launcher ended this rank (SIGTERM), usually because a peer failed first."""


def tag(kind: int, stage_index: int, mb_index: int, num_stages: int) -> int:
    """A unique message tag per step: what (activation/gradient), from which stage, which micro-batch."""
    return (mb_index * num_stages + stage_index) * 2 + kind


class P2PTransport:
    """torch.distributed isend/irecv between the ranks of one pipeline (gloo or NCCL).

    Peers are named by pipeline rank; replica k's pipeline starts at global rank
    `first_global_rank` = k p, so its messages never meet another replica's.
    """

    def __init__(self, rank: int, timeout_s: float, first_global_rank: int = 0):
        self.rank = rank
        self.offset = first_global_rank
        self.timeout = timedelta(seconds=timeout_s)
        self.pending: list[tuple[dist.Work, torch.Tensor, str]] = []
        self.posted: dict[tuple[int, int], tuple[dist.Work, torch.Tensor]] = {}

    def send(self, tensor: torch.Tensor, dst: int, tag: int, what: str) -> None:
        tensor = tensor.contiguous()  # keep it alive until the send completes
        with self._lost_peer(what):  # a peer already gone can fail the send at once
            self.pending.append((dist.isend(tensor, self.offset + dst, tag=tag), tensor, what))

    def can_recv(self, src: int, tag: int) -> bool:
        return True  # recv blocks (bounded) until the message arrives

    def post(self, make_buffer: Callable[[], torch.Tensor], src: int, tag: int) -> None:
        """Post a receive ahead of time: gloo then writes the data as soon as it arrives, and the
        receive action only waits (a receive posted late costs an extra round trip)."""
        buffer = make_buffer()
        with self._lost_peer(f"posting a receive from rank {src}"):
            self.posted[(src, tag)] = (dist.irecv(buffer, self.offset + src, tag=tag), buffer)

    def recv(self, src: int, tag: int, what: str, make_buffer: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The message's tensor, in the buffer posted for it (or in a new one, posted now)."""
        if (src, tag) not in self.posted:
            self.post(make_buffer, src, tag)
        work, buffer = self.posted.pop((src, tag))
        self._wait(work, what)
        return buffer

    def pending_sends(self) -> list[str]:
        return [what for _, _, what in self.pending]

    def flush(self) -> None:
        """Wait for every send of this step to complete."""
        while self.pending:
            work, _, what = self.pending.pop(0)
            self._wait(work, what)

    def _wait(self, work: dist.Work, what: str) -> None:
        with self._lost_peer(what):
            work.wait(self.timeout)

    @contextmanager
    def _lost_peer(self, what: str) -> Iterator[None]:
        """A timeout or a closed connection becomes one PeerTimeout naming this rank and `what`."""
        try:
            yield
        except PeerTimeout:  # a SIGTERM (Terminated) that landed in the wait: already the rank's own line
            raise
        except RuntimeError as err:
            lines = str(err).strip().splitlines() or [type(err).__name__]
            reason = re.sub(r"^\[[^\]]*\]\s*", "", lines[0])  # drop gloo's source-file prefix
            raise PeerTimeout(f"rank {self.rank}: no answer within {self.timeout.total_seconds():g} s "
                              f"(dist.timeout_s) at {what} ({reason})") from None


class Mailboxes:
    """Messages in flight between the ranks that one process runs (the in-process transport)."""

    def __init__(self):
        self.queues: dict[tuple[int, int, int], deque[torch.Tensor]] = defaultdict(deque)

    def endpoint(self, rank: int) -> "InProcessTransport":
        return InProcessTransport(rank, self)


class InProcessTransport:
    """One rank's view of the shared mailboxes; a receive is possible once the send has happened."""

    def __init__(self, rank: int, mailboxes: Mailboxes):
        self.rank = rank
        self.mailboxes = mailboxes

    def send(self, tensor: torch.Tensor, dst: int, tag: int, what: str) -> None:
        self.mailboxes.queues[(self.rank, dst, tag)].append(tensor.clone())  # a copy, like the wire

    def can_recv(self, src: int, tag: int) -> bool:
        return bool(self.mailboxes.queues.get((src, self.rank, tag)))

    def post(self, make_buffer: Callable[[], torch.Tensor], src: int, tag: int) -> None:
        pass  # a message waits in its mailbox until received: no buffer needed

    def recv(self, src: int, tag: int, what: str, make_buffer: Callable[[], torch.Tensor]) -> torch.Tensor:
        queue = self.mailboxes.queues.get((src, self.rank, tag))
        if not queue:
            raise PeerTimeout(f"rank {self.rank}: {what}: nothing was sent (in-process transport)")
        return queue.popleft()  # already a copy, made by send

    def pending_sends(self) -> list[str]:
        return []

    def flush(self) -> None:
        pass
