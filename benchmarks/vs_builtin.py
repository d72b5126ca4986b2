"""This project's pipeline against torch.distributed.pipelining: same MLP, same batches, same steps.

    python benchmarks/vs_builtin.py                      # default model, every schedule, m = 4, 8, 16
    python benchmarks/vs_builtin.py --model small        # 8 hidden layers of 64, batch 64, m = 8
    python benchmarks/vs_builtin.py --model balanced     # default with a 1536-wide input: an even cut, m = 8
    python benchmarks/vs_builtin.py --quick              # a tiny smoke run (seconds)
    python benchmarks/vs_builtin.py --json out.json      # also save every raw number

Two worker processes (p = 2, gloo, one thread each) start the process group once. For every
schedule and m they build this project's Engine and the built-in's PipelineStages from the same
initial weights, check that one step of each gives the same gradient, warm up, then time
`--repeats` blocks of `--steps` steps, alternating the order of the two tools from one repeat to
the next. Rank 0 also times, in the same repeats, this project on one process (T_seq: p = 1,
in-process transport, same m and v) while rank 1 waits, idle, at a barrier. A last section times
this project at p = 1, m = 1 against a plain PyTorch loop (nn.Sequential + autograd + SGD).

A step's time is the time between two consecutive steps completing on every rank (clock shared
by the processes of one machine); each table reports the median over all timed steps.
benchmarks/README.md explains what is counted as stashed bytes on each side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1")
VIRTUAL = {"interleaved_1f1b": 2}  # stages per rank; every other schedule has one
BUILTIN = {  # our schedule -> the torch.distributed.pipelining class it is compared with
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    # With one stage per rank ScheduleInterleavedZeroBubble runs exactly ZB-H1's order (same warm-up,
    # B/W split, W lagging `rank` micro-batches behind B); README.md shows the two orders side by side.
    "zb_h1": "ScheduleInterleavedZeroBubble",
}
SINGLE_STAGE = {"ScheduleGPipe", "Schedule1F1B"}  # built-in classes that take one stage, not a list
MODELS = {
    "default": {"in_dim": 256, "hidden": [1024] * 8, "classes": 10, "batch": 256, "microbatches": [4, 8, 16]},
    "small": {"in_dim": 256, "hidden": [64] * 8, "classes": 10, "batch": 64, "microbatches": [8]},
    # default with a 1536-wide input: the uniform cut [4 | 5] then gives both ranks the same matrix
    # products per micro-batch (F + B + W = 12 : 12.03 units of 1024 x 1024, stage 0 needing no
    # dJ/dx of the data), so E shows the schedule and runtime without the default model's uneven cut
    "balanced": {"in_dim": 1536, "hidden": [1024] * 8, "classes": 10, "batch": 256, "microbatches": [8]},
    "tiny": {"in_dim": 16, "hidden": [16] * 4, "classes": 4, "batch": 16, "microbatches": [4]},  # --quick
}
# Targets the project aims for: our step time / built-in's at equal p and m, at most
RATIO_TARGET = {"default": 0.8, "balanced": 0.8, "small": 0.5}
EFFICIENCY_FRACTION = 0.9  # E >= 0.9 (1 - theoretical bubble) at p = 2, m = 8
OVERHEAD_TARGET = 0.10  # p = 1, m = 1: at most 10 % slower than the plain loop
LR, SEED, DATA_SEED, NUM_BATCHES = 0.01, 0, 1234, 4
P = 2  # pipeline ranks = worker processes


# ------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/vs_builtin.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("default", "small", "balanced", "tiny"), default="default")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated subset of " + ",".join(SCHEDULES))
    parser.add_argument("--microbatches", default=None, help="comma-separated m (default: the model's, e.g. 4,8,16)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per repeat and tool (default: 5 for the default model, 20 for small)")
    parser.add_argument("--repeats", type=int, default=6, help="repeats; the order of the tools alternates")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per tool before timing")
    parser.add_argument("--no-refs", action="store_true", help="skip T_seq and the p=1 overhead section")
    parser.add_argument("--breakdown", action="store_true",
                        help="also trace our runtime's actions (trace.enabled) and print where each rank's step time goes")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps, 2 repeats, 1 warm-up: a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="save the raw numbers here")
    parser.add_argument("--timeout", type=float, default=1500.0, help="kill every worker after this many seconds")
    parser.add_argument("--worker-result", type=Path, default=None, help=argparse.SUPPRESS)  # set in workers
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.repeats, args.warmup = "tiny", 2, 2, 1
    args.schedules = [s for s in args.schedules.split(",") if s]
    unknown = sorted(set(args.schedules) - set(SCHEDULES))
    if unknown:
        parser.error(f"unknown schedule(s) {unknown}; choose from {', '.join(SCHEDULES)}")
    model = MODELS[args.model]
    if args.steps is None:
        args.steps = {"default": 5, "balanced": 5, "small": 20}.get(args.model, 2)
    args.microbatches = ([int(m) for m in args.microbatches.split(",")] if args.microbatches
                         else list(model["microbatches"]))
    bad = [m for m in args.microbatches if m < 1 or model["batch"] % m]
    if bad:
        parser.error(f"--microbatches {bad}: each m must divide the batch of {model['batch']} "
                     "(the built-in's static stage shapes need equal micro-batches)")
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


# ------------------------------------------------------------------------------------------------
# orchestrator: start the two workers, bound them in time, print the tables


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], args: argparse.Namespace, workdir: Path, script: Path | None = None,
           wrap=None) -> dict:
    """Run the two workers (`script` with argv and --worker-result) to completion, or kill them all on
    --timeout or on the first failure; returns rank 0's results. wrap(rank) -> a command prefix (a profiler)."""
    port, result = free_port(), workdir / "result.json"
    procs, logs = [], []
    for rank in range(P):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(P), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(P), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        log = open(workdir / f"rank{rank}.log", "w+")
        logs.append(log)
        prefix = wrap(rank) if wrap else []
        procs.append(subprocess.Popen([*prefix, sys.executable, str((script or Path(__file__)).resolve()), *argv,
                                       "--worker-result", str(result)],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))  # its own process group: kill() takes its children too
    deadline, relayed, failed = time.monotonic() + args.timeout, 0, None
    try:
        while any(proc.poll() is None for proc in procs):
            relayed = relay_progress(workdir / "rank0.log", relayed)
            failed = next((r for r, proc in enumerate(procs) if proc.poll() not in (None, 0)), None)
            if failed is not None:
                break
            if time.monotonic() > deadline:
                raise SystemExit(abort(procs, logs, f"timed out after {args.timeout:g} s (--timeout); killed every worker"))
            time.sleep(0.2)
        relay_progress(workdir / "rank0.log", relayed)
        failed = next((r for r, proc in enumerate(procs) if proc.poll() != 0), failed)
        if failed is not None:
            raise SystemExit(abort(procs, logs, f"worker rank {failed} failed with exit code {procs[failed].poll()}"))
    finally:
        for proc in procs:
            kill(proc)
        for log in logs:
            log.close()
    return json.loads(result.read_text())


def source_state() -> str:
    """The commit measured, and whether pipeline/ had uncommitted changes (read-only git queries)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in pipeline/' if dirty else ''}"


def relay_progress(log: Path, offset: int) -> int:
    """Copy rank 0's new progress lines to stderr; returns the new offset."""
    try:
        with open(log) as f:
            f.seek(offset)
            text = f.read()
    except FileNotFoundError:
        return offset
    complete = text[: text.rfind("\n") + 1]
    for line in complete.splitlines():
        if line.startswith("[vs_builtin]"):
            print(line, file=sys.stderr, flush=True)
    return offset + len(complete)


def kill(proc: subprocess.Popen) -> None:
    """End a worker we started, and anything it started (its own process group), if still running."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def abort(procs: list[subprocess.Popen], logs: list, message: str) -> str:
    """Kill every worker still running, show the end of each log; the message for SystemExit."""
    for proc in procs:
        kill(proc)
    for rank, log in enumerate(logs):
        log.flush()
        log.seek(0)
        tail = log.read().splitlines()[-25:]
        print(f"--- rank {rank} (exit {procs[rank].poll()}), last lines ---", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
    return f"vs_builtin: error: {message}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker_result is not None:
        return worker(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs_builtin_") as workdir:
        results = launch(argv, args, Path(workdir))
    results["wall_s"] = time.perf_counter() - started
    results["source"] = source_state()
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------
# report


def stage_work(dims: list[int], num_stages: int) -> list[tuple[int, int, int]]:
    """Per stage of the uniform cut, the multiply-adds per row of its F, B and W: each layer's
    in x out for each, less the first layer's B on stage 0 (the data needs no dJ/dx)."""
    from pipeline.partition import stage_layers, uniform

    work = []
    for s, layers in enumerate(stage_layers(uniform(len(dims) - 1, num_stages))):
        fwd = sum(dims[i] * dims[i + 1] for i in layers)
        work.append((fwd, fwd - (dims[0] * dims[1] if s == 0 else 0), fwd))
    return work


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}" if math.isfinite(seconds) else "-"


def kib(nbytes: float) -> str:
    return f"{nbytes / 1024:.0f}"


def report(res: dict) -> str:
    a, model = res["args"], res["args"]["model"]
    lines = [f"## vs torch.distributed.pipelining: model={model} {res['model']['dims']} batch={res['model']['batch']} "
             f"float32 relu bias, SGD lr={LR}; p={P} (gloo, 1 thread each); steps={a['steps']} x repeats={a['repeats']}, "
             f"warmup={a['warmup']}; torch {res['torch']}; {res['cpus']} CPU(s)", ""]
    lines += ["| schedule | built-in (stages/rank) | m | ours ms | built-in ms | ours/built-in (per-repeat range) "
              "| T_seq ms | stash ours r0/r1 KiB | stash built-in r0/r1 KiB | 1-step grad diff |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in res["configs"]:
        lo, hi = min(c["repeat_ratios"]), max(c["repeat_ratios"])
        lines.append(
            f"| {c['schedule']} | {c['builtin']} ({c['v']}) | {c['m']} | {ms(c['ours_s'])} | {ms(c['builtin_s'])} | "
            f"**{c['ratio']:.2f}** ({lo:.2f}-{hi:.2f}) | {ms(c.get('seq_s', float('nan')))} | "
            f"{' / '.join(kib(b) for b in c['stash_ours'])} | {' / '.join(kib(b) for b in c['stash_builtin'])} | "
            f"{c['grad_rel_diff']:.1e} |")
    param_diff = max(c["param_abs_diff"] for c in res["configs"])
    lines += ["", "ours/built-in = median step time of ours / of the built-in (< 1: ours is faster). "
              "1-step grad diff = max |g_ours − g_builtin| / max |g_builtin| over every parameter after one step from "
              f"the same weights on the same batch (the updated parameters differ by at most {param_diff:.1e})."]
    eff = [c for c in res["configs"] if c["m"] == res["efficiency_m"] and "seq_s" in c]
    if eff:
        lines += ["", f"### Pipeline efficiency E = T_seq / (p · T_pipe), p={P}, m={res['efficiency_m']}", "",
                  "| schedule | T_seq ms | T_pipe ours ms | E ours | E built-in | 1 − bubble (unit costs) "
                  "| target 0.9 (1 − bubble) | met | 1 − bubble (FLOP-weighted stages) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for c in eff:
            lines.append(f"| {c['schedule']} | {ms(c['seq_s'])} | {ms(c['ours_s'])} | {c['E_ours']:.3f} | "
                         f"{c['E_builtin']:.3f} | {c['ideal_unit']:.3f} | {EFFICIENCY_FRACTION * c['ideal_unit']:.3f} | "
                         f"{'yes' if c['E_ours'] >= EFFICIENCY_FRACTION * c['ideal_unit'] else 'no'} | "
                         f"{c['ideal_flops']:.3f} |")
    ov = res.get("overhead")
    if ov:
        lines += ["", "### p=1, m=1: this project (in-process, 1f1b) vs a plain PyTorch loop (nn.Sequential + autograd "
                  "+ SGD, whole batch), one process, one thread", "",
                  "| ours ms | plain ms | ours/plain | overhead | target ≤ 10 % |", "| ---: | ---: | ---: | ---: | --- |",
                  f"| {ms(ov['ours_s'])} | {ms(ov['plain_s'])} | {ov['ratio']:.3f} (per-repeat {min(ov['repeat_ratios']):.3f}-"
                  f"{max(ov['repeat_ratios']):.3f}) | {100 * (ov['ratio'] - 1):+.1f} % | "
                  f"{'met' if ov['ratio'] <= 1 + OVERHEAD_TARGET else 'missed'} |"]
    if any("breakdown" in c for c in res["configs"]):
        lines += ["", breakdown_table(res)]
    lines += ["", "### Targets", ""] + [f"- {t}" for t in targets(res)]
    lines += ["", f"wall time {res.get('wall_s', float('nan')):.0f} s; source {res.get('source', 'unknown')}"]
    return "\n".join(lines)


def breakdown_table(res: dict) -> str:
    """Where our step time goes, per rank (ms per step, traced run: tracing itself adds a little)."""
    cols = ["F", "B", "W", "BW", "RECV_F", "RECV_B", "SEND_F", "SEND_B", "WAIT_SENDS", "other in train_step", "update",
            "total"]
    lines = ["### Where our step time goes (ms per step, from the runtime's action spans; --breakdown)", "",
             "| schedule | m | rank | " + " | ".join(cols) + " | compute share |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in cols) + " | ---: |"]
    for c in res["configs"]:
        rows = [(str(r), b) for r, b in enumerate(c.get("breakdown") or [])]
        if c.get("seq_breakdown"):
            rows.append(("p=1", c["seq_breakdown"]))
        for label, b in rows:
            if not b:
                continue
            compute = sum(b.get(k, 0.0) for k in ("F", "B", "W", "BW"))
            lines.append(f"| {c['schedule']} | {c['m']} | {label} | "
                         + " | ".join(f"{b[k]:.1f}" if k in b else "-" for k in cols)
                         + f" | {compute / b['total']:.0%} |")
    return "\n".join(lines)


def targets(res: dict) -> list[str]:
    out, model, configs = [], res["args"]["model"], res["configs"]
    limit = RATIO_TARGET.get(model)
    worst = max(configs, key=lambda c: c["ratio"])
    if limit is None:
        out.append(f"step-time ratio: no target for model={model}; "
                   f"worst {worst['ratio']:.2f} ({worst['schedule']}, m={worst['m']})")
    else:
        missed = [f"{c['schedule']} m={c['m']}: {c['ratio']:.2f}" for c in configs if c["ratio"] > limit]
        out.append(f"ours ≤ {limit}× built-in step time for every schedule and m: "
                   + ("met" if not missed else f"MISSED ({len(missed)}/{len(configs)}: {'; '.join(missed)})"))
    eff = [c for c in configs if c["m"] == res["efficiency_m"] and "seq_s" in c]
    if eff:
        missed = [f"{c['schedule']}: E={c['E_ours']:.3f} < {EFFICIENCY_FRACTION * c['ideal_unit']:.3f}"
                  for c in eff if c["E_ours"] < EFFICIENCY_FRACTION * c["ideal_unit"]]
        out.append(f"E ≥ 0.9 (1 − bubble) at p={P}, m={res['efficiency_m']}: "
                   + ("met" if not missed else f"MISSED ({'; '.join(missed)})"))
    missed = [f"{c['schedule']} m={c['m']} rank {r}: {kib(o)} > {kib(b)} KiB"
              for c in configs for r, (o, b) in enumerate(zip(c["stash_ours"], c["stash_builtin"])) if o > b]
    out.append("our stashed bytes per rank ≤ built-in's: "
               + ("met" if not missed else f"MISSED ({len(missed)} of {P * len(configs)} rank-configs; worst ratio "
                  f"{max(o / b for c in configs for o, b in zip(c['stash_ours'], c['stash_builtin'])):.2f})"))
    ov = res.get("overhead")
    if ov:
        out.append(f"p=1, m=1 overhead ≤ 10 % over the plain loop: {100 * (ov['ratio'] - 1):+.1f} % "
                   + ("met" if ov["ratio"] <= 1 + OVERHEAD_TARGET else "MISSED"))
    worst_diff = max(c["grad_rel_diff"] for c in configs)
    out.append(f"same gradient after one step (both tools, same weights and batch): worst relative difference "
               f"{worst_diff:.1e}, parameters within {max(c['param_abs_diff'] for c in configs):.1e}")
    return out


# ------------------------------------------------------------------------------------------------
# worker: everything below runs inside the two processes


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    try:
        bench = Bench(args, dist.get_rank())
        results = bench.run()
        if bench.rank == 0:
            args.worker_result.write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def progress(rank: int, text: str) -> None:
    if rank == 0:
        print(f"[vs_builtin] {text}", flush=True)


class SavedBytes:
    """Live and peak bytes of the tensors autograd saves for backward (saved_tensors_hooks).

    Parameters (a Linear saves W, or a view of it) are not counted; every other saved tensor counts
    numel * element_size once, however many nodes save it (a ReLU's output is also the next Linear's
    input), from when it is first saved until the last node holding it frees it. `hold`/`drop`
    add other tensors kept for backward (zero-bubble schedules keep gradients between I and W).
    """

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[tuple, list[int]] = {}  # (data_ptr, nbytes) -> [holders, nbytes]
        self.held: dict[tuple, list[tuple]] = {}  # (stage, micro-batch) -> keys held between I and W
        self.live = self.peak = 0

    def _add(self, key: tuple, nbytes: int) -> None:
        entry = self.refs.get(key)
        if entry is not None:
            entry[0] += 1
            return
        self.refs[key] = [1, nbytes]
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _release(self, key: tuple) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self.refs[key]
            self.live -= entry[1]

    def pack(self, tensor):
        if tensor.numel() == 0 or tensor.untyped_storage().data_ptr() in self.params:
            return tensor
        return _Packed(self, tensor)

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed

    def hold(self, owner: tuple, tensors) -> None:
        keys = []
        for t in tensors:
            if t is not None and t.numel():
                key = (t.data_ptr(), t.numel() * t.element_size())
                self._add(key, key[1])
                keys.append(key)
        self.held.setdefault(owner, []).extend(keys)

    def drop(self, owner: tuple) -> None:
        for key in self.held.pop(owner, []):
            self._release(key)


class _Packed:
    __slots__ = ("tracker", "tensor", "key")

    def __init__(self, tracker: SavedBytes, tensor):
        self.tracker, self.tensor = tracker, tensor
        self.key = (tensor.data_ptr(), tensor.numel() * tensor.element_size())
        tracker._add(self.key, self.key[1])

    def __del__(self):
        self.tracker._release(self.key)


class Bench:
    """One worker's share: both tools for every configuration, then the references (rank 0)."""

    def __init__(self, args: argparse.Namespace, rank: int):
        import torch

        from pipeline.model import MLPSpec, build_layers

        self.args, self.rank = args, rank
        self.model = MODELS[args.model]
        self.spec = MLPSpec((self.model["in_dim"], *self.model["hidden"], self.model["classes"]), "relu", True, "float32")
        self.batch = self.model["batch"]
        gen = torch.Generator().manual_seed(DATA_SEED)  # identical on both ranks, for both tools
        self.batches = [(torch.randn(self.batch, self.model["in_dim"], generator=gen),
                         torch.randint(0, self.model["classes"], (self.batch,), generator=gen))
                        for _ in range(NUM_BATCHES)]
        self.init = {layer.index: (layer.weight.clone(), layer.bias.clone())
                     for layer in build_layers(self.spec, SEED, range(self.spec.num_layers))}
        self.step_no = 0
        self.timed_steps: set[int] = set()  # step numbers that were timed (for --breakdown)

    # --- building the tools -----------------------------------------------------------------

    def conf(self, schedule: str, m: int, v: int, transport: str, ranks: int | None):
        from pipeline import config

        mo = self.model
        return config.parse({
            "model": {"in_dim": mo["in_dim"], "out_dim": mo["classes"], "hidden": list(mo["hidden"]),
                      "activation": "relu", "bias": True, "dtype": "float32"},
            "data": {"name": "synthetic", "n": self.batch, "dim": mo["in_dim"], "classes": mo["classes"],
                     "noise": 0.0, "seed": 0, "test_fraction": 0.0, "shuffle": False},
            "optim": {"name": "sgd", "lr": LR, "momentum": 0.0},
            "pipeline": {"schedule": schedule, "microbatches": m, "virtual_stages": v, "partition": "uniform",
                         "transport": transport, "ranks": ranks},
            "train": {"steps": 1, "batch_size": self.batch, "seed": SEED, "log_every": 1, "eval_every": 1},
            "loss": {"name": "cross_entropy", "l2": 0.0},
            "checkpoint": {"save_initial": False},
            "dist": {"backend": "gloo", "timeout_s": self.args.timeout, "device": "cpu"},
            "trace": {"enabled": bool(self.args.breakdown)},
        })

    def ours(self, schedule: str, m: int, v: int, single: bool = False) -> "Ours":
        from pipeline.distributed import Env, read_env

        if single:  # p = 1, every stage in this process, in-process transport
            return Ours(self.conf(schedule, m, v, "inprocess", 1), self.spec, Env(0, 1, 0, 1, None), 1)
        return Ours(self.conf(schedule, m, v, "p2p", None), self.spec, read_env(), P)

    def builtin(self, schedule: str, m: int, v: int) -> "Builtin":
        return Builtin(self.spec, self.init, schedule, m, v, self.rank, self.batch)

    # --- measuring --------------------------------------------------------------------------

    def next_batch(self):
        self.step_no += 1
        return self.batches[self.step_no % NUM_BATCHES]

    def timed(self, tool, steps: int, distributed: bool = True, record: bool = True) -> list[float]:
        """Durations of `steps` steps: between consecutive completions on every rank (all-reduce MAX of
        each rank's clock readings; the processes of one machine share time.perf_counter's clock)."""
        import torch
        import torch.distributed as dist

        if distributed:
            dist.barrier()
        stamps = [time.perf_counter()]
        for _ in range(steps):
            x, y = self.next_batch()
            tool.step(x, y, self.step_no)
            stamps.append(time.perf_counter())
            if record:
                self.timed_steps.add(self.step_no)
        t = torch.tensor(stamps, dtype=torch.float64)
        if distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return (t[1:] - t[:-1]).tolist()

    def gather(self, value: float) -> list[float]:
        """[value of rank 0, value of rank 1]."""
        import torch
        import torch.distributed as dist

        t = torch.zeros(P, dtype=torch.float64)
        t[self.rank] = value
        dist.all_reduce(t)
        return t.tolist()

    def max_all(self, value: float) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def check_step(self, ours: "Ours", builtin: "Builtin") -> tuple[float, float]:
        """One step of each from the same weights on the same batch:
        (max |θ_ours − θ_builtin| after the update, max |g_ours − g_builtin| / max |g_builtin| of the gradients)."""
        x, y = self.batches[0]
        ours.step(x, y, 0)
        builtin.step(x, y, 0)
        po, pb = ours.params(), builtin.params()
        if sorted(po) != sorted(pb):
            raise AssertionError(f"rank {self.rank}: layers {sorted(po)} (ours) vs {sorted(pb)} (built-in)")
        param_diff = grad_diff = grad_max = 0.0
        for i in po:
            for a, b in zip(po[i], pb[i]):
                param_diff = max(param_diff, float((a - b).abs().max()))
                grad_diff = max(grad_diff, float((a.grad - b.grad).abs().max()))
                grad_max = max(grad_max, float(b.grad.abs().max()))
        return self.max_all(param_diff), self.max_all(grad_diff) / self.max_all(grad_max)

    def single_process(self, fn) -> None:
        """Rank 0 runs fn alone while rank 1 waits (idle) at the barrier."""
        import torch.distributed as dist

        if self.rank == 0:
            fn()
        dist.barrier()

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> dict:
        import torch

        from pipeline.partition import uniform

        a = self.args
        eff_m = 8 if 8 in a.microbatches else a.microbatches[len(a.microbatches) // 2]
        configs = []
        for schedule in a.schedules:
            for m in a.microbatches:
                configs.append(self.run_config(schedule, m, VIRTUAL.get(schedule, 1)))
                c = configs[-1]
                progress(self.rank, f"{schedule:<17} m={m:<3} ours {ms(c['ours_s'])} ms  built-in {ms(c['builtin_s'])} ms"
                                    f"  ratio {c['ratio']:.2f}  T_seq {ms(c.get('seq_s', float('nan')))} ms")
        for c in configs:
            ideal_unit, ideal_flops = self.ideal(c["schedule"], c["m"], c["v"])
            c.update(ideal_unit=ideal_unit, ideal_flops=ideal_flops)
            if "seq_s" in c:
                c.update(E_ours=c["seq_s"] / (P * c["ours_s"]), E_builtin=c["seq_s"] / (P * c["builtin_s"]))
        out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
               "model": {"dims": list(self.spec.dims), "batch": self.batch,
                         "stage_layers_v1": uniform(self.spec.num_layers, P),
                         "stage_layers_v2": uniform(self.spec.num_layers, 2 * P)},
               "torch": torch.__version__, "cpus": os.cpu_count(), "efficiency_m": eff_m, "configs": configs}
        if not a.no_refs:
            out["overhead"] = self.run_overhead()
            progress(self.rank, f"p=1 m=1 ours {ms(out['overhead']['ours_s'])} ms  plain {ms(out['overhead']['plain_s'])} ms")
        return out

    def run_config(self, schedule: str, m: int, v: int) -> dict:
        a = self.args
        ours, builtin = self.ours(schedule, m, v), self.builtin(schedule, m, v)
        seq = None
        try:
            param_diff, grad_diff = self.check_step(ours, builtin)
            for _ in range(a.warmup):
                x, y = self.next_batch()
                ours.step(x, y, self.step_no)
                builtin.step(x, y, self.step_no)
            x, y = self.next_batch()
            builtin_stash = builtin.measured_step(x, y)  # untimed: the hooks cost time
            times = {"ours": [], "builtin": [], "seq": []}
            repeat_ratios = []
            if not a.no_refs:
                def warm_seq():
                    nonlocal seq
                    seq = self.ours(schedule, m, v, single=True)
                    self.timed(seq, a.warmup + 1, distributed=False, record=False)
                self.single_process(warm_seq)
            for rep in range(a.repeats):
                block = {}
                for name, tool in ((("ours", ours), ("builtin", builtin)) if rep % 2 == 0
                                   else (("builtin", builtin), ("ours", ours))):
                    block[name] = self.timed(tool, a.steps)
                    times[name] += block[name]
                repeat_ratios.append(median(block["ours"]) / median(block["builtin"]))
                if not a.no_refs:
                    self.single_process(lambda: times["seq"].extend(self.timed(seq, a.steps, distributed=False)))
            stash_ours = self.gather(ours.stash_bytes())
            stash_builtin = self.gather(builtin_stash)
            builtin_live_after = self.gather(builtin.live_after_step)
            if a.breakdown:
                breakdown = self.all_gather(ours.breakdown(self.timed_steps))
                seq_breakdown = self.broadcast_list(seq.breakdown(self.timed_steps) if seq is not None else {})
        finally:
            ours.close()
            if seq is not None:
                seq.close()
        result = {"schedule": schedule, "builtin": BUILTIN[schedule], "m": m, "v": v,
                  "ours_s": median(times["ours"]), "builtin_s": median(times["builtin"]),
                  "ours_times": times["ours"], "builtin_times": times["builtin"],
                  "repeat_ratios": repeat_ratios, "stash_ours": stash_ours, "stash_builtin": stash_builtin,
                  "builtin_saved_bytes_after_step": builtin_live_after,
                  "param_abs_diff": param_diff, "grad_rel_diff": grad_diff}
        result["ratio"] = result["ours_s"] / result["builtin_s"]
        if a.breakdown:
            result.update(breakdown=breakdown, seq_breakdown=seq_breakdown)
        if not a.no_refs:
            seq_times = self.broadcast_list(times["seq"])
            result.update(seq_s=median(seq_times), seq_times=seq_times)
        return result

    def all_gather(self, value) -> list:
        """[value of rank 0, value of rank 1] for any picklable value."""
        import torch.distributed as dist

        box = [None] * P
        dist.all_gather_object(box, value)
        return box

    def broadcast_list(self, values: list[float]) -> list[float]:
        """Rank 0's list, on every rank (the workers then agree on every number)."""
        import torch.distributed as dist

        box = [values]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run_overhead(self) -> dict:
        """p = 1, m = 1: our in-process engine against a plain loop, alternating, on rank 0 alone."""
        a = self.args
        times = {"ours": [], "plain": []}
        ratios = []

        def measure():
            ours, plain = self.ours("1f1b", 1, 1, single=True), Plain(self.spec, self.init)
            try:
                for tool in (ours, plain):
                    self.timed(tool, a.warmup + 1, distributed=False, record=False)
                for rep in range(a.repeats):
                    block = {}
                    for name, tool in ((("ours", ours), ("plain", plain)) if rep % 2 == 0
                                       else (("plain", plain), ("ours", ours))):
                        block[name] = self.timed(tool, a.steps, distributed=False)
                        times[name] += block[name]
                    ratios.append(median(block["ours"]) / median(block["plain"]))
            finally:
                ours.close()

        self.single_process(measure)
        box = self.broadcast_list([times, ratios])
        times, ratios = box
        ours_s, plain_s = median(times["ours"]), median(times["plain"])
        return {"ours_s": ours_s, "plain_s": plain_s, "ratio": ours_s / plain_s, "repeat_ratios": ratios,
                "ours_times": times["ours"], "plain_times": times["plain"]}

    def ideal(self, schedule: str, m: int, v: int) -> tuple[float, float]:
        """1 − bubble from the simulator: with unit costs (F = B = W = 1) and with each stage's
        F, B, W proportional to its matrix-multiply FLOPs (stages of unequal size)."""
        from pipeline.schedule import build_schedule
        from pipeline.simulate import simulate

        compute = build_schedule(schedule, P, m, v)
        unit = simulate(compute, P, m, v)
        work = stage_work(self.spec.dims, P * v)

        def cost(action) -> float:
            f, b, w = work[action.stage_index]
            return {"F": f, "B": b, "W": w, "BW": b + w}.get(action.kind, 0.0)

        flops = simulate(compute, P, m, v, costs=cost)
        return (1 - max(unit.bubble.values()),
                sum(flops.busy.values()) / (P * flops.makespan))


class Ours:
    """This project's Engine over the already initialised process group (or in-process for p = 1)."""

    def __init__(self, conf, spec, env, world_size: int):
        from pipeline.distributed import connect
        from pipeline.engine import Engine
        from pipeline.plan import make_plan

        plan = make_plan(conf, spec, world_size, eval_rows=0)
        self._connection = connect(env, plan.num_ranks, conf.pipeline.transport, conf.dist)
        comm = self._connection.__enter__()  # reuses the group: closing it later destroys nothing
        self.engine = Engine(conf, spec, plan, comm)
        self.spans: list[tuple[int, int, int, int]] = []  # (step, start, after train_step, after update) in ns

    def step(self, x, y, step: int) -> None:
        e = self.engine
        start = time.perf_counter_ns()
        e.train_step(x if e.holds_first else None, y if e.holds_last else None, step)
        middle = time.perf_counter_ns()
        e.update()
        self.spans.append((step, start, middle, time.perf_counter_ns()))

    def breakdown(self, steps: set[int]) -> dict[str, float]:
        """Mean ms per step of the given steps, from the runtime's action spans (trace.enabled):
        compute by kind, receives (mostly waiting for the peer), sends, waiting for sends at the end,
        the rest of train_step (Python between actions, zero_grad, splitting), and update()."""
        events = [e for r in self.engine.runtimes.values() for e in (r.events or []) if e.step in steps]
        spans = [s for s in self.spans if s[0] in steps]
        if not spans or not events:
            return {}
        out: dict[str, float] = {}
        for e in events:
            kind = "WAIT_SENDS" if e.name == "WAIT_SENDS" else e.name.strip("0123456789")
            out[kind] = out.get(kind, 0.0) + (e.end_ns - e.start_ns)
        out["other in train_step"] = sum(m - s for _, s, m, _ in spans) - sum(out.values())
        out["update"] = sum(u - m for _, _, m, u in spans)
        out["total"] = sum(u - s for _, s, _, u in spans)
        return {k: v / len(spans) / 1e6 for k, v in out.items()}

    def params(self) -> dict:
        return {layer.index: (layer.weight, layer.bias)
                for stage in self.engine.stages.values() for layer in stage.layers}

    def stash_bytes(self) -> int:
        return max(self.engine.peak_stash_bytes.values())

    def close(self) -> None:
        self._connection.__exit__(None, None, None)


def torch_stage_modules(spec, init: dict, first: int, stop: int):
    """Layers [first, stop) as nn.Sequential (Linear, ReLU, ..., no ReLU after the model's last
    Linear), initialised with our weights."""
    import torch

    from pipeline.model import torch_sequential

    model = torch_sequential(spec)
    with torch.no_grad():
        for i in range(spec.num_layers):
            model[2 * i].weight.copy_(init[i][0])
            model[2 * i].bias.copy_(init[i][1])
    return model[2 * first: 2 * stop]


class Builtin:
    """torch.distributed.pipelining: one PipelineStage per stage, cut like ours (uniform, looped)."""

    def __init__(self, spec, init: dict, schedule: str, m: int, v: int, rank: int, batch: int):
        import torch
        import torch.nn.functional as F
        from torch.distributed import pipelining

        from pipeline.partition import stage_layers, uniform
        from pipeline.schedule import stages_of_rank

        num_stages, mb = P * v, batch // m
        ranges = stage_layers(uniform(spec.num_layers, num_stages))
        self.stages, self.layers = [], []
        for s in stages_of_rank(rank, P, v):
            r = ranges[s]
            submod = torch_stage_modules(spec, init, r.start, r.stop)
            self.stages.append(pipelining.PipelineStage(
                submod, s, num_stages, torch.device("cpu"),
                input_args=torch.empty(mb, spec.dims[r.start], requires_grad=s > 0),
                output_args=torch.empty(mb, spec.dims[r.stop], requires_grad=True)))
            self.layers.append(list(r))
        cls = getattr(pipelining, BUILTIN[schedule])
        # the loss is the micro-batch mean; scale_grads=True divides the gradient by m: the batch mean
        self.schedule = cls(self.stages[0] if cls.__name__ in SINGLE_STAGE else self.stages, m,
                            loss_fn=F.cross_entropy, scale_grads=True)
        self.params_list = [p for st in self.stages for p in st.submod.parameters()]
        self.optimizer = torch.optim.SGD(self.params_list, lr=LR, momentum=0.0)
        self.holds_first = any(st.is_first for st in self.stages)
        self.holds_last = any(st.is_last for st in self.stages)

    def step(self, x, y, step: int) -> None:
        self.optimizer.zero_grad()
        self.schedule.step(*((x,) if self.holds_first else ()), return_outputs=False,
                           **({"target": y} if self.holds_last else {}))
        self.optimizer.step()

    def params(self) -> dict:
        import torch

        out = {}
        for st, indices in zip(self.stages, self.layers):
            linears = [mod for mod in st.submod if isinstance(mod, torch.nn.Linear)]
            out.update({i: (lin.weight, lin.bias) for i, lin in zip(indices, linears)})
        return out

    def measured_step(self, x, y) -> int:
        """One step with every saved-for-backward tensor counted; returns this rank's peak bytes."""
        import torch

        tracker = SavedBytes(self.params_list)
        for st in self.stages:
            self._watch(st, tracker)
        try:
            with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
                self.step(x, y, 0)
        finally:
            for st in self.stages:
                del st.backward_one_chunk, st.backward_weight_one_chunk  # back to the class's methods
        self.live_after_step = tracker.live  # what autograd still held when the step was over (expect 0)
        return tracker.peak

    @staticmethod
    def _watch(stage, tracker: SavedBytes) -> None:
        """Zero-bubble: count what a stage keeps between I (input grad) and W (weight grad):
        the intermediate gradients W consumes, and on stage 0 (whose W runs the whole backward)
        the received output gradient."""
        backward, weight = stage.backward_one_chunk, stage.backward_weight_one_chunk

        def backward_one_chunk(bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
            backward(bwd_chunk_id, loss=loss, full_backward=full_backward, last_backward=last_backward)
            if not full_backward and bwd_chunk_id in stage.backward_state:
                _, groups, _, output_grads = stage.backward_state[bwd_chunk_id]
                held = [g for group in (groups or []) for grads in group.get("grads") or [] for g in grads]
                if stage.is_first:
                    held += list(output_grads or [])
                tracker.hold((stage.stage_index, bwd_chunk_id), held)

        def backward_weight_one_chunk(bwd_chunk_id, last_backward=False):
            weight(bwd_chunk_id, last_backward=last_backward)
            tracker.drop((stage.stage_index, bwd_chunk_id))

        stage.backward_one_chunk = backward_one_chunk
        stage.backward_weight_one_chunk = backward_weight_one_chunk


class Plain:
    """The textbook loop: nn.Sequential, autograd, torch.optim.SGD, the whole batch at once."""

    def __init__(self, spec, init: dict):
        import torch

        self.model = torch_stage_modules(spec, init, 0, spec.num_layers)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=0.0)

    def step(self, x, y, step: int) -> None:
        import torch.nn.functional as F

        self.optimizer.zero_grad()
        F.cross_entropy(self.model(x), y).backward()
        self.optimizer.step()


if __name__ == "__main__":
    raise SystemExit(main())
