"""Tests for pipeline.schedule: actions, generators, lowering, the grid and the CLI."""

from __future__ import annotations

import pytest

from pipeline.schedule import main
from pipeline.schedules.actions import COMM_KINDS, COMPUTE_KINDS, Action, format_grid
from pipeline.schedules.builders import gpipe, interleaved_1f1b, one_f_one_b, zb_h1
from pipeline.schedules.lowering import lower
from pipeline.schedules.placement import Placement, looped, v_shape as placement_v
from pipeline.schedules.registry import SCHEDULES, VIRTUAL, build_schedule, stages_per_rank
from pipeline.schedules.simulator import validate

pytestmark = pytest.mark.timeout(60)


def _acts(text: str) -> list[Action]:
    return [Action.parse(t) for t in text.split()]


def _line(schedule: dict[int, list[Action]], rank: int) -> str:
    """A rank's actions as one space-separated string."""
    return " ".join(str(a) for a in schedule[rank])


# --- Action -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", COMPUTE_KINDS + COMM_KINDS)
@pytest.mark.parametrize("stage_index, mb_index", [(0, 0), (3, 7), (12, 105), (100, 10)])
def test_action_round_trip(kind: str, stage_index: int, mb_index: int) -> None:
    action = Action(stage_index, kind, mb_index)
    text = str(action)
    assert text == f"{stage_index}{kind}{mb_index}"
    assert Action.parse(text) == action


def test_action_literal_strings() -> None:
    assert str(Action(1, "F", 0)) == "1F0"
    assert str(Action(0, "BW", 3)) == "0BW3"
    assert str(Action(2, "SEND_F", 1)) == "2SEND_F1"
    assert str(Action(3, "RECV_B", 10)) == "3RECV_B10"
    assert Action.parse("10W11") == Action(10, "W", 11)
    assert Action.parse("1B0").kind == "B" and Action.parse("1BW0").kind == "BW"


@pytest.mark.parametrize(
    "text",
    ["", "F1", "1F", "1X2", "1f0", " 1F0", "1F0 ", "01F0", "1F01", "1F-1", "1SEND0", "1BWW0"],
)
def test_action_parse_rejects_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match="cannot parse action"):
        Action.parse(text)


def test_action_parse_rejects_non_string() -> None:
    with pytest.raises(ValueError, match="cannot parse action 5"):
        Action.parse(5)  # type: ignore[arg-type]


def test_action_is_immutable_and_hashable() -> None:
    action = Action(1, "F", 2)
    with pytest.raises(AttributeError):
        action.kind = "B"  # type: ignore[misc]
    assert len({action, Action(1, "F", 2), Action(1, "B", 2)}) == 2


def test_placement_is_looped() -> None:
    assert looped(3, 3).ranks == (0, 1, 2, 0, 1, 2, 0, 1, 2)
    assert [looped(3, 3).rank_of(s) for s in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert looped(3, 3).stages_of(1) == [1, 4, 7]
    assert looped(4, 1).stages_of(2) == [2]
    assert (looped(3, 2).num_ranks, looped(3, 2).num_stages, looped(3, 2).last_rank) == (3, 6, 2)


def test_a_placement_is_data_any_shape_works() -> None:
    assert placement_v(3).ranks == (0, 1, 2, 2, 1, 0) and placement_v(3).last_rank == 0
    with pytest.raises(ValueError, match="a V places 2 stages on each rank, not 3"):
        placement_v(3, 3)
    v_shape = Placement((0, 1, 1, 0))  # a V: rank 0 holds the first and the last stage
    assert v_shape.stages_of(0) == [0, 3] and v_shape.last_rank == 0
    lowered = lower({0: _acts("0F0 3F0 3BW0 0BW0"), 1: _acts("1F0 2F0 2BW0 1BW0")}, v_shape)
    assert _line(lowered, 0) == "0F0 0SEND_F0 3RECV_F0 3F0 3BW0 3SEND_B0 0RECV_B0 0BW0"
    validate(lowered, v_shape, 1)
    with pytest.raises(ValueError, match="every rank 0..p-1"):
        Placement((0, 2))


def test_every_schedule_names_its_placement_in_the_registry() -> None:
    for name, entry in SCHEDULES.items():
        actions, placement = build_schedule(name, 3, 4, 2 if entry.virtual else 1)
        assert placement == entry.placement(3, stages_per_rank(name, 2 if entry.virtual else 1))
        validate(actions, placement, 4)  # every action sits on the rank its placement names


# --- literal grids ------------------------------------------------------------------------

GPIPE_2_4 = """\
step  rank 0  rank 1
   0  0F0     1F0
   1  0F1     1F1
   2  0F2     1F2
   3  0F3     1F3
   4  0BW0    1BW0
   5  0BW1    1BW1
   6  0BW2    1BW2
   7  0BW3    1BW3"""

GPIPE_3_4 = """\
step  rank 0  rank 1  rank 2
   0  0F0     1F0     2F0
   1  0F1     1F1     2F1
   2  0F2     1F2     2F2
   3  0F3     1F3     2F3
   4  0BW0    1BW0    2BW0
   5  0BW1    1BW1    2BW1
   6  0BW2    1BW2    2BW2
   7  0BW3    1BW3    2BW3"""

ONE_F_ONE_B_2_4 = """\
step  rank 0  rank 1
   0  0F0     1F0
   1  0F1     1BW0
   2  0BW0    1F1
   3  0F2     1BW1
   4  0BW1    1F2
   5  0F3     1BW2
   6  0BW2    1F3
   7  0BW3    1BW3"""

ONE_F_ONE_B_3_4 = """\
step  rank 0  rank 1  rank 2
   0  0F0     1F0     2F0
   1  0F1     1F1     2BW0
   2  0F2     1BW0    2F1
   3  0BW0    1F2     2BW1
   4  0F3     1BW1    2F2
   5  0BW1    1F3     2BW2
   6  0BW2    1BW2    2F3
   7  0BW3    1BW3    2BW3"""

ONE_F_ONE_B_4_4 = """\
step  rank 0  rank 1  rank 2  rank 3
   0  0F0     1F0     2F0     3F0
   1  0F1     1F1     2F1     3BW0
   2  0F2     1F2     2BW0    3F1
   3  0F3     1BW0    2F2     3BW1
   4  0BW0    1F3     2BW1    3F2
   5  0BW1    1BW1    2F3     3BW2
   6  0BW2    1BW2    2BW2    3F3
   7  0BW3    1BW3    2BW3    3BW3"""

ZB_H1_2_4 = """\
step  rank 0  rank 1
   0  0F0     1F0
   1  0F1     1B0
   2  0B0     1F1
   3  0W0     1B1
   4  0F2     1W0
   5  0B1     1F2
   6  0W1     1B2
   7  0F3     1W1
   8  0B2     1F3
   9  0W2     1B3
  10  0B3     1W2
  11  0W3     1W3"""


@pytest.mark.parametrize(
    "name, num_ranks, expected",
    [
        ("gpipe", 2, GPIPE_2_4),
        ("gpipe", 3, GPIPE_3_4),
        ("1f1b", 2, ONE_F_ONE_B_2_4),
        ("1f1b", 3, ONE_F_ONE_B_3_4),
        ("1f1b", 4, ONE_F_ONE_B_4_4),
        ("zb_h1", 2, ZB_H1_2_4),
    ],
)
def test_grid_literal(name: str, num_ranks: int, expected: str) -> None:
    assert format_grid(build_schedule(name, num_ranks, 4).actions) == expected


def test_grid_of_lowered_schedule_with_mark() -> None:
    expected = """\
step  rank 0    rank 1
   0  0F0       1RECV_F0
   1  0SEND_F0  1F0
   2  0F1       1BW0
   3  0SEND_F1 >1SEND_B0<
   4  0RECV_B0  1RECV_F1
   5  0BW0      1F1
   6  0RECV_B1  1BW1
   7  0BW1      1SEND_B1"""
    assert format_grid(lower(one_f_one_b(2, 2), looped(2)), mark=(1, 3)) == expected


def test_grid_of_uneven_ranks_and_wide_steps() -> None:
    schedule = {0: [Action(0, "F", mb) for mb in range(11)], 1: [Action(1, "F", 0)]}
    lines = format_grid(schedule, mark=(0, 10)).splitlines()
    assert lines[0] == "step  rank 0  rank 1"
    assert lines[1] == "   0  0F0     1F0"
    assert lines[2] == "   1  0F1"
    assert lines[-1] == "  10 >0F10<"
    assert format_grid({}) == "step"


# --- generators ---------------------------------------------------------------------------


def test_interleaved_order_literal() -> None:
    schedule = interleaved_1f1b(2, 4, 2)
    assert _line(schedule, 0) == (
        "0F0 0F1 2F0 2F1 0F2 2BW0 0F3 2BW1 2F2 0BW0 2F3 0BW1 2BW2 2BW3 0BW2 0BW3")
    assert _line(schedule, 1) == (
        "1F0 1F1 3F0 3BW0 3F1 3BW1 1F2 1BW0 1F3 1BW1 3F2 3BW2 3F3 3BW3 1BW2 1BW3")


def test_interleaved_pads_uneven_microbatch_counts() -> None:
    schedule = interleaved_1f1b(2, 3, 2)
    assert _line(schedule, 0) == "0F0 0F1 2F0 2F1 0F2 2BW0 2BW1 2F2 0BW0 0BW1 2BW2 0BW2"
    assert _line(schedule, 1) == "1F0 1F1 3F0 3BW0 3F1 3BW1 1F2 1BW0 1BW1 3F2 3BW2 1BW2"


def test_interleaved_with_one_chunk_is_1f1b() -> None:
    assert interleaved_1f1b(4, 6, 1) == one_f_one_b(4, 6)


def test_gpipe_virtual_stages_run_chunks_in_order() -> None:
    schedule = gpipe(2, 2, 2)
    assert _line(schedule, 0) == "0F0 0F1 2F0 2F1 2BW0 2BW1 0BW0 0BW1"
    assert _line(schedule, 1) == "1F0 1F1 3F0 3F1 3BW0 3BW1 1BW0 1BW1"


def test_zb_h1_defers_weight_passes_by_rank() -> None:
    schedule = zb_h1(4, 8)
    assert _line(schedule, 3).endswith("3B7 3W4 3W5 3W6 3W7")
    assert _line(schedule, 0).startswith("0F0 0F1 0F2 0F3 0B0 0W0 0F4 0B1 0W1")


def test_generators_are_pure() -> None:
    assert zb_h1(3, 5) == zb_h1(3, 5)
    first = one_f_one_b(3, 5)
    first[0].clear()
    assert len(one_f_one_b(3, 5)[0]) == 10


def _cases() -> list[tuple[str, int]]:
    """(schedule name, virtual_stages) pairs to sweep."""
    return [(name, v) for name in SCHEDULES for v in ((1, 2, 3) if name in VIRTUAL else (1,))]


@pytest.mark.parametrize("name, virtual_stages", _cases())
def test_every_generated_schedule_is_valid(name: str, virtual_stages: int) -> None:
    for num_ranks in range(1, 9):
        for num_microbatches in range(1, 17):
            schedule, placement = build_schedule(name, num_ranks, num_microbatches, virtual_stages)
            validate(schedule, placement, num_microbatches)
            validate(lower(schedule, placement), placement, num_microbatches)


@pytest.mark.parametrize(
    "args, message",
    [
        (("ring", 2, 4, 1), "unknown schedule 'ring'; choose one of gpipe, 1f1b"),
        (("gpipe", 0, 4, 1), "gpipe: num_ranks must be an integer >= 1, got 0"),
        (("1f1b", 2, 0, 1), "1f1b: num_microbatches must be an integer >= 1, got 0"),
        (("interleaved_1f1b", 2, 4, 0), "virtual_stages must be an integer >= 1, got 0"),
        (("zb_h1", 2, 4, 2), "zb_h1: virtual_stages must be 1, got 2"),
        (("1f1b", 2, 4, 2), "schedules with virtual stages: gpipe, interleaved_1f1b"),
        (("gpipe", 2.0, 4, 1), "num_ranks must be an integer >= 1, got 2.0"),
        (("gpipe", True, 4, 1), "num_ranks must be an integer >= 1, got True"),
    ],
)
def test_build_schedule_rejects_bad_arguments(args: tuple, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        build_schedule(*args)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# --- lowering -----------------------------------------------------------------------------


def test_lower_inserts_comms_around_cross_rank_compute() -> None:
    lowered = lower(zb_h1(3, 1), looped(3))
    assert _line(lowered, 0) == "0F0 0SEND_F0 0RECV_B0 0B0 0W0"
    assert _line(lowered, 1) == "1RECV_F0 1F0 1SEND_F0 1RECV_B0 1B0 1SEND_B0 1W0"
    assert _line(lowered, 2) == "2RECV_F0 2F0 2B0 2SEND_B0 2W0"


def test_lower_wraps_around_ranks_with_virtual_stages() -> None:
    lowered = lower(gpipe(2, 1, 2), looped(2, 2))
    assert _line(lowered, 0) == (
        "0F0 0SEND_F0 2RECV_F0 2F0 2SEND_F0 2RECV_B0 2BW0 2SEND_B0 0RECV_B0 0BW0")
    assert _line(lowered, 1) == (
        "1RECV_F0 1F0 1SEND_F0 3RECV_F0 3F0 3BW0 3SEND_B0 1RECV_B0 1BW0 1SEND_B0")


def test_lower_refuses_a_lowered_schedule() -> None:
    with pytest.raises(ValueError, match="already has SEND/RECV"):
        lower(lower(gpipe(2, 1), looped(2)), looped(2))


def test_lower_adds_nothing_on_one_rank_and_is_pure() -> None:
    schedule = interleaved_1f1b(1, 3, 3)
    before = {rank: list(actions) for rank, actions in schedule.items()}
    assert lower(schedule, looped(1, 3)) == schedule
    lower(gpipe(2, 2), looped(2))
    assert schedule == before


# --- CLI ----------------------------------------------------------------------------------


def test_cli_prints_grid_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--schedule", "zb_h1", "--stages", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "step  rank 0  rank 1  rank 2  rank 3\n   0  0F0     1F0     2F0     3F0\n")
    assert "  23  0W7     1W7     2W7     3W7\n" in out
    assert "zb_h1: 4 ranks, 4 stages, 8 micro-batches; costs F=1 B=1 W=1 BW=2 comm=0" in out
    assert "makespan 27, 24 steps" in out
    assert "   0    24   11.1%           4                4" in out
    assert "   3    24   11.1%           4                1" in out


def test_cli_comms_and_costs(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--schedule", "1f1b", "--stages", "2", "--microbatches", "1", "--comms",
            "--costs", "1,1,1,0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "   1  0SEND_F0  1F0" in out
    assert "makespan 7, 4 steps" in out


def test_cli_interleaved(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--schedule", "interleaved_1f1b", "--stages", "4", "--microbatches", "8",
            "--virtual-stages", "2"]
    assert main(argv) == 0
    assert "makespan 57, 32 steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stages", "0", "--microbatches", "4"],
         "error: 1f1b: num_ranks must be an integer >= 1"),
        (["--stages", "2", "--microbatches", "4", "--virtual-stages", "2"],
         "error: 1f1b: virtual_stages must be 1, got 2"),
        (["--stages", "2", "--microbatches", "4", "--costs", "1,2"], "error: --costs must be"),
        (["--stages", "2", "--microbatches", "4", "--costs", "1,-1,1"], "error: --costs must be"),
    ],
)
def test_cli_rejects_bad_numbers(argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--schedule", "1f1b", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message)
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--schedule", "ring", "--stages", "2", "--microbatches", "4"],
        ["--schedule", "1f1b", "--stages", "two", "--microbatches", "4"],
        ["--schedule", "1f1b", "--stages", "2"],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_module_runs_as_a_script() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "pipeline.schedule", "--schedule", "gpipe", "--stages", "2",
            "--microbatches", "2", "--comms"]
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "   1  0SEND_F0  1F0" in done.stdout
    assert "makespan 9, 8 steps" in done.stdout


def test_fuse_backward_merges_only_adjacent_b_and_w_of_the_same_micro_batch():
    from pipeline.schedules.lowering import fuse_backward

    lowered = lower(zb_h1(2, 3), looped(2))
    fused = fuse_backward(lowered)
    assert " ".join(map(str, fused[0])) == ("0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0BW0 0F2 0SEND_F2 0RECV_B1 0BW1 "
                                            "0RECV_B2 0BW2")
    assert fused[1] == lowered[1]  # rank 1 sends dJ/dx between its B and its (later) W
    validate(fused, looped(2), 3)
