"""The chapter's exercise 5, measured: split the graph over several processes, or accumulate smaller micro-batches?

    python benchmarks/split_vs_accumulate.py                    # default model and cap (~2 min on 2 cores)
    python benchmarks/split_vs_accumulate.py --plot docs/exercises/split_vs_accumulate.png --cap-mib 160
    python benchmarks/split_vs_accumulate.py --quick            # a tiny smoke run (tests/test_split_vs_accumulate.py)

A wide MLP (default 1024 -> 12 x 1024 -> 10, ReLU, bias, float32, Adam, batch 256) whose training
memory in one process exceeds --cap-mib is trained with the same B rows per step in these ways:

    pipeline p=P     P processes (gloo, one thread each), stage s on process s, 1F1B over m micro-batches
    accumulate m=M   one process, pipeline.microbatch.accumulate over the same m micro-batches
    whole batch      one process, one micro-batch of B rows: what accumulation improves on

First the gradients: the pipelines and accumulation each take one float64 step from the same
seeded weights on the same batch, every process writes its stages' gradients, and the pipelined
ones must equal the accumulated ones to a relative 1e-12 (max |g_pipe - g_acc| / max |g_acc| over
every parameter); otherwise the study stops with exit code 1.

Then, in float32, every configuration runs --repeats times, each time in fresh processes, the order
of the configurations reversed from one repeat to the next so that drift of this shared machine
hits all of them alike: --warmup untimed steps, then --steps timed ones (train_step + update). A
step's time is between two consecutive completions on every process (each process's clock
readings, max-reduced; the processes of one machine share the clock); the table gives the median,
and each process's CPU time per step (all its threads) beside it.

Memory is measured on each process: VmRSS from /proc/self/status right before the model is built
(after imports, the data, a tiny Adam step that pays the runtime's one-time costs and, for a
pipeline, joining the process group) and VmHWM, the peak resident set, after the warm-up steps,
which are the same steps as the timed ones and include the first, where Adam creates its state.
Their difference is what training added at its peak: parameters, gradients, Adam's two moments,
stashed activations, temporaries, gloo's buffers. VmHWM cannot be reset portably, so every run
gets fresh processes: nothing from an earlier run inflates or hides its peak. The baseline is taken
before the model rather than right before the first step because the parameters are the very thing
a pipeline divides.

The allocator decides how much of this is exact. glibc by default keeps freed blocks for reuse,
and which ones it keeps depends on the order of allocations (threads included), so a peak wanders
by tens of MiB from one fresh run to the next. The workers therefore start with
MALLOC_MMAP_THRESHOLD_ at 1 MiB: every block of 1 MiB or more is its own mapping, gone from the
resident set when the tensor is freed (much as torch.cuda.max_memory_allocated counts allocated,
not reserved, bytes). That
costs a page fault per page of every large allocation (about a quarter more CPU time per step
here), so after the warm-up steps each worker tells glibc (mallopt) to keep and reuse freed
blocks, and the timed steps run at the speed of the default allocator. --malloc-default leaves
glibc's defaults on throughout.

Beside the measured peak, the tensor bytes each process holds: parameters and gradients counted on
the stages' tensors, Adam's state as two moments per parameter, and the stashed activations at
their peak (the runtime's engine.peak_stash_bytes; for accumulation one micro-batch's stash,
counted the same way after its F and after its B).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from pipeline.errors import ConfigError, UserError, exit_with

MIB = 2 ** 20
GRAD_RTOL = 1e-12  # float64: pipelined and accumulated gradients agree to this relative difference
CLASSES, SCHEDULE = 10, "1f1b"
MMAP_THRESHOLD = 2 ** 20  # glibc: every block of 1 MiB or more is its own mapping, returned to the system when freed
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
DEFAULTS = {"width": 1024, "layers": 12, "batch": 256, "microbatches": 8, "stages": "2,4", "cap_mib": 160.0,
            "steps": 3, "warmup": 2, "repeats": 2}
QUICK = {"width": 64, "layers": 4, "batch": 16, "microbatches": 4, "stages": "2", "steps": 2, "warmup": 1,
         "repeats": 1}


# ------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/split_vs_accumulate.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cap-mib", type=float, default=None,
                        help=f"memory cap per process in MiB (default {DEFAULTS['cap_mib']:g})")
    parser.add_argument("--width", type=int, default=None, help="input and hidden width (default 1024)")
    parser.add_argument("--layers", type=int, default=None, help="hidden layers (default 12)")
    parser.add_argument("--batch", type=int, default=None, help="rows per minibatch (default 256)")
    parser.add_argument("--microbatches", type=int, default=None, help="m: micro-batches per minibatch (default 8)")
    parser.add_argument("--stages", default=None, help="comma-separated pipeline sizes p (default 2,4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 3)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first, over which memory is measured (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="fresh runs of every configuration (default 2)")
    parser.add_argument("--plot", type=Path, default=None, help="draw memory per process against step time here (PNG)")
    parser.add_argument("--json", type=Path, default=None, help="save every raw number here")
    parser.add_argument("--timeout", type=float, default=600.0, help="kill a run's processes after this many seconds")
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's dynamic mmap threshold on (freed blocks stay resident; noisier peaks)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, p = 2 and accumulation only, one repeat: a smoke run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a job, as JSON: set in the workers
    args = parser.parse_args(argv)
    for key, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse what cannot run, in one line naming the option and the fix."""
    try:
        args.stages = sorted({int(p) for p in str(args.stages).split(",") if p.strip()})
    except ValueError:
        raise ConfigError(f"--stages {args.stages!r}: give pipeline sizes as integers, e.g. --stages 2,4") from None
    if not args.stages or min(args.stages) < 2:
        raise ConfigError(f"--stages {args.stages}: every pipeline needs at least 2 processes, e.g. --stages 2,4")
    if max(args.stages) > args.layers + 1:
        raise ConfigError(f"--stages {max(args.stages)} exceeds the {args.layers + 1} layers; "
                          f"use at most --stages {args.layers + 1} or more --layers")
    if min(args.width, args.layers, args.batch, args.microbatches, args.steps, args.repeats, args.warmup) < 1:
        raise ConfigError("--width, --layers, --batch, --microbatches, --steps, --repeats and --warmup must be >= 1 "
                          "(memory is measured over the warm-up steps)")
    if args.microbatches > args.batch:
        raise ConfigError(f"--microbatches {args.microbatches} exceeds --batch {args.batch}; "
                          "use at most one micro-batch per row")
    if not args.cap_mib > 0:
        raise ConfigError(f"--cap-mib {args.cap_mib:g}: the cap must be a positive number of MiB, e.g. --cap-mib 160")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot {args.plot}: the plot is a PNG; give a path ending in .png")


def configurations(args: argparse.Namespace) -> list[dict]:
    """What is compared: every pipeline size, accumulation over the same micro-batches, the whole batch."""
    m = args.microbatches
    out = [{"name": f"pipeline p={p}", "kind": "pipeline", "processes": p, "m": m} for p in args.stages]
    out.append({"name": f"accumulate m={m}", "kind": "accumulate", "processes": 1, "m": m})
    if m > 1 and not args.quick:
        out.append({"name": "whole batch", "kind": "accumulate", "processes": 1, "m": 1})
    return out


def overrides(job: dict) -> list[str]:
    """The Hydra overrides of one job: the model, synthetic data (one batch of it is used), Adam, the layout."""
    width, batch = job["width"], job["batch"]
    return ["data=synthetic", f"data.n={2 * batch}", f"data.dim={width}", f"data.classes={CLASSES}",
            "data.test_fraction=0.5", "data.shuffle=false", f"model.in_dim={width}", f"model.out_dim={CLASSES}",
            f"model.hidden=[{','.join([str(width)] * job['layers'])}]", "model.activation=relu",
            "model.bias=true", f"model.dtype={job['dtype']}", "optim=adam", f"train.batch_size={batch}",
            f"pipeline.microbatches={job['m']}", f"pipeline.schedule={SCHEDULE}", "pipeline.partition=uniform",
            "pipeline.transport=p2p", "dist.device=cpu", "dist.backend=gloo",
            f"dist.timeout_s={job['timeout']:g}", f"dist.init_timeout_s={job['timeout']:g}"]


# ------------------------------------------------------------------------------------------------
# orchestrator: fresh processes for every run, the gradient check, alternation, the report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(json.loads(args.worker))
    try:
        check_args(args)
    except UserError as err:
        exit_with(err)
    started = time.perf_counter()
    configs = configurations(args)
    with tempfile.TemporaryDirectory(prefix="split_vs_accumulate_") as tmp:
        check = check_gradients(args, configs, Path(tmp))
        check["wall_s"] = time.perf_counter() - started
        print(check["line"], flush=True)
        if not check["passed"]:
            print("split_vs_accumulate: error: the pipelined gradients differ from the accumulated ones",
                  file=sys.stderr)
            return 1
        runs = measure(args, configs, Path(tmp))
    results = summarise(args, configs, runs)
    results.update(gradient_check=check, wall_s=time.perf_counter() - started, cpus=os.cpu_count(),
                   load_average=os.getloadavg())
    print(report(args, results))
    if args.plot:
        draw(args, results, args.plot)
        print(f"\nplot: {args.plot}")
    if args.json:
        harness.write_json(args.json, results)
    return 0


def job_of(args: argparse.Namespace, config: dict, dtype: str, mode: str, out: Path) -> dict:
    return {"kind": config["kind"], "processes": config["processes"], "m": config["m"], "width": args.width,
            "layers": args.layers, "batch": args.batch, "dtype": dtype, "mode": mode, "steps": args.steps,
            "warmup": args.warmup, "timeout": args.timeout, "out": str(out), "malloc_default": args.malloc_default}


def start(job: dict) -> list[subprocess.Popen]:
    """The job's processes, as torchrun would start them (harness.start_workers)."""
    Path(job["out"]).mkdir(parents=True, exist_ok=True)
    env = {} if job["malloc_default"] else {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    return harness.start_workers([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                                 job["processes"], Path(job["out"]), env=env)


def finish(jobs: list[tuple[dict, list[subprocess.Popen]]], timeout: float) -> list[list[dict]]:
    """Wait for every job's processes; on a failure or the timeout kill them all and stop with their logs.
    Returns each job's per-process results (rank order)."""
    procs = [p for _, ps in jobs for p in ps]
    try:
        harness.wait(procs, timeout, interval=0.1)
        codes = [(job, r, p.poll()) for job, ps in jobs for r, p in enumerate(ps)]
    finally:
        for p in procs:
            harness.kill(p)
    bad = [c for c in codes if c[2] not in (None, 0)] or [c for c in codes if c[2] is None]
    if bad:
        job, rank, code = bad[0]
        print(harness.tail(Path(job["out"]) / f"rank{rank}.log", 20), file=sys.stderr)
        reason = f"timed out after {timeout:g} s (--timeout)" if code is None else f"exit code {code}"
        raise SystemExit(f"split_vs_accumulate: error: {job['kind']} p={job['processes']} m={job['m']} "
                         f"rank {rank}: {reason}; every process of the study was stopped")
    return [[json.loads((Path(job["out"]) / f"rank{r}.json").read_text()) for r in range(job["processes"])]
            for job, _ in jobs]


def check_gradients(args: argparse.Namespace, configs: list[dict], tmp: Path) -> dict:
    """One float64 step of every configuration from the same weights on the same batch, all at once;
    each pipeline's gathered gradients against accumulation over the same micro-batches."""
    compared = [c for c in configs if c["kind"] == "pipeline" or c["m"] == args.microbatches]  # accumulation last
    jobs = [job_of(args, c, "float64", "check", tmp / f"check{i}") for i, c in enumerate(compared)]
    finish([(job, start(job)) for job in jobs], args.timeout)
    grads = [gathered(Path(job["out"]), job["processes"]) for job in jobs]
    diffs = {c["name"]: relative_difference(g, grads[-1]) for c, g in zip(compared[:-1], grads)}
    passed = all(d <= GRAD_RTOL for d in diffs.values()) and bool(diffs)
    line = (f"gradient check (float64, one step, same weights and batch, m={args.microbatches}): "
            + "; ".join(f"{name} vs accumulate: max relative difference {d:.1e}" for name, d in diffs.items())
            + f" -> {'passed' if passed else 'FAILED'} (<= {GRAD_RTOL:g})")
    return {"diffs": diffs, "passed": passed, "rtol": GRAD_RTOL, "line": line}


def relative_difference(grads: dict, reference: dict) -> float:
    """max |g - g_ref| / max |g_ref| over every parameter; inf when the two do not hold the same parameters."""
    if sorted(grads) != sorted(reference) or any(grads[k].shape != reference[k].shape for k in reference):
        return float("inf")
    scale = max(float(g.abs().max()) for g in reference.values())
    return max(float((grads[k] - reference[k]).abs().max()) for k in reference) / scale


def gathered(out: Path, processes: int) -> dict:
    """Every parameter's gradient, from the files of all the job's processes ('layer.name' -> tensor)."""
    import torch

    grads: dict = {}
    for rank in range(processes):
        grads.update(torch.load(out / f"grads{rank}.pt", weights_only=True))
    return grads


def measure(args: argparse.Namespace, configs: list[dict], tmp: Path) -> dict[str, list[list[dict]]]:
    """Every configuration --repeats times in fresh processes, one run at a time, the order reversed
    every other repeat; per configuration, each run's per-process results."""
    runs: dict[str, list[list[dict]]] = {c["name"]: [] for c in configs}
    for rep in range(args.repeats):
        for c in harness.alternating(configs, rep):
            job = job_of(args, c, "float32", "time", tmp / f"run{rep}_{c['name'].replace(' ', '_')}")
            runs[c["name"]] += finish([(job, start(job))], args.timeout)
            last = runs[c["name"]][-1]
            print(f"[split_vs_accumulate] repeat {rep + 1}/{args.repeats} {c['name']:<16} "
                  f"step {1e3 * statistics.median(last[0]['step_s']):8.1f} ms  "
                  f"training MiB {' / '.join(f'{training_mib(p):.0f}' for p in last)}", file=sys.stderr, flush=True)
    return runs


def training_mib(proc: dict) -> float:
    """What training added at its peak: VmHWM after the warm-up steps minus VmRSS before the model."""
    return (proc["hwm_after"] - proc["rss_before"]) / MIB


def summarise(args: argparse.Namespace, configs: list[dict], runs: dict[str, list[list[dict]]]) -> dict:
    rows = []
    for c in configs:
        reps = runs[c["name"]]
        per_process = [max(training_mib(run[r]) for run in reps) for r in range(c["processes"])]  # worst repeat
        tensors = [max(run[r]["tensor_bytes"] for run in reps) / MIB for r in range(c["processes"])]
        parts = {k: [reps[0][r][k] / MIB for r in range(c["processes"])]
                 for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "stash_bytes")}
        steps = [s for run in reps for s in run[0]["step_s"]]
        rows.append({**c, "rows": micro_rows(args.batch, c["m"]), "step_ms": 1e3 * statistics.median(steps),
                     "step_ms_all": [1e3 * s for s in steps],
                     "cpu_ms": [1e3 * statistics.median(run[r]["cpu_s"] for run in reps)
                                for r in range(c["processes"])],
                     "training_mib": per_process, "tensor_mib": tensors,
                     "parts_mib": parts, "hwm_mib": [max(run[r]["hwm_after"] for run in reps) / MIB
                                                     for r in range(c["processes"])],
                     "baseline_mib": [reps[0][r]["rss_before"] / MIB for r in range(c["processes"])],
                     "peak_before_model": any(run[r]["hwm_after"] <= run[r]["hwm_before"]
                                              for run in reps for r in range(c["processes"])),
                     "fits": max(per_process) <= args.cap_mib})
    return {"args": harness.plain(args), "rows": rows,
            "dims": [args.width] * (args.layers + 1) + [CLASSES]}


def micro_rows(batch: int, m: int) -> str:
    low, high = batch // m, -(-batch // m)
    return str(low) if low == high else f"{low}-{high}"


def report(args: argparse.Namespace, res: dict) -> str:
    lines = ["", f"## Split or accumulate: MLP {args.width} -> {args.layers} x {args.width} -> {CLASSES} (ReLU, bias, "
             f"float32), Adam, batch {args.batch}, m={args.microbatches}, {SCHEDULE}; cap {args.cap_mib:g} MiB per "
             f"process; {args.steps} timed steps x {args.repeats} fresh runs each; {res['cpus']} CPU(s)", ""]
    lines += harness.table(
        ["configuration", "processes", "micro-batch rows", "step time ms (median)", "CPU ms per step, each process",
         "peak memory per process MiB (measured)", "tensors per process MiB (params+grads+Adam+stash)",
         "fits the cap?"], "lrrrrrrl",
        ([row["name"], row["processes"], row["rows"], f"{row['step_ms']:.1f}",
          " / ".join(f"{v:.0f}" for v in row["cpu_ms"]), " / ".join(f"{v:.0f}" for v in row["training_mib"]),
          " / ".join(f"{v:.1f}" for v in row["tensor_mib"]),
          f"{'yes' if row['fits'] else 'no'} ({max(row['training_mib']):.0f} {'<=' if row['fits'] else '>'} "
          f"{args.cap_mib:g})"] for row in res["rows"]))
    lines += ["", "CPU ms = the process's CPU time per timed step (all its threads; median of the runs). "
              "Peak memory = VmHWM after the warm-up steps − VmRSS before the model was built, per process (rank "
              "order; the worst of the fresh runs). Each process's absolute VmHWM: "
              + "; ".join(f"{r['name']} {' / '.join(f'{v:.0f}' for v in r['hwm_mib'])} MiB" for r in res["rows"]) + ".",
              "", "Tensor MiB by kind (params / grads / Adam / stashed activations, largest process): "
              + "; ".join(f"{r['name']} " + " / ".join(f"{max(r['parts_mib'][k]):.1f}" for k in
                                                       ("param_bytes", "grad_bytes", "optimizer_bytes", "stash_bytes"))
                          for r in res["rows"]) + "."]
    odd = [r["name"] for r in res["rows"] if r["peak_before_model"]]
    if odd:
        lines.append(f"Warning: in {', '.join(odd)} the peak was reached before the model was built; "
                     "its figure is a lower bound.")
    lines += ["", res["gradient_check"]["line"],
              f"wall time {res['wall_s']:.0f} s (gradient check {res['gradient_check']['wall_s']:.0f} s); "
              f"load average at the end {' '.join(f'{v:.1f}' for v in res['load_average'])}"]
    return "\n".join(lines)


def draw(args: argparse.Namespace, res: dict, path: Path) -> None:
    """Draw `figure_of` to a PNG at `path`."""
    import matplotlib.pyplot as plt

    fig = figure_of(args, res)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_of(args: argparse.Namespace, res: dict):
    """Left: each configuration's largest process, measured memory against step time, and the cap.
    Right: per configuration, the tensors by kind beside the measured peak (largest process)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for row in rows:
        colour = "tab:blue" if row["kind"] == "pipeline" else "tab:orange"
        left.scatter(row["step_ms"], max(row["training_mib"]), s=60, color=colour, zorder=3)
        on_left = row["kind"] == "accumulate" and row["m"] == 1  # keeps it off accumulation's label
        left.annotate(f"{row['name']}\n({row['processes']} proc., {row['rows']} rows)", (row["step_ms"],
                      max(row["training_mib"])), textcoords="offset points", xytext=(-6 if on_left else 6, 4),
                      ha="right" if on_left else "left", fontsize=8)
    left.set(xlabel="step time, ms (median)", ylabel="peak memory per process, MiB (largest process)",
             title="memory per process against step time")
    cap_line(left, args.cap_mib, 1.3 * max(max(r["training_mib"]) for r in rows))
    left.set_xlim(left=0, right=1.35 * max(r["step_ms"] for r in rows))
    if left.get_legend_handles_labels()[0]:
        left.legend(loc="lower right", fontsize=8)
    kinds = (("param_bytes", "parameters"), ("grad_bytes", "gradients"), ("optimizer_bytes", "Adam state"),
             ("stash_bytes", "stashed activations"))
    xs = range(len(rows))
    bottom = [0.0] * len(rows)
    for key, label in kinds:
        heights = [row["parts_mib"][key][max(range(row["processes"]), key=lambda r: row["tensor_mib"][r])]
                   for row in rows]
        right.bar(xs, heights, bottom=bottom, width=0.6, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    right.scatter(xs, [max(r["training_mib"]) for r in rows], marker="_", s=900, color="black", zorder=3,
                  label="measured peak (VmHWM − RSS before the model)")
    right.set_xticks(list(xs), [r["name"] for r in rows], fontsize=8)
    right.set(ylabel="MiB per process (largest process)", title="what a process holds")
    cap_line(right, args.cap_mib, 1.5 * max(max(max(r["training_mib"]), max(r["tensor_mib"])) for r in rows))
    right.legend(fontsize=7, loc="upper left", markerscale=0.3)
    fig.suptitle(f"split or accumulate: {args.width} x {args.layers} MLP, Adam, batch {args.batch}, "
                 f"m={args.microbatches} ({res['cpus']} CPUs, one thread per process)", fontsize=10)
    fig.tight_layout()
    return fig


def cap_line(ax, cap_mib: float, top: float) -> None:
    """Show 0..top MiB; draw the cap as a legend line where it falls inside, else say in a corner
    that it is above the chart (a small model under the default cap: --quick)."""
    ax.set_ylim(0, top)
    if cap_mib <= top:
        ax.axhline(cap_mib, color="tab:red", linestyle="--", label=f"cap {cap_mib:g} MiB")
    else:
        ax.text(0.99, 0.98, f"cap {cap_mib:g} MiB: above the chart", transform=ax.transAxes, ha="right", va="top",
                fontsize=8, color="tab:red")


# ------------------------------------------------------------------------------------------------
# worker: one process of one run


def memory_status() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def warm_runtime(dtype) -> None:
    """Pay the runtime's one-time costs before the baseline: Adam's first step imports torch._dynamo
    (about 75 MiB of resident memory here) and the first matrix product sets up the BLAS; neither
    grows with the model, and every process, pipelined or not, pays them alike."""
    import torch

    w = torch.ones(4, 4, dtype=dtype)
    w.grad = torch.addmm(torch.zeros(4, dtype=dtype), w, w.T).relu()
    torch.optim.Adam([w]).step()


def worker(job: dict) -> int:
    import torch

    from pipeline.config import compose
    from pipeline.training.setup import as_tensors, load_data, model_spec

    torch.set_num_threads(1)
    conf = compose(overrides(job))
    data = load_data(conf)
    spec = model_spec(conf, data)
    x, y = as_tensors(data.x_train[:job["batch"]], data.y_train[:job["batch"]], spec)
    warm_runtime(spec.torch_dtype)
    run = run_pipeline if job["kind"] == "pipeline" else run_accumulate
    result = run(job, conf, spec, x, y)
    rank = int(os.environ.get("RANK", 0))
    (Path(job["out"]) / f"rank{rank}.json").write_text(json.dumps(result))
    return 0


def run_accumulate(job: dict, conf, spec, x, y) -> dict:
    """One process: pipeline.microbatch.accumulate over m micro-batches, then Adam."""
    import torch

    from pipeline.mlp.microbatch import accumulate, split
    from pipeline.mlp.model import build_layers
    from pipeline.mlp.stage import Stage

    rss_before, hwm_before = memory_status()
    stage = Stage(0, 1, build_layers(spec, conf.train.seed, range(spec.num_layers)))
    if job["mode"] == "check":
        accumulate(stage, x, y, job["m"], conf.loss.name, conf.loss.l2)
        save_grads(job, [stage])
        return {}
    o = conf.optim
    optimizer = torch.optim.Adam(stage.parameters(), lr=o.lr, betas=o.betas, eps=o.eps)

    def step() -> None:
        accumulate(stage, x, y, job["m"], conf.loss.name, conf.loss.l2)
        optimizer.step()

    after, times, cpu_s = timed(job, step, distributed=False)
    stash = one_microbatch_stash(stage, split(x, job["m"])[0])
    return measured((rss_before, hwm_before), after, times, cpu_s, [stage], stash)


def one_microbatch_stash(stage, x_mb) -> int:
    """Bytes one micro-batch keeps stashed at its peak: after F (x, h of every layer) or after B (x, dJ/dz);
    the same count as the runtime's, on the same tensors."""
    import torch

    out, stash = stage.forward(x_mb)
    after_f = stage.stash_nbytes(stash)
    stage.backward_input(torch.full_like(out, 1 / out.numel()), stash)
    after_b = stage.stash_nbytes(stash)
    stage.backward_weight(stash)
    stage.zero_grad()
    return max(after_f, after_b)


def run_pipeline(job: dict, conf, spec, x, y) -> dict:
    """One process of a p-process pipeline: the Engine over a gloo process group."""
    import torch.distributed as dist

    from pipeline.planning.planner import make_plan
    from pipeline.runtime.distributed import connect, read_env
    from pipeline.training.engine import Engine

    env = read_env()
    plan = make_plan(conf, spec, env.world_size, eval_rows=0)
    with connect(env, plan.num_ranks, conf.pipeline.transport, conf.dist) as comm:
        rss_before, hwm_before = memory_status()
        engine = Engine(conf, spec, plan, comm)
        first, last = 0 in engine.stages, plan.num_stages - 1 in engine.stages
        x_in, y_in = (x if first else None), (y if last else None)
        if job["mode"] == "check":
            engine.train_step(x_in, y_in, 0)
            save_grads(job, list(engine.stages.values()))
            return {}

        def step() -> None:
            engine.train_step(x_in, y_in)
            engine.update(1)  # the configured lr (optim.schedule=constant)

        dist.barrier()
        after, times, cpu_s = timed(job, step, distributed=True)
        stash = sum(engine.peak_stash_bytes.values())
        return measured((rss_before, hwm_before), after, times, cpu_s, list(engine.stages.values()), stash)


def timed(job: dict, step, distributed: bool) -> tuple[tuple[int, int], list[float], float]:
    """Warm up and read the memory peak, then time: ((VmRSS, VmHWM) after the warm-up steps, the duration
    of each timed step (harness.durations: with `distributed`, between completions on every process),
    this process's CPU seconds per timed step, all its threads)."""
    for _ in range(job["warmup"]):
        step()
    peak = memory_status()
    if not job["malloc_default"]:
        reuse_freed_blocks()
    stamps, cpu = [time.perf_counter()], time.process_time()
    for _ in range(job["steps"]):
        step()
        stamps.append(time.perf_counter())
    cpu = (time.process_time() - cpu) / job["steps"]
    return peak, harness.durations(stamps, distributed), cpu


def reuse_freed_blocks() -> None:
    """From now on glibc keeps freed blocks (up to 32 MiB each) and reuses them, as its default does
    once warmed up, so the timed steps pay no page faults for the tensors they allocate."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, 32 * MIB)
    libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30)


def measured(before: tuple[int, int], after: tuple[int, int], step_s: list[float], cpu_s: float, stages: list,
             stash: int) -> dict:
    """One process's figures: (VmRSS, VmHWM) before the model and after the warm-up steps, step times,
    CPU seconds per step, and the bytes of the tensors it holds, by kind."""
    params = [p for stage in stages for p in stage.parameters()]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    optimizer_bytes = 2 * param_bytes  # Adam: exp_avg and exp_avg_sq, one of each per parameter
    return {"rss_before": before[0], "hwm_before": before[1], "rss_after": after[0], "hwm_after": after[1],
            "step_s": step_s, "cpu_s": cpu_s, "param_bytes": param_bytes, "grad_bytes": grad_bytes,
            "optimizer_bytes": optimizer_bytes, "stash_bytes": stash,
            "tensor_bytes": param_bytes + grad_bytes + optimizer_bytes + stash}


def save_grads(job: dict, stages: list) -> None:
    """This process's gradients, keyed 'layer.name' by global layer index, for the orchestrator's comparison."""
    import torch

    grads = {f"{layer.index}.{name}": p.grad.clone() for stage in stages for layer in stage.layers
             for name, p in layer.named_parameters()}
    torch.save(grads, Path(job["out"]) / f"grads{int(os.environ.get('RANK', 0))}.pt")


if __name__ == "__main__":
    sys.exit(main())
