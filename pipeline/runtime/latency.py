"""One message's time between two processes on this machine, over the transport a run uses.

Two processes join a gloo group (a file rendezvous: no port to pick), one thread each, as torchrun
gives each rank, and move a tensor of a run's message size over each link asked for:

  gloo     the P2P transport (pipeline.transport=p2p): torch.distributed isend/irecv on loopback
  shm      the shared-memory transport (pipeline.transport=shm): rings in memfd segments, futex waits
  socket   a bare TCP socket on loopback with TCP_NODELAY: the floor that gloo adds its own work to

gloo and shm are the transports a run's executor calls (runtime.distributed.connect builds them,
the receive posted ahead as the executor posts it), so their figures include what the executor pays
to call them. Two ways of timing:

  ping-pong     rank 0 sends and waits for the echo, rank 1 echoes: one way = a round trip / 2,
                the median over timed blocks
  busy sender   rank 0 computes, sends and at once computes again (about 5 ms of matrix products, as
                a rank runs its next F or B right after a SEND) while rank 1, which computed until
                it posted its receive, waits 5 ms there (both keep one beat of shared
                CLOCK_MONOTONIC instants, not a barrier); reported is the time from
                the send to the end of rank 1's receive (both read CLOCK_MONOTONIC, one clock):
                median, mean and 90th percentile, and the median time rank 0 spent in its send

  woken         the busy sender's timing with rank 0 idle after its send (it sleeps instead of
                computing): over shm rank 1 sleeps on its futex in both, so what the two share is the
                operating system's wake of a sleeping process, and what busy adds is the compute's share
  polled        the busy sender's timing with rank 1 in its receive for 0.5 ms only, not 5 ms: over
                shm it is still polling (shm.SPIN_S) and sees the message without a wake, so this is
                what the sender's compute alone adds

and the median time of a receive whose message arrived before it began (what a rank pays to take
a message that is there). Once per measurement, the all-reduce of a few floats that a logged step
runs (Comm.sum_list, gloo whatever the transport) is timed too.

`python -m pipeline.simulate --measure` charges each message `transport_costs` of its transport;
`benchmarks/latency.py` prints every figure. Both call `measure`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist

from pipeline.config import AUTO, IN_PROCESS, P2P, SHM, TRANSPORTS, DistConfig
from pipeline.errors import ConfigError
from pipeline.runtime.distributed import Env, connect, shm_unavailable

GLOO, SOCKET = "gloo", "socket"
LINKS = (GLOO, SOCKET, SHM)  # what `measure` can time, in the order benchmarks/latency.py prints them
POLLED_LEAD_S = 5e-4  # "polled": the receiver has waited this long, inside shm's poll (shm.SPIN_S), when the send comes
_OF_TRANSPORT = {P2P: GLOO, SHM: SHM}  # pipeline.transport -> the link its messages take on one CPU host


class Latency(NamedTuple):
    """Seconds one message of `nbytes` takes from one process to the other over `link`."""

    link: str
    nbytes: int
    pingpong_s: float  # one way, both sides waiting on it
    busy_s: float  # median, the sender computing right after its send
    busy_mean_s: float  # mean of the same (a step's messages add up: the mean is what they cost)
    busy_p90_s: float  # 90th percentile of the same
    send_s: float  # median time the sender spent in its send
    recv_s: float  # median time of a receive whose message had arrived
    woken_s: float = math.nan  # median from the send to the receive's end, the receiver asleep, the sender idle
    woken_p90_s: float = math.nan  # 90th percentile of the same
    polled_s: float = math.nan  # median, the sender computing, the receiver still polling (it waited 0.5 ms)
    polled_p90_s: float = math.nan  # 90th percentile of the same
    polled_waited_s: float = math.nan  # median time the receiver had waited when the send came, in polled
    busy_waited_s: float = math.nan  # the same in busy


class Measured(NamedTuple):
    """Every figure of one `measure`: a Latency per link and size, and the logged step's all-reduce."""

    latencies: list[Latency]
    allreduce_s: float  # median seconds of Comm.sum_list of `values` floats between the two processes


class TransportCosts(NamedTuple):
    """What the simulator charges a message over a transport, and a logged step's all-reduce."""

    latency_s: float  # the busy sender's mean from its send's start to the receive's end, less send_s and recv_s
    send_s: float  # the sender's time in its send
    recv_s: float  # the receiver's time in a receive whose message is there
    allreduce_s: float  # Comm.sum_list of a logged step (gloo on every transport)


def resolve(transport: str, device: torch.device = torch.device("cpu")) -> str:
    """The transport a run named `transport` uses between two ranks of this host: `auto` is shm where
    this machine can run it on `device`, else p2p; a name that is no pipeline.transport is a ConfigError."""
    if transport not in TRANSPORTS:
        raise ConfigError(f"transport {transport!r} is unknown; pick one of {', '.join(TRANSPORTS)}")
    if transport == AUTO:
        return SHM if shm_unavailable(device) is None else P2P
    return transport


def transport_costs(nbytes: int, transport: str = P2P, values: int = 4) -> TransportCosts:
    """What a message of `nbytes` costs over `transport` (p2p, shm; inprocess: nothing, a mailbox hands
    the tensor over, and sums are local), timed between two processes, with the all-reduce of
    `values` floats of a logged step.

    The latency is the busy sender's mean less the sender's time in its send and the receiver's in a
    receive of a message that is there: the simulator charges those two on the ranks' own timelines.
    Busy, because a rank computes right after its send; the mean, because a step's messages add up
    along its critical path and a few slow ones (the 90th percentile is 2-5x the median on a shared
    machine) cost what they cost. Ping-pong and the busy median predicted traced runs' steps worse
    (see README.md, "See where the time goes").
    """
    if transport == IN_PROCESS:
        return TransportCosts(0.0, 0.0, 0.0, 0.0)
    if transport not in _OF_TRANSPORT:
        raise ValueError(f"no link to time for transport {transport!r}; resolve() it first")
    (got,), allreduce = measure([nbytes], [_OF_TRANSPORT[transport]], values=values, apart=False)
    return TransportCosts(max(0.0, got.busy_mean_s - got.send_s - got.recv_s), got.send_s, got.recv_s, allreduce)


def measure(sizes: Sequence[int], links: Sequence[str] = LINKS, iters: int = 200, repeats: int = 3,
            busy_trials: int = 40, timeout_s: float = 120.0, values: int = 4, apart: bool = True) -> Measured:
    """Every way of timing a message, for each link and each size in bytes (link by link, sizes
    within), and the all-reduce of `values` floats; without `apart` the woken and polled figures,
    which only take the busy one apart, are not timed (NaN). Raises ValueError for an unknown link,
    RuntimeError if a process fails."""
    unknown = [link for link in links if link not in LINKS]
    if unknown:
        raise ValueError(f"unknown link {unknown[0]!r}; pick from {', '.join(LINKS)}")
    sizes = [max(4, -(-int(n) // 4) * 4) for n in sizes]  # whole float32 elements
    plan = json.dumps({"sizes": sizes, "links": list(links), "iters": iters, "repeats": repeats,
                       "busy_trials": busy_trials, "values": values, "apart": apart})
    with tempfile.TemporaryDirectory(prefix="pipeline-latency-") as tmp:
        procs = [subprocess.Popen([sys.executable, "-m", "pipeline.runtime.latency", str(rank), tmp, plan],
                                  env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank in range(2)]
        outputs = _wait(procs, timeout_s)
    report = json.loads(outputs[0].strip().splitlines()[-1])
    return Measured([Latency(*row) for row in report["rows"]], report["allreduce_s"])


def _worker_env() -> dict[str, str]:
    """A rank's environment under torchrun: one thread; this package importable wherever it lives."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> list[str]:
    """Each process's stdout; at the deadline both are killed; raises unless both exited 0."""
    deadline = time.monotonic() + timeout_s
    outputs, errors = [], []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            out, err = proc.communicate()
        outputs.append(out)
        errors.append(err.strip().splitlines()[-1:] if err else [])
    codes = [proc.returncode for proc in procs]
    if codes != [0, 0]:
        last = "; ".join(line for lines in errors for line in lines)  # each process's last stderr line
        raise RuntimeError(f"a latency process failed or ran past {timeout_s:g} s (exit codes {codes})"
                           + (f": {last}" if last else ""))
    return outputs


# --- inside one of the two processes ---------------------------------------------------------


class _TransportLink:
    """A pipeline transport between rank and its one peer, as the executor drives it."""

    def __init__(self, transport, peer: int):
        self.transport, self.peer = transport, peer

    def post(self, buf: torch.Tensor, tag: int) -> None:
        self.transport.post(lambda: buf, self.peer, tag)

    def send(self, buf: torch.Tensor, tag: int) -> None:
        self.transport.send(buf, self.peer, tag, f"latency message {tag}")

    def recv(self, buf: torch.Tensor, tag: int) -> None:
        self.transport.recv(self.peer, tag, f"latency message {tag}", lambda: buf)

    def flush(self) -> None:
        self.transport.flush()


class _SocketLink:
    """A connected TCP socket: a send writes the tensor's bytes, a receive reads exactly as many."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def post(self, buf: torch.Tensor, tag: int) -> None:
        pass

    def send(self, buf: torch.Tensor, tag: int) -> None:
        self.sock.sendall(memoryview(buf.numpy()).cast("B"))

    def recv(self, buf: torch.Tensor, tag: int) -> None:
        view, got = memoryview(buf.numpy()).cast("B"), 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise RuntimeError("the peer closed the socket")
            got += n

    def flush(self) -> None:
        pass


def _socket_pair(rank: int, store: dist.Store) -> socket.socket:
    """A TCP connection on loopback between the two processes (rank 0 listens on a port the OS picks)."""
    if rank == 0:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            store.set("socket_port", str(server.getsockname()[1]))
            sock, _ = server.accept()
    else:
        sock = socket.create_connection(("127.0.0.1", int(store.get("socket_port"))))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _worker(rank: int, tmp: str, plan: dict) -> dict:
    """One of the two processes: join the group, time every link and size, then the all-reduce;
    returns {"rows": the rows of Latency, "allreduce_s": seconds} (both processes the same)."""
    torch.set_num_threads(1)
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # as a single-node run does: traffic stays on loopback
    store = dist.FileStore(str(Path(tmp) / "store"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    env, conf = Env(rank, 2, rank, 2, None), DistConfig(backend="gloo", timeout_s=60.0, device="cpu")
    ring_bytes = 4 * max(plan["sizes"]) + (1 << 16)  # a few messages fit: a send never waits for room
    rows = []
    for link in plan["links"]:
        if link == SOCKET:
            with _socket_pair(rank, store) as sock:
                rows += _time_link(rank, _SocketLink(sock), link, plan)
        else:
            with connect(env, 2, P2P if link == GLOO else SHM, conf, ring_bytes) as comm:
                rows += _time_link(rank, _TransportLink(comm.transports[rank], 1 - rank), link, plan)
    with connect(env, 2, P2P, conf) as comm:
        allreduce = allreduce_s(comm, plan["values"], plan["busy_trials"])
    dist.barrier()
    dist.destroy_process_group()
    return {"rows": rows, "allreduce_s": allreduce}


def _time_link(rank: int, link, name: str, plan: dict) -> list:
    rows = []
    for nbytes in plan["sizes"]:
        pingpong = pingpong_s(rank, link, nbytes, plan["iters"], plan["repeats"])
        busy = sender_busy(rank, link, nbytes, plan["busy_trials"])
        late = late_receive_s(rank, link, nbytes, plan["busy_trials"])
        apart = [math.nan] * 5  # woken and polled take the busy figure apart; a simulation charges only busy
        if plan["apart"]:
            woken_median, _, woken_p90, _, _ = sender_busy(rank, link, nbytes, plan["busy_trials"], compute=False)
            polled_median, _, polled_p90, _, polled_waited = sender_busy(rank, link, nbytes, plan["busy_trials"],
                                                                         lead_s=POLLED_LEAD_S)
            apart = [woken_median, woken_p90, polled_median, polled_p90, polled_waited]
        rows.append([name, nbytes, pingpong, *busy[:4], late, *apart, busy[4]])
    return rows


def pingpong_s(rank: int, link, nbytes: int, iters: int, repeats: int) -> float:
    """One-way seconds of an `nbytes` message: the median over timed blocks of a round trip / 2
    (the first block warms up); rank 0's figure, shared with rank 1."""
    out, into = torch.ones(nbytes // 4), torch.zeros(nbytes // 4)
    blocks = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        for i in range(iters):
            link.post(into, i)  # as the executor posts a step's receives before it runs
            if rank == 0:
                link.send(out, i)
                link.recv(into, i)
            else:
                link.recv(into, i)
                link.send(out, i)
            link.flush()
        blocks.append((time.perf_counter() - start) / iters / 2)
    return _shared(0, statistics.median(blocks[1:]))


def sender_busy(rank: int, link, nbytes: int, trials: int, compute: bool = True, lead_s: float = 0.005
                ) -> tuple[float, float, float, float, float]:
    """(median, mean, 90th percentile) seconds from rank 0's send to the end of rank 1's receive,
    while rank 0 computes right after the send (or, without `compute`, sleeps as long), the median
    of rank 0's time in the send, and the median time rank 1 had waited in its receive when the send
    came (the same figures on both ranks). Rank 1 has waited `lead_s` in
    its receive when the send comes: both keep one beat (see beats), not a barrier, whose two ranks
    leave it up to milliseconds apart here (a 0.5 ms lead became 2-3 ms, and a poll a sleep)."""
    weight, x = torch.randn(1024, 1024), torch.randn(32, 1024)
    out, into = torch.ones(nbytes // 4), torch.zeros(nbytes // 4)
    stamps, in_send, entered = [], [], []
    for i, beat in enumerate(beats(trials + 2, lead_s + 0.015)):  # the first two warm up
        if rank == 0:
            _compute_until(beat + lead_s, weight)  # its F, while rank 1 waits in its receive for the result
            stamps.append(time.perf_counter())
            link.send(out, i)
            in_send.append(time.perf_counter() - stamps[-1])
            if compute:
                for _ in range(6):
                    x @ weight.T  # about 5 ms of F on 32 rows, as a rank does after sending
            else:
                time.sleep(0.005)  # idle: rank 0's core is free for rank 1's wake
            link.flush()
        else:
            _compute_until(beat, weight)  # its own previous action, then the receive of the next one's input
            entered.append(time.perf_counter())
            link.post(into, i)
            link.recv(into, i)
            stamps.append(time.perf_counter())
    (sent, arrived), send_times, waited = _gathered(stamps), _gathered(in_send)[0], _gathered(entered)[1]
    times = sorted(b - a for a, b in zip(sent[2:], arrived[2:]))
    return (statistics.median(times), statistics.mean(times), times[int(0.9 * (len(times) - 1))],
            statistics.median(send_times[2:]), statistics.median(a - b for a, b in zip(sent[2:], waited[2:])))


def beats(count: int, period_s: float) -> list[float]:
    """`count` instants `period_s` apart, the first 20 ms from now, the same on both ranks (time.perf_counter
    reads CLOCK_MONOTONIC, one clock for every process of the machine)."""
    start = _shared(0, time.perf_counter() + 0.02 if dist.get_rank() == 0 else None)
    return [start + i * period_s for i in range(count)]


def _compute_until(instant: float, weight: torch.Tensor) -> None:
    """Matrix products of 8 rows (about 0.2 ms each here) until time.perf_counter() reads `instant`:
    a rank sends what it has just computed, and receives after its previous action. After a sleep instead,
    each Python step runs several times slower (7.5 µs for an empty call after 5 ms asleep here, 0.6 µs
    after 5 ms of work), which is not what a pipeline rank pays."""
    x = torch.ones(8, weight.shape[1])
    while time.perf_counter() < instant:
        x @ weight.T


def late_receive_s(rank: int, link, nbytes: int, trials: int) -> float:
    """Median seconds of rank 1's receive of a message sent 2 ms before it (the same on both ranks)."""
    out, into = torch.ones(nbytes // 4), torch.zeros(nbytes // 4)
    times = []
    for i in range(trials + 2):
        if rank == 1:
            link.post(into, i)
        dist.barrier()
        if rank == 0:
            link.send(out, i)
            link.flush()
        else:
            time.sleep(0.002)  # the message is there by now
            start = time.perf_counter()
            link.recv(into, i)
            times.append(time.perf_counter() - start)
    return _shared(1, statistics.median(times[2:]) if rank == 1 else None)


def allreduce_s(comm, values: int, trials: int) -> float:
    """Median seconds of comm.sum_list of `values` floats, both processes entering together."""
    times = []
    for _ in range(trials + 2):
        dist.barrier()
        start = time.perf_counter()
        comm.sum_list([0.0] * values)
        times.append(time.perf_counter() - start)
    return _shared(0, statistics.median(times[2:]))


def _shared(owner: int, value: float | None) -> float:
    """Rank `owner`'s `value`, on both ranks."""
    return _gathered([] if value is None else [value])[owner][0]


def _gathered(values: list[float]) -> list[list[float]]:
    """Both processes' lists of floats, through tensors (the package pickles nothing)."""
    count = torch.tensor([len(values)])
    counts = [torch.zeros_like(count) for _ in range(2)]
    dist.all_gather(counts, count)
    mine = torch.zeros(int(max(counts)), dtype=torch.float64)
    mine[:len(values)] = torch.tensor(values, dtype=torch.float64)
    both = [torch.zeros_like(mine) for _ in range(2)]
    dist.all_gather(both, mine)
    return [b[:int(n)].tolist() for b, n in zip(both, counts)]


if __name__ == "__main__":  # one of measure's two processes: RANK TMP_DIR PLAN_JSON
    print(json.dumps(_worker(int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]))))
