"""torch.distributed point-to-point messages (gloo on CPUs, NCCL on GPUs): the transport of one rank per process."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from pipeline.runtime.transport import PeerTimeout, wait_failed


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
        self.pids: dict[int, int] = {}  # pipeline rank -> pid of the peers on this host (connect fills it)

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

    def close(self) -> None:
        """Forget the receives posted for a step that did not run (after an error every wait would fail)."""
        self.posted.clear()
        self.pending.clear()

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
            raise wait_failed(self.rank, what, err, self.timeout.total_seconds(), self.pids) from None
