"""Tests for pipeline.schedules.dualpipe_v: its grid, its validity, torch's own order, and exact training."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.errors import ConfigError
from pipeline.planning.planner import make_plan
from pipeline.schedule import main
from pipeline.schedules.actions import Action, Schedule, format_grid
from pipeline.schedules.dualpipe_v import dualpipe_v
from pipeline.schedules.lowering import fuse_backward, lower
from pipeline.schedules.placement import v_shape
from pipeline.schedules.registry import build_schedule
from pipeline.schedules.simulator import check_in_order, simulate, validate
from pipeline.training.equivalence import difference, pipelined, problem, reference
from pipeline.training.setup import load_data, model_spec

pytestmark = pytest.mark.timeout(120)
TOL = 1e-6

DUALPIPE_V_2_4 = """\
step  rank 0  rank 1
   0  0F0     1F0
   1  0F1     2F0
   2  0F2     1F1
   3  3F0     2F1
   4  3B0     1F2
   5  3W0     2BW0
   6  3F1     2F2
   7  0F3     1BW0
   8  3BW1    1F3
   9  3F2     2BW1
  10  0BW0    2F3
  11  3BW2    1BW1
  12  3F3     2BW2
  13  0BW1    1BW2
  14  3BW3    2B3
  15  0B2     1B3
  16  0W2     2W3
  17  0B3     1W3
  18  0W3"""


def test_grid_p2_m4() -> None:
    assert format_grid(dualpipe_v(2, 4)) == DUALPIPE_V_2_4
    result = simulate(dualpipe_v(2, 4), v_shape(2), 4)
    assert result.makespan == 25 and result.busy == {0: 24, 1: 24}


def test_one_rank_runs_both_stages_without_a_bubble() -> None:
    assert " ".join(map(str, dualpipe_v(1, 3)[0])) == "0F0 1F0 0F1 1BW0 1F1 0BW0 0F2 1BW1 1F2 0BW1 1BW2 0B2 0W2"
    assert simulate(dualpipe_v(1, 3), v_shape(1), 3).bubble == {0: 0.0}


def test_every_p_up_to_8_and_every_m_up_to_20_is_valid() -> None:
    for p in range(1, 9):
        placement = v_shape(p)
        for m in range(1, 21):
            schedule, built = build_schedule("dualpipe_v", p, m)
            assert built == placement
            validate(schedule, placement, m)
            validate(fuse_backward(lower(schedule, placement)), placement, m)  # what the trainer runs


def _torch_order(p: int, m: int) -> Schedule:
    """torch 2.13's ScheduleDualPipeV order in our actions: F->F, I->B, W->W, B->BW, (F;B)OVERLAP_F_B -> F, BW.

    The public constructor with stand-in stages (the four attributes it reads before any tensor is needed); it
    builds `pipeline_order` for every rank. It raises ValueError for m < 2p.
    """
    from torch.distributed.pipelining.schedules import ScheduleDualPipeV

    stand_ins = [SimpleNamespace(submod=None, group_size=p, num_stages=2 * p, group_rank=0) for _ in range(2)]
    order = ScheduleDualPipeV(stand_ins, m).pipeline_order
    kind = {"F": "F", "I": "B", "W": "W", "B": "BW"}
    return {rank: [Action(part.stage_index, kind[part.computation_type.value], part.microbatch_index)
                   for action in actions for part in (action.sub_actions or (action,))]
            for rank, actions in order.items()}


@pytest.mark.parametrize("p, m", [(2, 4), (2, 8), (2, 16), (4, 8), (4, 16), (3, 6), (4, 9)])
def test_bubble_no_more_than_torchs_own_order(p: int, m: int) -> None:
    placement = v_shape(p)
    theirs = _torch_order(p, m)
    ours = simulate(dualpipe_v(p, m), placement, m)
    torchs = simulate(theirs, placement, m)
    assert ours.makespan <= torchs.makespan
    assert all(ours.bubble[r] <= torchs.bubble[r] + 1e-12 for r in range(p))
    assert dualpipe_v(p, m) == theirs  # the very same order, each overlap pair as its two halves


@pytest.mark.parametrize("p, m", [(4, 4), (2, 3), (3, 5), (8, 15)])
def test_m_torch_refuses_still_works(p: int, m: int) -> None:
    with pytest.raises(ValueError, match="DualPipeV requires at least as many microbatches as stages"):
        _torch_order(p, m)
    schedule, placement = build_schedule("dualpipe_v", p, m)
    validate(fuse_backward(lower(schedule, placement)), placement, m)
    # two stages per rank, like interleaved 1F1B at v = 2, and not slower
    interleaved, looped_placement = build_schedule("interleaved_1f1b", p, m, 2)
    assert simulate(schedule, placement, m).makespan <= simulate(interleaved, looped_placement, m).makespan


def test_unit_costs_give_the_readme_figures() -> None:
    # bubble (p-1)/(6m+p-1) from m = 2p-1; 2p+1 (stage, micro-batch) pairs stashed on every rank from m = 2p
    for p in range(1, 9):
        for m in range(2 * p - 1, 2 * p + 6):
            result = simulate(dualpipe_v(p, m), v_shape(p), m)
            assert result.makespan == 6 * m + p - 1 and set(result.busy.values()) == {6 * m}
            assert m < 2 * p or set(result.peak_stash.values()) == {2 * p + 1}
    assert [simulate(dualpipe_v(4, m), v_shape(4), m).makespan for m in (4, 8, 16)] == [30, 51, 99]


@pytest.mark.parametrize("args, message", [
    ((2, 4, 3), "dualpipe_v: runs 2 stages per rank (a V), so virtual_stages must be 2, got 3"),
    ((2, 4, 1), "dualpipe_v: runs 2 stages per rank (a V), so virtual_stages must be 2, got 1"),
    ((0, 4, 2), "dualpipe_v: num_ranks must be an integer >= 1, got 0"),
    ((2, 0, 2), "dualpipe_v: num_microbatches must be an integer >= 1, got 0"),
])
def test_bad_counts_are_one_line_errors(args: tuple, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        dualpipe_v(*args)
    assert str(caught.value) == message


def test_registry_takes_virtual_stages_2_or_the_default_and_nothing_else() -> None:
    assert build_schedule("dualpipe_v", 3, 6, 1) == build_schedule("dualpipe_v", 3, 6, 2)
    with pytest.raises(ValueError) as caught:
        build_schedule("dualpipe_v", 3, 6, 3)
    assert str(caught.value) == ("dualpipe_v: always runs 2 stages per rank, so virtual_stages must be 2 or left at "
                                 "1; got 3")
    conf = problem(schedule="dualpipe_v", ranks=2, microbatches=4, virtual_stages=3)
    with pytest.raises(ConfigError) as err:
        make_plan(conf, model_spec(conf, load_data(conf)), 1, eval_rows=10)
    assert "pipeline.virtual_stages=3: dualpipe_v: always runs 2 stages per rank" in str(err.value)
    assert "\n" not in str(err.value)


def test_nccl_order_holds_once_lowered() -> None:
    # rank r sends its forwards of stage r and its backwards of stage 2p-1-r to rank r+1, which computes them in
    # another order from p = 3; lowering receives each peer's messages in the order it sends them, so NCCL
    # (which pairs messages in order, not by tag) can run it too
    for p, m in ((2, 1), (2, 8), (3, 8), (4, 8), (4, 16)):
        schedule, placement = build_schedule("dualpipe_v", p, m)
        check_in_order(fuse_backward(lower(schedule, placement)), placement)


@pytest.fixture(scope="module")
def ref():
    return reference(problem())


@pytest.mark.parametrize("p, m", [(2, 3), (2, 8), (3, 3), (3, 8), (4, 3), (4, 8)])
def test_training_equals_single_device(p: int, m: int, ref, tmp_path) -> None:
    # a batch of 10 in 3 or 8 micro-batches: uneven sizes; m = 3 is below torch's minimum of 2p at p = 2, 3, 4
    params, _ = pipelined(problem(schedule="dualpipe_v", ranks=p, microbatches=m), tmp_path)
    assert difference(params, ref) <= TOL


def test_cli_prints_grid_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--schedule", "dualpipe_v", "--stages", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("step  rank 0  rank 1  rank 2  rank 3\n   0  0F0     1F0     2F0     3F0\n")
    assert "  38  0W7\n" in out
    assert "dualpipe_v: 4 ranks, 8 stages, 8 micro-batches; costs F=1 B=1 W=1 BW=2 comm=0" in out
    assert "makespan 51, 39 steps" in out
    assert "   0    48    5.9%           9                9" in out
