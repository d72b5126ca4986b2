"""Pipeline x data parallel: d replicas of a p-rank pipeline train exactly like one device on the global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.mlp.model import build_layers
from pipeline.mlp.stage import Stage
from pipeline.planning.planner import make_plan
from pipeline.runtime.data_parallel import flatten_grads
from pipeline.runtime.distributed import Grid, connect, read_env
from pipeline.training import checkpoint
from pipeline.training.engine import Engine
from pipeline.training.equivalence import PROBLEM, difference, grid, pipelined, problem, reference
from pipeline.training.setup import load_data, model_spec
from tests.conftest import ROOT
from tests.launch import free_port, start, wait

pytestmark = pytest.mark.timeout(300)
TOL = 1e-6


def test_the_grid_puts_each_pipeline_on_consecutive_ranks():
    layout = [(Grid(2, 2, g).replica, Grid(2, 2, g).pipeline_rank) for g in range(4)]
    assert layout == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert Grid(2, 3, 0).pipeline_ranks(2) == [4, 5] and Grid(2, 3, 0).replica_ranks(1) == [1, 3, 5]


def test_a_stage_s_gradients_become_views_of_one_flat_buffer_cut_into_buckets():
    conf = problem()
    spec = model_spec(conf, load_data(conf))
    stage = Stage(0, 1, build_layers(spec, 0, range(3)))
    sizes = [p.numel() for p in stage.parameters()]  # 6x5 + 6, 5x6 + 5, 6x5 + 6 = 107 float64
    buckets = flatten_grads(stage, bucket_bytes=40 * 8)
    assert [b.numel() for b in buckets] == [40, 40, 27] and sum(sizes) == 107
    for bucket in buckets:
        bucket.fill_(1.0)  # writing a bucket writes the gradients themselves
    assert all(bool((p.grad == 1).all()) for p in stage.parameters())
    stage.zero_grad()  # in place: the views survive
    assert all(bool((b == 0).all()) for b in buckets)


def test_a_stage_s_gradients_are_handed_over_right_after_its_last_w():
    # p = 1, v = 2 in one process: stage 1's backward ends before stage 0's, so its sum over the
    # replicas can run while stage 0 still computes
    conf = problem(schedule="interleaved_1f1b", ranks=1, virtual_stages=2, microbatches=4)
    spec = model_spec(conf, load_data(conf))
    plan = make_plan(conf, spec, 1, eval_rows=10)
    with connect(read_env(), 1, "inprocess", conf.dist) as comm:
        engine = Engine(conf, spec, plan, comm)
        runtime, handed = engine.runtimes[0], []
        runtime.on_grads_ready = lambda s: handed.append((s, runtime.result.last_action))
        x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
        engine.train_step(x, y)
    actions = [str(a) for a in plan.train_schedule[0]]
    # each hand-over happens inside the stage's last BW (last_action is still the action before it)
    assert [s for s, _ in handed] == [1, 0]
    assert [actions[actions.index(before) + 1] for _, before in handed] == ["1BW3", "0BW3"]
    assert actions.index("1BW3") < len(actions) - 1  # work remains after stage 1's hand-over


def dp_cases(p, d):
    """Every schedule at this p, with m (and v) such that each replica's 10 // d rows hold m micro-batches."""
    return [{**case, "dp": d} for case in grid(ranks=(p,), microbatches=(1, 3, 4))
            if case["microbatches"] <= 10 // d and case["ranks"] * case["virtual_stages"] <= 8]


@pytest.mark.parametrize("p, d", [(2, 2), (1, 3)])  # 10 rows: 5 + 5, and 4 + 3 + 3
def test_replicated_pipelines_equal_single_device_training_on_the_global_batch(p, d, tmp_path):
    cases = dp_cases(p, d)
    procs = start(p * d, lambda rank: ["tests/workers/rank.py", "train", json.dumps(cases), str(tmp_path)])
    results = wait(procs, timeout=280)
    assert all(code == 0 for code, _ in results), "\n".join(out[-3000:] for _, out in results)
    ref = reference(problem())
    worst = {}
    for i, case in enumerate(cases):
        run = tmp_path / f"case{i}"
        step, params = checkpoint.load_layers(run)
        worst["{schedule} m={microbatches} v={virtual_stages}".format(**case)] = difference(params, ref)
        assert checkpoint.read_meta(run, step)["replicas"] == d
    print(f"p={p} d={d}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    assert max(worst.values()) <= TOL, worst
    # one metrics file, from replica 0's last stage, with the loss of the whole global batch
    rows = [json.loads(line) for line in (tmp_path / "case0" / "metrics.jsonl").read_text().splitlines()]
    single = tmp_path / "single"
    pipelined(problem(**{k: v for k, v in cases[0].items() if k != "dp"}, transport="inprocess"), single)
    expected = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [r["step"] for r in expected if "loss" in r] == [2, 4]
    assert [r["loss"] for r in rows if "loss" in r] == \
        pytest.approx([r["loss"] for r in expected if "loss" in r], rel=1e-12)
    assert [r["test_accuracy"] for r in rows if "test_accuracy" in r] == \
        [r["test_accuracy"] for r in expected if "test_accuracy" in r]


def overrides_of(tree, prefix=""):
    """PROBLEM as command-line overrides (model.hidden=[6,5,...] ...)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from overrides_of(value, f"{prefix}{key}.")
        elif value is not None:
            text = json.dumps(value).replace(" ", "") if isinstance(value, list) else str(value).lower() \
                if isinstance(value, bool) else str(value)
            yield f"{prefix}{key}={text}"


def problem_overrides(**pipeline):
    """The equivalence problem as overrides of `python -m pipeline.train` (its data group chosen by name)."""
    tree = {**PROBLEM, "pipeline": {**PROBLEM["pipeline"], "transport": "p2p", "ranks": None, **pipeline}}
    return ["data=synthetic" if o == "data.name=synthetic" else o for o in overrides_of(tree)]


@pytest.mark.parametrize("nproc_per_node, dp", [(1, 1), (2, 2)])  # p = 2 x d = 1, p = 2 x d = 2
def test_two_torchrun_nodes_on_loopback_train_like_one_device(nproc_per_node, dp, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "NNODES": "2", "NPROC_PER_NODE": str(nproc_per_node),
           "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "RDZV_ID": f"loopback{dp}", "GLOO_SOCKET_IFNAME": "lo",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    args = ["bash", "launch/multi_node.sh", *problem_overrides(schedule="zb_h1", microbatches=4),
            f"parallel.dp={dp}", "dist.init_timeout_s=120", f"hydra.run.dir={run}"]
    nodes = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    results = wait(nodes, timeout=240)
    assert all(code == 0 for code, _ in results), "\n".join(out[-3000:] for _, out in results)
    summary = [line for _, out in results for line in out.splitlines() if line.startswith("pipeline: done")]
    assert len(summary) == 1 and "ranks=2 schedule=zb_h1 microbatches=4" in summary[0]
    assert ("replicas=2" in summary[0]) == (dp == 2)
    diff = difference(checkpoint.load_layers(run)[1], reference(problem()))
    print(f"{summary[0]}\nrelative difference from one device: {diff:.2e}")
    assert diff <= TOL
