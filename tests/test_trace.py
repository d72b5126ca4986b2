"""Tests for pipeline.trace: rank files, the Chrome trace, measured bubbles and the timeline PNG."""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.runtime.executor import TraceEvent
from pipeline.runtime.trace import (chrome_trace, draw_timeline, finish, is_compute, load_ranks, measured_spans,
                                    step_bubbles, step_span_s, write_rank)
from pipeline.schedules.lowering import lower
from pipeline.schedules.registry import build_schedule
from pipeline.schedules.simulator import simulate

pytestmark = pytest.mark.timeout(60)

T0 = 5_000_000_000  # perf_counter_ns of the first event; every time below is in µs after it
STEP_2_OFFSET = 2000  # µs: step 2 repeats step 1 this much later

# A lowered 1F1B step over two ranks and two micro-batches, times in µs from T0.
RANK_0 = [("0F0", 0, 100), ("0SEND_F0", 100, 110), ("0F1", 110, 210), ("0SEND_F1", 210, 220),
          ("0RECV_B0", 220, 440), ("0BW0", 440, 640), ("0RECV_B1", 640, 780), ("0BW1", 780, 980),
          ("WAIT_SENDS", 980, 1000)]
RANK_1 = [("1RECV_F0", 100, 120), ("1F0", 120, 220), ("1BW0", 220, 420), ("1SEND_B0", 420, 430),
          ("1RECV_F1", 430, 440), ("1F1", 440, 560), ("1BW1", 560, 760), ("1SEND_B1", 760, 770),
          ("WAIT_SENDS", 770, 780)]
# step span 1000 µs; compute: rank 0 100+100+200+200 = 600, rank 1 100+200+120+200 = 620
BUBBLE = {0: 0.4, 1: 0.38}


def _events(rows: list[tuple[str, int, int]], step: int, offset_us: int = 0) -> list[TraceEvent]:
    return [TraceEvent(step, name, T0 + (start + offset_us) * 1000, T0 + (end + offset_us) * 1000)
            for name, start, end in rows]


@pytest.fixture
def events() -> dict[int, list[TraceEvent]]:
    """Two training steps of the hand-made 1F1B step on two ranks."""
    return {rank: _events(rows, 1) + _events(rows, 2, STEP_2_OFFSET)
            for rank, rows in ((0, RANK_0), (1, RANK_1))}


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the magic bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _complete_events(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


# --- events and files ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["1F0", "0B3", "2W11", "3BW0"])
def test_compute_actions_are_compute(name):
    assert is_compute(name)


@pytest.mark.parametrize("name", ["1SEND_F0", "1RECV_F0", "0SEND_B2", "0RECV_B2", "WAIT_SENDS", "", "F"])
def test_transfers_and_waits_are_not_compute(name):
    assert not is_compute(name)


def test_rank_files_round_trip(tmp_path, events):
    path = write_rank(tmp_path, 3, events[1])
    write_rank(tmp_path, 0, events[0])
    (tmp_path / "trace" / "notes.txt").write_text("not a rank file")
    assert path == tmp_path / "trace" / "rank_003.json"
    assert json.loads(path.read_text())[0] == [1, "1RECV_F0", T0 + 100_000, T0 + 120_000]
    loaded = load_ranks(tmp_path)
    assert list(loaded) == [0, 3]
    assert loaded[3] == events[1] and loaded[0] == events[0]
    assert all(isinstance(e, TraceEvent) for e in loaded[0])


def test_a_malformed_rank_file_names_the_file(tmp_path):
    (tmp_path / "trace").mkdir()
    (tmp_path / "trace" / "rank_000.json").write_text('[[1, "0F0", 5]]')
    with pytest.raises(UserError, match="rank_000.json"):
        load_ranks(tmp_path)


def test_no_rank_files_load_as_empty(tmp_path):
    assert load_ranks(tmp_path) == {}


# --- Chrome trace -------------------------------------------------------------------------

def test_chrome_trace_times_are_microseconds_from_the_first_event(events):
    trace = chrome_trace(events)
    assert trace["displayTimeUnit"] == "ms"
    by_key = {(e["pid"], e["name"], e["args"]["step"]): e for e in _complete_events(trace)}
    assert by_key[(0, "0F0", 1)]["ts"] == 0.0 and by_key[(0, "0F0", 1)]["dur"] == 100.0
    assert by_key[(1, "1F0", 1)]["ts"] == 120.0 and by_key[(1, "1F0", 1)]["dur"] == 100.0
    assert by_key[(1, "1F0", 2)]["ts"] == 2120.0
    assert by_key[(0, "WAIT_SENDS", 2)]["ts"] == 2980.0 and by_key[(0, "WAIT_SENDS", 2)]["dur"] == 20.0
    assert len(by_key) == 2 * (len(RANK_0) + len(RANK_1))


def test_chrome_trace_puts_compute_on_thread_0_and_communication_on_thread_1(events):
    threads = {(e["pid"], e["name"], e["args"]["step"]): e["tid"]
               for e in _complete_events(chrome_trace(events))}
    assert threads[(0, "0F0", 1)] == 0 and threads[(1, "1BW1", 2)] == 0
    assert threads[(0, "0SEND_F0", 1)] == 1 and threads[(1, "1RECV_F1", 1)] == 1
    assert threads[(1, "WAIT_SENDS", 2)] == 1
    assert sum(tid == 0 for tid in threads.values()) == 2 * 8  # 4 compute actions x 2 ranks x 2 steps


def test_chrome_trace_names_ranks_and_threads(events):
    meta = [e for e in chrome_trace(events)["traceEvents"] if e["ph"] == "M"]
    names = {(e["pid"], e["name"], e.get("tid")): e["args"] for e in meta}
    assert names[(0, "process_name", 0)] == {"name": "rank 0"}
    assert names[(1, "process_name", 0)] == {"name": "rank 1"}
    assert names[(1, "process_sort_index", 0)] == {"sort_index": 1}
    assert names[(0, "thread_name", 0)] == {"name": "compute"}
    assert names[(0, "thread_name", 1)] == {"name": "communication"}


def test_events_on_one_thread_never_overlap(events):
    threads = defaultdict(list)
    for event in _complete_events(chrome_trace(events)):
        threads[(event["pid"], event["tid"])].append((event["ts"], event["ts"] + event["dur"]))
    assert sorted(threads) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for spans in threads.values():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end - 1e-9


def test_chrome_trace_is_json_and_empty_input_is_empty():
    assert json.loads(json.dumps(chrome_trace({}))) == {"traceEvents": [], "displayTimeUnit": "ms"}


# --- bubbles ------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [1, 2])
def test_step_bubbles_are_idle_fractions_of_the_whole_step(events, step):
    assert step_bubbles(events, step) == pytest.approx(BUBBLE)
    assert step_span_s(events, step) == pytest.approx(1000e-6)


def test_a_rank_idle_for_the_whole_step_has_bubble_1(events):
    events[2] = []
    assert step_bubbles(events, 1)[2] == 1.0


def test_span_covers_every_rank(events):
    only_rank_1 = {1: events[1]}
    assert step_span_s(only_rank_1, 1) == pytest.approx(680e-6)  # 100 .. 780 µs
    assert step_bubbles(only_rank_1, 1)[1] == pytest.approx(1 - 620 / 680)


def test_an_untraced_step_is_refused(events):
    with pytest.raises(ValueError, match="step 7"):
        step_bubbles(events, 7)


def test_measured_spans_are_ms_from_the_steps_start(events):
    spans = measured_spans(events, 2)
    assert list(spans) == [0, 1]
    assert spans[0][0] == pytest.approx((0.0, 0.1, "0F0"))
    assert spans[1][0] == pytest.approx((0.1, 0.12, "1RECV_F0"))
    assert spans[0][-1] == pytest.approx((0.98, 1.0, "WAIT_SENDS"))
    assert len(spans[1]) == len(RANK_1)


# --- pictures -----------------------------------------------------------------------------

def _simulated(name: str, ranks: int, mbs: int, virtual: int = 1, lowered: bool = False,
               costs: dict | None = None) -> dict[int, list[tuple[float, float, str]]]:
    schedule, placement = build_schedule(name, ranks, mbs, virtual)
    if lowered:
        schedule = lower(schedule, placement)
    timeline = simulate(schedule, placement, mbs, costs).timeline
    return {rank: [(start, end, str(action)) for start, end, action in spans]
            for rank, spans in timeline.items()}


def test_draw_a_measured_step(tmp_path, events):
    path = draw_timeline(measured_spans(events, 1), tmp_path / "pics" / "step1.png", title="1F1B")
    assert path == tmp_path / "pics" / "step1.png"
    width, height = _png_size(path)
    assert 800 <= width <= 3000 and 150 <= height < width


def test_draw_a_simulated_zb_h1(tmp_path):
    spans = _simulated("zb_h1", 2, 4)
    assert spans[0][0] == (0.0, 1.0, "0F0")
    path = draw_timeline(spans, tmp_path / "zb.png", title="ZB-H1", unit="")
    width, height = _png_size(path)
    assert width > height > 100


def test_draw_interleaved_with_transfers_and_an_idle_rank(tmp_path):
    costs = {"SEND_F": 0.2, "RECV_F": 0.3, "SEND_B": 0.2, "RECV_B": 0.3}
    spans = _simulated("interleaved_1f1b", 2, 4, virtual=2, lowered=True, costs=costs)
    spans[2] = []  # a rank that ran nothing still gets its (empty) row
    width, height = _png_size(draw_timeline(spans, tmp_path / "inter.png", unit=""))
    assert width > height > 150


# --- finish -------------------------------------------------------------------------------

def test_finish_merges_ranks_and_draws_the_last_step(tmp_path, events):
    for rank, evs in events.items():
        write_rank(tmp_path, rank, evs)
    result = finish(tmp_path)
    assert result["step"] == 2
    assert result["trace"] == tmp_path / "trace.json"
    assert result["timeline"] == tmp_path / "timeline.png"
    assert result["bubble"] == pytest.approx(BUBBLE)
    merged = json.loads((tmp_path / "trace.json").read_text())
    assert len(_complete_events(merged)) == 2 * (len(RANK_0) + len(RANK_1))
    _png_size(tmp_path / "timeline.png")


def test_finish_a_chosen_step(tmp_path, events):
    for rank, evs in events.items():
        write_rank(tmp_path, rank, [e for e in evs if e.step == 1])
    assert finish(tmp_path, step=1)["step"] == 1
    with pytest.raises(UserError, match="no events for step 5"):
        finish(tmp_path, step=5)


def test_finish_without_rank_files_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no trace events"):
        finish(tmp_path)


def test_draw_nothing_still_writes_a_picture(tmp_path):
    width, height = _png_size(draw_timeline({}, tmp_path / "empty.png"))
    assert width > height


def test_a_traced_run_writes_the_merged_trace_timeline_and_bubbles(tmp_path):
    from dataclasses import replace

    from pipeline.training.equivalence import pipelined, problem

    conf = problem(schedule="zb_h1", ranks=2, microbatches=4)
    conf = replace(conf, trace=replace(conf.trace, enabled=True))
    pipelined(conf, tmp_path)
    merged = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    compute = [e for e in merged if e["ph"] == "X" and e["tid"] == 0]
    assert {e["pid"] for e in compute} == {0, 1}
    # every step: rank 1 runs F, B and W of 4 micro-batches; rank 0 runs its B and W together (BW)
    assert len(compute) == conf.train.steps * (12 + 8)
    assert {e["name"] for e in compute if e["pid"] == 1} == {f"1{k}{mb}" for k in "FBW" for mb in range(4)}
    assert {e["name"] for e in compute if e["pid"] == 0} == {f"0{k}{mb}" for k in ("F", "BW") for mb in range(4)}
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    bubbles = [r["bubble"] for r in rows if "bubble" in r]
    assert len(bubbles) == 2 and all(len(b) == 2 and all(0 <= x < 1 for x in b) for b in bubbles)


def test_message_latency_counts_only_receives_that_were_already_waiting():
    from pipeline.planning.costs import message_latency
    from pipeline.runtime.executor import TraceEvent

    events = {
        0: [TraceEvent(2, "0SEND_F0", 1_000, 1_010), TraceEvent(2, "0SEND_F1", 5_000, 5_010),
            TraceEvent(2, "0RECV_B0", 2_000, 9_000), TraceEvent(1, "0SEND_F0", 0, 10)],
        1: [TraceEvent(2, "1RECV_F0", 500, 1_300),  # waiting since before the send: 300 ns
            TraceEvent(2, "1RECV_F1", 6_000, 6_001),  # reached after the data arrived: not a latency
            TraceEvent(2, "1SEND_B0", 8_500, 8_510),  # rank 0 waits from 2000: 500 ns
            TraceEvent(1, "1RECV_F0", 0, 99_999)],  # step 1 is warm-up
    }
    assert message_latency(events, skip_steps=1) == pytest.approx(400e-9)  # mean of 300 and 500 ns
    assert message_latency({0: events[0][:2], 1: []}) is None
