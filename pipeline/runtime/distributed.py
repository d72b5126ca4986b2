"""Where this process sits in a torchrun job, and the process groups its ranks talk over.

`connect` yields a Comm: which pipeline ranks this process runs (one under torchrun, all of
them in-process), a transport for each, and the collectives the trainer needs (sums over the
pipeline, a sum over the replicas of a stage, a barrier). It starts the process group only when
there is a peer to talk to and none exists yet, and then waits for every peer and destroys it
on the way out.

With d replicas of a p-rank pipeline (parallel.dp = d) the world's p x d processes form a grid:

    global rank = replica * p + pipeline rank        e.g. p = 2, d = 2:   replica 0: ranks 0 1
                                                                          replica 1: ranks 2 3
    a pipeline group per replica (its P2P messages and pipeline-wide sums stay inside it), and
    a replica group per pipeline rank (ranks 0 2 and 1 3: the all-reduce of that stage's gradients).

One replica's pipeline sits on consecutive ranks, so with --nproc-per-node=p each pipeline stays
within one node: the frequent, latency-bound P2P messages never cross the network, only one
all-reduce per stage and step does.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from pipeline.config import AUTO, IN_PROCESS, P2P, SHM, DistConfig
from pipeline.errors import ConfigError
from pipeline.runtime import lifecycle, shm
from pipeline.runtime.inprocess import Mailboxes
from pipeline.runtime.p2p import P2PTransport
from pipeline.runtime.transport import PeerTimeout, wait_failed

RING_BYTES = 1 << 20  # each shared-memory channel's ring, unless connect is told a pass's message bytes
RING_LIMITS = (64 << 10, 64 << 20)  # the smallest and largest ring: larger messages stream through in chunks
# a collective's waiter polls it this long (yielding its core to gloo's threads) before it blocks, where each of
# the host's ranks has a core: on a VM a core left idle for a moment runs the next milliseconds slow (the
# quickstart's training at p = 2 took 1.41-1.82 s with the logged steps' all-reduce blocking, 1.12-1.18 s polled)
COLLECTIVE_POLL_S = 0.02


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    run_id: str | None


def read_env() -> Env:
    """Read torchrun's variables; without them this is rank 0 of a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return Env(
        rank=int(os.environ.get("RANK", 0)),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
        run_id=os.environ.get("TORCHELASTIC_RUN_ID"),
    )


def device_for(name: str, env: Env, distributed: bool) -> torch.device:
    """`auto` is cuda when CUDA is there, else cpu; each process of a job takes GPU LOCAL_RANK."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("dist.device=cuda but no CUDA device is visible; use dist.device=cpu or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", env.local_rank if distributed else 0)


def backend_for(name: str, device: torch.device) -> str:
    """`auto` picks NCCL for CUDA tensors, gloo for CPU tensors."""
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend=nccl needs CUDA tensors but dist.device is cpu; use dist.backend=gloo or auto")
    return name


@dataclass(frozen=True)
class Grid:
    """This process's place in the p x d grid of a torchrun job (see the module docstring)."""

    num_ranks: int  # p: pipeline ranks per replica
    num_replicas: int  # d
    rank: int  # global rank

    @property
    def pipeline_rank(self) -> int:
        return self.rank % self.num_ranks

    @property
    def replica(self) -> int:
        return self.rank // self.num_ranks

    def pipeline_ranks(self, replica: int) -> list[int]:
        """The global ranks of one replica's pipeline, in pipeline order."""
        return [replica * self.num_ranks + r for r in range(self.num_ranks)]

    def replica_ranks(self, pipeline_rank: int) -> list[int]:
        """The global ranks holding the same stages in every replica."""
        return [d * self.num_ranks + pipeline_rank for d in range(self.num_replicas)]


class Comm:
    """The pipeline ranks this process runs, how they reach the others, and the sums they need."""

    def __init__(self, local_ranks: list[int], transports: dict, distributed: bool, timeout_s: float,
                 device: torch.device, replica: int = 0, num_replicas: int = 1,
                 pipeline_group: dist.ProcessGroup | None = None, replica_group: dist.ProcessGroup | None = None):
        self.local_ranks = local_ranks  # pipeline ranks, 0 .. p-1
        self.transports = transports
        self.distributed = distributed
        self.timeout_s = timeout_s
        self.device = device  # where this process's stages and batches live
        self.replica, self.num_replicas = replica, num_replicas
        self.pipeline_group = pipeline_group  # None: the whole world is one pipeline
        self.replica_group = replica_group  # None: no other replica
        self.links = "in this process"  # how the ranks' messages travel, in words (the run's first line)
        self.poll_s = 0.0  # how long a collective's wait polls before it blocks (COLLECTIVE_POLL_S, or 0)
        self.transport = IN_PROCESS  # the pipeline.transport they take between two ranks of this host
        self.pids: dict[int, int] = {}  # global rank -> pid of this pipeline's other processes on this host

    @property
    def is_root(self) -> bool:
        """The one process that writes run-wide files (global rank 0)."""
        return self.replica == 0 and 0 in self.local_ranks

    @property
    def writes_results(self) -> bool:
        """Replica 0 keeps the books: metrics, evaluation, checkpoints and traces (the replicas are equal)."""
        return self.replica == 0

    def sum(self, value: float) -> float:
        """The sum of `value` over this pipeline's processes (all call it at the same point)."""
        return self.sum_list([value])[0]

    def sum_list(self, values: list[float]) -> list[float]:
        """Element-wise sums over this pipeline's processes (all call it at the same point)."""
        return self._all_reduce(values, self.pipeline_group, "all_reduce")

    def sum_replicas(self, values: list[float]) -> list[float]:
        """Element-wise sums over the replicas of this process's stages (all of them call it)."""
        if self.replica_group is None:
            return list(values)
        return self._all_reduce(values, self.replica_group, "all_reduce over the replicas")

    def sum_world(self, values: list[float]) -> list[float]:
        """Element-wise sums over every process of the job (all call it at the same point)."""
        return self._all_reduce(values, dist.group.WORLD if self.distributed else None, "all_reduce")

    def mean_list(self, values: list[float]) -> list[float]:
        """Element-wise means over every process of the job (all call it at the same point)."""
        processes = dist.get_world_size() if self.distributed else 1
        return [v / processes for v in self.sum_world(values)]

    def _all_reduce(self, values: list[float], group, what: str) -> list[float]:
        if not self.distributed:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        try:
            work = dist.all_reduce(total, group=group, async_op=True)
            poll(work, self.poll_s)
            work.wait(timedelta(seconds=self.timeout_s))
        except PeerTimeout as err:  # a SIGTERM (Terminated) that landed in the wait is no timeout
            err.report.setdefault("waiting_on", what)  # hang_report.json: where the launcher found this rank
            raise
        except RuntimeError as err:
            error = wait_failed(dist.get_rank(), f"an {what}", err, self.timeout_s, self.pids)
            error.report["waiting_on"] = what
            raise error from None
        return total.tolist()

    def barrier(self, what: str) -> None:
        if not self.distributed:
            return
        try:
            if dist.get_backend() == "gloo":  # waited for in Python: a Ctrl-C lands here on every rank, not
                wait_in_python(dist.barrier(async_op=True), self.timeout_s, self.poll_s)  # in C++ (gloo logs)
            else:
                dist.barrier()
        except PeerTimeout as err:  # a SIGTERM (Terminated) that landed in the wait is no barrier failure
            err.report.setdefault("waiting_on", f"barrier ({what})")
            raise
        except (RuntimeError, TimeoutError) as err:
            raise wait_failed(dist.get_rank(), f"barrier ({what})", err, self.timeout_s, self.pids) from None


def poll(work: dist.Work, seconds: float) -> None:
    """Keep this core busy while `work` runs, at most `seconds`, handing it to any other thread that wants it
    (gloo's, which run the collective); the wait that follows still has the timeout and raises its errors."""
    if seconds <= 0:
        return
    deadline = time.monotonic() + seconds
    while not work.is_completed() and time.monotonic() < deadline:
        os.sched_yield()


def wait_in_python(work: dist.Work, timeout_s: float, poll_s: float) -> None:
    """Wait for `work` in Python (polled for poll_s, then in 1 ms sleeps), so a signal's handler runs at once;
    raises TimeoutError past timeout_s, and whatever the work raised."""
    poll(work, poll_s)
    deadline = time.monotonic() + timeout_s
    while not work.is_completed():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no answer within {timeout_s:g} s (dist.timeout_s)")
        time.sleep(0.001)
    work.wait()


def core_each(num_processes: int) -> bool:
    """Has this host a CPU for each of its `num_processes` ranks? (Then waiting on a core is no one's loss.)"""
    return num_processes <= len(os.sched_getaffinity(0))


def _bind_loopback(env: Env) -> None:
    """Single-node jobs keep gloo's traffic on loopback (torch.distributed has no authentication)."""
    if env.local_world_size == env.world_size and "GLOO_SOCKET_IFNAME" not in os.environ \
            and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


def plan_devices(env: Env, in_process: bool, conf: DistConfig) -> tuple[torch.device, str | None]:
    """(device, backend or None when no process group is needed); raises ConfigError before any start."""
    distributed = not in_process and env.world_size > 1
    device = device_for(conf.device, env, distributed)
    return device, backend_for(conf.backend, device) if distributed else None


_JOINS = itertools.count()  # process groups this process has joined


def _store(env: Env, timeout: timedelta) -> dist.Store:
    """The rendezvous store, its keys prefixed with torchrun's restart count.

    torchrun (2.13) lets workers share its agent's store across restarts; without the prefix a
    restarted group can read the dead group's gloo addresses and fail to connect.
    """
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                          is_master=env.rank == 0 and not agent_hosts, timeout=timeout)
    # a process that joins twice (each job of a Hydra multirun) must not read its first group's keys either
    restart, join = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'), next(_JOINS)
    prefixed = dist.PrefixStore(f"pipeline/restart{restart}/join{join}", store)
    lifecycle.keep_store(prefixed)  # where a failing rank leaves its note for the others
    return prefixed


def _join(env: Env, backend: str, conf: DistConfig) -> None:
    """Start the process group; peers may still be importing, so joining waits dist.init_timeout_s.

    That timeout is also the group's default; every wait during training passes dist.timeout_s.
    """
    timeout = timedelta(seconds=max(conf.init_timeout_s, conf.timeout_s))
    try:
        dist.init_process_group(backend, timeout=timeout, store=_store(env, timeout), rank=env.rank,
                                world_size=env.world_size)
    except (RuntimeError, ValueError) as err:  # DistStoreError and friends
        error = PeerTimeout(f"rank {env.rank}: could not join the process group of {env.world_size} within "
                            f"{conf.init_timeout_s:g} s (dist.init_timeout_s): {str(err).strip().splitlines()[0]}")
        error.report.update(rank=env.rank, waiting_on="init_process_group")
        raise error from None


def _groups(grid: Grid) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """(this replica's pipeline group, this pipeline rank's replica group); every process creates
    every group, in the same order, as torch.distributed requires. None where the world would do."""
    if grid.num_replicas == 1:
        return None, None
    pipelines = [dist.new_group(grid.pipeline_ranks(d)) for d in range(grid.num_replicas)]
    replicas = [dist.new_group(grid.replica_ranks(r)) for r in range(grid.num_ranks)]
    return pipelines[grid.replica], replicas[grid.pipeline_rank]


@contextmanager
def connect(env: Env, num_ranks: int, transport: str, conf: DistConfig, ring_bytes: int = RING_BYTES) -> Iterator[Comm]:
    """The Comm for this process over `transport` (a pipeline.transport name); starts (and later ends) the
    process group when one is needed. `num_ranks` is p; under torchrun the world holds world_size / p replicas.
    `ring_bytes`: what one shared-memory channel holds (a step's messages between two ranks fit in it)."""
    if transport not in _TRANSPORTS:
        raise ConfigError(f"pipeline.transport={transport!r} is unknown; pick one of {', '.join(_TRANSPORTS)}")
    with _TRANSPORTS[transport](env, num_ranks, conf, ring_bytes) as comm:
        try:
            yield comm
        finally:
            for endpoint in comm.transports.values():
                endpoint.close()


@contextmanager
def _in_process(env: Env, num_ranks: int, conf: DistConfig, ring_bytes: int = 0) -> Iterator[Comm]:
    """Every rank in this process, messages through mailboxes: no process group."""
    device, _ = plan_devices(env, True, conf)
    mailboxes = Mailboxes()
    ranks = list(range(num_ranks))
    yield Comm(ranks, {r: mailboxes.endpoint(r) for r in ranks}, False, conf.timeout_s, device)


@contextmanager
def _point_to_point(env: Env, num_ranks: int, conf: DistConfig, ring_bytes: int = 0) -> Iterator[Comm]:
    """One rank per process over torch.distributed (a world of one needs no group: it has no peer)."""
    device, backend = plan_devices(env, False, conf)
    if backend is None:
        with _in_process(env, num_ranks, conf) as comm:
            yield comm
        return
    owned = not dist.is_initialized()
    if owned:
        lifecycle.raise_deferred()  # torchrun ended this rank while it checked the config
        _bind_loopback(env)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _join(env, backend, conf)
    grid = Grid(num_ranks, env.world_size // num_ranks, env.rank)
    pipeline_group, replica_group = _groups(grid)
    r = grid.pipeline_rank
    endpoint = P2PTransport(r, conf.timeout_s, first_global_rank=grid.pipeline_ranks(grid.replica)[0])
    comm = Comm([r], {r: endpoint}, True, conf.timeout_s, device, grid.replica, grid.num_replicas,
                pipeline_group, replica_group)
    comm.links, comm.transport = f"every pair: p2p ({backend})", P2P
    comm.poll_s = COLLECTIVE_POLL_S if device.type == "cpu" and core_each(env.local_world_size) else 0.0
    yield comm
    # Only after a clean run: wait for every peer, then close. After an error a peer may be gone
    # or stopped, and waiting for it would turn a clear error into a hang; exiting closes sockets.
    if owned:
        comm.barrier("end of run")
    for group in (pipeline_group, replica_group):
        if group is not None:
            dist.destroy_process_group(group)
    if owned:
        dist.destroy_process_group()


def _know_the_pids(comm: Comm, here: dict[int, int]) -> None:
    """Where a collective or a P2P message fails because a connection closed, name the peer of this host
    that is gone and its pid (`here`: pipeline rank -> pid)."""
    endpoint = comm.transports[comm.local_ranks[0]]  # P2P: its peers by pipeline rank, from global rank `offset`
    endpoint.pids = dict(here)
    comm.pids = {endpoint.offset + r: pid for r, pid in here.items()}


def shm_unavailable(device: torch.device) -> str | None:
    """Why the shared-memory transport cannot carry this run's messages, or None when it can."""
    if device.type != "cpu":
        return f"it carries CPU tensors and this run's are on {device.type}"
    return shm.unsupported()


def _host() -> list[int]:
    """Who can map whose memory: the same kernel (boot id) and PID namespace (/proc/PID/fd), as two integers."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    name = f"{socket.gethostname()}/{boot}/{os.stat('/proc/self/ns/pid').st_ino}".encode()
    digest = hashlib.sha256(name).digest()
    return [int.from_bytes(digest[:8], "little", signed=True), int.from_bytes(digest[8:16], "little", signed=True)]


def _gather(comm: Comm, values: list[int], what: str) -> list[list[int]]:
    """Every pipeline rank's `values` (integers: no Python object is pickled), in pipeline-rank order. A peer
    that failed on its own (and left) is a PeerTimeout, as in the trainer's collectives, so that this rank
    names that peer's failure instead of printing a gloo traceback."""
    mine = torch.tensor(values, dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(comm.pipeline_group))]
    try:
        dist.all_gather(everyone, mine, group=comm.pipeline_group, async_op=True).wait(
            timedelta(seconds=comm.timeout_s))
    except PeerTimeout as err:  # a SIGTERM (Terminated) that landed in the wait
        err.report.setdefault("waiting_on", what)
        raise
    except RuntimeError as err:
        raise wait_failed(dist.get_rank(), what, err, comm.timeout_s, comm.pids) from None
    return [t.tolist() for t in everyone]


class _NoSharedMemory(Exception):
    """A rank could not make or map its segment (`cause`; `advice`: what a user of shm can do about it);
    every rank of the pipeline learns it in the same gather."""

    def __init__(self, cause: str, advice: str):
        super().__init__(cause)
        self.cause, self.advice = cause, advice


def _attach_shared_memory(comm: Comm, ring_bytes: int, strict: bool) -> None:
    """Replace this process's P2P endpoint by one that reaches the pipeline ranks on its host through
    shared memory (the rest stay P2P). Every rank of the pipeline calls it at the same point. If a rank
    cannot make or map a segment, every rank knows: strict (pipeline.transport=shm) refuses the run in
    one line; auto keeps P2P everywhere and its first line says why."""
    (rank,) = comm.local_ranks
    everyone = _gather(comm, [*_host(), os.getpid()], "shared-memory set-up (sharing out the hosts)")
    hosts = [values[:2] for values in everyone]
    local = [r for r, host in enumerate(hosts) if host == hosts[rank]]
    _know_the_pids(comm, {r: everyone[r][2] for r in local if r != rank})
    ring_bytes = -(-min(max(ring_bytes, RING_LIMITS[0]), RING_LIMITS[1]) // 4096) * 4096
    try:
        comm.transports[rank] = _map_segments(comm, local, ring_bytes)
    except _NoSharedMemory as err:
        if strict:
            raise ConfigError(f"pipeline.transport=shm: {err.cause}; {err.advice}") from None
        comm.links += f" (no shm: {err.cause})"
        return
    comm.links, comm.transport = _describe_links(hosts, dist.get_backend()), SHM


def _map_segments(comm: Comm, local: list[int], ring_bytes: int) -> shm.ShmTransport:
    """Make this rank's segment, map its host peers', and build the transport over them; raises
    _NoSharedMemory (on every rank, with nothing left mapped) when any rank fails at either."""
    (rank,) = comm.local_ranks
    peers = [r for r in local if r != rank]
    pids = comm.transports[rank].pids  # the P2P endpoint's, from the hosts' gather (_know_the_pids)
    size = shm.segment_bytes(len(peers), ring_bytes)
    own, fd, failed = None, -1, 0
    try:
        own, fd = shm.Segment.create(size, f"pipeline-rank{rank}")
    except OSError as err:
        failed = err.errno or errno.ENOMEM
    where = _gather(comm, [fd, size, failed], "shared-memory set-up (sharing out the shared memory)")
    made = [r for r, (_, _, code) in enumerate(where) if code]
    if made:
        _unmap({rank: own} if own is not None else {}, fd)
        r, code = made[0], where[made[0]][2]
        raise _NoSharedMemory(f"rank {r} could not get {where[r][1] / 2**20:.1f} MiB of shared memory "
                              f"({os.strerror(code)})", "free memory or use pipeline.transport=p2p")
    segments, failed_map = {rank: own}, [-1, 0]
    for peer in peers:
        try:
            segments[peer] = shm.Segment.open(pids[peer], *where[peer][:2])
        except OSError as err:
            failed_map = [peer, err.errno or errno.EACCES]
    # every segment mapped where it can be
    failures = _gather(comm, failed_map, "shared-memory set-up (mapping the shared memory)")
    os.close(fd)  # nothing names the memory any more (each mmap holds its own duplicate, closed with it)
    for r, (peer, code) in enumerate(failures):
        if peer >= 0:
            _unmap(segments)
            raise _NoSharedMemory(f"rank {r} could not map rank {peer}'s shared memory ({os.strerror(code)})",
                                  "use pipeline.transport=p2p")

    def base(receiver: int, sender: int) -> int:  # where sender's ring sits in receiver's segment
        senders = [r for r in local if r != receiver]
        return shm.HEADER + senders.index(sender) * (shm.CONTROL + ring_bytes)

    incoming = {src: shm.Channel(own, base(rank, src), ring_bytes) for src in peers}
    outgoing = {dst: shm.Channel(segments[dst], base(dst, rank), ring_bytes) for dst in peers}
    spin_s = shm.SPIN_S if core_each(len(local)) else 0.0  # never poll on a shared core
    return shm.ShmTransport(rank, comm.timeout_s, own, incoming, outgoing, segments, dict(pids),
                            fallback=comm.transports[rank], spin_s=spin_s)


def _unmap(segments: dict[int, shm.Segment], fd: int = -1) -> None:
    """Give back segments that will carry nothing (and this rank's descriptor, when still open)."""
    for segment in segments.values():
        segment.close()
    if fd >= 0:
        os.close(fd)


def _describe_links(hosts: list[list[int]], backend: str) -> str:
    """In words, which pairs of ranks talk through shared memory and which over P2P."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, host in enumerate(hosts):
        groups.setdefault(tuple(host), []).append(r)
    shared = [f"among ranks {' '.join(map(str, ranks))} (one host): shm" for ranks in groups.values() if len(ranks) > 1]
    across = [f"between hosts: p2p ({backend})"] if len(groups) > 1 else []
    return "; ".join(shared + across)


@contextmanager
def _host_local(env: Env, num_ranks: int, conf: DistConfig, ring_bytes: int, strict: bool) -> Iterator[Comm]:
    """P2P, with the ranks that share a host talking through shared memory (strict: refuse where it cannot)."""
    device, _ = plan_devices(env, False, conf)
    reason = shm_unavailable(device)
    if reason is not None and strict:
        raise ConfigError(f"pipeline.transport=shm cannot run here: {reason}; use pipeline.transport=auto or p2p")
    with _point_to_point(env, num_ranks, conf) as comm:
        if comm.distributed and reason is None:
            _attach_shared_memory(comm, ring_bytes, strict)
        elif comm.distributed:
            comm.links += f" (no shm: {reason})"
        yield comm


@contextmanager
def _shared_memory(env: Env, num_ranks: int, conf: DistConfig, ring_bytes: int) -> Iterator[Comm]:
    with _host_local(env, num_ranks, conf, ring_bytes, strict=True) as comm:
        yield comm


@contextmanager
def _auto(env: Env, num_ranks: int, conf: DistConfig, ring_bytes: int) -> Iterator[Comm]:
    with _host_local(env, num_ranks, conf, ring_bytes, strict=False) as comm:
        yield comm


# pipeline.transport -> how this process's ranks reach each other: the one place a transport is chosen
_TRANSPORTS = {AUTO: _auto, SHM: _shared_memory, P2P: _point_to_point, IN_PROCESS: _in_process}
