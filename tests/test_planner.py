"""Costs, the simulator with per-stage costs, predicted stash bytes, the planner and pipeline.schedule=auto."""

import pytest
import torch

from pipeline import plan as plan_command
from pipeline.config import compose
from pipeline.errors import ConfigError
from pipeline.mlp.model import MLPSpec
from pipeline.planning import plan as plan_layout, planner
from pipeline.planning.costs import Costs, flop_costs, layer_kind_times
from pipeline.planning.memory import peak_stash_bytes, stash_bytes
from pipeline.planning.partition import stage_layers
from pipeline.planning.plan import retime
from pipeline.schedules.lowering import lower
from pipeline.schedules.registry import SCHEDULES, build_schedule
from pipeline.schedules.simulator import simulate
from pipeline.training.equivalence import difference, pipelined, problem, reference
from pipeline.training.setup import load_data, model_spec

pytestmark = pytest.mark.timeout(120)


def two_stage_costs(latency=0.5):
    compute = {(s, k): 1.0 for s in (0, 1) for k in ("F", "B", "W")}
    return Costs(compute, message_bytes={0: 100, 1: 100}, latency_s=latency, bandwidth=200.0)


@pytest.mark.parametrize("lowered", [False, True])
def test_simulator_charges_each_transfer_its_latency_and_bytes(lowered):
    schedule, placement = build_schedule("gpipe", 2, 1)
    schedule = lower(schedule, placement) if lowered else schedule
    result = simulate(schedule, placement, 1, costs=two_stage_costs())
    # 0F0 [0,1]; +0.5 latency +100/200 s on the wire; 1F0 [2,3]; 1BW0 [3,5]; +1; 0BW0 [6,8]
    assert result.makespan == pytest.approx(8.0)
    assert result.bubble[0] == pytest.approx(1 - 3 / 8) and result.bubble[1] == pytest.approx(1 - 3 / 8)


def test_equal_unit_costs_give_the_textbook_bubbles():
    for name in ("gpipe", "1f1b"):
        for p, m in ((2, 8), (4, 8), (4, 16)):
            r = simulate(*build_schedule(name, p, m), m)
            assert max(r.bubble.values()) == pytest.approx((p - 1) / (m + p - 1))
    zb, ofob = simulate(*build_schedule("zb_h1", 4, 8), 8), simulate(*build_schedule("1f1b", 4, 8), 8)
    assert max(zb.bubble.values()) < 0.41 * max(ofob.bubble.values())


@pytest.mark.parametrize("schedule,p,v", [("gpipe", 2, 1), ("1f1b", 4, 1), ("zb_h1", 4, 1),
                                           ("interleaved_1f1b", 2, 2)])
def test_predicted_stash_bytes_equal_the_runtimes_measurement(schedule, p, v, tmp_path):
    conf = problem(schedule=schedule, ranks=p, microbatches=4, virtual_stages=v)
    _, summary = pipelined(conf, tmp_path)
    spec = model_spec(conf, load_data(conf))
    from pipeline.planning.partition import uniform
    stages = stage_layers(uniform(spec.num_layers, p * v))
    lowered = planner.make_plan(conf, spec, 1, eval_rows=10).train_schedule  # what the runtime ran
    predicted = peak_stash_bytes(lowered, spec, stages, [3, 3, 2, 2])  # a batch of 10 in 4 micro-batches
    assert summary["peak_stash_bytes"] == [predicted[r] for r in range(p)]


def test_planner_ranks_fitting_options_first_and_respects_the_budget():
    conf = problem()
    spec = model_spec(conf, load_data(conf))
    ranked = planner.options(conf, spec, 2, lambda stages, rows: flop_costs(spec, stages, rows), budget_gib=None)
    assert all(o.fits for o in ranked)
    assert [o.step_s for o in ranked] == sorted(o.step_s for o in ranked)
    assert {o.schedule for o in ranked} == {*SCHEDULES, "search"}  # every schedule of the registry, and the search
    tight = sorted(max(o.memory) for o in ranked)[len(ranked) // 2] / 2 ** 30
    limited = planner.options(conf, spec, 2, lambda stages, rows: flop_costs(spec, stages, rows), tight)
    assert any(not o.fits for o in limited)
    assert all(max(o.memory) <= tight * 2 ** 30 for o in limited if o.fits)
    assert limited.index(next(o for o in limited if not o.fits)) == sum(o.fits for o in limited)


def test_auto_trains_with_the_planners_choice_and_stays_exact(tmp_path):
    conf = problem(schedule="auto", ranks=2)
    params, summary = pipelined(conf, tmp_path)
    spec = model_spec(conf, load_data(conf))
    best = planner.choose(conf, spec, 2)
    assert (summary["schedule"], summary["microbatches"]) == (best.schedule, best.microbatches)
    assert difference(params, reference(problem())) <= 1e-6


def test_auto_with_a_budget_nothing_fits_is_a_config_error():
    conf = problem(schedule="auto", ranks=2, memory_gib=1e-9)
    with pytest.raises(ConfigError, match=r"pipeline.memory_gib=1e-09: no schedule fits; the smallest needs"):
        planner.make_plan(conf, model_spec(conf, load_data(conf)), 1, eval_rows=10)


def test_time_partition_cuts_where_measured_times_say(monkeypatch, tmp_path):
    monkeypatch.setattr(plan_layout, "layer_times", lambda spec, rows, seed: [1, 1, 1, 1, 1, 1, 1, 9])
    conf = problem(ranks=2, partition="time")
    spec = model_spec(conf, load_data(conf))
    plan = planner.make_plan(conf, spec, 1, eval_rows=10)
    assert [len(r) for r in plan.stage_layers] == [4, 4]  # uniform until the ranks can agree on times
    assert [len(r) for r in retime(plan, spec, conf, lambda t: t).stage_layers] == [7, 1]
    params, _ = pipelined(conf, tmp_path)  # really measured here; any cut trains the same
    assert difference(params, reference(problem())) <= 1e-6


def test_timing_layers_leaves_torchs_global_rng_where_it_was():
    """partition=time and the measured search time layers after the run seeded torch: the run's draws stay its own."""
    spec = MLPSpec((8, 16, 4), "relu", True, "float32")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    layer_kind_times(spec, 4, repeats=1)
    assert torch.equal(torch.rand(3), expected)


def test_plan_command_prints_the_table_and_a_choice(capsys):
    assert plan_command.main(["--ranks", "2", "--memory-gib", "1", "--top", "5", "train.batch_size=32"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("model 64-128-128-128-10 float32, batch 32, p=2, 1 GiB per rank")
    assert out[1].split() == ["schedule", "m", "v", "step", "(ms)", "bubble", "peak", "MiB/rank", "fits"]
    assert len(out) == 2 + 5 + 1 and out[-1].startswith("choice: pipeline.schedule=")


def test_plan_command_bad_input_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        plan_command.main(["--ranks", "0"])
    assert stop.value.code == 2 and "--ranks must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        plan_command.main(["model.nope=3"])
    assert stop.value.code == 2 and "Could not override 'model.nope'" in capsys.readouterr().err


def test_compose_applies_overrides():
    assert compose(["model=seed", "optim=adam"]).optim.name == "adam"


def test_flop_costs_grow_with_rows_and_width():
    spec = MLPSpec((8, 64, 64, 4), "relu", True, "float32")
    stages = stage_layers([2, 1])
    small, big = flop_costs(spec, stages, 4), flop_costs(spec, stages, 40)
    assert big.compute[(0, "F")] > small.compute[(0, "F")] > small.compute[(1, "F")]
    assert small.message_bytes == {0: 4 * 64 * 4, 1: 4 * 4 * 4}


def test_simulate_command_prints_the_prediction_and_draws_it(tmp_path, capsys):
    from pipeline.simulate import main as simulate_main

    png = tmp_path / "predicted.png"
    assert simulate_main(["--ranks", "2", "--png", str(png), "pipeline.schedule=zb_h1", "pipeline.microbatches=8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("zb_h1: p=2 m=8 v=1, model 64-128-128-128-10 float32, batch 64, costs from FLOP counts")
    assert out[1].startswith("predicted step time") and out[2].split() == ["rank", "bubble", "peak_stash",
                                                                            "peak_stash_bytes"]
    assert [line.split()[0] for line in out[3:5]] == ["0", "1"] and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as stop:
        simulate_main(["--ranks", "0"])
    assert stop.value.code == 2


@pytest.mark.parametrize("activation,before", [("relu", 6 + 8 + 5), ("gelu", 6 + 8 + 8 + 5 + 5)])
def test_stash_bytes_per_micro_batch(activation, before):
    spec = MLPSpec((6, 8, 5, 3), activation, True, "float64")
    assert stash_bytes(spec, range(0, 3), 2) == 2 * 8 * before  # the output layer keeps only its input
    assert stash_bytes(spec, range(0, 2), 1) == 8 * (before - 5 + (5 if activation == "relu" else 0))
    assert stash_bytes(spec, range(0, 3), 1, after_b=True) == 8 * (6 + 8 + 8 + 5 + 5 + 3)  # x and dJ/dz
