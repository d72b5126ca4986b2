"""The pipeline ranks this process runs: their stages, runtimes and optimizers, stepped together.

Under torchrun a process runs one rank; with the in-process transport it runs all of them.
Either way each rank steps the optimizer on its own stages' parameters only. With replicas
(parallel.dp > 1) each trains on its share of the global batch and the stages' gradients are
summed over the replicas (see runtime.data_parallel) before the regulariser, the clipping
(training.clip, over every stage) and the update at the step's learning rate (training.lr).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pipeline.config import Config
from pipeline.mlp import microbatch, objective
from pipeline.mlp.model import MLPSpec, build_layers
from pipeline.mlp.stage import Stage
from pipeline.planning.memory import held_bytes
from pipeline.planning.plan import Plan
from pipeline.runtime import trace
from pipeline.runtime.data_parallel import GradReducer
from pipeline.runtime.distributed import Comm
from pipeline.runtime.executor import Runtime, StepResult, execute
from pipeline.training import checkpoint, clip, lr


def all_finite(t: Tensor) -> bool:
    """No NaN or inf in t. A finite sum proves it (a NaN or an inf cannot add up to a finite number) in one
    read of t, about 12x faster than isfinite's mask on the CPU; only a sum that is not finite, which finite
    values can reach by overflow, is settled element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def make_optimizer(conf: Config, params: list[Tensor]) -> torch.optim.Optimizer:
    o = conf.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum)
    return torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps)


class Engine:
    """This process's share of the pipeline."""

    def __init__(self, conf: Config, spec: MLPSpec, plan: Plan, comm: Comm):
        self.conf, self.spec, self.plan, self.comm = conf, spec, plan, comm
        seed, loss_name = conf.train.seed, conf.loss.name  # plan, not conf, says schedule, m and v (auto)
        self.stages = {s: Stage(s, plan.num_stages, build_layers(spec, seed, plan.stage_layers[s], comm.device),
                                recompute=conf.pipeline.recompute)
                       for r in comm.local_ranks for s in plan.stages_of(r)}
        self.runtimes = {r: Runtime(r, plan.placement, self._stages_of(r), comm.transports[r], loss_name)
                         for r in comm.local_ranks}
        self.optimizers = {r: make_optimizer(conf, [p for st in self._stages_of(r) for p in st.parameters()])
                           for r in comm.local_ranks}
        self.reducer = None
        if comm.replica_group is not None:
            self.reducer = GradReducer(self.stages, comm.replica_group, int(conf.parallel.bucket_mib * 2 ** 20),
                                       conf.dist.timeout_s)
            for runtime in self.runtimes.values():
                runtime.on_grads_ready = self.reducer.start
        # this replica's rows of the global batch (np.array_split's sizes, as datasets.BatchSampler cuts them)
        self.replica_rows = microbatch.sizes(conf.train.batch_size, comm.num_replicas)[comm.replica]
        if conf.trace.enabled:
            for runtime in self.runtimes.values():
                runtime.events = []
        self.peak_stash = {r: 0 for r in comm.local_ranks}
        self.peak_awaiting_b = {r: 0 for r in comm.local_ranks}
        self.peak_stash_bytes = {r: 0 for r in comm.local_ranks}
        self.sent_bytes = {r: 0 for r in comm.local_ranks}  # per step (every step sends the same)
        self.input_scaling: dict | None = None  # the data's standardisation, set by the trainer; for the export
        self.grad_norm: torch.Tensor | None = None  # with optim.clip_norm: the last update's ||dJ/dtheta||, unclipped

    def _stages_of(self, rank: int) -> list[Stage]:
        return [self.stages[s] for s in self.plan.stages_of(rank)]

    @property
    def holds_first(self) -> bool:
        return 0 in self.stages

    @property
    def holds_last(self) -> bool:
        """Does this process compute the loss?"""
        return self.plan.num_stages - 1 in self.stages

    @property
    def reports(self) -> bool:
        """Does this process write metrics, evaluate and print? The last stage of replica 0."""
        return self.holds_last and self.comm.writes_results

    def run(self, schedule, x: Tensor | None, y: Tensor | None, rows: int, num_mbs: int,
             training: bool, step: int = 0, batch_size: int | None = None) -> dict[int, StepResult]:
        """One pass of `schedule` over `rows` rows in `num_mbs` micro-batches, on every local rank;
        losses are divided by `batch_size` (default `rows`)."""
        sizes = microbatch.sizes(rows, num_mbs)
        x_mbs = microbatch.split(x, num_mbs) if self.holds_first else None
        y_mbs = microbatch.split(y, num_mbs) if self.holds_last and y is not None else None
        for runtime in self.runtimes.values():
            runtime.begin(sizes, x_mbs, y_mbs, training, step, batch_size)
        execute(self.runtimes, schedule)
        return {rank: runtime.end() for rank, runtime in self.runtimes.items()}

    def train_step(self, x: Tensor | None, y: Tensor | None, step: int = 0) -> Tensor | None:
        """Accumulate dJ/dW for one minibatch under the schedule (x, y: this replica's rows);
        returns this replica's share of L where the loss lives."""
        for stage in self.stages.values():
            stage.zero_grad()
        results = self.run(self.plan.train_schedule, x, y, self.replica_rows, self.plan.num_microbatches,
                           training=True, step=step, batch_size=self.conf.train.batch_size)
        if self.reducer is not None:
            self.reducer.wait()  # dJ/dW of the data term, summed over the replicas
        for stage in self.stages.values():
            objective.add_regulariser_grad(stage.weights(), self.conf.loss.l2)  # dJ/dW += lambda W
        for rank, result in results.items():
            self.peak_stash[rank] = max(self.peak_stash[rank], result.peak_stash)
            self.peak_awaiting_b[rank] = max(self.peak_awaiting_b[rank], result.peak_awaiting_b)
            self.peak_stash_bytes[rank] = max(self.peak_stash_bytes[rank], result.peak_stash_bytes)
            self.sent_bytes[rank] = result.sent_bytes
        return results[self.plan.last_rank].loss if self.holds_last else None

    def batch_loss(self, loss: Tensor) -> float:
        """L of the global batch from this replica's share (the last stages of all replicas call it)."""
        return self.comm.sum_replicas([float(loss)])[0]

    def local_regulariser(self) -> float:
        """This process's share of s = lambda/2 sum ||W||^2; the trainer sums it over ranks with its NaN check."""
        weights = [w for stage in self.stages.values() for w in stage.weights()]
        return float(objective.regulariser(weights, self.conf.loss.l2))

    def nonfinite_stages(self) -> list[float]:
        """Per stage of the whole pipeline: 1.0 where this process holds it and a parameter is NaN or inf."""
        flags = [0.0] * self.plan.num_stages
        for s, stage in self.stages.items():
            flags[s] = float(not all(all_finite(p) for p in stage.parameters()))
        return flags

    def update(self, step: int, measure: bool = False) -> list[float]:
        """Step every optimizer at the learning rate of `step` (training.lr); with optim.clip_norm, clip the
        gradient of J over the whole pipeline first (one all-reduce per step, see training.clip).
        Returns the per-tensor gradient norms still to be summed over the pipeline when `measure` asks
        for grad_norm without clipping (the trainer's check carries them), else []."""
        o = self.conf.optim
        lr.set_lr(self.optimizers.values(), lr.lr_at(step, o, self.conf.train.steps))
        pending: list[float] = []
        self.grad_norm = None
        if o.clip_norm is not None:
            self.grad_norm = self.total_grad_norm(self.comm.sum_list(self.grad_norm_slots()))
            grads = [p.grad for st in self.stages.values() for p in st.parameters()]
            clip.clip_(grads, o.clip_norm, self.grad_norm)  # g <- g * min(C / (||g|| + 1e-6), 1), ||g|| over all stages
        elif measure:
            pending = self.grad_norm_slots()
        for optimizer in self.optimizers.values():
            optimizer.step()
        for stage in self.stages.values():
            stage.cast_weights()  # model.compute_dtype: the next F, B and W read the updated weights' copy
        return pending

    def grad_norm_slots(self) -> list[float]:
        """||dJ/dtheta_k||_2 of every parameter tensor of the model that this process holds, 0 for the others."""
        layers = [layer for stage in self.stages.values() for layer in stage.layers]
        return clip.slot_norms(layers, self.spec.num_layers, self.spec.bias)

    def total_grad_norm(self, summed: list[float]) -> torch.Tensor:
        """||dJ/dtheta|| over the whole model from the slots summed over the pipeline (before any clipping)."""
        return clip.total_norm(summed, self.spec.torch_dtype, self.comm.device)

    def logged_grad_norm(self, summed: list[float]) -> float:
        """A metrics row's grad_norm: the clipping's total with optim.clip_norm, else the slots the check summed."""
        return float(self.grad_norm if self.grad_norm is not None else self.total_grad_norm(summed))

    def evaluate(self, x: Tensor | None, y: Tensor | None, rows: int) -> dict[str, float] | None:
        """Forward-only pipeline over the test set; test loss and accuracy where the loss lives."""
        results = self.run(self.plan.eval_schedule, x, y, rows, self.plan.eval_microbatches, training=False)
        if not self.holds_last:
            return None
        last = results[self.plan.last_rank]
        return {"test_loss": float(last.loss), "test_accuracy": last.correct / rows}

    def stash_figures(self) -> dict[str, list[int]]:
        """Peak stashed micro-batches and bytes of every rank, the bytes it sends per step, and the bytes of
        its parameters (with their compute-dtype copies), gradients and optimizer state, counted on the
        tensors (a collective: all ranks call it)."""
        p = self.plan.num_ranks
        held = {r: held_bytes([q for st in self._stages_of(r) for q in st.parameters()], self.optimizers[r],
                              [c for st in self._stages_of(r) for c in st.compute_copies()])
                for r in self.comm.local_ranks}
        named = (("peak_stash", self.peak_stash), ("peak_awaiting_b", self.peak_awaiting_b),
                 ("peak_stash_bytes", self.peak_stash_bytes), ("sent_bytes", self.sent_bytes),
                 *((name, {r: h[i] for r, h in held.items()})
                   for i, name in enumerate(("param_bytes", "grad_bytes", "optimizer_bytes"))))
        totals = self.comm.sum_list([float(peaks.get(r, 0)) for _, peaks in named for r in range(p)])  # one all-reduce
        return {name: [int(v) for v in totals[i * p:(i + 1) * p]] for i, (name, _) in enumerate(named)}

    def measured_bubble(self, step: int) -> list[float]:
        """Each rank's idle fraction of `step` from its trace (a collective: all ranks call it).

        The step spans from the earliest action start to the latest end over all ranks.
        """
        p = self.plan.num_ranks
        slots = [0.0] * (3 * p)  # per rank: compute ns, first start, last end
        for rank, runtime in self.runtimes.items():
            events = [e for e in runtime.events if e.step == step]
            slots[rank] = float(sum(e.end_ns - e.start_ns for e in events if trace.is_compute(e.name)))
            slots[p + rank] = float(min(e.start_ns for e in events))
            slots[2 * p + rank] = float(max(e.end_ns for e in events))
        slots = self.comm.sum_list(slots)
        span = max(slots[2 * p:]) - min(slots[p:2 * p])
        return [1 - slots[r] / span for r in range(p)]

    def save_trace(self, run_dir: str | Path, step: int | None) -> dict | None:
        """Replica 0's processes write their ranks' events; global rank 0 merges trace.json and draws timeline.png."""
        if self.comm.writes_results:  # replica 0's pipeline; the others ran the same schedule
            for rank, runtime in self.runtimes.items():
                trace.write_rank(run_dir, rank, runtime.events)
        self.comm.barrier("trace")
        return trace.finish(run_dir, step) if self.comm.is_root else None

    def save(self, run_dir: str | Path, step: int) -> None:
        """Every rank of replica 0 writes its stages' shards (the replicas hold the same state);
        once all have, global rank 0 marks the checkpoint complete."""
        if self.comm.writes_results:
            mark = checkpoint.fingerprint(checkpoint.math_record(self.conf, self.spec))
            shards = [checkpoint.stage_shard(step, self.stages[s], self.optimizers[r], mark)
                      for r in self.comm.local_ranks for s in self.plan.stages_of(r)]
            checkpoint.save_shards(run_dir, step, shards)
        self.comm.barrier(f"checkpoint {step}")
        if self.comm.is_root:
            checkpoint.commit(run_dir, step, self.checkpoint_meta())
            checkpoint.prune(run_dir, self.conf.checkpoint.keep, step)

    def checkpoint_meta(self) -> dict:
        """What checkpoint.json records besides the step: the layout that wrote it, the model it fits, and
        the math that a resume must not change (with its fingerprint, which every shard carries too)."""
        math = checkpoint.math_record(self.conf, self.spec)
        return {"num_stages": self.plan.num_stages, "num_layers": self.spec.num_layers,
                "stage_layers": [[r.start, r.stop] for r in self.plan.stage_layers], "num_ranks": self.plan.num_ranks,
                "virtual_stages": self.plan.virtual_stages, "dims": list(self.spec.dims), "bias": self.spec.bias,
                "dtype": self.spec.dtype, "optimizer": self.conf.optim.name, "replicas": self.comm.num_replicas,
                "input_scaling": self.input_scaling, "math": math, "fingerprint": checkpoint.fingerprint(math)}

    def local_layers(self) -> list[int]:
        return sorted(layer.index for stage in self.stages.values() for layer in stage.layers)

    def read_checkpoint(self, run_dir: str | Path, step: int) -> checkpoint.State:
        """The state of this process's layers at `step`, from whichever shards hold them (raises DamagedCheckpoint)."""
        return checkpoint.read_state(run_dir, step, self.local_layers())

    def first_reader(self, meta: dict, shard: int) -> int:
        """The lowest rank of this layout that reads `shard` of a checkpoint (it reports a damaged one)."""
        return min(r for r in range(self.plan.num_ranks) if shard in checkpoint.shards_for(meta, self.plan.layers_of(r)))

    def restore(self, state: checkpoint.State) -> None:
        """Copy weights and optimizer state in place; torch's RNG from the shard of this process's first layer."""
        for rank in self.comm.local_ranks:
            optimizer = self.optimizers[rank]
            for stage in self._stages_of(rank):
                for layer in stage.layers:
                    for name, param in layer.named_parameters():
                        with torch.no_grad():
                            param.copy_(state.params[layer.index][name])
                        saved = state.optimizer[layer.index][name]
                        optimizer.state.pop(param, None)
                        if saved:
                            optimizer.state[param] = {k: _to_param(k, v, param) for k, v in saved.items()}
                stage.cast_weights()  # model.compute_dtype: the copies follow the restored weights
        torch.set_rng_state(state.rng[self.local_layers()[0]])


def _to_param(key: str, value: Tensor, param: Tensor) -> Tensor:
    """Optimizer state goes to the parameter's device and dtype, except Adam's `step`, a CPU counter."""
    if key == "step" or not value.is_floating_point():
        return value.clone()
    return value.to(device=param.device, dtype=param.dtype, copy=True)
