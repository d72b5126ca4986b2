"""The transport interface: how one rank's activations and gradients reach another, and the errors of a lost peer.

Every transport carries a tensor from one rank to another under a tag that names what it is
(forward activation or input gradient, stage, micro-batch), so receives match sends in any order.
Shapes are known from the model config: receives fill preallocated buffers and no message
carries metadata. Sends never block (isend semantics); every wait is bounded by dist.timeout_s.
The transports: p2p.P2PTransport (torch.distributed, gloo or NCCL) and inprocess.InProcessTransport;
runtime.distributed.connect picks one by pipeline.transport.
"""

from __future__ import annotations

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
