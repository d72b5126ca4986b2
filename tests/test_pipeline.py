"""Pipelined training equals single-device training, in one process (the in-process transport).

Every schedule, p in {1, 2, 3, 4}, m in {1, 3, 4, 8} with a batch of 10 (3, 4, 8 do not divide
it), v in {1, 2} where the schedule has virtual stages: after 4 SGD steps every parameter equals
#2's single-device trainer to 1e-6 relative, in float64.
"""

import re
from dataclasses import replace

import pytest
import torch

from pipeline import config
from pipeline.errors import ConfigError
from pipeline.planning.planner import make_plan
from pipeline.runtime.distributed import connect, read_env
from pipeline.runtime.executor import Runtime, Stuck, execute
from pipeline.schedules.actions import Action
from pipeline.schedules.lowering import lower
from pipeline.schedules.registry import build_schedule
from pipeline.schedules.simulator import simulate
from pipeline.training.engine import Engine
from pipeline.training.equivalence import difference, grid, pipelined, problem, reference
from pipeline.training.setup import load_data, model_spec

pytestmark = pytest.mark.timeout(120)
TOL = 1e-6


@pytest.fixture(scope="module")
def ref():
    return reference(problem())


@pytest.mark.parametrize("case", list(grid()), ids=lambda c: "{schedule}-p{ranks}-m{microbatches}-v{virtual_stages}".format(**c))
def test_every_schedule_equals_single_device_training(case, ref, tmp_path):
    params, _ = pipelined(problem(**case), tmp_path)
    assert difference(params, ref) <= TOL


@pytest.mark.parametrize("schedule", ["1f1b", "zb_h1", "interleaved_1f1b"])
def test_adam_mse_and_no_bias_are_exact_too(schedule, tmp_path):
    base = problem()
    conf = replace(base, optim=replace(base.optim, name="adam", lr=0.01),
                   loss=replace(base.loss, name="mse"), model=replace(base.model, bias=False, activation="gelu"))
    v = 2 if schedule == "interleaved_1f1b" else 1
    piped = replace(conf, pipeline=replace(conf.pipeline, schedule=schedule, ranks=3, microbatches=4, virtual_stages=v))
    params, _ = pipelined(piped, tmp_path)
    assert difference(params, reference(conf)) <= TOL


def test_losses_and_evaluation_agree_with_one_rank(tmp_path):
    _, one = pipelined(problem(ranks=1, microbatches=1), tmp_path / "one")
    _, four = pipelined(problem(schedule="zb_h1", ranks=4, microbatches=3), tmp_path / "four")
    for key in ("loss", "objective", "test_loss", "test_accuracy"):
        assert four[key] == pytest.approx(one[key], rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("schedule,expected", [
    ("gpipe", {"peak_stash": [8, 8, 8, 8], "peak_awaiting_b": [8, 8, 8, 8]}),
    ("1f1b", {"peak_stash": [4, 3, 2, 1], "peak_awaiting_b": [4, 3, 2, 1]}),
    # ZB-H1 defers W: B-pending micro-batches stay at 1F1B's p - rank; W-pending ones at 1F1B's peak, p
    ("zb_h1", {"peak_stash": [4, 4, 4, 4], "peak_awaiting_b": [4, 3, 2, 1]}),
])
def test_measured_peak_stash_at_p4_m8(schedule, expected, tmp_path):
    _, summary = pipelined(problem(schedule=schedule, ranks=4, microbatches=8), tmp_path)
    assert {k: summary[k] for k in expected} == expected
    predicted = simulate(*build_schedule(schedule, 4, 8), 8)
    assert summary["peak_stash"] == [predicted.peak_stash[r] for r in range(4)]


def engine_for(conf):
    data = load_data(conf)
    spec = model_spec(conf, data)
    plan = make_plan(conf, spec, 1, eval_rows=len(data.x_test))
    return data, spec, plan


def test_evaluation_stashes_nothing():
    conf = problem(schedule="gpipe", ranks=2, microbatches=4)
    data, spec, plan = engine_for(conf)
    with connect(read_env(), plan.num_ranks, "inprocess", conf.dist) as comm:
        engine = Engine(conf, spec, plan, comm)
        x, y = torch.as_tensor(data.x_test), torch.as_tensor(data.y_test)
        results = engine.run(plan.eval_schedule, x, y, len(x), plan.eval_microbatches, training=False)
    assert [r.peak_stash for r in results.values()] == [0, 0]
    assert results[1].correct >= 0 and results[1].loss is not None and results[0].loss is None


def test_a_step_that_leaves_a_stash_behind_is_caught():
    conf = problem(schedule="zb_h1", ranks=2, microbatches=2)
    data, spec, plan = engine_for(conf)
    broken = {r: [a for a in acts if a != Action(1, "W", 1)] for r, acts in plan.train_schedule.items()}
    with connect(read_env(), 2, "inprocess", conf.dist) as comm:
        engine = Engine(conf, spec, plan, comm)
        x, y = torch.as_tensor(data.x_train[:10]), torch.as_tensor(data.y_train[:10])
        with pytest.raises(Stuck, match=r"rank 1: step ended with unconsumed state \{'stash': \[\(1, 1\)\]\}"):
            engine.run(broken, x, y, 10, 2, training=True)


def test_a_receive_nobody_sends_is_reported_not_hung():
    conf = problem(schedule="1f1b", ranks=2, microbatches=2)
    data, spec, plan = engine_for(conf)
    broken = {0: [a for a in plan.train_schedule[0] if a != Action(0, "SEND_F", 1)], 1: plan.train_schedule[1]}
    with connect(read_env(), 2, "inprocess", conf.dist) as comm:
        engine = Engine(conf, spec, plan, comm)
        x, y = torch.as_tensor(data.x_train[:10]), torch.as_tensor(data.y_train[:10])
        with pytest.raises(Stuck, match="no rank can progress; waiting: rank 0 at 0RECV_B1, rank 1 at 1RECV_F1"):
            engine.run(broken, x, y, 10, 2, training=True)


@pytest.mark.parametrize("pipeline,message", [
    ({"schedule": "1f1b", "virtual_stages": 2, "ranks": 2},
     "pipeline.virtual_stages=2 but pipeline.schedule=1f1b has no virtual stages"),
    ({"schedule": "interleaved_1f1b", "virtual_stages": 3, "ranks": 3},
     "3 rank(s) x pipeline.virtual_stages=3 gives 9 stages but the model has 8 layers"),
    ({"ranks": 2, "partition": (4, 3)}, "pipeline.partition=[4, 3] must list 2 layer counts"),
])
def test_impossible_layouts_are_refused_before_any_work(pipeline, message):
    conf = problem(**pipeline)
    data = load_data(conf)
    with pytest.raises(ConfigError) as err:
        make_plan(conf, model_spec(conf, data), 1, eval_rows=10)
    assert message in str(err.value)


def test_ranks_must_match_the_world(monkeypatch):
    conf = problem(transport="p2p", ranks=3)
    data = load_data(conf)
    with pytest.raises(ConfigError, match=r"pipeline.ranks=3 x parallel.dp=1 needs 3 processes but the world "
                                          r"size is 2; launch 3 processes \(e.g. --nproc-per-node=3\) or drop "
                                          r"pipeline.ranks"):
        make_plan(conf, model_spec(conf, data), 2, eval_rows=10)
    with pytest.raises(ConfigError, match="pipeline.transport=inprocess runs every rank in one process"):
        make_plan(problem(ranks=2), model_spec(conf, data), 2, eval_rows=10)


@pytest.mark.parametrize("dp, pp, world, p", [(1, None, 4, 4), (2, None, 4, 2), (4, None, 4, 1), (2, 2, 4, 2),
                                              (3, None, 3, 1)])
def test_the_world_is_p_times_d(dp, pp, world, p):
    conf = problem(transport="p2p", ranks=None, dp=dp, pp=pp)
    assert make_plan(conf, model_spec(conf, load_data(conf)), world, eval_rows=10).num_ranks == p


@pytest.mark.parametrize("dp, pp, world, message", [
    (3, None, 4, "the world size 4 is not a multiple of parallel.dp=3; launch a multiple of 3 processes"),
    (2, 3, 4, "parallel.pp=3 x parallel.dp=2 needs 6 processes but the world size is 4"),
])
def test_a_grid_that_does_not_fit_the_world_is_refused(dp, pp, world, message):
    conf = problem(transport="p2p", ranks=None, dp=dp, pp=pp)
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_plan(conf, model_spec(conf, load_data(conf)), world, eval_rows=10)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.dp=2"], "parallel.dp=2 needs one process per rank: use pipeline.transport=p2p"),
    (["parallel.dp=4", "train.batch_size=10", "pipeline.transport=p2p", "pipeline.microbatches=3"],
     "train.batch_size=10 split over parallel.dp=4 replicas leaves 2 rows per replica, fewer than "
     "pipeline.microbatches=3; raise train.batch_size to at least 12"),
    (["parallel.pp=2", "pipeline.ranks=3"], "parallel.pp=2 and pipeline.ranks=3 disagree (both are p)"),
    (["parallel.dp=0"], "parallel.dp=0 must be an integer >= 1"),
    (["parallel.bucket_mib=0"], "parallel.bucket_mib=0 must be a finite number > 0"),
])
def test_bad_parallel_settings_are_refused(overrides, message):
    base = ["pipeline.transport=inprocess"] if "pipeline.transport=p2p" not in overrides else []
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.compose(base + overrides)


def test_lowered_schedules_feed_the_runtime_only_what_it_expects():
    schedule = lower(*build_schedule("interleaved_1f1b", 2, 4, 2))
    kinds = {a.kind for acts in schedule.values() for a in acts}
    assert kinds == {"F", "BW", "SEND_F", "RECV_F", "SEND_B", "RECV_B"}
    assert all(hasattr(Runtime, "_" + kind) for kind in kinds | {"B", "W"})
    assert callable(execute)
