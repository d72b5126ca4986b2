"""This project's pipeline against torch.distributed.pipelining: same MLP, same batches, same steps.

    python benchmarks/vs_builtin.py                      # default model, every schedule, m = 4, 8, 16
    python benchmarks/vs_builtin.py --model small        # 8 hidden layers of 64, batch 64, m = 8
    python benchmarks/vs_builtin.py --model balanced     # default with a 1536-wide input: an even cut, m = 8
    python benchmarks/vs_builtin.py --quick              # a tiny smoke run (seconds)
    python benchmarks/vs_builtin.py --json out.json      # also save every raw number
    python benchmarks/vs_builtin.py --alone 0            # skip the alone runs

Two worker processes (p = 2, gloo, one thread each) start the process group once. For every
schedule and m they build this project's Engine on each of --transports (shm, p2p) and the
built-in's PipelineStages from the same initial weights, check that one step of each gives the
same gradient, warm up, then time `--repeats` blocks of `--steps` steps, the order of the tools
reversing from one repeat to the next. Rank 0 also times, in the same repeats, this project on one
process (T_seq: p = 1, in-process transport, same m and v) while rank 1 waits, idle, at a barrier.
A last section times this project at p = 1, m = 1 against a plain PyTorch loop.

Then, for the configurations of --alone-for (default 1f1b at m = 8), each tool runs alone as a user
would, --alone times in alternation: a torchrun launch per tool, one process group, nothing else in
the process. Ours alone runs twice over: the harness's Engine steps, and `python -m pipeline.train`
itself (its step_time_s); for the second the harness also times ours as pipeline.train steps a
step it logs (its NaN check is an all-reduce over the ranks), so each alone ratio has its harness twin.

A step's time is the time between two consecutive steps completing on every rank (clock shared
by the processes of one machine); each table reports the median over all timed steps.
benchmarks/README.md explains what is counted as stashed bytes on each side.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import kib, median, ms
from pipeline.schedules.registry import SCHEDULES, VIRTUAL

BUILTIN = {  # our schedule -> the torch.distributed.pipelining class it is compared with
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    # With one stage per rank ScheduleInterleavedZeroBubble runs exactly ZB-H1's order (same warm-up,
    # B/W split, W lagging `rank` micro-batches behind B); README.md shows the two orders side by side.
    "zb_h1": "ScheduleInterleavedZeroBubble",
    "zb_v": "ScheduleZBVZeroBubble",  # both on the V: rank r holds stages r and 2p - 1 - r
    "dualpipe_v": "ScheduleDualPipeV",
}
SINGLE_STAGE = {"ScheduleGPipe", "Schedule1F1B"}  # built-in classes that take one stage, not a list
COMPARED = [name for name in SCHEDULES if name in BUILTIN]  # the registry's schedules the built-in has
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
# issue #15: 1f1b, m = 8, ours over shm / the built-in, in the harness and alone, at most
SHM_TARGET = {"small": 0.6, "default": 0.75}
EFFICIENCY_FRACTION = 0.9  # E >= 0.9 (1 - theoretical bubble) at p = 2, m = 8
OVERHEAD_TARGET = 0.10  # p = 1, m = 1: at most 10 % slower than the plain loop
LR, SEED, DATA_SEED, NUM_BATCHES = 0.01, 0, 1234, 4
P = 2  # pipeline ranks = worker processes
TRANSPORTS = ("shm", "p2p")  # our side's pipeline.transport: shared memory, gloo point-to-point
BUILTIN_TOOL = "built-in"  # the name of the built-in's timings, beside "ours shm" and "ours p2p"
TRAIN = " train"  # "shm train": ours as pipeline.train steps (in the harness) or pipeline.train itself (alone)


def stages_per_rank(schedule: str) -> int:
    """v = 2 where both tools run several stages per rank (our schedule has virtual stages and the
    built-in class takes a list of them, or it always runs two: a V), else 1: gpipe and zb_h1 at v = 1."""
    if SCHEDULES[schedule].fixed_stages:
        return SCHEDULES[schedule].fixed_stages
    return 2 if schedule in VIRTUAL and BUILTIN.get(schedule) not in SINGLE_STAGE else 1


# ------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/vs_builtin.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("default", "small", "balanced", "tiny"), default="default")
    parser.add_argument("--schedules", default=",".join(COMPARED), help="comma-separated subset of " + ",".join(COMPARED))
    parser.add_argument("--microbatches", default=None, help="comma-separated m (default: the model's, e.g. 4,8,16)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per repeat and tool (default: 5 for the default model, 20 for small)")
    parser.add_argument("--repeats", type=int, default=6, help="repeats; the order of the tools alternates")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per tool before timing")
    parser.add_argument("--no-refs", action="store_true", help="skip T_seq and the p=1 overhead section")
    parser.add_argument("--breakdown", action="store_true",
                        help="also trace our runtime's actions (trace.enabled) and print where each rank's step time goes")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 2 steps, 2 repeats, 1 warm-up, at most 1 alone round: a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="save the raw numbers here")
    parser.add_argument("--timeout", type=float, default=1500.0, help="kill every worker after this many seconds")
    parser.add_argument("--transports", default=",".join(TRANSPORTS),
                        help="our side's pipeline.transport, comma-separated: shm, p2p (gloo) or both")
    parser.add_argument("--alone", type=int, default=3,
                        help="also run each tool alone under torchrun, alternating, this many times (0: skip)")
    parser.add_argument("--alone-for", default=None,
                        help="SCHEDULE:M,... run alone and timed as pipeline.train steps too, or 'all' "
                             "(default: 1f1b:8 when run, else the first; none with --alone 0)")
    parser.add_argument("--worker-result", type=Path, default=None, help=argparse.SUPPRESS)  # set in workers
    parser.add_argument("--solo", default=None, help=argparse.SUPPRESS)  # under torchrun: this one tool alone
    parser.add_argument("--harness-round", action="store_true", help=argparse.SUPPRESS)  # one of the alone rounds
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.repeats, args.warmup, args.alone = "tiny", 2, 2, 1, min(args.alone, 1)
    args.transports = [t for t in args.transports.split(",") if t]
    if not args.transports or sorted(set(args.transports)) != sorted(args.transports) \
            or set(args.transports) - set(TRANSPORTS):
        parser.error(f"--transports: one or more of {', '.join(TRANSPORTS)}, each once")
    if args.alone < 0:
        parser.error("--alone must be >= 0")
    args.schedules = [s for s in args.schedules.split(",") if s]
    unknown = sorted(set(args.schedules) - set(COMPARED))
    if unknown:
        parser.error(f"unknown schedule(s) {unknown}; choose from {', '.join(COMPARED)}")
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
    args.alone_for = alone_configs(parser, args)
    return args


def alone_configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[list]:
    """The [schedule, m] pairs --alone-for names, each one the invocation runs."""
    run = [[s, m] for s in args.schedules for m in args.microbatches]
    if args.alone_for == "none":
        return []
    if args.alone_for == "all":
        return run
    if args.alone_for is None:
        return [] if args.alone == 0 else [["1f1b", 8]] if ["1f1b", 8] in run else run[:1]
    named = []
    for item in args.alone_for.split(","):
        schedule, _, m = item.partition(":")
        if not m.isdigit() or [schedule, int(m)] not in run:
            parser.error(f"--alone-for {item!r}: expected SCHEDULE:M among this run's --schedules and --microbatches")
        named.append([schedule, int(m)])
    return named


# ------------------------------------------------------------------------------------------------
# orchestrator: start the two workers (harness.launch bounds them in time), print the tables


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.solo is not None:
        return solo(args)
    if args.worker_result is not None:
        return harness.worker_main(args.timeout, args.worker_result, lambda rank: Bench(args, rank).run())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs_builtin_") as workdir:
        results = harness.launch(Path(__file__), argv, P, Path(workdir), args.timeout, "vs_builtin")
        results["alone"] = [] if args.harness_round or args.alone == 0 else \
            [run_alone(args, schedule, m, Path(workdir)) for schedule, m in args.alone_for]
    results["wall_s"] = time.perf_counter() - started
    results["source"] = harness.source_state()
    print(report(results))
    if args.json:
        harness.write_json(args.json, results)
    return 0


def tools(args: argparse.Namespace, trainer: bool) -> list[str]:
    """What is timed: our side on each of --transports (with `trainer`, also as pipeline.train steps),
    then the built-in, the ratios' reference."""
    return [*args.transports, *((t + TRAIN for t in args.transports) if trainer else ()), BUILTIN_TOOL]


def train_overrides(args: argparse.Namespace, schedule: str, m: int, transport: str, steps: int) -> list[str]:
    """`python -m pipeline.train` overrides for Bench.conf's model, data and optimiser; every step logged
    (train.log_every=1: each step's step_time_s, and each step's NaN check), no evaluation."""
    mo = MODELS[args.model]
    return [f"model.in_dim={mo['in_dim']}", f"model.out_dim={mo['classes']}",
            f"model.hidden=[{','.join(map(str, mo['hidden']))}]", "model.activation=relu", "model.bias=true",
            "model.dtype=float32", "data=synthetic", f"data.n={mo['batch']}", f"data.dim={mo['in_dim']}",
            f"data.classes={mo['classes']}", "data.noise=0.0", "data.test_fraction=0.0", "data.shuffle=false",
            "optim=sgd", f"optim.lr={LR}", "optim.momentum=0.0", "loss.l2=0.0", f"train.batch_size={mo['batch']}",
            f"train.seed={SEED}", f"train.steps={steps}", "train.log_every=1", f"train.eval_every={steps}",
            f"pipeline.schedule={schedule}", f"pipeline.microbatches={m}", f"pipeline.virtual_stages={stages_per_rank(schedule)}",
            "pipeline.partition=uniform", f"pipeline.transport={transport}", "dist.backend=gloo", "dist.device=cpu"]


def alone_once(args: argparse.Namespace, schedule: str, m: int, tool: str, workdir: Path) -> dict:
    """One launch of one tool under torchrun: its timed steps' durations, and what it reports about itself."""
    if tool.endswith(TRAIN):  # pipeline.train as a user runs it; its steps after the warm-up
        warm, steps = args.warmup + 1, args.warmup + 1 + args.repeats * args.steps
        overrides = train_overrides(args, schedule, m, tool.removesuffix(TRAIN), steps)
        done = harness.torchrun_train(overrides, P, str(workdir), args.timeout)
        if done.returncode != 0:
            print((done.stdout + done.stderr)[-3000:], file=sys.stderr)
            raise SystemExit(f"vs_builtin: error: torchrun -m pipeline.train {' '.join(overrides)} failed "
                             f"with exit code {done.returncode}")
        rows = [r for r in harness.metrics(workdir) if "step_time_s" in r and r["step"] > warm]
        links = next((ln for ln in done.stdout.splitlines() if ln.startswith("pipeline: messages ")), "?")
        return {"times": [r["step_time_s"] for r in rows], "links": links.removeprefix("pipeline: messages "),
                "threads": "torchrun's", "work": None}
    argv = ["--model", args.model, "--schedules", schedule, "--microbatches", str(m), "--steps", str(args.steps),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--timeout", str(args.timeout), "--solo", tool]
    return harness.torchrun_script(Path(__file__), argv, P, workdir, args.timeout, "vs_builtin")


def harness_round(args: argparse.Namespace, schedule: str, m: int, workdir: Path) -> dict:
    """One launch of the harness for one configuration, every tool of the alone runs in it; each tool's durations."""
    argv = ["--model", args.model, "--schedules", schedule, "--microbatches", str(m), "--steps", str(args.steps),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--timeout", str(args.timeout),
            "--transports", ",".join(args.transports), "--no-refs", "--alone-for", f"{schedule}:{m}", "--harness-round"]
    workdir.mkdir(parents=True)
    (config,) = harness.launch(Path(__file__), argv, P, workdir, args.timeout, "vs_builtin")["configs"]
    return {"times": config["times"], "work": config["work"]}


def run_alone(args: argparse.Namespace, schedule: str, m: int, workdir: Path) -> dict:
    """Each tool alone under torchrun (one launch, one process group, one tool per process), and between
    them the harness with every tool (a launch of its own), alternating (H A B C, C B A H, ...) --alone
    times, so that machine drift reaches both readings alike. Ours runs alone twice over: the harness's
    Engine steps (the same code in a process of its own), and pipeline.train."""
    names = tools(args, trainer=True)
    readings = {how: {"times": {t: [] for t in names}, "run_medians": {t: [] for t in names}, "work": []}
                for how in ("harness", "alone")}
    for rep in range(args.alone):
        for item in harness.alternating(["harness", *names], rep):
            where = workdir / f"alone_{schedule}_{m}_{item.replace(' ', '_')}_{rep}"
            if item == "harness":
                out, tools_out = harness_round(args, schedule, m, where), names
            else:
                out, tools_out = alone_once(args, schedule, m, item, where), [item]
                out["times"] = {item: out["times"]}
            r = readings["harness" if item == "harness" else "alone"]
            r["work"].append({"tool": item, "work": out["work"]})
            for tool in tools_out:
                r["times"][tool] += out["times"][tool]
                r["run_medians"][tool].append(median(out["times"][tool]))
            print(f"[vs_builtin] alone runs {schedule} m={m}, round {rep + 1}/{args.alone}: {item} "
                  + " ".join(f"{t} {ms(r['run_medians'][t][-1])} ms" for t in tools_out)
                  + (f" ({out['links']}, {out['threads']} thread(s))" if item != "harness" else ""),
                  file=sys.stderr, flush=True)
    for r in readings.values():
        r.update(round_ratios(r["times"], r["run_medians"], names))
    return {"schedule": schedule, "m": m, **readings}


def round_ratios(times: dict[str, list[float]], run_medians: dict[str, list[float]], names: list[str]) -> dict:
    """Each tool's median step over every round, and its ratio to the built-in (the last name) taken round by
    round: rounds are launches minutes apart and the machine's speed drifts between them, so a ratio of medians
    pooled over rounds can set a fast round's steps against a slow one's (it read 0.72 where the two rounds
    read 0.78 and 0.79). `ratio` is the median of the rounds' ratios; `pooled_ratio` keeps the other figure."""
    median_s = {t: median(times[t]) for t in names}
    run_ratios = {t: [a / b for a, b in zip(run_medians[t], run_medians[names[-1]])] for t in names[:-1]}
    return {"median_s": median_s, "run_ratios": run_ratios,
            "ratio": {t: median(run_ratios[t]) for t in names[:-1]},
            "pooled_ratio": {t: median_s[t] / median_s[names[-1]] for t in names[:-1]}}


def work_figures(tool) -> dict:
    """A tool's timed steps on this rank: the garbage collector's collections of each generation per 100
    steps and its ms per step; CPU ms per step of the process (every thread) and of the main thread."""
    n = max(tool.timed_steps, 1)
    return {"per_100_steps": [100 * c / n for c in tool.gc.collections],
            "ms_per_step": 1e3 * sum(tool.gc.seconds) / n, "steps": tool.timed_steps,
            "cpu_ms_per_step": 1e3 * tool.cpu_s / n, "main_thread_cpu_ms_per_step": 1e3 * tool.main_cpu_s / n}


def solo(args: argparse.Namespace) -> int:
    """Under torchrun: one tool alone in this process, as a user would run it, in its own process group
    (ours: connect starts it; the built-in: init_process_group). Warm-up, then --repeats blocks of
    --steps steps timed as in the harness; rank 0 writes the durations to --worker-result."""
    import json
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    bench, schedule, m = Bench(args, int(os.environ["RANK"])), args.schedules[0], args.microbatches[0]
    v = stages_per_rank(schedule)
    if args.solo == BUILTIN_TOOL:
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
        tool, links = bench.builtin(schedule, m, v), "gloo"
    else:  # "shm train": as pipeline.train steps (for a look at the difference from pipeline.train itself)
        tool = bench.ours(schedule, m, v, args.solo.removesuffix(TRAIN), trainer=args.solo.endswith(TRAIN))
        links = tool.links
    try:
        for _ in range(args.warmup + 1):
            x, y = bench.next_batch()
            tool.step(x, y, bench.step_no)
        times = [t for _ in range(args.repeats) for t in bench.timed(tool, args.steps)]
        work = harness.all_gather(work_figures(tool))
        if dist.get_rank() == 0:
            args.worker_result.write_text(json.dumps({"times": times, "threads": torch.get_num_threads(),
                                                      "links": links, "work": work}))
    finally:
        if isinstance(tool, Ours):
            tool.close()  # waits for the peer, then ends the group connect started
        else:
            # the stages hold the group: a group freed only at the interpreter's exit aborts it
            # ("terminate called without an active exception", seen on rank 1 in 1 of 10 launches)
            del tool
            gc.collect()
            dist.barrier()  # no rank tears its connections down while a peer still uses them
            dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------------
# report


def stage_work(dims: list[int], num_stages: int) -> list[tuple[int, int, int]]:
    """Per stage of the uniform cut, the multiply-adds per row of its F, B and W: each layer's
    in x out for each, less the first layer's B on stage 0 (the data needs no dJ/dx)."""
    from pipeline.planning.partition import stage_layers, uniform

    work = []
    for s, layers in enumerate(stage_layers(uniform(len(dims) - 1, num_stages))):
        fwd = sum(dims[i] * dims[i + 1] for i in layers)
        work.append((fwd, fwd - (dims[0] * dims[1] if s == 0 else 0), fwd))
    return work


def report(res: dict) -> str:
    a, model = res["args"], res["args"]["model"]
    lines = [f"## vs torch.distributed.pipelining: model={model} {res['model']['dims']} batch={res['model']['batch']} "
             f"float32 relu bias, SGD lr={LR}; p={P} (gloo, 1 thread each); steps={a['steps']} x repeats={a['repeats']}, "
             f"warmup={a['warmup']}; torch {res['torch']}; {res['cpus']} CPU(s)", ""]
    transports = a["transports"]
    lines += harness.table(
        ["schedule", "built-in (stages/rank)", "m", *(f"ours {t} ms" for t in transports), "built-in ms",
         *(f"ours {t}/built-in (per-repeat range)" for t in transports), "T_seq ms", "stash ours r0/r1 KiB",
         "stash built-in r0/r1 KiB", "1-step grad diff"], "llr" + "r" * (2 * len(transports) + 5),
        ([c["schedule"], f"{c['builtin']} ({c['v']})", c["m"], *(ms(c["median_s"][t]) for t in transports),
          ms(c["builtin_s"]), *(ratio_cell(c["ratios"][t], c["repeat_ratios"][t]) for t in transports),
          ms(c.get("seq_s", float("nan"))), " / ".join(kib(b) for b in c["stash_ours"]),
          " / ".join(kib(b) for b in c["stash_builtin"]), f"{c['grad_rel_diff']:.1e}"] for c in res["configs"]))
    param_diff = max(c["param_abs_diff"] for c in res["configs"])
    lines += ["", "ours/built-in = median step time of ours / of the built-in (< 1: ours is faster). "
              "1-step grad diff = max |g_ours − g_builtin| / max |g_builtin| over every parameter after one step from "
              f"the same weights on the same batch (the updated parameters differ by at most {param_diff:.1e})."]
    eff = [c for c in res["configs"] if c["m"] == res["efficiency_m"] and "seq_s" in c]
    if eff:
        lines += ["", f"### Pipeline efficiency E = T_seq / (p · T_pipe), p={P}, m={res['efficiency_m']}", ""]
        lines += harness.table(
            ["schedule", "T_seq ms", "T_pipe ours ms", "E ours", "E built-in", "1 − bubble (unit costs)",
             "target 0.9 (1 − bubble)", "met", "1 − bubble (FLOP-weighted stages)"], "lrrrrrrlr",
            ([c["schedule"], ms(c["seq_s"]), ms(c["ours_s"]), f"{c['E_ours']:.3f}", f"{c['E_builtin']:.3f}",
              f"{c['ideal_unit']:.3f}", f"{EFFICIENCY_FRACTION * c['ideal_unit']:.3f}",
              "yes" if c["E_ours"] >= EFFICIENCY_FRACTION * c["ideal_unit"] else "no", f"{c['ideal_flops']:.3f}"]
             for c in eff))
    ov = res.get("overhead")
    if ov:
        lines += ["", "### p=1, m=1: this project (in-process, 1f1b) vs a plain PyTorch loop (nn.Sequential + autograd "
                  "+ SGD, whole batch), one process, one thread", ""]
        lines += harness.table(["ours ms", "plain ms", "ours/plain", "overhead", "target ≤ 10 %"], "rrrrl", [[
            ms(ov["ours_s"]), ms(ov["plain_s"]),
            f"{ov['ratio']:.3f} (per-repeat {min(ov['repeat_ratios']):.3f}-{max(ov['repeat_ratios']):.3f})",
            f"{100 * (ov['ratio'] - 1):+.1f} %", "met" if ov["ratio"] <= 1 + OVERHEAD_TARGET else "missed"]])
    if any("breakdown" in c for c in res["configs"]):
        lines += ["", breakdown_table(res)]
    if any(t + TRAIN in c["median_s"] for c in res["configs"] for t in a["transports"]):
        lines += ["", logged_table(res)]
    if res.get("alone"):
        lines += ["", alone_table(res)]
    lines += ["", "### Targets", ""] + [f"- {t}" for t in targets(res)]
    lines += ["", f"wall time {res.get('wall_s', float('nan')):.0f} s; source {res.get('source', 'unknown')}"]
    return "\n".join(lines)


def ratio_cell(ratio: float, per_repeat: list[float]) -> str:
    return f"**{ratio:.2f}** ({min(per_repeat):.2f}-{max(per_repeat):.2f})"


def logged_table(res: dict) -> str:
    """In the harness, ours as pipeline.train steps a step it logs against ours' Engine steps: per repeat the
    ratio of the two blocks' medians (timed in the same repeat, so drift cancels); their median and quartiles."""
    import statistics

    rows = []
    for c in res["configs"]:
        for t in res["args"]["transports"]:
            if t + TRAIN in c["median_s"]:
                per = [a / b for a, b in zip(c["repeat_ratios"][t + TRAIN], c["repeat_ratios"][t])]
                quartiles = statistics.quantiles(per, n=4) if len(per) > 1 else per * 3
                rows.append([c["schedule"], c["m"], t, ms(c["median_s"][t]), ms(c["median_s"][t + TRAIN]),
                             f"**{median(per):.2f}** ({quartiles[0]:.2f}-{quartiles[2]:.2f})", len(per)])
    return "\n".join(["### Ours as pipeline.train steps a logged step, against its Engine steps, in the harness", "",
                      *harness.table(["schedule", "m", "our transport", "Engine steps ms", "logged steps ms",
                                      "logged / Engine, median of the per-repeat ratios (quartiles)", "repeats"],
                                     "lrlrrrr", rows)])


def alone_table(res: dict) -> str:
    """Each tool alone (its own torchrun launch) beside the same configuration in the harness: ours as the
    harness steps it, and ours as pipeline.train steps (in the harness) or pipeline.train itself (alone)."""
    a, rows = res["args"], []
    for run in res["alone"]:
        h, alone = run["harness"], run["alone"]
        for name in (n for t in a["transports"] for n in (t, t + TRAIN)):
            rows.append([run["schedule"], run["m"], name.removesuffix(TRAIN),
                         "pipeline.train" if name.endswith(TRAIN) else "Engine steps",
                         ms(h["median_s"][name]), ms(h["median_s"][BUILTIN_TOOL]), ratio_cell(h["ratio"][name], h["run_ratios"][name]),
                         ms(alone["median_s"][name]), ms(alone["median_s"][BUILTIN_TOOL]),
                         ratio_cell(alone["ratio"][name], alone["run_ratios"][name])])
    return "\n".join([
        f"### In the harness and each tool alone: {a['alone']} rounds, each a harness launch (every tool) and a "
        f"torchrun launch per tool alone (one process group, no other tool in the process), in alternating order; "
        f"{a['repeats']} x {a['steps']} timed steps per tool and launch", "",
        *harness.table(["schedule", "m", "our transport", "ours timed as", "harness: ours ms", "harness: built-in ms",
                        "harness: ours/built-in, median of the rounds' (range)", "alone: ours ms", "alone: built-in ms",
                        "alone: ours/built-in, median of the rounds' (range)"], "lrllrrrrrr", rows), "",
        "ms: the median of every timed step of every round. Ratios: each round's median of ours over its median of "
        "the built-in, then the median of those (the machine's speed drifts between rounds; a ratio of medians "
        "pooled over rounds can fall outside every round's ratio: JSON `pooled_ratio`).", "",
        "Engine steps: train_step + update, in the harness and alone (the same code). pipeline.train: alone, "
        "`torchrun -m pipeline.train` itself (train.log_every=1, its step_time_s); in the harness, Engine steps "
        "plus what pipeline.train adds to a step it logs (the NaN check's all-reduce over the ranks, the L2 term, "
        "the loss read)."])


def breakdown_table(res: dict) -> str:
    """Where our step time goes, per rank (ms per step, traced run: tracing itself adds a little)."""
    cols = ["F", "B", "W", "BW", "RECV_F", "RECV_B", "SEND_F", "SEND_B", "WAIT_SENDS", "other in train_step", "update",
            "total"]
    rows = []
    for c in res["configs"]:
        ranks = [(str(r), b) for r, b in enumerate(c.get("breakdown") or [])]
        if c.get("seq_breakdown"):
            ranks.append(("p=1", c["seq_breakdown"]))
        for label, b in ranks:
            if b:
                compute = sum(b.get(k, 0.0) for k in ("F", "B", "W", "BW"))
                rows.append([c["schedule"], c["m"], label, *(f"{b[k]:.1f}" if k in b else "-" for k in cols),
                             f"{compute / b['total']:.0%}"])
    return "\n".join(["### Where our step time goes (ms per step, from the runtime's action spans; --breakdown)", "",
                      *harness.table(["schedule", "m", "rank", *cols, "compute share"], "lrr" + "r" * len(cols) + "r",
                                     rows)])


def shm_targets(res: dict) -> list[str]:
    """Issue #15's: 1f1b at m = 8 over shm against the built-in, in the harness and alone, and how far
    our step is from the limit T_seq / (p (1 − bubble)) (unit costs) where T_seq was measured, and from
    the limit of the cut it runs (FLOP-weighted stages), with the ratio a runtime at that limit would read."""
    model, out = res["args"]["model"], []
    c = next((c for c in res["configs"] if c["schedule"] == "1f1b" and c["m"] == 8 and "shm" in c["median_s"]), None)
    if c is None or model not in SHM_TARGET:
        return out
    limit = SHM_TARGET[model]
    alone = next((r for r in res.get("alone", []) if (r["schedule"], r["m"]) == ("1f1b", 8)), None)
    readings = [("in the harness", c["ratios"]["shm"])]
    if alone is not None:
        readings += [("alone", alone["alone"]["ratio"]["shm"]),
                     ("alone as pipeline.train", alone["alone"]["ratio"]["shm" + TRAIN])]
    out.append(f"issue #15: 1f1b m=8 over shm ≤ {limit}× built-in: "
               + "; ".join(f"{how} {r:.2f} {'met' if r <= limit else 'MISSED'}" for how, r in readings))
    if "seq_s" in c:
        bound = c["seq_s"] / (P * c["ideal_unit"])
        out.append(f"1f1b m=8 over shm against its limit T_seq / (p (1 − bubble)) = {ms(bound)} ms: "
                   f"{ms(c['median_s']['shm'])} ms, {c['median_s']['shm'] / bound:.2f}× the limit")
        cut = _cut_limit_s(c)
        out.append(f"1f1b m=8 on this cut, T_seq / (p (1 − bubble of the FLOP-weighted stages)) = {ms(cut)} ms: "
                   f"{c['median_s']['shm'] / cut:.2f}× it; a runtime that reached it would read "
                   f"{cut / c['median_s']['built-in']:.2f}× the built-in (against the ≤ {limit} target)")
    return out


def _cut_limit_s(c: dict) -> float:
    """The step time of the cut a config runs at its limit: T_seq / (p (1 − bubble of the FLOP-weighted stages))."""
    return c["seq_s"] / (P * c["ideal_flops"])


def _at_the_limit(c: dict) -> str:
    """What a runtime at this config's limit (_cut_limit_s) would read against the built-in ('' where T_seq
    was not measured)."""
    if "seq_s" not in c:
        return ""
    return f" (at this cut's limit: {_cut_limit_s(c) / c['median_s']['built-in']:.2f})"


def targets(res: dict) -> list[str]:
    out, model, configs = [], res["args"]["model"], res["configs"]
    limit = RATIO_TARGET.get(model)
    worst = max(configs, key=lambda c: c["ratio"])
    if limit is None:
        out.append(f"step-time ratio: no target for model={model}; "
                   f"worst {worst['ratio']:.2f} ({worst['schedule']}, m={worst['m']})")
    else:
        missed = [f"{c['schedule']} m={c['m']}: {c['ratio']:.2f}{_at_the_limit(c)}" for c in configs
                  if c["ratio"] > limit]
        out.append(f"ours ({configs[0]['transport']}) ≤ {limit}× built-in step time for every schedule and m: "
                   + ("met" if not missed else f"MISSED ({len(missed)}/{len(configs)}: {'; '.join(missed)})"))
    out += shm_targets(res)
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


def progress(rank: int, text: str) -> None:
    if rank == 0:
        print(f"[vs_builtin] {text}", flush=True)


class Bench:
    """One worker's share: both tools for every configuration, then the references (rank 0)."""

    def __init__(self, args: argparse.Namespace, rank: int):
        import torch

        from pipeline.mlp.model import MLPSpec, build_layers

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

    def ours(self, schedule: str, m: int, v: int, transport: str = "shm", single: bool = False,
             trainer: bool = False) -> "Ours":
        from pipeline.runtime.distributed import Env, read_env

        if single:  # p = 1, every stage in this process, in-process transport
            return Ours(self.conf(schedule, m, v, "inprocess", 1), self.spec, Env(0, 1, 0, 1, None), 1)
        return Ours(self.conf(schedule, m, v, transport, None), self.spec, read_env(), P, trainer)

    def builtin(self, schedule: str, m: int, v: int) -> "Builtin":
        return Builtin(self.spec, self.init, schedule, m, v, self.rank, self.batch)

    # --- measuring --------------------------------------------------------------------------

    def next_batch(self):
        self.step_no += 1
        return self.batches[self.step_no % NUM_BATCHES]

    def timed(self, tool, steps: int, distributed: bool = True, record: bool = True) -> list[float]:
        """Durations of `steps` steps: between consecutive completions on every rank (harness.durations)."""
        import torch.distributed as dist

        if distributed:
            dist.barrier()
        stamps, cpu, main = [time.perf_counter()], time.process_time(), time.thread_time()
        with tool.gc:
            for _ in range(steps):
                x, y = self.next_batch()
                tool.step(x, y, self.step_no)
                stamps.append(time.perf_counter())
                if record:
                    self.timed_steps.add(self.step_no)
        tool.main_cpu_s += time.thread_time() - main  # this thread: the tool's Python, kernels and sends
        tool.cpu_s += time.process_time() - cpu  # every thread: also gloo's I/O loop (receives, notifications)
        tool.timed_steps += steps
        return harness.durations(stamps, distributed)

    def check_step(self, ours: list["Ours"], builtin: "Builtin") -> tuple[float, float]:
        """One step of each from the same weights on the same batch, the worst over our engines:
        (max |θ_ours − θ_builtin| after the update, max |g_ours − g_builtin| / max |g_builtin| of the gradients)."""
        x, y = self.batches[0]
        builtin.step(x, y, 0)
        pb = builtin.params()
        param_diff = grad_diff = grad_max = 0.0
        for engine in ours:
            engine.step(x, y, 0)
            po = engine.params()
            if sorted(po) != sorted(pb):
                raise AssertionError(f"rank {self.rank}: layers {sorted(po)} (ours) vs {sorted(pb)} (built-in)")
            for i in po:
                for a, b in zip(po[i], pb[i]):
                    param_diff = max(param_diff, float((a - b).abs().max()))
                    grad_diff = max(grad_diff, float((a.grad - b.grad).abs().max()))
                    grad_max = max(grad_max, float(b.grad.abs().max()))
        return harness.max_all(param_diff), harness.max_all(grad_diff) / harness.max_all(grad_max)

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> dict:
        import torch

        from pipeline.planning.partition import uniform

        a = self.args
        eff_m = 8 if 8 in a.microbatches else a.microbatches[len(a.microbatches) // 2]
        configs = []
        for schedule in a.schedules:
            for m in a.microbatches:
                configs.append(self.run_config(schedule, m, stages_per_rank(schedule)))
                c = configs[-1]
                progress(self.rank, f"{schedule:<17} m={m:<3} ours {ms(c['ours_s'])} ms  built-in {ms(c['builtin_s'])} ms"
                                    f"  ratio {c['ratio']:.2f}  T_seq {ms(c.get('seq_s', float('nan')))} ms")
        for c in configs:
            ideal_unit, ideal_flops = self.ideal(c["schedule"], c["m"], c["v"])
            c.update(ideal_unit=ideal_unit, ideal_flops=ideal_flops)
            if "seq_s" in c:
                c.update(E_ours=c["seq_s"] / (P * c["ours_s"]), E_builtin=c["seq_s"] / (P * c["builtin_s"]))
        out = {"args": harness.plain(a),
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
        names = tools(a, trainer=[schedule, m] in a.alone_for)[:-1]  # as pipeline.train steps where also run alone
        ours = {name: self.ours(schedule, m, v, name.removesuffix(TRAIN), trainer=name.endswith(TRAIN)) for name in names}
        builtin, seq = self.builtin(schedule, m, v), None
        try:
            param_diff, grad_diff = self.check_step(list(ours.values()), builtin)
            for _ in range(a.warmup):
                x, y = self.next_batch()
                for tool in (*ours.values(), builtin):
                    tool.step(x, y, self.step_no)
            x, y = self.next_batch()
            builtin_stash = builtin.measured_step(x, y)  # untimed: the hooks cost time
            seq_times: list[float] = []  # T_seq: rank 0 alone, after each repeat
            if not a.no_refs:
                def warm_seq():
                    nonlocal seq
                    seq = self.ours(schedule, m, v, single=True)
                    self.timed(seq, a.warmup + 1, distributed=False, record=False)
                harness.alone(warm_seq)
            timed = {name: (lambda tool=tool: self.timed(tool, a.steps))
                     for name, tool in [*ours.items(), (BUILTIN_TOOL, builtin)]}
            times, repeat_ratios = harness.alternate(
                timed, a.repeats, after=(lambda: None) if a.no_refs else
                lambda: harness.alone(lambda: seq_times.extend(self.timed(seq, a.steps, distributed=False))))
            first = ours[a.transports[0]]
            work = harness.all_gather({name: work_figures(tool) for name, tool in [*ours.items(), (BUILTIN_TOOL, builtin)]})
            stash_ours = harness.gather(first.stash_bytes())
            stash_builtin = harness.gather(builtin_stash)
            builtin_live_after = harness.gather(builtin.live_after_step)
            if a.breakdown:
                breakdown = harness.all_gather(first.breakdown(self.timed_steps))
                seq_breakdown = harness.broadcast(seq.breakdown(self.timed_steps) if seq is not None else {})
        finally:
            for tool in ours.values():
                tool.close()
            if seq is not None:
                seq.close()
        medians = {name: median(t) for name, t in times.items()}
        result = {"schedule": schedule, "builtin": BUILTIN[schedule], "m": m, "v": v,
                  "transport": a.transports[0], "ours_s": medians[a.transports[0]], "builtin_s": medians[BUILTIN_TOOL],
                  "median_s": medians, "times": times, "repeat_ratios": repeat_ratios,
                  "ratios": {t: medians[t] / medians[BUILTIN_TOOL] for t in names},
                  "links": {t: tool.links for t, tool in ours.items()}, "work": work,
                  "stash_ours": stash_ours, "stash_builtin": stash_builtin,
                  "builtin_saved_bytes_after_step": builtin_live_after,
                  "param_abs_diff": param_diff, "grad_rel_diff": grad_diff}
        result["ratio"] = result["ours_s"] / result["builtin_s"]
        if a.breakdown:
            result.update(breakdown=breakdown, seq_breakdown=seq_breakdown)
        if not a.no_refs:
            seq_times = harness.broadcast(seq_times)
            result.update(seq_s=median(seq_times), seq_times=seq_times)
        return result

    def run_overhead(self) -> dict:
        """p = 1, m = 1: our in-process engine against a plain loop, alternating, on rank 0 alone."""
        a = self.args
        box: list = []  # [times, ratios], filled on rank 0

        def measure():
            ours, plain = self.ours("1f1b", 1, 1, single=True), Plain(self.spec, self.init)
            try:
                for tool in (ours, plain):
                    self.timed(tool, a.warmup + 1, distributed=False, record=False)
                box.extend(harness.alternate({"ours": lambda: self.timed(ours, a.steps, distributed=False),
                                              "plain": lambda: self.timed(plain, a.steps, distributed=False)},
                                             a.repeats))
            finally:
                ours.close()

        harness.alone(measure)
        times, ratios = harness.broadcast(box)
        ours_s, plain_s = median(times["ours"]), median(times["plain"])
        return {"ours_s": ours_s, "plain_s": plain_s, "ratio": ours_s / plain_s, "repeat_ratios": ratios["ours"],
                "ours_times": times["ours"], "plain_times": times["plain"]}

    def ideal(self, schedule: str, m: int, v: int) -> tuple[float, float]:
        """1 − bubble from the simulator: with unit costs (F = B = W = 1) and with each stage's
        F, B, W proportional to its matrix-multiply FLOPs (stages of unequal size)."""
        from pipeline.schedules.registry import build_schedule
        from pipeline.schedules.simulator import simulate

        compute, placement = build_schedule(schedule, P, m, v)
        unit = simulate(compute, placement, m)
        work = stage_work(self.spec.dims, P * v)

        def cost(action) -> float:
            f, b, w = work[action.stage_index]
            return {"F": f, "B": b, "W": w, "BW": b + w}.get(action.kind, 0.0)

        flops = simulate(compute, placement, m, costs=cost)
        return (1 - max(unit.bubble.values()),
                sum(flops.busy.values()) / (P * flops.makespan))


class Ours:
    """This project's Engine over the already initialised process group (or in-process for p = 1)."""

    def __init__(self, conf, spec, env, world_size: int, trainer: bool = False):
        from pipeline.planning.costs import channel_bytes
        from pipeline.training.trainer import FirstBadLoss
        from pipeline.planning.planner import make_plan
        from pipeline.runtime.distributed import connect
        from pipeline.training.engine import Engine

        plan = make_plan(conf, spec, world_size, eval_rows=0)
        ring_bytes = channel_bytes(spec, list(plan.stage_layers), conf.train.batch_size, plan.num_microbatches)
        self._connection = connect(env, plan.num_ranks, conf.pipeline.transport, conf.dist, ring_bytes)
        comm = self._connection.__enter__()  # in the harness it reuses the group: closing it destroys nothing
        self.links = comm.links  # how the messages travel, in words (what pipeline.train prints first)
        self.engine = Engine(conf, spec, plan, comm)
        self.trainer, self.first_bad = trainer, FirstBadLoss()
        self.gc, self.timed_steps, self.cpu_s, self.main_cpu_s = harness.GcClock(), 0, 0.0, 0.0  # the garbage collector's work in timed steps
        self.spans: list[tuple[int, int, int, int]] = []  # (step, start, after train_step, after update) in ns

    def step(self, x, y, step: int) -> None:
        """train_step and update; as pipeline.train steps (`trainer`), also what it adds to a step it logs
        (train.log_every=1): the loss's NaN watch, the L2 term, the NaN check's sum over the pipeline's
        ranks (a collective: every rank waits for the others) and the loss read on its rank."""
        from pipeline.training.trainer import check_finite

        e = self.engine
        start = time.perf_counter_ns()
        loss = e.train_step(x if e.holds_first else None, y if e.holds_last else None, step)
        middle = time.perf_counter_ns()
        if self.trainer:
            self.first_bad.see(loss, step)
            regulariser = e.local_regulariser()
            pending = e.update(step, measure=True)
            check_finite(e, step, regulariser, self.first_bad, None, pending)
            if e.holds_last:
                e.batch_loss(loss)
        else:
            e.update(step)
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

    from pipeline.mlp.model import torch_sequential

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

        from pipeline.planning.partition import stage_layers, uniform

        num_stages, mb = P * v, batch // m
        ranges = stage_layers(uniform(spec.num_layers, num_stages))
        self.stages, self.layers = [], []
        for s in SCHEDULES[schedule].placement(P, v).stages_of(rank):  # the built-in places stages as ours does
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
        self.gc, self.timed_steps, self.cpu_s, self.main_cpu_s = harness.GcClock(), 0, 0.0, 0.0

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

        tracker = harness.SavedBytes(self.params_list)
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
    def _watch(stage, tracker: harness.SavedBytes) -> None:
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
        self.gc, self.timed_steps, self.cpu_s, self.main_cpu_s = harness.GcClock(), 0, 0.0, 0.0

    def step(self, x, y, step: int) -> None:
        import torch.nn.functional as F

        self.optimizer.zero_grad()
        F.cross_entropy(self.model(x), y).backward()
        self.optimizer.step()


if __name__ == "__main__":
    raise SystemExit(main())
