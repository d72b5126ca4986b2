"""How long one message takes between two processes: gloo isend/irecv against a bare TCP socket.

    python benchmarks/latency.py [--sizes-kib 2,16,128,1024] [--iters 1000]

Two processes on this machine play ping-pong, one thread each, as the pipeline's ranks do: the
one-way time is a round trip over two. First over torch.distributed (gloo on loopback, the
transport both this project and torch.distributed.pipelining use), then over a plain TCP socket
with TCP_NODELAY (the floor any socket transport pays on this machine). Message sizes default to
those of the benchmarks: 2 KiB (small model, m = 8) and 128 KiB (default model, m = 8).

A pipeline rank rarely waits for its own send: it isends and goes on computing. The third
measurement does that: rank 0 isends and at once runs about 5 ms of matrix products while rank 1
waits for the message; reported is the time from the isend to the end of rank 1's wait (one
clock: both processes read CLOCK_MONOTONIC), median and 90th percentile.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_builtin import free_port  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/latency.py", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-kib", default="2,16,128,1024", help="comma-separated message sizes in KiB")
    parser.add_argument("--iters", type=int, default=1000, help="round trips per size and transport")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per size; the median is reported")
    args = parser.parse_args(argv)
    try:
        args.sizes = [float(s) for s in args.sizes_kib.split(",")]
    except ValueError:
        parser.error(f"--sizes-kib {args.sizes_kib!r} is not a list of numbers; e.g. --sizes-kib 2,128")
    if any(s <= 0 for s in args.sizes) or args.iters < 1 or args.repeats < 1:
        parser.error("--sizes-kib must be positive, --iters and --repeats at least 1")
    return args


def gloo_pingpong(rank: int, port: int, sizes: list[float], iters: int, repeats: int, out) -> None:
    """Rank 0 sends and waits for the echo; rank 1 echoes. Puts {KiB: one-way seconds} from rank 0
    and {("busy", KiB): sender_busy's figures} from rank 1."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    result = {}
    for kib in sizes:
        buf = torch.zeros(max(1, round(kib * 1024 / 4)))
        blocks = []
        for _ in range(repeats + 1):  # the first block warms up
            dist.barrier()
            start = time.perf_counter()
            for i in range(iters):
                if rank == 0:
                    dist.isend(buf, 1, tag=i).wait()
                    dist.irecv(buf, 1, tag=i).wait()
                else:
                    dist.irecv(buf, 0, tag=i).wait()
                    dist.isend(buf, 0, tag=i).wait()
            blocks.append((time.perf_counter() - start) / iters / 2)
        busy = sender_busy(rank, buf, max(20, iters // 10))
        if rank == 0:
            result[kib] = statistics.median(blocks[1:])
        else:
            result[("busy", kib)] = busy
    dist.barrier()
    dist.destroy_process_group()
    out.put(result)


def sender_busy(rank: int, buf: torch.Tensor, trials: int) -> tuple[float, float] | None:
    """Rank 1's (median, 90th percentile) seconds from rank 0's isend to its own receive's end, while
    rank 0 computes right after the isend; None on rank 0."""
    weight, x = torch.randn(1024, 1024), torch.randn(32, 1024)
    sent_at = torch.zeros(1, dtype=torch.float64)
    delays = []
    for i in range(trials + 2):  # the first two warm up
        dist.barrier()
        if rank == 0:
            time.sleep(0.005)  # rank 1 is surely waiting
            sent_at[0] = time.perf_counter()
            work = dist.isend(buf, 1, tag=i)
            for _ in range(6):
                x @ weight.T  # about 5 ms of F on 32 rows, as a rank does after sending
            work.wait()
            dist.send(sent_at, 1, tag=10_000 + i)
        else:
            dist.irecv(buf, 0, tag=i).wait()
            arrived = time.perf_counter()
            dist.recv(sent_at, 0, tag=10_000 + i)
            delays.append(arrived - sent_at.item())
    if rank == 0:
        return None
    delays = sorted(delays[2:])
    return statistics.median(delays), delays[int(0.9 * (len(delays) - 1))]


def _exchange(sock: socket.socket, data: bytes, echo: bool) -> None:
    view = bytearray(len(data))
    if not echo:
        sock.sendall(data)
    got = 0
    while got < len(data):
        got += sock.recv_into(memoryview(view)[got:])
    if echo:
        sock.sendall(view)


def tcp_echo(port: int, sizes: list[float], iters: int, repeats: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for kib in sizes:
            data = bytes(round(kib * 1024))
            for _ in range((repeats + 1) * iters):
                _exchange(sock, data, echo=True)


def tcp_pingpong(sizes: list[float], iters: int, repeats: int) -> dict[float, float]:
    """{KiB: one-way seconds} over a plain TCP socket on loopback, echoed by a second process."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        echo = mp.get_context("spawn").Process(target=tcp_echo, args=(server.getsockname()[1], sizes, iters, repeats))
        echo.start()
        conn, _ = server.accept()
    result = {}
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for kib in sizes:
            data = bytes(round(kib * 1024))
            blocks = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                for _ in range(iters):
                    _exchange(conn, data, echo=False)
                blocks.append((time.perf_counter() - start) / iters / 2)
            result[kib] = statistics.median(blocks[1:])
    echo.join(timeout=60)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=gloo_pingpong, args=(r, port, args.sizes, args.iters, args.repeats, out))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    if any(p.exitcode != 0 for p in procs):
        print(f"error: a gloo ping-pong process failed (exit codes {[p.exitcode for p in procs]})", file=sys.stderr)
        return 1
    gloo = {**out.get(), **out.get()}
    tcp = tcp_pingpong(args.sizes, args.iters, args.repeats)
    print(f"one-way message time, two processes on this machine ({os.cpu_count()} CPU(s)), "
          f"median of {args.repeats} blocks of {args.iters} round trips\n")
    print("| message KiB | gloo isend/irecv µs | TCP socket µs | gloo / TCP | gloo, sender computing: median µs | "
          "90th percentile µs |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for kib in args.sizes:
        median, p90 = gloo[("busy", kib)]
        print(f"| {kib:g} | {gloo[kib] * 1e6:.1f} | {tcp[kib] * 1e6:.1f} | {gloo[kib] / tcp[kib]:.2f} | "
              f"{median * 1e6:.1f} | {p90 * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
