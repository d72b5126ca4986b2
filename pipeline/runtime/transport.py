"""The transport interface: how one rank's activations and gradients reach another, and the errors of a lost peer.

Every transport carries a tensor from one rank to another under a tag that names what it is
(forward activation or input gradient, stage, micro-batch), so receives match sends in any order.
Shapes are known from the model config: receives fill preallocated buffers and no message
carries metadata. Sends never block (isend semantics); every wait is bounded by dist.timeout_s.
The transports: p2p.P2PTransport (torch.distributed, gloo or NCCL) and inprocess.InProcessTransport;
runtime.distributed.connect picks one by pipeline.transport.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Protocol

from torch import Tensor

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


# what gloo (or the OS under it) says when the other end of a connection went away
_CONNECTION_LOST = ("closed by peer", "reset by peer", "broken pipe", "connection refused", "connection closed",
                    "socket closed")
SETTLE_S = 0.5  # a killed peer's sockets close a moment before its process is over: how long to look again


def pid_alive(pid: int) -> bool:
    """Is process `pid` running (a zombie is not)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def gone_peers(pids: dict[int, int], settle_s: float = SETTLE_S) -> list[int]:
    """The ranks of `pids` (rank -> pid, peers on this host) whose process has ended, looking again for up to
    settle_s while none has (the caller saw a connection close)."""
    deadline = time.monotonic() + settle_s
    while True:
        gone = [rank for rank, pid in pids.items() if not pid_alive(pid)]
        if gone or time.monotonic() >= deadline:
            return gone
        time.sleep(0.01)


def wait_failed(rank: int, what: str, err: Exception, timeout_s: float,
                pids: dict[int, int] | None = None) -> PeerTimeout:
    """The one-line PeerTimeout of a torch.distributed wait that raised `err` at `what`: a peer that is gone
    (its connection closed; named with its pid where `pids` knows it) or no answer within dist.timeout_s.
    `pids`: rank -> pid of the peers on this host, in the ranks the message names."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    reason = re.sub(r"^\[[^\]]*\]\s*", "", lines[0])  # gloo's source-file prefix
    if any(words in reason.lower() for words in _CONNECTION_LOST):
        reason = reason.split(". ")[0]  # what happened, without gloo's advice after it
        gone = gone_peers(pids or {})
        if gone:
            who = " and ".join(f"rank {r} (pid {pids[r]})" for r in gone) + (" is" if len(gone) == 1 else " are")
            error = PeerTimeout(f"rank {rank}: {who} gone at {what} ({reason})")
        else:  # on another host, or a transport that does not know its peers' processes
            error = PeerTimeout(f"rank {rank}: a peer is gone at {what} ({reason}); its own log says why")
    else:  # a TimeoutError is our own wait's (distributed.wait_in_python): nothing to add
        said = "" if isinstance(err, TimeoutError) else f" ({reason[-160:]})"
        error = PeerTimeout(f"rank {rank}: no answer within {timeout_s:g} s (dist.timeout_s) at {what}{said}")
    error.report.update(rank=rank, waiting_on=what)
    return error


def tag(kind: int, stage_index: int, mb_index: int, num_stages: int) -> int:
    """A unique message tag per step: what (activation/gradient), from which stage, which micro-batch."""
    return (mb_index * num_stages + stage_index) * 2 + kind


class Transport(Protocol):
    """One rank's end of the pipeline's messages; peers are named by pipeline rank."""

    def send(self, tensor: Tensor, dst: int, tag: int, what: str) -> None:
        """Start sending `tensor` to `dst` and return at once; `what` names it in errors."""

    def post(self, make_buffer: Callable[[], Tensor], src: int, tag: int) -> None:
        """Optionally get ready for a message before it is needed (a posted receive)."""

    def can_recv(self, src: int, tag: int) -> bool:
        """Could `recv` return now without waiting on a peer that this process also runs?"""

    def recv(self, src: int, tag: int, what: str, make_buffer: Callable[[], Tensor]) -> Tensor:
        """The message, waiting at most dist.timeout_s; a peer that is gone or silent raises PeerTimeout."""

    def flush(self) -> None:
        """Wait, with the same deadline, until every send of this step has completed."""

    def pending_sends(self) -> list[str]:
        """What is still being sent (for hang reports)."""

    def close(self) -> None:
        """Let go of buffers and messages this rank no longer needs (the end of a run)."""
