"""In-process mailboxes: the transport when one process runs every rank (pipeline.transport=inprocess; pdb works)."""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Callable

import torch

from pipeline.runtime.transport import PeerTimeout


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

    def close(self) -> None:
        self.mailboxes.queues.clear()
