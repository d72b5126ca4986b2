"""The shared-memory transport: its rings in one process (two ranks' segments, the sender in a thread), its
refusal where it cannot run, and a run that leaves nothing in /dev/shm (normal end, config error, SIGKILL)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.run import get_args_parser

from pipeline.config import SHM
from pipeline.errors import ConfigError
from pipeline.runtime import distributed, shm
from pipeline.runtime import transport
from pipeline.runtime.transport import PeerTimeout
from pipeline.schedules.registry import SCHEDULES
from pipeline.training.equivalence import problem
from tests.conftest import ROOT
from tests.test_distributed import TOL, differences_from_single_device
from tests.test_watchdog import alive, dev_shm, left_in_dev_shm, wait_for, workers

pytestmark = pytest.mark.timeout(60)


def pair(ring_bytes: int = 4096, timeout_s: float = 10.0, slots: int = 1) -> dict[int, shm.ShmTransport]:
    """Ranks 0 and 1 of one host, both in this process, wired as _attach_shared_memory wires them: each rank
    creates its segment, the other maps it through /proc/PID/fd, and the descriptors are closed (each mmap keeps
    its own duplicate until the segment is closed)
    The peer's ring is the first of `slots` (the others stay unused: a write past the ring would land there)."""
    size = shm.segment_bytes(slots, ring_bytes)
    created = {r: shm.Segment.create(size, f"test-rank{r}") for r in (0, 1)}
    mapped = {r: shm.Segment.open(os.getpid(), fd, size) for r, (_, fd) in created.items()}  # the peer's view
    for _, fd in created.values():
        os.close(fd)
    transports = {}
    for r, other in ((0, 1), (1, 0)):
        own = created[r][0]
        transports[r] = shm.ShmTransport(
            r, timeout_s, own, incoming={other: shm.Channel(own, shm.HEADER, ring_bytes)},
            outgoing={other: shm.Channel(mapped[other], shm.HEADER, ring_bytes)},
            segments={r: own, other: mapped[other]}, pids={other: os.getpid()})
    return transports


def mapped_segments(pid: int | str = "self", name: str = "memfd:test-rank") -> list[str]:
    """A process's mappings of shared-memory segments (the memfds are named test-rankR here, pipeline-rankR in runs)."""
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if name in line]


def open_segments(pid: int | str = "self", name: str = "memfd:test-rank") -> list[str]:
    """A process's file descriptors of shared-memory segments."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found += [target] if name in (target := os.readlink(fd)) else []
        except OSError:  # closed meanwhile (the one listing the directory)
            pass
    return found


def close(transports: dict[int, shm.ShmTransport]) -> None:
    """End both ranks' runs: afterwards no mapping (and no descriptor) of their memory is left in this process."""
    for transport in transports.values():
        transport.close()
    assert mapped_segments() == open_segments() == []


@pytest.fixture(params=["C", "Python"])
def hot_path(request, monkeypatch):
    """Each in-process test twice: through the C hot path (pipeline.runtime._ring) and through shm.py's own."""
    if request.param == "Python":
        monkeypatch.setattr(shm, "native", None)
    return request.param


@pytest.fixture
def ranks(hot_path):
    transports = pair()
    yield transports
    close(transports)


def in_thread(work) -> threading.Thread:
    """Run work() beside the test (ctypes lets go of the GIL in the futex calls); its exception is kept."""
    def run():
        try:
            work()
        except BaseException as err:  # noqa: BLE001  re-raised by joined()
            thread.error = err

    thread = threading.Thread(target=run, daemon=True)
    thread.error = None
    thread.start()
    return thread


def joined(thread: threading.Thread) -> None:
    thread.join(20)
    assert not thread.is_alive(), "the sender never finished"
    if thread.error is not None:
        raise thread.error


def receive(transport: shm.ShmTransport, like: torch.Tensor, tag: int, src: int = 1) -> torch.Tensor:
    return transport.recv(src, tag, f"0RECV_F{tag}", lambda: torch.empty_like(like))


def test_a_message_goes_there_and_back(ranks):
    x = torch.randn(3, 7, dtype=torch.float64)
    ranks[1].send(x, 0, 5, "1SEND_F5")
    y = receive(ranks[0], x, 5)
    ranks[0].send(2 * y, 1, 6, "0SEND_B6")
    back = ranks[1].recv(0, 6, "1RECV_B6", lambda: torch.empty_like(x))
    assert torch.equal(y, x) and torch.equal(back, 2 * x)
    assert y.dtype == torch.float64 and y.shape == (3, 7)
    ranks[0].flush(), ranks[1].flush()  # nothing is left to send
    assert ranks[0].pending_sends() == ranks[1].pending_sends() == []


def test_a_message_larger_than_the_ring_streams_through(ranks):
    x = torch.randn(50_000, dtype=torch.float64)  # 400 kB through a 4 kB ring: about a hundred turns
    assert x.nbytes > 50 * ranks[1].outgoing[0].capacity

    def sender():
        ranks[1].send(x, 0, 3, "1SEND_F3")
        assert ranks[1].pending_sends() == ["1SEND_F3"]  # it did not fit: the rest waits in the queue
        ranks[1].flush()  # moves it on as the receiver makes room

    thread = in_thread(sender)
    y = receive(ranks[0], x, 3)
    joined(thread)
    assert torch.equal(y, x) and ranks[1].pending_sends() == []


def test_records_wrap_around_the_end_of_the_ring(hot_path):
    transports = pair(ring_bytes=1024, slots=2)
    try:
        channel = transports[1].outgoing[0]
        for i in range(12):  # records of 64 + 320 bytes: the third, and many after it, cross the end
            x = torch.full((40,), float(i), dtype=torch.float64) + torch.arange(40, dtype=torch.float64)
            transports[1].send(x, 0, i, f"1SEND_F{i}")
            assert torch.equal(receive(transports[0], x, i), x)
        written = channel.segment.words[channel.write_word]
        assert written == 12 * 384 and written > 4 * channel.capacity
        after = channel.ring + channel.capacity  # the unused second slot, right behind the ring
        assert bytes(transports[0].own.mm[after:]) == bytes(len(transports[0].own.mm) - after)
    finally:
        close(transports)


def test_the_c_hot_path_is_built_where_a_c_compiler_is():
    if shutil.which("cc") or shutil.which("gcc"):
        assert shm.native is not None, "pip install -e . should have built pipeline/runtime/_ring.c (see setup.py)"
    switched_off = subprocess.run([sys.executable, "-c", "from pipeline.runtime import shm; print(shm.native)"],
                                  cwd=ROOT, env={**os.environ, "PIPELINE_SHM_NATIVE": "0"}, capture_output=True,
                                  text=True, timeout=60)
    assert switched_off.stdout.strip() == "None", switched_off.stderr


@pytest.mark.skipif(shm.native is None, reason="the C hot path is not built here (no C compiler)")
@pytest.mark.parametrize("writer", ["C", "Python"])
def test_the_c_and_python_paths_write_and_read_the_same_records(writer, monkeypatch):
    # what one path writes the other reads, records of every padding, many across the end of the ring
    transports = pair(ring_bytes=8192)
    native = shm.native
    try:
        sent = [torch.randn(n, dtype=torch.float64) + i for i, n in enumerate((5, 300, 48, 1, 200, 511, 64, 700))]
        for i, x in enumerate(sent * 3):
            monkeypatch.setattr(shm, "native", native if writer == "C" else None)
            transports[1].send(x, 0, i, f"1SEND_F{i}")
            transports[1].flush()
            monkeypatch.setattr(shm, "native", None if writer == "C" else native)
            assert torch.equal(receive(transports[0], x, i), x), i
        channel = transports[1].outgoing[0]
        assert channel.segment.words[channel.write_word] > 3 * channel.capacity  # it went round the ring
    finally:
        close(transports)


@pytest.mark.parametrize("posted", [False, True], ids=["unposted", "posted"])
def test_the_same_tag_sent_twice_arrives_in_order(posted, ranks):
    # tags repeat from pass to pass (training, then evaluation), and a fast sender's next pass can
    # arrive before this one is read
    first, second = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    if posted:
        ranks[0].post(lambda: torch.empty_like(first), 1, 9)
    ranks[1].send(first, 0, 9, "1SEND_F9")
    ranks[1].send(second, 0, 9, "1SEND_F9")
    assert torch.equal(receive(ranks[0], first, 9), first)
    ranks[0].post(lambda: torch.empty_like(first), 1, 9)  # the next pass posts its receive: the second is there
    assert torch.equal(receive(ranks[0], first, 9), second)


def test_a_message_that_arrives_before_its_receive_is_posted(ranks):
    early, later = torch.randn(2, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float32)
    ranks[1].send(early, 0, 1, "1SEND_F1")
    ranks[1].send(later, 0, 2, "1SEND_F2")
    assert torch.equal(receive(ranks[0], later, 2), later)  # reading tag 2 brings tag 1 in, as bytes
    assert list(ranks[0].arrived[(1, 1)]) and ranks[0].arrived[(1, 1)][0][1]  # kept raw, not yet typed
    y = receive(ranks[0], early, 1)
    assert torch.equal(y, early) and y.dtype == torch.float64 and y.shape == (2, 3)


@pytest.mark.parametrize("posted", [False, True], ids=["unposted", "posted"])
def test_a_message_of_the_wrong_size_is_a_clear_error(posted, ranks):
    expected = torch.empty(12, dtype=torch.float64)
    if posted:
        ranks[0].post(lambda: torch.empty_like(expected), 1, 4)
    ranks[1].send(torch.zeros(10, dtype=torch.float64), 0, 4, "1SEND_F4")
    with pytest.raises(PeerTimeout, match=r"^rank 0: a message from rank 1 has 80 bytes where 96 were expected "
                                          r"\(do both ranks run the same config\?\)$"):
        receive(ranks[0], expected, 4)


def test_a_receive_from_a_silent_peer_times_out_naming_the_rank_and_the_setting(hot_path):
    transports = pair(timeout_s=0.5)
    try:
        began = time.monotonic()
        with pytest.raises(PeerTimeout, match=r"^rank 0: no answer within 0.5 s \(dist.timeout_s\) at 0RECV_F7 "
                                              r"\(shared memory\)$"):
            receive(transports[0], torch.empty(3), 7)
        took = time.monotonic() - began
        assert 0.5 <= took < 1.5, took
    finally:
        close(transports)


def test_a_send_that_never_drains_times_out_in_flush(hot_path):
    transports = pair(timeout_s=0.5)
    try:
        transports[1].send(torch.zeros(10_000, dtype=torch.float64), 0, 2, "1SEND_F2")  # 80 kB into 4 kB: stuck
        began = time.monotonic()
        with pytest.raises(PeerTimeout, match=r"^rank 1: no answer within 0.5 s \(dist.timeout_s\) at "
                                              r"WAIT_SENDS: 1SEND_F2 \(shared memory\)$"):
            transports[1].flush()
        assert time.monotonic() - began < 1.5
    finally:
        close(transports)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_pid_alive_tells_a_running_or_stopped_process_from_a_dead_one():
    assert transport.pid_alive(os.getpid())
    assert not transport.pid_alive(dead_pid())
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not transport.pid_alive(zombie.pid)  # exited, not yet reaped
        os.kill(stopped.pid, signal.SIGSTOP)
        assert transport.pid_alive(stopped.pid)  # a stopped peer is alive: dist.timeout_s ends that wait
    finally:
        zombie.wait()
        stopped.kill()
        stopped.wait()


CLOSED = RuntimeError("[/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:29094. This is "
                      "typically caused by a remote worker crashing. Check the logs of the remote worker before "
                      "reporting an error. GLHF!")


def test_a_failed_wait_names_the_peer_that_is_gone_or_says_it_timed_out():
    """gloo's closed connection names the dead peer of this host and its pid (not a timeout that never was);
    a live peer leaves `a peer`; gloo's own timeout and our TimeoutError read as no answer within the timeout."""
    dead = dead_pid()
    error = transport.wait_failed(1, "an all_reduce", CLOSED, 4.0, {0: dead, 2: os.getpid()})
    assert str(error) == f"rank 1: rank 0 (pid {dead}) is gone at an all_reduce (Connection closed by peer " \
                         "[127.0.0.1]:29094)"
    assert error.report == {"rank": 1, "waiting_on": "an all_reduce"}
    began = time.monotonic()
    error = transport.wait_failed(1, "barrier (end of run)", CLOSED, 4.0, {0: os.getpid()})
    assert time.monotonic() - began >= transport.SETTLE_S  # it looked again before it gave up on naming it
    assert str(error) == "rank 1: a peer is gone at barrier (end of run) (Connection closed by peer " \
                         "[127.0.0.1]:29094); its own log says why"
    reset = RuntimeError("[pair.cc:589] Read error [127.0.0.1]:17798: Connection reset by peer")
    assert str(transport.wait_failed(0, "0RECV_B1", reset, 4.0)).startswith("rank 0: a peer is gone at 0RECV_B1 (Read")
    timed_out = RuntimeError("[/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 4000ms for recv operation")
    assert str(transport.wait_failed(0, "0RECV_B1", timed_out, 4.0)) == \
        "rank 0: no answer within 4 s (dist.timeout_s) at 0RECV_B1 (Timed out waiting 4000ms for recv operation)"
    ours = TimeoutError("no answer within 4 s (dist.timeout_s)")
    assert str(transport.wait_failed(0, "barrier (end of run)", ours, 4.0)) == \
        "rank 0: no answer within 4 s (dist.timeout_s) at barrier (end of run)"


def test_a_receive_from_a_dead_peer_says_so_before_the_timeout(hot_path):
    transports = pair(timeout_s=30)
    try:
        gone = dead_pid()
        transports[0].pids[1] = gone
        began = time.monotonic()
        with pytest.raises(PeerTimeout, match=rf"^rank 0: rank 1 \(pid {gone}\) is gone at 0RECV_F7 "
                                              r"\(shared memory\)$"):
            receive(transports[0], torch.empty(3), 7)
        assert time.monotonic() - began < 0.5
    finally:
        close(transports)


def test_a_dead_peer_is_noticed_before_torchrun_would_tell():
    # torchrun polls its workers every monitor interval and then SIGTERMs the rest: a waiter that looked less
    # often would always hear "terminated by the launcher" instead of which peer is gone (as gloo's reset says)
    torchrun_polls_every = get_args_parser().get_default("monitor_interval")
    assert shm.LIVENESS_S < torchrun_polls_every / 2, (shm.LIVENESS_S, torchrun_polls_every)


def test_the_receiver_sleeps_until_the_sender_rings(ranks):
    x = torch.randn(16, dtype=torch.float64)

    def late_sender():
        time.sleep(0.3)
        ranks[1].send(x, 0, 8, "1SEND_F8")

    thread = in_thread(late_sender)
    began, cpu = time.monotonic(), time.process_time()
    y = receive(ranks[0], x, 8)
    waited, used = time.monotonic() - began, time.process_time() - cpu
    joined(thread)
    assert torch.equal(y, x) and 0.25 < waited < 2
    assert used < 0.5 * waited, (used, waited)  # it slept on the futex, it did not spin on a core


def test_a_sleeping_receiver_is_woken_by_the_send_not_by_its_next_look(ranks):
    # the receiver also wakes every LIVENESS_S to check its peer; a lost wake would show as ~LIVENESS_S / 2
    x, sent_at, delays = torch.zeros(8, dtype=torch.float64), [], []

    def sender():
        for i in range(20):
            time.sleep(0.03)  # long enough for the receiver to be asleep on its doorbell
            sent_at.append(time.perf_counter())
            ranks[1].send(x, 0, i, f"1SEND_F{i}")

    thread = in_thread(sender)
    for i in range(20):
        receive(ranks[0], x, i)
        delays.append(time.perf_counter() - sent_at[i])
    joined(thread)
    median = sorted(delays)[len(delays) // 2]
    print(f"woken {median * 1e6:.0f} us after the send (median of 20)")
    assert median < shm.LIVENESS_S / 4, (median, delays)


def test_a_receiver_says_it_sleeps_only_while_it_does_on_the_c_path(hot_path):
    # a C sender wakes its receiver only when `sleeping` says so; the Python path says so for good
    transports = pair()
    try:
        flag = transports[0].own.bell
        x = torch.randn(4, dtype=torch.float64)
        if shm.native is None:  # the Python path (or a machine that could not build the C one)
            assert flag[1] == 1
        else:
            assert flag[1] == 0
            thread = in_thread(lambda: receive(transports[0], x, 2))
            assert wait_for(lambda: flag[1] == 1, 5), "the receiver never went to sleep"
            transports[1].send(x, 0, 2, "1SEND_F2")
            joined(thread)
            assert flag[1] == 0  # awake again: the next sends skip the system call
    finally:
        close(transports)


# --- where shm cannot run -----------------------------------------------------------------------

TWO_RANKS = distributed.Env(rank=0, world_size=2, local_rank=0, local_world_size=2, run_id=None)


def test_shm_where_it_cannot_run_is_one_config_error_naming_the_alternatives(monkeypatch):
    monkeypatch.setattr(shm, "unsupported", lambda: "it needs Linux (memfd and futex), and this is plan9")
    with pytest.raises(ConfigError) as refused:
        with distributed.connect(TWO_RANKS, 2, SHM, problem().dist):
            pass
    message = str(refused.value)
    assert message == ("pipeline.transport=shm cannot run here: it needs Linux (memfd and futex), and this is "
                       "plan9; use pipeline.transport=auto or p2p")
    assert not torch.distributed.is_initialized()  # refused before any process group


def test_shm_refuses_tensors_that_are_not_on_the_cpu():
    assert distributed.shm_unavailable(torch.device("cpu")) is None
    assert distributed.shm_unavailable(torch.device("meta")) == "it carries CPU tensors and this run's are on meta"


# --- whole runs over shm: exactness, refusals, a SIGKILL; nothing left in /dev/shm -----------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("p, path", [(2, "C"), (3, "C"), (4, "C"), (2, "Python")])
def test_every_schedule_over_shm_equals_single_device_training(p, path, tmp_path, monkeypatch):
    # one launch per p trains the whole grid (every schedule of the registry, m in 1 3 4 8, v = 2 where a
    # schedule has virtual stages) in one process group: 36 runs, each attaching and letting go of its segments;
    # through the C hot path where it is built, and once through shm.py's Python path (PIPELINE_SHM_NATIVE=0)
    if path == "Python":
        monkeypatch.setenv("PIPELINE_SHM_NATIVE", "0")
    before = dev_shm()
    worst, out = differences_from_single_device(p, SHM, tmp_path)
    assert {name.split()[0] for name in worst} == set(SCHEDULES)
    assert max(worst.values()) <= TOL, worst
    ranks = " ".join(map(str, range(p)))
    assert out.count(f"pipeline: messages among ranks {ranks} (one host): shm\n") == len(worst), out[:2000]
    assert "shared-memory segments still mapped: 0" in out, out[-2000:]
    assert left_in_dev_shm(before) == []


def torchrun(nproc: int, program: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                             *program], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


REFUSALS = {
    # refused on every rank before any process group or segment (the machine has no memfd or futex)
    "unsupported": ("pipeline.transport=shm cannot run here: it needs Linux (memfd and futex), and this is a test; "
                    "use pipeline.transport=auto or p2p", 2),
    # refused by every rank after the segments are made: rank 1 may not open rank 0's
    "map": ("pipeline.transport=shm: rank 1 could not map rank 0's shared memory (Permission denied); "
            "use pipeline.transport=p2p", 2),
    # rank 1 alone cannot get its segment; every rank learns it in the same gather and refuses
    "create": ("pipeline.transport=shm: rank 1 could not get N MiB of shared memory (Cannot allocate memory); "
               "free memory or use pipeline.transport=p2p", 2)}


def sizeless(line: str) -> str:
    """The line with the segment's size, which follows the default model, written N."""
    return re.sub(r"get [0-9.]+ MiB", "get N MiB", line)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(REFUSALS))
def test_shm_that_cannot_start_is_one_line_and_leaves_nothing(case, tmp_path):
    said, code = REFUSALS[case]
    before = dev_shm()
    launcher = torchrun(2, ["tests/workers/shm_refused.py", case, "train.steps=5", "pipeline.transport=shm",
                            f"hydra.run.dir={tmp_path / 'run'}"])
    _, stderr = launcher.communicate(timeout=100)
    errors = [sizeless(line) for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {said}"], stderr[-3000:]  # a user error is said once, by local rank 0
    assert f"exitcode  : {code}" in stderr and "exitcode  : 2" in stderr  # rank 1's own exit code is 2
    assert str(ROOT / "pipeline") not in stderr  # no traceback from our code (torchrun prints its own)
    assert left_in_dev_shm(before) == []


@pytest.mark.timeout(240)
def test_a_sigkilled_rank_0_leaves_nothing_behind(tmp_path):
    # the watchdog's tests kill rank 1 (tests/test_watchdog.py); here the rank that writes the run's files goes
    run_dir, timeout_s = tmp_path / "run", 4
    before = dev_shm()
    launcher = torchrun(2, ["-m", "pipeline.train", "train.steps=1000000", "train.log_every=20",
                            "train.eval_every=1000000", f"dist.timeout_s={timeout_s}", "pipeline.transport=shm",
                            f"hydra.run.dir={run_dir}"])
    try:
        assert wait_for(lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size,
                        150), "training never started"
        pids = workers(run_dir)
        assert sorted(pids) == [0, 1]
        for rank, pid in pids.items():  # each maps both segments and holds one descriptor of each: its mmap's own
            mapped = sorted(line.split("memfd:")[1].split()[0] for line in mapped_segments(pid, "memfd:pipeline-rank"))
            held = sorted(target.split("memfd:")[1].split()[0] for target in open_segments(pid, "memfd:pipeline-rank"))
            assert mapped == held == ["pipeline-rank0", "pipeline-rank1"], (rank, mapped, held)
        os.kill(pids[0], signal.SIGKILL)
        lost_at = time.monotonic()
        assert wait_for(lambda: not alive(pids[1]), timeout_s + 20)
        took = time.monotonic() - lost_at
    finally:
        for pid in workers(run_dir).values():
            os.kill(pid, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=60)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    print(f"rank 1 exited {took:.1f} s after rank 0 was killed:", *errors)
    assert took < timeout_s + 5
    assert len(errors) == 1 and re.fullmatch(LOST_RANK_0, errors[0]), stderr[-3000:]
    assert left_in_dev_shm(before) == []
    assert not any(alive(pid) for pid in pids.values())  # nothing of the run holds its memory


AUTO_FALLBACKS = {  # pipeline.transport=auto where shm cannot be had: p2p for every pair, and why
    "unsupported": "it needs Linux (memfd and futex), and this is a test",
    "create": "rank 1 could not get N MiB of shared memory (Cannot allocate memory)",
    "map": "rank 1 could not map rank 0's shared memory (Permission denied)"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(AUTO_FALLBACKS))
def test_auto_where_shm_cannot_run_talks_p2p_and_says_why(case, tmp_path):
    before = dev_shm()
    launcher = torchrun(2, ["tests/workers/shm_refused.py", case, "train.steps=5", "pipeline.transport=auto",
                            f"hydra.run.dir={tmp_path / 'run'}"])
    stdout, stderr = launcher.communicate(timeout=100)
    assert launcher.returncode == 0, stderr[-3000:]
    first = sizeless(stdout.splitlines()[0])
    assert first == f"pipeline: messages every pair: p2p (gloo) (no shm: {AUTO_FALLBACKS[case]})", stdout[:1000]
    assert "pipeline: done steps=5" in stdout
    assert left_in_dev_shm(before) == []


@pytest.mark.timeout(120)
def test_a_search_from_measured_costs_prices_messages_as_the_transport_auto_fell_back_to(tmp_path):
    launcher = torchrun(2, ["tests/workers/shm_refused.py", "create", "train.steps=2", "pipeline.transport=auto",
                            "pipeline.schedule=search", "pipeline.search_costs=measured",
                            f"hydra.run.dir={tmp_path / 'run'}"])
    stdout, stderr = launcher.communicate(timeout=100)
    assert launcher.returncode == 0, stderr[-3000:]
    said = [line for line in stdout.splitlines() if "search from measured costs" in line]
    assert len(said) == 1 and said[0].endswith("(messages priced as p2p)"), stdout[:2000]


# rank 1's line when rank 0 is SIGKILLed: its own (rank 0 gone, or silent) if it notices first, else the
# launcher's SIGTERM (torchrun looks every 0.1 s, the shm waiter every shm.LIVENESS_S)
LOST_RANK_0 = (r"error: rank 1: (rank 0 \(pid \d+\) is gone at .*"
               r"|terminated by the launcher \(SIGTERM\); no rank reported a failure, so the launcher itself was "
               r"stopped \(or a rank was killed without a word\))")
