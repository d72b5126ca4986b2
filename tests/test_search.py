"""pipeline.schedule=search: greedy list schedules built from costs, held against every schedule of the registry."""

import random

import pytest

from pipeline.config import compose
from pipeline.errors import ConfigError
from pipeline.planning import partition, planner
from pipeline.planning.costs import Costs, flop_costs
from pipeline.planning.plan import program_layout
from pipeline.schedules.actions import Action
from pipeline.schedules.lowering import fuse_backward, lower
from pipeline.schedules.placement import looped, v_shape
from pipeline.schedules import search
from pipeline.schedules.search import greedy
from pipeline.schedules.simulator import simulate, validate
from pipeline.training.equivalence import difference, pipelined, problem, reference
from pipeline.training import checkpoint, trainer
from pipeline.training.setup import load_data, model_spec
from pipeline.training.trainer import train

pytestmark = pytest.mark.timeout(300)
UNIT = lambda action: 1.0  # noqa: E731
FREE = lambda producer: 0.0  # noqa: E731
BENCHMARK = ["model.hidden=[1024,1024,1024,1024,1024,1024,1024,1024]", "data=synthetic", "data.dim=256",
             "data.classes=10", "data.n=4096", "train.batch_size=256"]  # benchmarks/harness.py's default model


def _line(schedule, rank: int) -> str:
    return " ".join(str(a) for a in schedule[rank])


def test_greedy_runs_b_first_then_f_then_w_in_the_gaps():
    # p = 2, m = 3, unit costs, room for every micro-batch: rank 1 turns each F around at once; rank 0 keeps
    # forwarding until its first gradient is back, and its Ws fill the waits for the next ones
    schedule = greedy(looped(2), 3, UNIT, FREE, limit=3)
    assert _line(schedule, 0) == "0F0 0F1 0F2 0B0 0W0 0B1 0W1 0B2 0W2"
    assert _line(schedule, 1) == "1F0 1B0 1F1 1B1 1F2 1B2 1W0 1W1 1W2"


@pytest.mark.parametrize("shape", ["looped", "V"])
def test_every_greedy_schedule_is_valid_and_keeps_its_limit(shape):
    for p in (1, 2, 3, 4):
        placement = looped(p) if shape == "looped" else v_shape(p)
        per_rank = placement.num_stages // p
        for m in (1, 2, 3, 5, 8):
            for limit in range(1, m + 1):
                schedule = greedy(placement, m, UNIT, FREE, limit)
                validate(schedule, placement, m)
                validate(fuse_backward(lower(schedule, placement)), placement, m)
                assert max(simulate(schedule, placement, m).peak_stash.values()) <= limit * per_rank


def test_greedy_asks_again_only_the_ranks_an_action_feeds_and_builds_what_asking_every_rank_builds(monkeypatch):
    # the greedy recomputes the choices of the rank that ran and of the rank its output feeds; asking every
    # rank after every action (the plain list scheduler) must build the very same order, under uneven costs
    # and message delays that make the ranks' ready times differ
    rng = random.Random(7)
    cases = []
    for p in (2, 3, 4):
        for placement in (looped(p), looped(p, 2), v_shape(p)):
            for m in (3, 8):
                cost = {(s, k): rng.uniform(0.5, 2.0) for s in range(placement.num_stages) for k in "FBW"}
                delay = rng.uniform(0.0, 0.6)
                for limit in (1, 2, m):
                    cases.append((placement, m, lambda a, c=cost: c[(a.stage_index, a.kind)],
                                  lambda a, d=delay: d, limit))
    built = [greedy(*case) for case in cases]
    every_rank = lambda placement, rank, action: set(range(placement.num_ranks))  # noqa: E731
    monkeypatch.setattr(search, "_touched", every_rank)
    assert [greedy(*case) for case in cases] == built
    assert len({str(b) for b in built}) > len(cases) // 2  # the cases differ: the costs shape the orders


def test_a_bad_limit_is_refused():
    with pytest.raises(ValueError, match="limit must be an integer >= 1"):
        greedy(looped(2), 4, UNIT, FREE, 0)


def _equal_layers(p: int, m: int) -> tuple:
    """A model of eight equal layers, so a stage's cost is its share of the layers under every placement."""
    conf = compose(["data=synthetic", "data.dim=32", "data.classes=32", "model.hidden=[32,32,32,32,32,32,32]",
                    "train.batch_size=64", "pipeline.transport=inprocess", f"pipeline.ranks={p}",
                    f"pipeline.microbatches={m}"])
    spec = model_spec(conf, load_data(conf))

    def unit(stages, rows):  # F = B = W = 1 per layer, messages free
        return Costs({(s, k): float(len(layers)) for s, layers in enumerate(stages) for k in "FBW"}, {})
    return conf, spec, unit


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("m", [4, 8, 16])
def test_under_unit_costs_the_search_is_never_worse_than_the_best_schedule_at_the_same_cap(p, m):
    """search() picks the fastest of what weigh() returns that fits the cap: at every family's own memory as the
    cap it is no slower than that family; with no cap, a greedy schedule alone is as fast as the best family.
    The plans are weighed once and pick() judges each cap (search() is pick over a fresh weighing: checked
    at the tightest cap)."""
    conf, spec, unit = _equal_layers(p, m)
    weighed = planner.weigh(conf, spec, p, m, unit)
    families = [o for plan, o in weighed if not plan.origin]
    for judged in families:
        cap_gib = max(judged.memory) / 2 ** 30
        plan, option = planner.pick(conf, p, m, weighed, cap_gib)
        assert option.step_s <= judged.step_s and max(option.memory) <= max(judged.memory), judged
    tightest = min(max(o.memory) for o in families) / 2 ** 30
    assert planner.search(conf, spec, p, m, unit, tightest) == planner.pick(conf, p, m, weighed, tightest)
    greedy_best = min(o.step_s for plan, o in weighed if plan.origin.startswith("greedy"))
    assert greedy_best <= min(o.step_s for o in families)


def test_on_the_uneven_benchmark_model_the_search_beats_every_family_by_cutting_too():
    """The default benchmark model (256-1024x8-10) at p = 2, m = 8, FLOP-count costs: its seven 1024x1024 layers
    split 4 : 3 over two ranks whatever the cut, so the rank with four is busy the whole step but for the wait for
    its first input. On the configured (uniform) cut the greedy V schedule gets there as DualPipeV does; cutting
    the first stage down to the small input layer shortens that wait, and only the search may re-cut."""
    conf = compose([*BENCHMARK, "pipeline.transport=inprocess", "pipeline.ranks=2", "pipeline.microbatches=8"])
    spec = model_spec(conf, load_data(conf))
    costs = lambda stages, rows: flop_costs(spec, stages, rows)  # noqa: E731
    plan, option = planner.search(conf, spec, 2, 8, costs, None)
    weighed = planner.weigh(conf, spec, 2, 8, costs)
    families = {(p.schedule, p.virtual_stages): o.step_s for p, o in weighed if not p.origin}
    on_the_cut = min(o.step_s for p, o in weighed if p.origin.startswith("greedy") and "cut" not in p.origin)
    assert on_the_cut == pytest.approx(min(families.values()))
    assert all(on_the_cut < families[key] for key in (("zb_v", 2), ("zb_h1", 1), ("zb_h2", 1), ("1f1b", 1)))
    assert option.step_s < min(families.values()) * 0.995  # strictly ahead of DualPipeV, the best family
    assert plan.origin == "greedy V, limit 3, cut [1, 2, 2, 4]" and plan.stage_layers[0] == range(0, 1)
    result = simulate(plan.train_schedule, plan.placement, 8, costs(list(plan.stage_layers), 32))
    assert max(result.busy.values()) / result.makespan > 0.98


def test_a_partition_the_user_lists_is_the_only_cut_the_search_builds_on():
    conf = compose([*BENCHMARK, "pipeline.transport=inprocess", "pipeline.ranks=2", "pipeline.microbatches=8",
                    "pipeline.partition=[2,2,2,3]"])
    spec = model_spec(conf, load_data(conf))
    weighed = planner.weigh(conf, spec, 2, 8, lambda stages, rows: flop_costs(spec, stages, rows))
    assert {tuple(p.stage_layers) for p, _ in weighed if p.virtual_stages == 2} == {
        (range(0, 2), range(2, 4), range(4, 6), range(6, 9))}


def test_rank_balanced_cuts_least_work_on_the_busiest_rank_then_the_lightest_first_stage():
    weights = [0.25] + [1.0] * 7 + [0.01]  # the benchmark model's layers: a small input layer, seven big, a tiny head
    assert partition.rank_balanced(weights, [0, 1, 1, 0]) == [[1, 2, 2, 4], [1, 1, 3, 4]]  # V: rank 1 gets 4 big
    assert partition.rank_balanced(weights, [0, 1]) == [[4, 5], [5, 4]]  # 3.25 : 4.01, then 4.25 : 3.01
    assert partition.rank_balanced([1.0] * 4, [0, 1], keep=3) == [[2, 2], [1, 3], [3, 1]]
    assert partition.rank_balanced([1.0] * 30, list(range(10)) * 2) == []  # C(29, 19) cuts: too many to try


@pytest.mark.parametrize("p", [2, 3])
def test_training_with_the_searched_schedule_is_exact(tmp_path, p):
    conf = problem(schedule="search", ranks=p, microbatches=3)  # batch 10 in 3 uneven micro-batches
    params, summary = pipelined(conf, tmp_path)
    assert summary["schedule"] == "search"
    assert difference(params, reference(conf)) <= 1e-6


def test_training_with_a_schedule_searched_from_measured_costs_is_exact_and_says_what_it_built(tmp_path, capsys):
    conf = problem(schedule="search", ranks=2, microbatches=3, search_costs="measured")
    summary = train(conf, tmp_path)
    assert summary["schedule"] == "search"
    assert difference(checkpoint.load_layers(tmp_path)[1], reference(conf)) <= 1e-6
    said = [line for line in capsys.readouterr().out.splitlines() if "measured costs" in line]
    assert len(said) == 1 and said[0].startswith("pipeline: search from measured costs: "), said


def test_partition_time_makes_the_search_cut_by_measured_times_and_nothing_re_cuts_it(tmp_path, capsys, monkeypatch):
    """A re-cut after the search would keep a schedule built for another cut: under partition=time the search
    builds from measured costs itself, and retime (partition=time's re-cut) never runs."""
    monkeypatch.setattr(trainer, "retime", lambda *args: pytest.fail("re-cut after the search"))
    conf = problem(schedule="search", ranks=2, microbatches=3, partition="time")
    assert train(conf, tmp_path)["schedule"] == "search"
    assert difference(checkpoint.load_layers(tmp_path)[1], reference(conf)) <= 1e-6
    said = [line for line in capsys.readouterr().out.splitlines() if "measured costs" in line]
    assert len(said) == 1, said


def test_search_from_measured_costs_on_every_process_builds_from_their_average(monkeypatch):
    """Each process times the layers; the search builds from the mean (what comm.mean_list returns), so a process
    whose own timings differ still builds the same schedule as its peers."""
    conf = compose([*BENCHMARK, "pipeline.transport=inprocess", "pipeline.ranks=2", "pipeline.microbatches=8",
                    "pipeline.schedule=search", "pipeline.search_costs=measured"])
    spec = model_spec(conf, load_data(conf))
    flat = [1.0] * (3 * spec.num_layers)
    flat[0:3] = [0.25] * 3  # the input layer, a quarter of a big one
    flat[-3:] = [0.01] * 3  # the head
    timed = []
    monkeypatch.setattr(planner, "layer_kind_times", lambda spec, rows, seed: timed.append(rows) or [9.0] * len(flat))
    plan = planner.make_plan(conf, spec, 1, eval_rows=0)
    searched = planner.measured_search(conf, spec, plan, 0, lambda mine: flat, "shm")
    assert timed == [32]  # one micro-batch of the 256-row batch in 8
    assert searched.origin == "greedy V, limit 3, cut [1, 2, 2, 4]"  # FLOP-like costs: as the FLOP search builds


def test_an_unknown_search_cost_is_one_line():
    with pytest.raises(ConfigError, match=r"pipeline.search_costs='guess'"):
        compose(["pipeline.search_costs=guess"])


def test_search_under_a_budget_nothing_meets_is_one_line():
    conf = compose(["pipeline.schedule=search", "pipeline.memory_gib=0.000001", "pipeline.transport=inprocess",
                    "pipeline.ranks=2"])
    with pytest.raises(ConfigError, match=r"pipeline.memory_gib=1e-06: no schedule fits; the smallest needs"):
        planner.make_plan(conf, model_spec(conf, load_data(conf)), 1, eval_rows=10)


def test_search_keeps_b_and_w_apart_and_the_plan_fuses_only_adjacent_pairs():
    schedule = greedy(looped(2), 3, UNIT, FREE, limit=3)  # rank 0: 0B0 0W0 0B1 0W1 0B2 0W2 (the first test)
    assert {a.kind for actions in schedule.values() for a in actions} == {"F", "B", "W"}
    adjacent = sum(a.kind == "B" and b == Action(a.stage_index, "W", a.mb_index)
                   for actions in schedule.values() for a, b in zip(actions, actions[1:]))
    plan = program_layout("search", schedule, looped(2), 3, (range(0, 2), range(2, 4)))
    assert adjacent == 3 == sum(a.kind == "BW" for actions in plan.train_schedule.values() for a in actions)


def test_rank_balanced_ties_cuts_whose_loads_differ_only_by_float_rounding():
    """The benchmark model's FLOP-count seconds: rank 1's load under [1, 2, 2, 4] and under [1, 1, 3, 4] is the same
    four big layers, summed in another order; the tie goes to the next key, the evener stages."""
    conf = compose([*BENCHMARK, "pipeline.transport=inprocess", "pipeline.ranks=2", "pipeline.microbatches=8"])
    spec = model_spec(conf, load_data(conf))
    layer_s = planner._layer_seconds(spec, lambda stages, rows: flop_costs(spec, stages, rows), 32)
    assert partition.rank_balanced(layer_s, [0, 1, 1, 0]) == [[1, 2, 2, 4], [1, 1, 3, 4]]
    assert partition.rank_balanced([w * 1e-3 for w in layer_s], [0, 1, 1, 0]) == [[1, 2, 2, 4], [1, 1, 3, 4]]
