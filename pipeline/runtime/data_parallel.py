"""Data parallelism: each stage's weight gradients summed over its replicas, bucket by bucket, during the backward.

Every replica divides its loss by the *global* batch size B (not by its own rows), so its
gradient is its rows' share of the global batch's gradient, and the sum over the d replicas is
exactly the single-device gradient of the whole batch:

    dL/dW = sum over replicas k of  (1/B) sum over the rows of k of  dl(row)/dW

which equals the average of per-replica means when d divides B, and stays exact when it does
not. The regulariser's lambda W is the same on every replica, so it is added after the sum, once.

A stage's gradients live in one flat buffer (each .grad is a view into it) cut into buckets of at
most parallel.bucket_mib; the runtime calls `start(stage_index)` as soon as the stage's last W of
the step is done, and the bucket all-reduces then run in the background while this rank goes on
with its other stages' backward, its sends and its cooldown. `wait` collects them at the end.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.mlp.stage import Stage
from pipeline.runtime.transport import PeerTimeout, wait_failed


def flatten_grads(stage: Stage, bucket_bytes: int) -> list[Tensor]:
    """Move the stage's gradients into one flat buffer (each .grad a view of it); return its buckets."""
    params = stage.parameters()
    flat = torch.zeros(sum(p.numel() for p in params), dtype=stage.dtype, device=stage.device)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)  # accumulate_grad_weight adds in place
        offset += p.numel()
    per_bucket = max(1, bucket_bytes // flat.element_size())
    return list(flat.split(per_bucket))


class GradReducer:
    """Sums this process's stages' gradients over their replicas (one process group per pipeline rank)."""

    def __init__(self, stages: dict[int, Stage], group: dist.ProcessGroup, bucket_bytes: int, timeout_s: float):
        self.buckets = {s: flatten_grads(stage, bucket_bytes) for s, stage in stages.items()}
        self.group = group
        self.timeout = timedelta(seconds=timeout_s)
        self.works: list[tuple[int, dist.Work]] = []

    def start(self, stage_index: int) -> None:
        """The stage's gradients are complete for this step: start summing them over the replicas."""
        for bucket in self.buckets[stage_index]:
            self.works.append((stage_index, dist.all_reduce(bucket, group=self.group, async_op=True)))

    def wait(self) -> None:
        """Block until every started sum is done (bounded by dist.timeout_s)."""
        while self.works:
            stage_index, work = self.works.pop(0)
            try:
                work.wait(self.timeout)
            except PeerTimeout as err:  # a SIGTERM (Terminated) that landed in the wait: the rank's own line
                err.report.setdefault("waiting_on", f"gradient all-reduce of stage {stage_index}")
                raise
            except RuntimeError as err:
                error = wait_failed(dist.get_rank(), f"the gradient all-reduce of stage {stage_index} over the "
                                    "replicas", err, self.timeout.total_seconds())
                error.report["waiting_on"] = f"gradient all-reduce of stage {stage_index}"
                raise error from None
