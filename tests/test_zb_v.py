"""ZB-V (pipeline.schedule=zb_v): its grid, validity, bubble and stash against 1F1B and torch's order, exact
training, resharding between the V and looped placements, and the V in the memory model, graph and timeline."""

from __future__ import annotations

import contextlib
import io
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import config
from pipeline.errors import ConfigError
from pipeline.graph import graph_for, main as graph_main
from pipeline.planning.graph import build_graph, stage_plan
from pipeline.planning.memory import state_bytes
from pipeline.planning.planner import make_plan
from pipeline.runtime.trace import _rank_label, _rank_stages, _shade, draw_timeline, load_ranks, measured_spans
from pipeline.schedule import main as schedule_main
from pipeline.schedules.actions import Action, format_grid
from pipeline.schedules.lowering import fuse_backward, lower
from pipeline.schedules.placement import v_shape
from pipeline.schedules.registry import build_schedule
from pipeline.schedules.simulator import check_in_order, simulate, validate
from pipeline.schedules.zb_v import zb_v
from pipeline.training import checkpoint
from pipeline.training.equivalence import difference, pipelined, problem, reference
from pipeline.training.footprint import calculate, measure
from pipeline.training.setup import load_data, model_spec
from pipeline.training.trainer import train
from tests.conftest import make_cfg

pytestmark = pytest.mark.timeout(120)

ZB_V_2_4 = """\
step  rank 0  rank 1
   0  0F0     1F0
   1  0F1     2F0
   2  0F2     1F1
   3  3F0     2F1
   4  3B0     2B0
   5  3W0     1B0
   6  3F1     1W0
   7  0B0     1F2
   8  3B1     2B1
   9  0W0     1B1
  10  0F3     2W0
  11  0B1     2F2
  12  0W1     1W1
  13  3F2     1F3
  14  3B2     2B2
  15  3W1     1B2
  16  3W2     2W1
  17  0B2     2F3
  18  0W2     1W2
  19  3F3     2W2
  20  3B3     2B3
  21  3W3     1B3
  22  0B3     1W3
  23  0W3     2W3"""


def test_grid_literal_p2_m4():
    program = build_schedule("zb_v", 2, 4)
    assert program.placement == v_shape(2) and program.placement.ranks == (0, 1, 1, 0)
    assert format_grid(program.actions) == ZB_V_2_4


def test_virtual_stages_may_be_2_or_left_at_its_default():
    assert build_schedule("zb_v", 3, 5, 2) == build_schedule("zb_v", 3, 5) == (zb_v(3, 5), v_shape(3))


@pytest.mark.parametrize("num_ranks", range(1, 9))
def test_every_p_and_m_validates_lowered_and_fused(num_ranks):
    for m in range(1, 17):
        actions, placement = build_schedule("zb_v", num_ranks, m)
        assert sorted(placement.stages_of(0)) == [0, 2 * num_ranks - 1]
        validate(actions, placement, m)
        lowered = fuse_backward(lower(actions, placement))
        validate(lowered, placement, m)
        check_in_order(lowered, placement)  # NCCL: each link's messages are read in the order they are sent
        kinds = {a.kind for acts in actions.values() for a in acts}
        assert kinds == {"F", "B", "W"}  # B and W split, as the paper's ZB-V


def test_a_link_carrying_forwards_and_backwards_is_read_in_send_order():
    # rank 0 sends 0F2's output before 3B0's gradient; rank 1 computes 2B0 before 1F2, so it takes 1F2's input first
    lowered = lower(*build_schedule("zb_v", 2, 4))
    rank_1 = [str(a) for a in lowered[1]]
    assert rank_1[7:11] == ["2SEND_F1", "1RECV_F2", "2RECV_B0", "2B0"]
    assert rank_1.index("1RECV_F2") < rank_1.index("1F2") - 5
    # a looped schedule is in order already and keeps each RECV right before its compute
    assert [str(a) for a in lower(*build_schedule("1f1b", 2, 2))[1]] == [
        "1RECV_F0", "1F0", "1BW0", "1SEND_B0", "1RECV_F1", "1F1", "1BW1", "1SEND_B1"]


def test_one_rank_holds_both_stages():
    actions, placement = build_schedule("zb_v", 1, 2)
    assert placement.ranks == (0, 0)
    assert lower(actions, placement) == actions  # nothing to send
    assert simulate(actions, placement, 2).bubble == {0: 0.0}


# The stash rule: a (stage, micro-batch) pair counts from its F to its W. A V stage holds half a rank's layers,
# so on a rank with 2 stages a pair is 1/2 of a rank's activation of one micro-batch; under 1F1B (one stage per
# rank) a pair is a whole one. ZB-V must hold no more on any rank than 1F1B does at its peak (rank 0: min(p, m)).
def whole_rank_activations(peak_pairs: int, stages_per_rank: int) -> float:
    return peak_pairs / stages_per_rank


@pytest.mark.parametrize("num_ranks", range(1, 9))
def test_stash_is_never_above_1f1bs_peak(num_ranks):
    for m in range(1, 17):
        ours = simulate(*build_schedule("zb_v", num_ranks, m), m).peak_stash
        one_f_one_b = simulate(*build_schedule("1f1b", num_ranks, m), m).peak_stash
        peak = max(whole_rank_activations(pairs, 1) for pairs in one_f_one_b.values())
        assert peak == min(num_ranks, m)
        assert all(whole_rank_activations(pairs, 2) <= peak for pairs in ours.values()), (num_ranks, m, ours)
        assert set(ours.values()) == {2 * peak}  # in fact every rank holds exactly 1F1B's peak


@pytest.mark.parametrize("num_ranks", range(1, 9))
def test_the_bubble_is_the_floor_once_m_reaches_2p_minus_1(num_ranks):
    # rank p-1 cannot start before its first input has come down the V, p-1 units; after that it never waits
    for m in range(2 * num_ranks - 1, 2 * num_ranks + 4):
        result = simulate(*build_schedule("zb_v", num_ranks, m), m)
        assert result.makespan == 6 * m + num_ranks - 1
        assert max(result.bubble.values()) == pytest.approx((num_ranks - 1) / (6 * m + num_ranks - 1))


def test_targets_at_p4_m8():
    ours = simulate(*build_schedule("zb_v", 4, 8), 8)
    one_f_one_b = simulate(*build_schedule("1f1b", 4, 8), 8)
    assert ours.makespan == 51 and all(busy == 48 for busy in ours.busy.values())
    assert max(ours.bubble.values()) <= 0.06  # 3/51 = 5.9%: rank 3 waits 3 units for its first input, no more
    assert ours.peak_stash == {0: 8, 1: 8, 2: 8, 3: 8}  # pairs: 4 whole-rank activations on every rank
    assert one_f_one_b.peak_stash == {0: 4, 1: 3, 2: 2, 3: 1}
    assert max(one_f_one_b.bubble.values()) == pytest.approx(9 / 33)


def torch_zbv_order(num_ranks: int, num_microbatches: int) -> dict[int, list[Action]]:
    """torch's ScheduleZBVZeroBubble order, without stages or a process group: its per-rank order function is
    called on a stand-in holding the three attributes it reads; its I (input gradient) is our B."""
    from torch.distributed.pipelining.schedules import ScheduleZBVZeroBubble

    stand_in = SimpleNamespace(pp_group_size=num_ranks, _n_microbatches=num_microbatches, num_stages=2 * num_ranks)
    kinds = {"FORWARD": "F", "BACKWARD_INPUT": "B", "BACKWARD_WEIGHT": "W"}
    return {rank: [Action(a.stage_index, kinds[a.computation_type.name], a.microbatch_index)
                   for a in ScheduleZBVZeroBubble._calculate_single_rank_operations(stand_in, rank) if a is not None]
            for rank in range(num_ranks)}


def test_no_worse_than_torchs_zbv_order_at_p4_m8():
    theirs = simulate(torch_zbv_order(4, 8), v_shape(4), 8)  # our simulator, unit costs, free messages
    ours = simulate(*build_schedule("zb_v", 4, 8), 8)
    assert theirs.makespan == 51
    assert ours.makespan <= theirs.makespan
    assert max(ours.bubble.values()) <= max(theirs.bubble.values())
    assert all(ours.peak_stash[r] <= theirs.peak_stash[r] for r in range(4))


def test_fewer_micro_batches_than_the_v_needs_still_run_tight():
    # torch pads m up to 2p - 1 and drops the padding; this order packs what is there (p = 4, m = 3)
    ours = simulate(*build_schedule("zb_v", 4, 3), 3).makespan
    assert ours < simulate(torch_zbv_order(4, 3), v_shape(4), 3).makespan


def test_virtual_stages_3_is_refused_in_one_line():
    with pytest.raises(ValueError) as caught:
        build_schedule("zb_v", 2, 4, 3)
    assert str(caught.value) == ("zb_v: always runs 2 stages per rank, so virtual_stages must be 2 or left at 1; "
                                 "got 3")
    with pytest.raises(ValueError, match=r"^zb_v: runs exactly 2 stages per rank \(a V\), so virtual_stages must "
                                         r"be 2, got 3$"):
        zb_v(2, 4, 3)


def test_virtual_stages_3_is_refused_by_the_config_and_plan():
    conf = make_cfg("pipeline.schedule=zb_v", "pipeline.virtual_stages=3", "pipeline.transport=inprocess",
                    "pipeline.ranks=2")
    parsed = config.parse(conf)
    with pytest.raises(ConfigError) as caught:
        make_plan(parsed, model_spec(parsed, load_data(parsed)), 1, eval_rows=10)
    assert str(caught.value) == ("pipeline.virtual_stages=3: zb_v: always runs 2 stages per rank, so "
                                 "virtual_stages must be 2 or left at 1; got 3")


# --- training ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref():
    return reference(problem())


@pytest.mark.parametrize("num_ranks", [2, 3, 4])
def test_training_equals_single_device_with_uneven_micro_batches(num_ranks, ref, tmp_path):
    conf = problem(schedule="zb_v", ranks=num_ranks, microbatches=3)  # a batch of 10 in 4 + 3 + 3 rows
    assert conf.train.batch_size == 10
    params, summary = pipelined(conf, tmp_path)
    assert difference(params, ref) <= 1e-6
    assert summary["virtual_stages"] == 2 and summary["ranks"] == num_ranks


SMALL = ("data=synthetic", "data.n=120", "data.dim=5", "data.classes=3", "model.hidden=[6,5,6,5,6,5,6]",
         "model.activation=tanh", "model.dtype=float64", "loss.l2=0.05", "train.batch_size=10",
         "pipeline.microbatches=4", "train.log_every=2", "train.eval_every=100", "optim=sgd", "optim.lr=0.2",
         "optim.momentum=0.5", "pipeline.transport=inprocess")


def train_quietly(run_dir: Path, *overrides: str) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return train(make_cfg(*SMALL, *overrides), run_dir)


def largest_change(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[i][k] - b[i][k]).abs().max()) for i in b for k in b[i])


def test_a_zb_v_checkpoint_resumes_as_1f1b_on_4_ranks_bit_for_bit(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train_quietly(whole, "pipeline.schedule=1f1b", "pipeline.ranks=4", "train.steps=6")
    train_quietly(parts, "pipeline.schedule=zb_v", "pipeline.ranks=2", "train.steps=3")
    assert checkpoint.read_meta(parts, 3)["virtual_stages"] == 2
    summary = train_quietly(parts, "pipeline.schedule=1f1b", "pipeline.ranks=4", "train.steps=6")
    assert summary["resumed_from"] == 3 and summary["ranks"] == 4
    assert largest_change(checkpoint.load_layers(parts)[1], checkpoint.load_layers(whole)[1]) == 0.0


def test_a_looped_checkpoint_resumes_as_zb_v_bit_for_bit(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train_quietly(whole, "pipeline.schedule=zb_v", "pipeline.ranks=2", "train.steps=6")
    train_quietly(parts, "pipeline.schedule=interleaved_1f1b", "pipeline.ranks=2", "pipeline.virtual_stages=2",
                  "train.steps=3")
    summary = train_quietly(parts, "pipeline.schedule=zb_v", "pipeline.ranks=2", "train.steps=6")
    assert summary["resumed_from"] == 3
    assert largest_change(checkpoint.load_layers(parts)[1], checkpoint.load_layers(whole)[1]) == 0.0


# --- the V in the memory model, the graph and the timeline -------------------------------------------------

def test_the_memory_model_counts_the_first_and_last_stage_on_rank_0():
    conf = problem(schedule="zb_v", microbatches=4)
    spec = model_spec(conf, load_data(conf))
    plan = stage_plan(conf, spec, 2)
    assert plan.stages_of(0) == [0, 3] and plan.layers_of(0) == [0, 1, 6, 7]
    element = torch.empty((), dtype=spec.torch_dtype).element_size()
    params, _, _ = state_bytes(conf, plan, spec, 0)
    assert params == element * sum(spec.layer_params(i) for i in (0, 1, 6, 7))
    calc, measured = calculate(conf, 2), measure(conf, 2)
    assert [m.params for m in calc.ranks] == measured["param_bytes"]
    assert [m.stash for m in calc.ranks] == measured["peak_stash_bytes"]


def test_the_graph_names_rank_0_for_the_first_and_the_last_stage(tmp_path):
    conf = problem(schedule="zb_v")
    spec = model_spec(conf, load_data(conf))
    plan = stage_plan(conf, spec, 2)
    regions = build_graph(spec.num_layers, spec.bias, plan.stage_layers, plan.placement).stages
    assert [r.rank for r in regions] == [0, 1, 1, 0]
    assert regions[0].label == "stage 0 / rank 0" and regions[-1].label == "stage 3 / rank 0"


def test_the_graph_command_draws_the_v(tmp_path):
    graph, title = graph_for(["pipeline.schedule=zb_v"], ranks=2)
    assert [r.label for r in graph.stages] == ["stage 0 / rank 0", "stage 1 / rank 1", "stage 2 / rank 1",
                                               "stage 3 / rank 0"]
    assert "4 stages on 2 ranks" in title
    with contextlib.redirect_stdout(io.StringIO()):
        assert graph_main(["--ranks", "2", "--out", str(tmp_path / "v"), "pipeline.schedule=zb_v"]) == 0
    assert (tmp_path / "v.png").stat().st_size > 0


def test_the_timeline_tells_a_ranks_two_stages_apart(tmp_path):
    actions, placement = build_schedule("zb_v", 3, 4)
    timeline = simulate(actions, placement, 4).timeline
    spans = {rank: [(start, end, str(a)) for start, end, a in run] for rank, run in timeline.items()}
    assert [_rank_stages(spans[r]) for r in range(3)] == [[0, 5], [1, 4], [2, 3]]
    assert _rank_label(0, spans[0]) == "rank 0\nstages 0,5"
    for kind in ("F", "B", "W"):
        assert _shade(kind, 0, 2) != _shade(kind, 1, 2)
    assert draw_timeline(spans, tmp_path / "zb_v.png", title="ZB-V", unit="").stat().st_size > 0


def test_a_traced_run_draws_both_stages_of_rank_0(tmp_path):
    conf = problem(schedule="zb_v", ranks=2, microbatches=4)
    conf = replace(conf, trace=replace(conf.trace, enabled=True))
    pipelined(conf, tmp_path)
    spans = measured_spans(load_ranks(tmp_path), conf.train.steps)
    assert _rank_stages(spans[0]) == [0, 3] and _rank_stages(spans[1]) == [1, 2]
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prints_the_grid_and_the_summary(capsys):
    assert schedule_main(["--schedule", "zb_v", "--stages", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("step  rank 0  rank 1  rank 2  rank 3\n   0  0F0     1F0     2F0     3F0\n")
    assert "zb_v: 4 ranks, 8 stages, 8 micro-batches; costs F=1 B=1 W=1 BW=2 comm=0" in out
    assert "makespan 51, 48 steps" in out
    for rank in range(4):
        assert f"   {rank}    48    5.9%           8                8" in out
