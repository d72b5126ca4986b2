"""Tests for pipeline.simulate: the validator's error messages and the simulated costs."""

from __future__ import annotations

import pytest

from pipeline.schedules.actions import Action, Schedule
from pipeline.schedules.builders import gpipe, interleaved_1f1b, one_f_one_b, zb_h1
from pipeline.schedules.lowering import fuse_backward, lower
from pipeline.schedules.placement import looped
from pipeline.schedules.registry import SCHEDULES, build_schedule
from pipeline.schedules.simulator import ScheduleError, SimResult, check_in_order, format_summary, simulate, validate

pytestmark = pytest.mark.timeout(60)


def _acts(text: str) -> list[Action]:
    """Actions from a space-separated string such as "0F0 0BW0"."""
    return [Action.parse(word) for word in text.split()]


def _error(schedule: Schedule, num_ranks: int, num_microbatches: int,
           virtual_stages: int = 1) -> ScheduleError:
    """The ScheduleError validate raises for this schedule."""
    with pytest.raises(ScheduleError) as caught:
        validate(schedule, looped(num_ranks, virtual_stages), num_microbatches)
    return caught.value


def _summary(error: ScheduleError) -> str:
    """The first line of the error message, after checking the grid follows it."""
    first, _, grid = str(error).partition("\n")
    assert first == error.summary
    assert grid.startswith("step  rank 0")
    return first


# --- validator: hand-broken schedules -----------------------------------------------------


def test_missing_backward() -> None:
    schedule = one_f_one_b(2, 4)
    schedule[1].remove(Action(1, "BW", 2))
    error = _error(schedule, 2, 4)
    assert _summary(error) == "stage 1 mb 2: missing backward (BW, or B and W)"
    assert ">" not in str(error)


def test_missing_forward() -> None:
    schedule = gpipe(2, 4)
    schedule[0].remove(Action(0, "F", 3))
    assert _summary(_error(schedule, 2, 4)) == "stage 0 mb 3: missing forward (F)"


def test_missing_weight_pass_marks_its_b() -> None:
    schedule = zb_h1(2, 4)
    schedule[1].remove(Action(1, "W", 3))
    error = _error(schedule, 2, 4)
    assert _summary(error) == "stage 1 mb 3: missing weight gradient (W) after its B"
    assert "   9  0W2    >1B3<" in str(error)


def test_w_without_b_and_mixed_bw() -> None:
    schedule = zb_h1(2, 1)
    schedule[0].remove(Action(0, "B", 0))
    assert "stage 0 mb 0: missing input gradient (B) before its W" in str(_error(schedule, 2, 1))
    schedule = zb_h1(2, 1)
    schedule[0].append(Action(0, "BW", 0))
    assert _summary(_error(schedule, 2, 1)) == (
        "stage 0 mb 0: has both BW and B; use BW alone or B then W")


def test_b_before_f_is_rejected_with_marker() -> None:
    schedule = zb_h1(2, 4)
    assert schedule[1][8:10] == _acts("1F3 1B3")
    schedule[1][8:10] = _acts("1B3 1F3")
    error = _error(schedule, 2, 4)
    assert _summary(error) == "rank 1: 1B3 runs before 1F3"
    assert "   8  0B2    >1B3<" in str(error)


def test_w_before_b_is_rejected() -> None:
    schedule = zb_h1(2, 4)
    schedule[0][2:4] = _acts("0W0 0B0")
    assert _summary(_error(schedule, 2, 4)) == "rank 0: 0W0 runs before 0B0"


def test_local_stage_order_is_checked_on_one_rank() -> None:
    schedule = gpipe(1, 1, 2)
    schedule[0][0:2] = _acts("1F0 0F0")
    assert _summary(_error(schedule, 1, 1, 2)) == "rank 0: 1F0 runs before 0F0"


def test_duplicate_action() -> None:
    schedule = one_f_one_b(2, 4)
    schedule[0].append(Action(0, "F", 1))
    error = _error(schedule, 2, 4)
    assert _summary(error) == "rank 0: 0F1 appears twice (steps 1 and 8)"
    assert "   8 >0F1<" in str(error)


def test_action_on_wrong_rank() -> None:
    schedule = one_f_one_b(2, 2)
    schedule[1].remove(Action(1, "F", 0))
    schedule[0].insert(0, Action(1, "F", 0))
    error = _error(schedule, 2, 2)
    assert _summary(error) == "rank 0: 1F0 is on the wrong rank (stage 1 lives on rank 1)"
    assert "   0 >1F0<    1BW0" in str(error)


@pytest.mark.parametrize(
    "schedule, message",
    [
        ({0: _acts("0F0 0BW0"), 2: []}, "unknown rank 2: ranks are 0..1"),
        ({0: _acts("0F0 2F0")}, "rank 0: 2F0 names stage 2, but stages are 0..1"),
        ({0: _acts("0F0 0F1")}, "rank 0: 0F1 names micro-batch 1, but micro-batches are 0..0"),
        ({0: [Action(0, "X", 0)]}, "rank 0: 0X0 has unknown kind 'X'"),
        ({0: ["0F0"]}, "rank 0: '0F0' is not an Action(stage_index, kind, mb_index)"),
    ],
)
def test_malformed_entries(schedule: Schedule, message: str) -> None:
    assert _summary(_error(schedule, 2, 1)) == message


def test_unmatched_send() -> None:
    schedule = lower(one_f_one_b(2, 4), looped(2))
    schedule[1].remove(Action(1, "RECV_F", 2))
    error = _error(schedule, 2, 4)
    assert _summary(error) == "rank 0: 0SEND_F2 has no matching RECV_F on rank 1"
    assert ">0SEND_F2<" in str(error)


def test_unmatched_recv() -> None:
    schedule = lower(one_f_one_b(2, 4), looped(2))
    schedule[0].remove(Action(0, "SEND_F", 2))
    error = _error(schedule, 2, 4)
    assert _summary(error) == "rank 1: 1RECV_F2 has no matching SEND_F on rank 0"
    assert ">1RECV_F2<" in str(error)


def test_unmatched_gradient_send() -> None:
    schedule = lower(zb_h1(3, 2), looped(3))
    schedule[1].remove(Action(1, "RECV_B", 1))
    assert _summary(_error(schedule, 3, 2)) == "rank 2: 2SEND_B1 has no matching RECV_B on rank 1"


def test_send_without_peer_stage() -> None:
    schedule = lower(one_f_one_b(2, 1), looped(2))
    schedule[1].append(Action(1, "SEND_F", 0))
    assert _summary(_error(schedule, 2, 1)) == "rank 1: 1SEND_F0 has no peer stage 2 to talk to"


def test_lowered_schedule_missing_both_ends_of_a_transfer() -> None:
    schedule = lower(one_f_one_b(2, 4), looped(2))
    schedule[0].remove(Action(0, "SEND_F", 2))
    schedule[1].remove(Action(1, "RECV_F", 2))
    assert _summary(_error(schedule, 2, 4)) == (
        "rank 1: 1F2 needs 1RECV_F2, which is not in the schedule")


def test_send_before_its_compute() -> None:
    schedule = lower(one_f_one_b(2, 2), looped(2))
    schedule[0][2:4] = _acts("0SEND_F1 0F1")
    assert _summary(_error(schedule, 2, 2)) == "rank 0: 0SEND_F1 runs before 0F1"


def test_deadlock_when_both_ranks_receive_first() -> None:
    schedule = {0: _acts("0RECV_B0 0F0 0SEND_F0 0BW0"), 1: _acts("1RECV_F0 1F0 1BW0 1SEND_B0")}
    error = _error(schedule, 2, 1)
    assert _summary(error) == (
        "deadlock: no rank can progress; waiting: rank 0 at 0RECV_B0, rank 1 at 1RECV_F0")
    assert "   0 >0RECV_B0< 1RECV_F0\n   1  0F0       1F0\n" in str(error)


def test_deadlock_in_compute_only_schedule() -> None:
    schedule = {0: _acts("0F0 0BW0 0F1 0BW1"), 1: _acts("1F1 1BW1 1F0 1BW0")}
    assert _summary(_error(schedule, 2, 2)) == (
        "deadlock: no rank can progress; waiting: rank 0 at 0BW0, rank 1 at 1F1")


def test_deadlock_names_where_every_stuck_rank_waits() -> None:
    schedule = {0: _acts("0F0 0F1 0BW1 0BW0"), 1: _acts("1F0 1BW0 1F1 1BW1"),
                2: _acts("2F1 2BW1 2F0 2BW0")}
    error = _error(schedule, 3, 2)
    assert _summary(error) == (
        "deadlock: no rank can progress; waiting: rank 0 at 0BW1, rank 1 at 1BW0, rank 2 at 2F1")
    assert "   2 >0BW1<   1F1     2F0" in str(error)


def test_validate_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="num_microbatches must be an integer >= 1, got 0"):
        validate(one_f_one_b(2, 2), looped(2), 0)


def test_validate_accepts_hand_written_valid_schedule() -> None:
    schedule = {0: _acts("0F0 0F1 0B1 0B0 0W0 0W1"), 1: _acts("1F1 1F0 1BW1 1BW0")}
    validate(schedule, looped(2), 2)
    validate(lower(schedule, looped(2)), looped(2), 2)


def test_nccl_needs_messages_received_in_the_order_they_are_sent() -> None:
    # valid over gloo (tags match messages), but rank 1 receives micro-batch 1 before 0
    with pytest.raises(ScheduleError, match=r"rank 0: 0SEND_F1 is sent after the message of 1RECV_F0, but rank 1 "
                                            r"runs 1RECV_F1 first; NCCL pairs messages in order"):
        check_in_order({0: _acts("0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B1 0B1 0RECV_B0 0B0 0W0 0W1"),
                        1: _acts("1RECV_F1 1F1 1RECV_F0 1F0 1BW1 1SEND_B1 1BW0 1SEND_B0")}, looped(2))
    # lower() reads each link in send order: rank 1 takes micro-batch 0's input first, then computes 1 before 0
    lowered = lower({0: _acts("0F0 0F1 0B1 0B0 0W0 0W1"), 1: _acts("1F1 1F0 1BW1 1BW0")}, looped(2))
    assert " ".join(map(str, lowered[1])) == "1RECV_F0 1RECV_F1 1F1 1F0 1BW1 1SEND_B1 1BW0 1SEND_B0"
    check_in_order(lowered, looped(2))
    validate(lowered, looped(2), 2)
    for name, entry in SCHEDULES.items():
        for p, m, v in ((2, 3, 1), (3, 8, 1), (4, 4, 2), (4, 8, 2)):
            if v == 1 or entry.virtual or entry.fixed_stages:
                actions, placement = build_schedule(name, p, m, v)
                check_in_order(fuse_backward(lower(actions, placement)), placement)


def test_simulate_raises_on_invalid_schedule() -> None:
    with pytest.raises(ScheduleError, match="stage 0 mb 1: missing forward"):
        simulate({0: _acts("0F0 0BW0 0BW1")}, looped(1), 2)


# --- simulator: bubbles -------------------------------------------------------------------


@pytest.mark.parametrize("generator", [gpipe, one_f_one_b])
def test_gpipe_and_1f1b_bubble_is_exact(generator) -> None:
    for p in range(1, 9):
        for m in range(1, 17):
            result = simulate(generator(p, m), looped(p), m)
            assert result.makespan == 3 * (m + p - 1)
            assert result.busy == {rank: 3 * m for rank in range(p)}
            for bubble in result.bubble.values():
                assert bubble == pytest.approx((p - 1) / (m + p - 1))


def test_zb_h1_makespan_and_bubble() -> None:
    for p in range(1, 9):
        for m in range(1, 17):
            result = simulate(zb_h1(p, m), looped(p), m)
            assert result.makespan == 3 * m + p - 1 + max(0, p - m)
            if m >= p:
                assert result.bubble[0] == pytest.approx((p - 1) / (3 * m + p - 1))


def test_numbers_at_four_ranks_eight_microbatches() -> None:
    results = {name: simulate(make(4, 8), looped(4), 8)
               for name, make in (("gpipe", gpipe), ("1f1b", one_f_one_b), ("zb_h1", zb_h1))}
    assert [results[n].makespan for n in ("gpipe", "1f1b", "zb_h1")] == [33, 33, 27]
    assert results["1f1b"].bubble[0] == pytest.approx(3 / 11)
    assert results["zb_h1"].bubble[0] == pytest.approx(1 / 9)
    idle = {name: r.makespan - r.busy[0] for name, r in results.items()}
    assert idle == {"gpipe": 9, "1f1b": 9, "zb_h1": 3}  # ZB-H1 idles a third as long
    ratio = results["zb_h1"].bubble[0] / results["1f1b"].bubble[0]
    assert ratio == pytest.approx(11 / 27)
    assert ratio < 0.41


@pytest.mark.parametrize(
    "p, m, v, makespan, bubble",
    [(4, 8, 2, 57, 3 / 19), (2, 4, 2, 27, 1 / 9), (4, 8, 3, 81, 1 / 9), (8, 16, 2, 117, 7 / 39)],
)
def test_interleaved_bubble_literal(p: int, m: int, v: int, makespan: int, bubble: float) -> None:
    result = simulate(interleaved_1f1b(p, m, v), looped(p, v), m)
    assert result.makespan == makespan
    assert list(result.bubble.values()) == [pytest.approx(bubble)] * p


def test_interleaved_bubble_formula_when_p_divides_m() -> None:
    for p in range(1, 9):
        for m in range(p, 17, p):
            for v in (2, 3):
                result = simulate(interleaved_1f1b(p, m, v), looped(p, v), m)
                assert result.bubble[0] == pytest.approx((p - 1) / (v * m + p - 1))


def test_interleaved_never_idles_longer_than_1f1b_per_unit_of_work() -> None:
    for p in range(2, 7):
        for m in range(1, 13):
            for v in (2, 3):
                idle = simulate(interleaved_1f1b(p, m, v), looped(p, v), m).makespan - 3 * v * m
                assert idle <= v * 3 * (p - 1)  # 1F1B idles 3(p-1) units of full-stage work


# --- simulator: memory --------------------------------------------------------------------


def test_peak_stash_per_schedule() -> None:
    for p in range(1, 9):
        for m in range(1, 17):
            expected_1f1b = {r: min(p - r, m) for r in range(p)}
            assert simulate(gpipe(p, m), looped(p), m).peak_stash == {r: m for r in range(p)}
            assert simulate(one_f_one_b(p, m), looped(p), m).peak_stash == expected_1f1b
            zb = simulate(zb_h1(p, m), looped(p), m)
            assert zb.peak_awaiting_b == expected_1f1b
            assert zb.peak_stash == {r: min(p, m) for r in range(p)}


def test_peak_stash_interleaved_and_looped_gpipe() -> None:
    assert simulate(interleaved_1f1b(4, 8, 2), looped(4, 2), 8).peak_stash == {0: 11, 1: 9, 2: 7, 3: 5}
    assert simulate(gpipe(2, 3, 2), looped(2, 2), 3).peak_stash == {0: 6, 1: 6}


# --- simulator: costs and timeline --------------------------------------------------------


def test_timeline_literal() -> None:
    result = simulate(zb_h1(2, 2), looped(2), 2)
    assert result.makespan == 7
    assert [(s, e, str(a)) for s, e, a in result.timeline[0]] == [
        (0, 1, "0F0"), (1, 2, "0F1"), (3, 4, "0B0"), (4, 5, "0W0"), (5, 6, "0B1"), (6, 7, "0W1")]
    assert [(s, e, str(a)) for s, e, a in result.timeline[1]] == [
        (1, 2, "1F0"), (2, 3, "1B0"), (3, 4, "1F1"), (4, 5, "1B1"), (5, 6, "1W0"), (6, 7, "1W1")]


def test_comm_latency_same_with_and_without_lowering() -> None:
    schedule = one_f_one_b(2, 1)
    costs = {"comm": 0.5}
    assert simulate(schedule, looped(2), 1, costs=costs).makespan == 7
    assert simulate(lower(schedule, looped(2)), looped(2), 1, costs=costs).makespan == 7


def test_comm_actions_with_cost_appear_in_timeline() -> None:
    result = simulate(lower(one_f_one_b(2, 1), looped(2)), looped(2), 1, costs={"SEND_F": 0.25})
    assert [(s, e, str(a)) for s, e, a in result.timeline[0]] == [
        (0, 1, "0F0"), (1, 1.25, "0SEND_F0"), (4.25, 6.25, "0BW0")]
    assert result.busy[0] == 3


def test_per_kind_and_per_stage_costs() -> None:
    result = simulate(zb_h1(1, 2), looped(1), 2, costs={"F": 2, "B": 3, "W": 0.5})
    assert result.makespan == 11
    assert simulate(gpipe(2, 2), looped(2), 2, costs={"B": 2, "W": 2}).makespan == 2 * 1 + 1 + 2 * 4 + 4
    slow_last = simulate(gpipe(2, 1), looped(2), 1, costs=lambda a: (a.stage_index + 1) * (
        2 if a.kind == "BW" else 1))
    assert slow_last.makespan == 1 + 2 + 4 + 2
    assert slow_last.bubble[0] == pytest.approx(1 - 3 / 9)


def test_zero_costs_give_zero_bubble() -> None:
    result = simulate(one_f_one_b(2, 2), looped(2), 2, costs={"F": 0, "B": 0, "W": 0})
    assert result.makespan == 0
    assert result.bubble == {0: 0.0, 1: 0.0}


@pytest.mark.parametrize(
    "costs, message",
    [({"X": 1}, r"unknown cost keys \['X'\]"), ({"F": -1}, "costs must be non-negative")],
)
def test_bad_costs(costs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        simulate(one_f_one_b(2, 2), looped(2), 2, costs=costs)


def test_format_summary() -> None:
    result = SimResult(makespan=10, busy={0: 8, 1: 6.5}, bubble={0: 0.2, 1: 0.35},
                       peak_stash={0: 2, 1: 1}, timeline={0: [], 1: []},
                       peak_awaiting_b={0: 2, 1: 1}, steps=4)
    assert format_summary(result) == """\
makespan 10, 4 steps
rank  busy  bubble  peak_stash  peak_awaiting_b
   0     8   20.0%           2                2
   1   6.5   35.0%           1                1"""


def test_negative_callable_cost_is_rejected() -> None:
    with pytest.raises(ValueError, match="cost of 0F0 must be non-negative, got -1"):
        simulate(one_f_one_b(1, 1), looped(1), 1, costs=lambda action: -1)


def test_schedule_error_survives_pickling() -> None:
    import pickle

    error = _error({0: _acts("0F0")}, 1, 1)
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ScheduleError) and str(copy) == str(error)


# --- predictions from a traced run and a measured message latency ---------------------------

TRACED = ("data=synthetic", "data.n=200", "data.dim=8", "data.classes=3", "model.hidden=[16,16,16]",
          "train.batch_size=16", "pipeline.microbatches=4", "pipeline.transport=inprocess", "pipeline.ranks=2",
          "train.steps=8", "train.log_every=2", "train.eval_every=8", "trace.enabled=true")


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
    """A traced two-rank run (one process) with the .hydra/config.yaml Hydra writes beside it."""
    import contextlib
    import io

    import torch
    from omegaconf import OmegaConf

    from pipeline.config import parse
    from pipeline.training.trainer import train
    from tests.conftest import make_cfg

    run_dir = tmp_path_factory.mktemp("traced")
    cfg = make_cfg(*TRACED)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun gives each rank; more threads crawl on a busy machine
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train(parse(cfg), run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir


def _simulate_cli(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    """(exit code, stdout lines, stderr lines) of `python -m pipeline.simulate ARGV`, run here."""
    from pipeline.simulate import main

    try:
        code = main(list(argv))
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_from_trace_prints_the_prediction_beside_the_measured_step_time(traced_run, tmp_path, capsys):
    import json
    import statistics

    code, out, err = _simulate_cli(capsys, "--from-trace", str(traced_run), "--warmup", "2",
                                   "--png", str(tmp_path / "p.png"))
    assert code == 0, err
    assert out[0] == (f"1f1b: p=2 m=4 v=1, model 8-16-16-16-3 float32, batch 16, costs from the trace of "
                      f"{traced_run} (steps after 2), transport inprocess, message latency 0.000 ms (inprocess: a "
                      "mailbox hands the tensor over)")
    rows = [json.loads(line) for line in (traced_run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > 2]  # steps 4, 6, 8
    assert len(logged) == 3
    measured = statistics.median(logged) * 1e3
    assert out[2] == (f"measured step time {measured:.2f} ms (median step_time_s of the 3 logged steps from "
                      "step 4 on, metrics.jsonl)")
    predicted = float(out[1].split()[3])
    assert out[1].startswith("predicted step time ") and predicted > 0
    assert "ms after an unlogged one" in out[1]  # steps 3, 5 and 7 were not logged
    assert out[3].startswith("error ") and out[3].endswith("%")
    error = float(out[3].split()[1].rstrip("%"))  # printed to 0.1 point, from the unrounded prediction
    rounding = 0.05 + 100 * 0.005 / measured  # the prediction above is printed to 0.01 ms: 0.5 / measured points
    assert error == pytest.approx(100 * (predicted - measured) / measured, abs=rounding * 1.001)
    assert out[4].split() == ["rank", "bubble", "peak_stash", "peak_stash_bytes", "measured_bubble"]
    assert [line.split()[0] for line in out[5:7]] == ["0", "1"] and (tmp_path / "p.png").is_file()


def test_a_trace_json_reads_back_as_the_events_it_was_written_from(traced_run):
    from pipeline.runtime import trace
    from pipeline.training.traced_run import read_events

    written = trace.load_ranks(traced_run)  # the per-rank files trace.json was merged from, in ns
    read = read_events(traced_run / "trace.json")
    origin = min(e.start_ns for evs in written.values() for e in evs)
    assert sorted(read) == sorted(written) == [0, 1]
    for rank, events in written.items():
        shifted = sorted(((e.step, e.name, e.start_ns - origin, e.end_ns - origin) for e in events),
                         key=lambda e: e[2])
        assert [tuple(e) for e in read[rank]] == shifted


def _one_error_line(capsys, *argv: str) -> str:
    code, out, err = _simulate_cli(capsys, *argv)
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


def test_from_trace_of_a_missing_directory(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert _one_error_line(capsys, "--from-trace", str(missing)) == (
        f"error: {missing}: no such run directory; give the hydra.run.dir of a traced run")


def test_from_trace_of_an_untraced_run(traced_run, tmp_path, capsys):
    import shutil

    untraced = tmp_path / "untraced"
    shutil.copytree(traced_run, untraced)
    (untraced / "trace.json").unlink()
    assert _one_error_line(capsys, "--from-trace", str(untraced)) == (
        f"error: {untraced} has no trace.json, so the run was not traced; rerun with trace.enabled=true")


@pytest.mark.parametrize("text, detail", [
    ('{"traceEvents": [{"ph": "X", "pid": 0, "na', "JSONDecodeError"),  # cut short
    ('{"traceEvents": [{"ph": "X", "pid": 0, "name": "0F0", "ts": 1, "dur": 2}]}', "KeyError: 'args'"),
    ('{"traceEvents": [{"ph": "X", "pid": 0, "name": "hello", "ts": 1, "dur": 2, "args": {"step": 1}}]}',
     "ValueError"),
    ('[1, 2, 3]', "TypeError"),
])
def test_from_trace_of_a_damaged_trace(tmp_path, capsys, text, detail):
    (tmp_path / "trace.json").write_text(text)
    line = _one_error_line(capsys, "--from-trace", str(tmp_path))
    assert line.startswith(f"error: {tmp_path / 'trace.json'} is damaged (") and detail in line
    assert line.endswith("; rerun with trace.enabled=true")


def test_a_trace_without_actions_is_refused(tmp_path, capsys):
    (tmp_path / "trace.json").write_text('{"traceEvents": []}')
    assert _one_error_line(capsys, "--from-trace", str(tmp_path)) == (
        f"error: {tmp_path / 'trace.json'} holds no actions; rerun with trace.enabled=true")


def test_from_trace_and_measure_together_are_refused(traced_run, capsys):
    assert _one_error_line(capsys, "--from-trace", str(traced_run), "--measure") == (
        "error: --from-trace takes the costs from the run's trace, --measure times them here; give one of the two")


def test_from_trace_refuses_overrides_and_a_warmup_past_the_last_logged_step(traced_run, capsys):
    assert _one_error_line(capsys, "--from-trace", str(traced_run), "pipeline.schedule=gpipe") == (
        "error: --from-trace simulates the run as its .hydra/config.yaml says; drop the overrides "
        "(pipeline.schedule=gpipe)")
    assert _one_error_line(capsys, "--from-trace", str(traced_run), "--warmup", "8").startswith(
        f"error: {traced_run}/trace.json has no F of stage 0 after step 8")


def test_measure_charges_the_costs_measured_over_the_run_s_transport(monkeypatch, tmp_path, capsys):
    import pipeline.training.forecast
    from pipeline.runtime.latency import TransportCosts, resolve

    asked = []  # stands in for pipeline.runtime.latency.transport_costs (tests/test_latency.py runs it)
    monkeypatch.setattr(pipeline.training.forecast, "transport_costs",
                        lambda nbytes, transport, values: asked.append((nbytes, transport, values))
                        or TransportCosts(1.234e-3, 2e-5, 1e-5, 3e-4))
    code, out, _ = _simulate_cli(capsys, "--measure", "--png", str(tmp_path / "p.png"))
    auto = resolve("auto")
    assert code == 0 and asked == [(16 * 128 * 4, auto, 4)]  # 16 rows of 128 float32 cross ranks; 2 + 2 stages' sums
    assert out[0].endswith(f", costs measured here, transport {auto}, message latency 1.234 ms (measured: {auto} "
                           "between two processes, 8 KiB, sender busy; send 20 us, receive 10 us)")
    step, logged = float(out[1].split()[3]), float(out[2].split()[6])
    assert out[2].startswith("a logged step (a metrics.jsonl row) ") and logged > step
    code, out, _ = _simulate_cli(capsys, "--measure", "--png", str(tmp_path / "p.png"), "pipeline.transport=p2p")
    assert code == 0 and asked[-1][1] == "p2p" and ", transport p2p, " in out[0]  # the config names it
    code, out, _ = _simulate_cli(capsys, "--measure", "--transport", "shm", "--png", str(tmp_path / "p.png"),
                                 "pipeline.transport=p2p")
    assert code == 0 and asked[-1][1] == "shm"  # --transport wins over the config
    code, out, _ = _simulate_cli(capsys, "--measure", "--latency-us", "500", "--png", str(tmp_path / "p.png"))
    assert code == 0 and len(asked) == 3 and out[0].endswith("message latency 0.500 ms (given)")  # nothing timed
    code, out, _ = _simulate_cli(capsys, "--measure", "--transport", "inprocess", "--png", str(tmp_path / "p.png"))
    assert code == 0 and len(asked) == 3  # nothing to time: a mailbox hands the tensor over
    assert out[0].endswith("transport inprocess, message latency 0.000 ms (inprocess: a mailbox hands the tensor over)")


@pytest.mark.parametrize("transport, latency_ms", [("shm", "0.011"), ("p2p", "0.050"), ("inprocess", "0.000")])
def test_flop_counts_charge_the_latency_assumed_for_the_transport(transport, latency_ms, tmp_path, capsys):
    code, out, _ = _simulate_cli(capsys, "--transport", transport, "--png", str(tmp_path / "p.png"))
    assert code == 0 and f", costs from FLOP counts, transport {transport}, message latency {latency_ms} ms (" in out[0]


def test_a_faster_transport_predicts_a_shorter_step(tmp_path, capsys):
    steps = {}
    for transport in ("p2p", "shm", "inprocess"):
        code, out, _ = _simulate_cli(capsys, "--transport", transport, "--png", str(tmp_path / "p.png"))
        steps[transport] = float(out[1].split()[3])
    assert steps["p2p"] > steps["shm"] > steps["inprocess"]


@pytest.mark.parametrize("argv, message", [
    (["--transport", "gloo"], "error: --transport='gloo' is unknown; pick one of auto, shm, p2p, inprocess"),
    (["--transport", ""], "error: --transport='' is unknown; pick one of auto, shm, p2p, inprocess"),
    (["--bandwidth-gbs", "0"], "error: --bandwidth-gbs=0 must be > 0"),
])
def test_bad_transport_or_bandwidth_is_one_line_and_exit_2(argv, message, capsys):
    assert _one_error_line(capsys, *argv) == message


def test_from_trace_takes_the_transport_of_the_run(traced_run, capsys):
    assert _one_error_line(capsys, "--from-trace", str(traced_run), "--transport", "shm") == (
        "error: --from-trace simulates the run over the transport it ran on (its pipeline.transport); drop "
        "--transport, or give --latency-us US")


def test_the_trace_latency_is_the_mean_over_receives_that_waited():
    from pipeline.planning.costs import message_latency
    from pipeline.runtime.executor import TraceEvent

    events = {0: [TraceEvent(2, "0SEND_F0", 1_000, 1_010), TraceEvent(2, "0SEND_F1", 3_000, 3_010),
                  TraceEvent(2, "0SEND_F2", 5_000, 5_010)],
              1: [TraceEvent(2, "1RECV_F0", 900, 1_300), TraceEvent(2, "1RECV_F1", 2_000, 3_500),
                  TraceEvent(2, "1RECV_F2", 4_000, 6_300)]}  # 300, 500 and 1300 ns
    assert message_latency(events) == pytest.approx(700e-9)  # the median would say 500


def test_between_steps_is_the_gap_on_the_rank_that_ends_each_step():
    from pipeline.planning.costs import between_steps
    from pipeline.runtime.executor import TraceEvent

    events = {0: [TraceEvent(1, "0F0", 0, 10), TraceEvent(2, "0F0", 30, 40), TraceEvent(3, "0F0", 45, 50)],
              1: [TraceEvent(1, "1F0", 5, 25), TraceEvent(2, "1F0", 20, 60), TraceEvent(3, "1F0", 120, 130)]}
    # step 1 ends on rank 1 (at 25), which starts step 2 at 20 (it overlaps); step 2 ends on rank 1 at 60
    assert between_steps(events, skip_steps=0) == {1: -5e-9, 2: 60e-9}
    assert between_steps(events, skip_steps=1) == {2: 60e-9}


def _message_events(wait_ns: int) -> dict:
    """One step (2) of rank 0 sending 0F0's output to rank 1; rank 1 reaches its receive `wait_ns` before the send."""
    from pipeline.runtime.executor import TraceEvent

    return {0: [TraceEvent(2, "0F0", 0, 1_000), TraceEvent(2, "0SEND_F0", 1_002, 1_012)],
            1: [TraceEvent(2, "1RECV_F0", 1_002 - wait_ns, 1_200), TraceEvent(2, "1F0", 1_204, 2_000)]}


@pytest.mark.parametrize("transport, latency_s", [("shm", 1.1e-5), ("p2p", 5e-5), ("inprocess", 0.0)])
def test_from_trace_charges_the_transport_s_latency_where_no_receive_waited(transport, latency_s):
    from pipeline.mlp.model import MLPSpec
    from pipeline.planning.costs import from_trace

    spec = MLPSpec(dims=(4, 8, 3), activation="relu", bias=True, dtype="float32")
    costs, _ = from_trace(_message_events(wait_ns=-100), spec, [range(0, 1), range(1, 2)], 2, skip_steps=1,
                          transport=transport)  # the receive began after the send: nothing waited
    assert costs.latency_s == latency_s
    assert costs.comm == pytest.approx({(0, "SEND_F"): 10e-9, (1, "RECV_F"): 98e-9})
    assert costs.action_s == pytest.approx(3e-9)  # the gaps 2 and 4 ns


def test_from_trace_measures_the_latency_over_a_process_transport_and_none_in_process():
    from pipeline.mlp.model import MLPSpec
    from pipeline.planning.costs import from_trace

    spec = MLPSpec(dims=(4, 8, 3), activation="relu", bias=True, dtype="float32")
    events = _message_events(wait_ns=500)
    for transport in ("shm", "p2p"):
        costs, _ = from_trace(events, spec, [range(0, 1), range(1, 2)], 2, skip_steps=1, transport=transport)
        # 198 ns from the send's start to the receive's end, less the send (10), one executor step (the
        # median of the gaps 2 and 4: 3) and a receive that did not wait (none here: 0)
        assert costs.latency_s == pytest.approx(185e-9) and costs.recv_s == 0.0
    costs, _ = from_trace(events, spec, [range(0, 1), range(1, 2)], 2, skip_steps=1, transport="inprocess")
    assert costs.latency_s == 0.0


def test_send_receive_and_executor_step_costs_are_charged_on_the_timeline():
    from pipeline.planning.costs import Costs

    schedule = lower(one_f_one_b(2, 1), looped(2))
    compute = {(s, k): 1.0 for s in range(2) for k in "FBW"}
    costs = Costs(compute, {0: 0, 1: 0}, latency_s=0.5, send_s=0.25, recv_s=0.125, action_s=0.0625,
                  comm={(1, "SEND_B"): 0.375})
    # rank 0: 0F0 [0, 1.0625], 0SEND_F0 [, 1.375]; rank 1: 1RECV_F0 ends 1.375 + 0.5 + 0.1875 = 2.0625,
    # 1F0 3.125, 1BW0 (B + W) 5.1875, 1SEND_B0 5.625; rank 0: 0RECV_B0 ends 6.3125, 0BW0 8.375
    assert simulate(schedule, looped(2), 1, costs).makespan == pytest.approx(8.375)
    assert simulate(schedule, looped(2), 1, Costs({**compute, (0, "BW"): 1.5, (1, "BW"): 1.5}, {0: 0, 1: 0},
                    latency_s=0.5, send_s=0.25, recv_s=0.125, action_s=0.0625, comm={(1, "SEND_B"): 0.375})
                    ).makespan == pytest.approx(8.375 - 0.5 - 0.5)  # a BW timed whole replaces B + W


def test_executor_costs_time_every_stage_through_the_executor():
    import torch

    from pipeline.config import compose
    from pipeline.training.forecast import _configured, executor_costs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        conf, spec, plan, batch, rows = _configured(compose(["pipeline.schedule=zb_h1", "pipeline.microbatches=4"]), 2)
        costs, outside = executor_costs(conf, spec, plan, batch, repeats=2)
    finally:
        torch.set_num_threads(threads)
    assert set(costs.compute) == {(s, k) for s in range(2) for k in ("F", "B", "W", "BW")}
    assert all(0 < t < 1 for t in costs.compute.values()) and 0 < costs.action_s < 1e-2 and 0 < outside < 1
    assert costs.message_bytes == {0: 16 * 128 * 4, 1: 16 * 10 * 4}
