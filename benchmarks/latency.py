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
clock: both processes read CLOCK_MONOTONIC), median, mean and 90th percentile. The gloo figures
come from pipeline.latency.measure, which `python -m pipeline.simulate --measure` uses too (it
charges each message the busy sender's mean).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch.multiprocessing as mp

import harness
from pipeline.runtime.latency import measure


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
    try:
        gloo = measure([round(kib * 1024) for kib in args.sizes], args.iters, args.repeats,
                       max(20, args.iters // 10), timeout_s=600)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    tcp = tcp_pingpong(args.sizes, args.iters, args.repeats)
    print(f"one-way message time, two processes on this machine ({os.cpu_count()} CPU(s)), "
          f"median of {args.repeats} blocks of {args.iters} round trips\n")
    print("\n".join(harness.table(
        ["message KiB", "gloo isend/irecv µs", "TCP socket µs", "gloo / TCP", "gloo, sender computing: median µs",
         "mean µs", "90th percentile µs"], "rrrrrrr",
        ([f"{kib:g}", f"{g.pingpong_s * 1e6:.1f}", f"{tcp[kib] * 1e6:.1f}", f"{g.pingpong_s / tcp[kib]:.2f}",
          f"{g.busy_s * 1e6:.1f}", f"{g.busy_mean_s * 1e6:.1f}", f"{g.busy_p90_s * 1e6:.1f}"]
         for kib, g in zip(args.sizes, gloo)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
