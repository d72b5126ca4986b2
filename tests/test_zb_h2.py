"""ZB-H2 (pipeline.schedule=zb_h2): its grid, validity, the parallelogram's zero bubble, its stash and exactness.

The bubble of rank r is the idle time between the start of its own first action and the end of its
own last one (the paper's count: with post-validation the next iteration starts right after a
rank's own end), read from the simulator's timeline.
"""

from __future__ import annotations

import pytest

from pipeline.schedule import main
from pipeline.schedules.actions import format_grid
from pipeline.schedules.lowering import fuse_backward, lower
from pipeline.schedules.placement import looped
from pipeline.schedules.registry import SCHEDULES, build_schedule
from pipeline.schedules.simulator import check_in_order, simulate, validate
from pipeline.schedules.zb_h2 import zb_h2
from pipeline.training.equivalence import difference, pipelined, problem, reference

pytestmark = pytest.mark.timeout(120)
TOL = 1e-6  # as tests/test_pipeline.py

ZB_H2_3_6 = """\
step  rank 0  rank 1  rank 2
   0  0F0     1F0     2F0
   1  0F1     1F1     2B0
   2  0F2     1F2     2W0
   3  0F3     1B0     2F1
   4  0F4     1W0     2B1
   5  0B0     1F3     2F2
   6  0W0     1B1     2B2
   7  0F5     1F4     2F3
   8  0B1     1B2     2B3
   9  0W1     1F5     2F4
  10  0B2     1B3     2B4
  11  0W2     1W1     2F5
  12  0B3     1B4     2B5
  13  0W3     1W2     2W1
  14  0B4     1B5     2W2
  15  0W4     1W3     2W3
  16  0B5     1W4     2W4
  17  0W5     1W5     2W5"""

SHAPES = [(p, m) for p in range(1, 9) for m in range(1, 17)]


def own_idle(result, rank: int) -> float:
    """Idle time of `rank` inside [start of its first action, end of its last]."""
    run = result.timeline[rank]
    return run[-1][1] - run[0][0] - sum(end - start for start, end, _ in run)


def test_grid_literal() -> None:
    assert format_grid(build_schedule("zb_h2", 3, 6).actions) == ZB_H2_3_6


def test_registry_line_is_looped_one_stage_per_rank() -> None:
    entry = SCHEDULES["zb_h2"]
    assert (entry.build, entry.placement, entry.virtual, entry.fixed_stages) == (zb_h2, looped, False, None)
    assert build_schedule("zb_h2", 3, 6).placement == looped(3)


@pytest.mark.parametrize("p, m", SHAPES)
def test_every_shape_is_valid_lowered_fused_and_in_order(p: int, m: int) -> None:
    schedule, placement = build_schedule("zb_h2", p, m)
    validate(schedule, placement, m)
    lowered = fuse_backward(lower(schedule, placement))
    validate(lowered, placement, m)
    check_in_order(lowered, placement)
    assert zb_h2(p, m) == schedule  # pure


@pytest.mark.parametrize("p", range(1, 9))
def test_unit_costs_make_a_parallelogram_without_bubbles(p: int) -> None:
    for m in range(2 * p - 1, 17):
        result = simulate(*build_schedule("zb_h2", p, m), m)
        assert result.makespan == 3 * m + p - 1
        for rank in range(p):
            run = result.timeline[rank]
            assert (run[0][0], run[-1][1]) == (rank, rank + 3 * m)
            assert own_idle(result, rank) == 0


@pytest.mark.parametrize("p, m", [(p, m) for p, m in SHAPES if m < 2 * p - 1])
def test_too_few_micro_batches_only_wait_for_the_first_b(p: int, m: int) -> None:
    # the warm-up runs all m forwards, then rank r waits for B0 to climb back: 2(p - r) - 1 - m units
    result = simulate(*build_schedule("zb_h2", p, m), m)
    assert [own_idle(result, r) for r in range(p)] == [max(0, 2 * (p - r) - 1 - m) for r in range(p)]


@pytest.mark.parametrize("costs", [{"F": 1, "B": 2, "W": 1}, {"F": 2, "B": 2, "W": 1}, {"F": 2, "B": 1, "W": 1},
                                   {"F": 1, "B": 3, "W": 1}, {"F": 1, "B": 1, "W": 2}, {"F": 1, "B": 1, "W": 1.5}])
@pytest.mark.parametrize("p, m", [(2, 8), (3, 6), (4, 8), (4, 16), (8, 16)])
def test_bubble_with_unequal_costs_is_the_papers_on_rank_0(costs: dict, p: int, m: int) -> None:
    # the paper's (p-1)(T_F + T_B - 2 T_W) where >= 0 is rank 0's, the longest; rank r idles (p-1-r)/(p-1) of it
    excess = max(0, costs["F"] + costs["B"] - 2 * costs["W"])
    result = simulate(*build_schedule("zb_h2", p, m), m, costs)
    assert own_idle(result, 0) == (p - 1) * excess
    assert [own_idle(result, r) for r in range(p)] == [(p - 1 - r) * excess for r in range(p)]


@pytest.mark.parametrize("p, m", SHAPES)
def test_peak_stash_is_at_most_2p_minus_1(p: int, m: int) -> None:
    result = simulate(*build_schedule("zb_h2", p, m), m)
    assert result.peak_stash[0] <= 2 * p - 1
    assert result.peak_stash == {r: min(m, 2 * p - 1) for r in range(p)}
    assert result.peak_awaiting_b == {r: min(m, 2 * (p - r) - 1) for r in range(p)}


def test_zb_h2_spends_memory_to_close_zb_h1s_own_span_bubble() -> None:
    h1, h2 = (simulate(*build_schedule(name, 4, 8), 8) for name in ("zb_h1", "zb_h2"))
    assert h1.makespan == h2.makespan == 27
    assert [own_idle(h1, r) for r in range(4)] == [3, 2, 1, 0]
    assert [own_idle(h2, r) for r in range(4)] == [0, 0, 0, 0]
    assert list(h1.peak_stash.values()) == [4, 4, 4, 4] and list(h2.peak_stash.values()) == [7, 7, 7, 7]


@pytest.mark.parametrize("args, message", [
    ((2, 4, 2), "zb_h2: virtual_stages must be 1, got 2"),
    ((0, 4, 1), "zb_h2: num_ranks must be an integer >= 1, got 0"),
    ((2, 0, 1), "zb_h2: num_microbatches must be an integer >= 1, got 0"),
])
def test_bad_counts_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        zb_h2(*args)


def test_cli_prints_grid_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--schedule", "zb_h2", "--stages", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("step  rank 0  rank 1  rank 2  rank 3\n   0  0F0     1F0     2F0     3F0\n")
    assert "zb_h2: 4 ranks, 4 stages, 8 micro-batches; costs F=1 B=1 W=1 BW=2 comm=0" in out
    assert "makespan 27, 24 steps" in out
    assert "   0    24   11.1%           7                7" in out
    assert "   3    24   11.1%           7                1" in out


@pytest.fixture(scope="module")
def ref():
    return reference(problem())


@pytest.mark.parametrize("p", [2, 3, 4])
def test_training_equals_single_device_with_uneven_micro_batches(p: int, ref, tmp_path) -> None:
    conf = problem(schedule="zb_h2", ranks=p, microbatches=3)
    assert conf.train.batch_size == 10  # 3 micro-batches of 4, 3 and 3 rows
    params, summary = pipelined(conf, tmp_path)
    assert difference(params, ref) <= TOL
    assert summary["peak_stash"] == [simulate(*build_schedule("zb_h2", p, 3), 3).peak_stash[r] for r in range(p)]
