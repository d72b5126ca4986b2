"""What the benchmarks share: worker processes, timing, the saved-tensor tracker, report tables and JSON.

Each script imports it as `harness`: Python puts a script's own folder first on sys.path, also under
torchrun. The scripts import `pipeline` as an installed package (`pip install -e .`). In an
orchestrator: start_workers, wait, kill, launch (workers that report one JSON result),
torchrun_script (the same under torchrun) and torchrun_train. Inside a worker: worker_main, durations and the collectives. For reports: table, ms, kib, write_json.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
MODEL_OVERRIDES = {  # the two models of benchmarks/README.md, as overrides of python -m pipeline.train
    "default": ["model.hidden=[1024,1024,1024,1024,1024,1024,1024,1024]", "data=synthetic", "data.dim=256",
                "data.classes=10", "data.n=4096", "train.batch_size=256", "optim.lr=0.01"],
    "small": ["model.hidden=[64,64,64,64,64,64,64,64]", "data=synthetic", "data.dim=256", "data.classes=10",
              "train.batch_size=64", "optim.lr=0.01"],
}


# ------------------------------------------------------------------------------------------------
# worker processes, started and bounded in time by the orchestrator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH: a child process imports this checkout."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def worker_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun gives a worker, with one thread and gloo on loopback."""
    return {**project_env(), "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def start_workers(cmd: list[str], processes: int, logdir: Path, env: dict[str, str] | None = None,
                  wrap: Callable[[int], list[str]] | None = None) -> list[subprocess.Popen]:
    """`processes` ranks of cmd on a free port, rank R writing logdir/rankR.log; each in its own
    process group, so that kill() takes its children too. wrap(rank) -> a command prefix (a profiler)."""
    port, procs = free_port(), []
    for rank in range(processes):
        with open(logdir / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([*(wrap(rank) if wrap else []), *cmd], cwd=ROOT,
                                          env={**worker_env(rank, processes, port), **(env or {})},
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float, tick: Callable[[], None] = lambda: None,
         interval: float = 0.2) -> bool:
    """Wait until every process has ended or one has failed (True), or `timeout` seconds have passed
    (False); tick() runs every `interval` seconds meanwhile."""
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc in procs):
        tick()
        if any(proc.poll() not in (None, 0) for proc in procs):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def kill(proc: subprocess.Popen) -> None:
    """End a process we started, and anything it started (its own process group), if still running."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def tail(log: Path, lines: int) -> str:
    """The last `lines` lines of a worker's log."""
    return "\n".join(log.read_text().splitlines()[-lines:])


class Relay:
    """Each call copies the new complete lines of a log that start with `prefix` to stderr."""

    def __init__(self, log: Path, prefix: str):
        self.log, self.prefix, self.offset = log, prefix, 0

    def __call__(self) -> None:
        try:
            with open(self.log) as f:
                f.seek(self.offset)
                text = f.read()
        except FileNotFoundError:
            return
        complete = text[: text.rfind("\n") + 1]
        for line in complete.splitlines():
            if line.startswith(self.prefix):
                print(line, file=sys.stderr, flush=True)
        self.offset += len(complete)


def launch(script: Path, argv: list[str], processes: int, workdir: Path, timeout: float, name: str,
           wrap: Callable[[int], list[str]] | None = None) -> dict:
    """Run `processes` workers of `script` (argv and --worker-result, for worker_main) to completion,
    relaying rank 0's "[name] ..." progress lines; returns rank 0's result. On --timeout or the first
    failure every worker is killed, the end of each log shown, and SystemExit names the reason."""
    result = workdir / "result.json"
    procs = start_workers([sys.executable, str(script.resolve()), *argv, "--worker-result", str(result)],
                          processes, workdir, wrap=wrap)
    relay = Relay(workdir / "rank0.log", f"[{name}]")
    try:
        if not wait(procs, timeout, relay):
            raise SystemExit(abort(procs, workdir, f"{name}: error: timed out after {timeout:g} s (--timeout); "
                                                   "killed every worker"))
        relay()
        failed = next((r for r, proc in enumerate(procs) if proc.poll() not in (None, 0)), None)
        if failed is not None:
            raise SystemExit(abort(procs, workdir, f"{name}: error: worker rank {failed} failed with exit code "
                                                   f"{procs[failed].poll()}"))
    finally:
        for proc in procs:
            kill(proc)
    return json.loads(result.read_text())


def abort(procs: list[subprocess.Popen], workdir: Path, message: str) -> str:
    """Kill every worker still running, show the end of each log; the message for SystemExit."""
    for proc in procs:
        kill(proc)
    for rank, proc in enumerate(procs):
        print(f"--- rank {rank} (exit {proc.poll()}), last lines ---", file=sys.stderr)
        print(tail(workdir / f"rank{rank}.log", 25), file=sys.stderr)
    return message


def torchrun_train(overrides: list[str], ranks: int, run_dir: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node=RANKS -m pipeline.train`, output captured.
    Past `timeout` seconds torchrun is stopped with its workers (stop) and TimeoutExpired raised."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
           "pipeline.train", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stop(torchrun: subprocess.Popen) -> None:
    """End a torchrun we started: SIGTERM, which it passes on to its workers (each in a session of its
    own, out of reach of our kill), and SIGKILL if it is still there 30 s later."""
    torchrun.terminate()
    try:
        torchrun.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        torchrun.kill()
        torchrun.communicate()


def torchrun_script(script: Path, argv: list[str], ranks: int, workdir: Path, timeout: float, name: str) -> dict:
    """`python -m torch.distributed.run --standalone --nproc-per-node=RANKS SCRIPT ARGV --worker-result F`:
    torchrun's own rendezvous and process group, as a user would launch it (one thread per rank and gloo
    on loopback, as in launch); returns rank 0's JSON result. Past `timeout` seconds torchrun is told to
    stop (SIGTERM: it ends its workers), then killed; on a failure SystemExit shows the end of the log."""
    workdir.mkdir(parents=True, exist_ok=True)
    result, log = workdir / "result.json", workdir / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           str(script.resolve()), *argv, "--worker-result", str(result)]
    env = {**os.environ, **{k: v for k, v in worker_env(0, ranks, 0).items()
                           if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLOO_SOCKET_IFNAME", "PYTHONPATH")}}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        print(tail(log, 25), file=sys.stderr)
        raise SystemExit(f"{name}: error: torchrun {' '.join(argv)} timed out after {timeout:g} s (--timeout)") from None
    if code != 0 or not result.exists():
        print(tail(log, 25), file=sys.stderr)
        raise SystemExit(f"{name}: error: torchrun {' '.join(argv)} failed with exit code {code}")
    return json.loads(result.read_text())


def metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


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


# ------------------------------------------------------------------------------------------------
# inside a worker: the process group, clocks and collectives (gloo, CPU tensors)


def worker_main(timeout: float, result: Path, work: Callable[[int], dict]) -> int:
    """One thread, one gloo process group for the whole run; work(rank) on every rank, whose result
    rank 0 writes to `result` (JSON) for launch()."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    try:
        out = work(dist.get_rank())
        # the tools' objects (stages in reference cycles, their Work handles) are freed now, while the
        # group and the interpreter are whole: freed at exit they can abort the process ("terminate
        # called without an active exception": rank 1 of a --quick vs_builtin run, once in CI; solo()
        # in vs_builtin.py frees its tool the same way)
        gc.collect()
        if dist.get_rank() == 0:
            result.write_text(json.dumps(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def durations(stamps: list[float], distributed: bool) -> list[float]:
    """Seconds between consecutive clock readings; with `distributed`, each reading is the latest of
    every rank's (all-reduce MAX; the processes of one machine share time.perf_counter's clock)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(stamps, dtype=torch.float64)
    if distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return (t[1:] - t[:-1]).tolist()


def gather(value: float) -> list[float]:
    """[value of rank 0, value of rank 1, ...]."""
    import torch
    import torch.distributed as dist

    t = torch.zeros(dist.get_world_size(), dtype=torch.float64)
    t[dist.get_rank()] = value
    dist.all_reduce(t)
    return t.tolist()


def max_all(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def all_gather(value) -> list:
    """[value of rank 0, value of rank 1, ...] for any picklable value."""
    import torch.distributed as dist

    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, value)
    return box


def broadcast(value):
    """Rank 0's value, on every rank (the workers then agree on every number)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def alone(fn: Callable[[], None]) -> None:
    """Rank 0 runs fn alone while the other ranks wait (idle) at a barrier."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        fn()
    dist.barrier()


# ------------------------------------------------------------------------------------------------
# timing: medians, alternating orders


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def alternating(items: Sequence, i: int) -> Sequence:
    """`items` in order in even repeats, reversed in odd ones: machine drift hits every item alike."""
    return items if i % 2 == 0 else items[::-1]


def in_rounds(names: Sequence[str], rounds: int, run_one: Callable[[str], dict], describe: Callable[[dict], str],
              prefix: str) -> dict[str, list[dict]]:
    """run_one(name) for every name once per round, the order alternating; per name its results in round
    order. After each run, a progress line on stderr: [prefix] round i/n name: describe(result)."""
    results: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(rounds):
        for name in alternating(names, rep):
            results[name].append(run_one(name))
            print(f"[{prefix}] round {rep + 1}/{rounds} {name}: {describe(results[name][-1])}",
                  file=sys.stderr, flush=True)
    return results


def alternate(tools: dict[str, Callable[[], list[float]]], repeats: int,
              after: Callable[[], None] = lambda: None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time a block of each tool per repeat, the order alternating, after() after each repeat: every
    tool's durations, and for each tool but the last, per repeat its block median over the last tool's."""
    names = list(tools)
    times: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names[:-1]}
    for rep in range(repeats):
        block = {name: tools[name]() for name in alternating(names, rep)}
        for name in names:
            times[name] += block[name]
        for name in ratios:
            ratios[name].append(median(block[name]) / median(block[names[-1]]))
        after()
    return times, ratios


class GcClock:
    """While entered: how many collections of each generation the cyclic garbage collector ran, and
    the seconds they took (gc.callbacks). Entering again goes on counting."""

    def __init__(self):
        self.collections, self.seconds, self._start = [0, 0, 0], [0.0, 0.0, 0.0], None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.collections[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._start
            self._start = None

    def __enter__(self) -> "GcClock":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)
        self._start = None

    def figures(self) -> dict:
        return {"collections": list(self.collections), "seconds": list(self.seconds)}


# ------------------------------------------------------------------------------------------------
# the saved-tensor tracker


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


# ------------------------------------------------------------------------------------------------
# reports: Markdown tables, numbers, JSON


def row(cells: Iterable) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: list[str], align: str, rows: Iterable[Iterable] = ()) -> list[str]:
    """A Markdown table's lines; `align` has a letter per column: l (---) or r (---:)."""
    return [row(header), row("---:" if a == "r" else "---" for a in align), *(row(r) for r in rows)]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}" if math.isfinite(seconds) else "-"


def kib(nbytes: float) -> str:
    return f"{nbytes / 1024:.0f}"


def plain(args) -> dict:
    """An argparse.Namespace as JSON-ready values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def write_json(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1))
