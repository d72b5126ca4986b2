"""Shared memory between the ranks of one host: each rank's incoming messages in rings it owns; waits sleep on a futex.

Every rank creates one segment (a memfd: it never has a name in /dev/shm, so a killed run leaves
nothing behind) and its peers on the same host map it through /proc/PID/fd/FD:

    [0, 64)                 doorbell: a u32 futex word; whoever has news for this rank writes it and wakes it;
                            then `sleeping` (u32), written by this rank alone: 1 while it sleeps on the
                            doorbell (so a sender skips the wake otherwise), or for good on the Python path
    per peer i that sends here, at base_i:
      [base, base+64)       write_pos (u64, bytes ever written), then `stalled` (u64, 1 while the sender
                            waits for room); only the sender writes them
      [base+64, base+128)   read_pos  (u64, bytes ever read; only this rank writes it)
      [base+128, +C)        the ring: records of a 64-byte header (tag, nbytes) and the payload, padded to 64

One writer per word, so no atomics are needed: on x86-64 stores stay in program order (the
payload is written before write_pos, write_pos before the doorbell) and so do loads. A doorbell
has many writers; each writes a value no other write produces (its rank in the low byte, its own
count above), so a sleeper that read the old value is always woken (FUTEX_WAIT compares in the kernel).
A message larger than the free space streams through in 64-byte-aligned chunks; a send never
blocks: what does not fit waits in this rank's queue and moves on at its next call into the transport.
Rings are sized to hold a step's messages, so that is rare; a stalled sender is woken when room is
made, and (as that wake is not ordered against its flag) it also looks again every STALLED_S.

The common steps (a whole message in with its doorbell, a whole message out, the poll, the sleep)
run in C where setup.py could build pipeline/runtime/_ring.c (`native`): the same bytes, with C11
atomics for the order above, and a fence on both sides of `sleeping` so a sender makes the wake's
system call only for a sleeper. The Python code below is the protocol in full and the fallback.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys
import time
from collections import defaultdict, deque
from typing import Callable

import torch

from pipeline.runtime.transport import PeerTimeout, gone_peers

try:  # the hot path in C (setup.py builds it where a compiler is); the same protocol in Python otherwise
    from pipeline.runtime import _ring as native
except ImportError:
    native = None
if os.environ.get("PIPELINE_SHM_NATIVE") == "0":  # a switch for tests and for comparing the two paths
    native = None

HEADER = 64  # bytes of a record's header, and the alignment of every record and chunk
CONTROL = 128  # write_pos and read_pos, each on its own cache line
# a waiter polls this long before it sleeps on the futex, when the host has a core per rank (on the waiter's own
# core): most waits of a small model's step are shorter, and a futex wake costs the sender a syscall and the
# receiver a reschedule (benchmarks/quickstart.py: p = 2 took 1.4-1.9 s with 2 ms, 1.7-2.3 s with 50 us)
SPIN_S = 2e-3
# a waiter checks this often that the peers it depends on still live (after its first LIVENESS_S of waiting);
# under torchrun's 0.1 s monitor interval, so a killed peer is named here before the launcher's SIGTERM comes
LIVENESS_S = 0.02
STALLED_S = 1e-3  # a sender whose message does not fit looks for room at least this often
_SYS_FUTEX = {"x86_64": 202}
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # shared (not FUTEX_PRIVATE): the words live in a shared mapping


def unsupported() -> str | None:
    """Why this machine cannot run the shared-memory transport, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"it needs Linux (memfd and futex), and this is {sys.platform}"
    if platform.machine() not in _SYS_FUTEX:
        return f"it relies on x86-64's store order, and this machine is {platform.machine()}"
    return None


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True) if unsupported() is None else None


def _futex_wait(addr: int, expected: int, timeout_s: float) -> None:
    """Sleep while the u32 at addr holds `expected`, at most timeout_s (returns early on a wake or a signal)."""
    timeout = _Timespec(int(timeout_s), int((timeout_s % 1.0) * 1e9))
    _libc.syscall(_SYS_FUTEX[platform.machine()], ctypes.c_void_p(addr), _FUTEX_WAIT, ctypes.c_uint32(expected),
                  ctypes.byref(timeout), None, 0)


def _futex_wake(addr: int) -> None:
    _libc.syscall(_SYS_FUTEX[platform.machine()], ctypes.c_void_p(addr), _FUTEX_WAKE, 2**31 - 1, None, None, 0)


def _round_up(n: int, to: int = HEADER) -> int:
    return -(-n // to) * to


def segment_bytes(num_senders: int, ring_bytes: int) -> int:
    return HEADER + num_senders * (CONTROL + ring_bytes)


class Segment:
    """One rank's shared memory, mapped in this process (created here, or opened from its owner)."""

    def __init__(self, fd: int, nbytes: int):
        self.mm = mmap.mmap(fd, nbytes)
        self._anchor = ctypes.c_char.from_buffer(self.mm)  # pins the mapping while its address is in use
        self.address = ctypes.addressof(self._anchor)
        self.words = memoryview(self.mm).cast("Q")  # u64 positions (write_pos, read_pos)
        self.bell = memoryview(self.mm)[:8].cast("I")  # the doorbell, then `sleeping`
        self.rung = 0  # doorbell writes by this process into this segment

    @classmethod
    def create(cls, nbytes: int, name: str) -> tuple["Segment", int]:
        """A new zeroed segment and its descriptor (kept open: peers open it through /proc)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            os.posix_fallocate(fd, 0, nbytes)  # a full memory fails here, not as a SIGBUS mid-step
        except OSError:
            os.close(fd)
            raise
        return cls(fd, nbytes), fd

    @classmethod
    def open(cls, pid: int, fd: int, nbytes: int) -> "Segment":
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
        try:
            return cls(own, nbytes)
        finally:
            os.close(own)  # the mapping keeps the memory

    def next_bell(self, writer: int) -> int:
        """The doorbell value of this process's next news here: one no other write produces."""
        self.rung = (self.rung + 1) & 0xFFFFFF
        return (self.rung << 8) | writer

    def ring(self, writer: int) -> None:
        """Tell this segment's owner there is news: a new doorbell value, then a wake."""
        if native is not None:
            return native.ring(self.address, self.next_bell(writer))
        self.bell[0] = self.next_bell(writer)
        _futex_wake(self.address)

    def close(self) -> None:
        """Unmap (peers keep their own mappings: the memory goes when the last one does)."""
        del self._anchor
        self.words.release()
        self.bell.release()
        try:
            self.mm.close()
        except BufferError:  # a tensor view still alive somewhere: the collector unmaps it later
            pass


class _Outgoing:
    """A message on its way: the bytes of its record written so far."""

    __slots__ = ("tensor", "address", "tag", "nbytes", "record", "done", "what")

    def __init__(self, tensor: torch.Tensor, tag: int, what: str):
        self.tensor = tensor if tensor.is_contiguous() else tensor.contiguous()  # alive until fully written
        self.address, self.nbytes = self.tensor.data_ptr(), self.tensor.nbytes
        self.tag, self.what = tag, what
        self.record, self.done = HEADER + _round_up(self.nbytes), 0


class _Incoming:
    """A message being read: where its bytes go."""

    __slots__ = ("tag", "nbytes", "record", "done", "buffer", "raw", "address")

    def __init__(self, tag: int, nbytes: int, buffer: torch.Tensor, raw: bool):
        self.tag, self.nbytes, self.buffer, self.raw, self.address = tag, nbytes, buffer, raw, buffer.data_ptr()
        self.record, self.done = HEADER + _round_up(nbytes), 0


class Channel:
    """One direction between two ranks of a host: a ring in the receiver's segment."""

    def __init__(self, segment: Segment, base: int, ring_bytes: int):
        self.segment, self.capacity = segment, ring_bytes
        self.write_word, self.read_word = base // 8, (base + 64) // 8
        self.stalled_word = self.write_word + 1
        self.ring = base + CONTROL  # byte offset of the ring in the segment
        self.control_address, self.ring_address = segment.address + base, segment.address + self.ring

    def _copy(self, position: int, address: int, n: int, into_ring: bool) -> None:
        """Copy n bytes at `address` into the ring at byte `position` (or out of it), wrapping at the end."""
        start = position % self.capacity
        first = min(n, self.capacity - start)
        ring = self.segment.address + self.ring
        for at, offset, size in ((ring + start, 0, first), (ring, first, n - first)):
            if size:
                ctypes.memmove(at, address + offset, size) if into_ring else ctypes.memmove(address + offset, at, size)

    def put(self, tensor: torch.Tensor, tag: int, writer: int) -> bool:
        """Write all of a contiguous `tensor` as one record and ring the receiver (`writer`: this rank) if it
        fits now; False (nothing written) if not. The short way of push for the common case: a cold sender
        pays for every Python step it takes, so in C this is one call."""
        segment = self.segment
        if native is not None:
            return native.put(self.ring_address, self.capacity, self.control_address, tag, tensor.data_ptr(),
                              tensor.nbytes, segment.address, segment.next_bell(writer))
        words, nbytes = segment.words, tensor.nbytes
        written = words[self.write_word]
        record = HEADER + -(-nbytes // HEADER) * HEADER
        if self.capacity - (written - words[self.read_word]) < record:
            return False
        start = written % self.capacity  # a record starts 64-aligned and the ring is whole pages: its header never wraps
        header = (self.ring + start) // 8
        words[header], words[header + 1] = tag, nbytes
        if start + HEADER + nbytes <= self.capacity:
            ctypes.memmove(self.segment.address + self.ring + start + HEADER, tensor.data_ptr(), nbytes)
        else:
            self._copy(written + HEADER, tensor.data_ptr(), nbytes, into_ring=True)
        words[self.write_word] = written + record
        segment.ring(writer)
        return True

    def push(self, message: _Outgoing) -> bool:
        """Write as much of `message` as fits; True once all of it is in the ring (the sender's side)."""
        words = self.segment.words
        written = words[self.write_word]
        free = self.capacity - (written - words[self.read_word])
        step = min(free, message.record - message.done)
        if step <= 0:
            return False
        if message.done == 0:
            header = (self.ring + written % self.capacity) // 8
            words[header], words[header + 1] = message.tag, message.nbytes
        lo, hi = max(message.done, HEADER) - HEADER, min(message.done + step, HEADER + message.nbytes) - HEADER
        if hi > lo:
            self._copy(written + HEADER + lo - message.done, message.address + lo, hi - lo, into_ring=True)
        words[self.write_word] = written + step
        message.done += step
        return message.done == message.record

    def pull(self, current: _Incoming | None, buffer_for: Callable[[int, int], tuple[torch.Tensor, bool]]
             ) -> _Incoming | None:
        """Read what has arrived of `current` (or of the next message, into buffer_for(tag, nbytes));
        returns that message, or None when nothing new has arrived (the receiver's side)."""
        words = self.segment.words
        read = words[self.read_word]
        arrived = words[self.write_word] - read
        if arrived <= 0:
            return None
        if current is None:
            header = (self.ring + read % self.capacity) // 8
            tag, nbytes = words[header], words[header + 1]
            current = _Incoming(tag, nbytes, *buffer_for(tag, nbytes))
        step = min(arrived, current.record - current.done)
        lo, hi = max(current.done, HEADER) - HEADER, min(current.done + step, HEADER + current.nbytes) - HEADER
        if hi > lo:
            self._copy(read + HEADER + lo - current.done, current.address + lo, hi - lo, into_ring=False)
        words[self.read_word] = read + step
        current.done += step
        return current


class ShmTransport:
    """Messages to and from the ranks on this host through shared memory; others through `fallback` (P2P).

    `incoming[src]` is the ring src writes into (in this rank's segment), `outgoing[dst]` the ring
    this rank writes into (in dst's segment); `segments[r]` is rank r's segment, `pids[r]` its process.
    """

    def __init__(self, rank: int, timeout_s: float, own: Segment, incoming: dict[int, Channel],
                 outgoing: dict[int, Channel], segments: dict[int, Segment], pids: dict[int, int], fallback=None,
                 spin_s: float = SPIN_S):
        self.rank, self.timeout_s, self.own, self.spin_s = rank, timeout_s, own, spin_s
        if native is None:
            own.bell[1] = 1  # this rank's sleeps cannot be ordered against its flag: always wake it
        self.incoming, self.outgoing, self.segments, self.pids = incoming, outgoing, segments, pids
        self.fallback = fallback
        self.queues: dict[int, deque[_Outgoing]] = {dst: deque() for dst in outgoing}
        self.reading: dict[int, _Incoming | None] = {src: None for src in incoming}
        self.posted: dict[tuple[int, int], torch.Tensor] = {}  # (src, tag) -> the buffer its next message fills
        # (src, tag) -> complete messages in arrival order, each (tensor, raw: bytes that came before their post);
        # tags repeat from pass to pass, and a fast sender's next pass can arrive before this one is read
        self.arrived: dict[tuple[int, int], deque[tuple[torch.Tensor, bool]]] = defaultdict(deque)

    # --- the Transport interface -----------------------------------------------------------

    def send(self, tensor: torch.Tensor, dst: int, tag: int, what: str) -> None:
        channel = self.outgoing.get(dst)
        if channel is None:
            return self.fallback.send(tensor, dst, tag, what)
        if not self.queues[dst] and tensor.is_contiguous() and channel.put(tensor, tag, self.rank):
            return  # the common case: it fits, nothing waits before it
        self.queues[dst].append(_Outgoing(tensor, tag, what))
        self._push(dst)

    def post(self, make_buffer: Callable[[], torch.Tensor], src: int, tag: int) -> None:
        if src not in self.incoming:
            return self.fallback.post(make_buffer, src, tag)
        if not self.arrived.get((src, tag)):
            self.posted[(src, tag)] = make_buffer()

    def can_recv(self, src: int, tag: int) -> bool:
        return True  # recv waits (bounded) until the message arrives

    def recv(self, src: int, tag: int, what: str, make_buffer: Callable[[], torch.Tensor]) -> torch.Tensor:
        if src not in self.incoming:
            return self.fallback.recv(src, tag, what, make_buffer)
        key = (src, tag)
        if key not in self.posted and not self.arrived.get(key):
            self.posted[key] = make_buffer()
        began = time.monotonic()
        if native is not None and (buffer := self._take(src, tag)) is not None:
            return buffer
        self._progress()
        if not self.arrived.get(key):
            self._wait(lambda: bool(self.arrived.get(key)), what, [src], began)
        buffer, raw = self.arrived[key].popleft()
        if raw:  # it came before its receive was posted, as bytes
            expected = make_buffer()
            self._check_size(src, buffer.nbytes, expected.nbytes)
            buffer = buffer.view(expected.dtype).view(expected.shape)
        return buffer

    def flush(self) -> None:
        if self.fallback is not None:
            self.fallback.flush()
        waiting = [dst for dst, queue in self.queues.items() if queue]
        if waiting:
            self._wait(lambda: not any(self.queues.values()), self._describe_pending(), waiting)

    def pending_sends(self) -> list[str]:
        local = [message.what for queue in self.queues.values() for message in queue]
        return local + (self.fallback.pending_sends() if self.fallback is not None else [])

    def close(self) -> None:
        """The end of a run: forget its messages and unmap every segment (the last unmap frees the memory)."""
        self.posted.clear()
        self.arrived.clear()
        self.reading = {src: None for src in self.incoming}
        for queue in self.queues.values():
            queue.clear()
        for segment in self.segments.values():
            segment.close()
        self.segments.clear()
        if self.fallback is not None:
            self.fallback.close()

    # --- progress --------------------------------------------------------------------------

    def _push(self, dst: int) -> None:
        queue, channel, moved = self.queues[dst], self.outgoing[dst], False
        while queue:
            before = queue[0].done
            complete = channel.push(queue[0])
            moved |= queue[0].done != before
            if not complete:
                break
            queue.popleft()
        channel.segment.words[channel.stalled_word] = 1 if queue else 0
        if moved:
            self.segments[dst].ring(self.rank)

    def _pull(self, src: int) -> None:
        channel, moved = self.incoming[src], False
        while native is not None and self.reading[src] is None and (
                head := native.head(channel.ring_address, channel.capacity, channel.control_address)) is not None:
            tag, nbytes = head  # a whole message has arrived: one copy out in C
            buffer, raw = self._buffer_for(src, tag, nbytes)
            native.take(channel.ring_address, channel.capacity, channel.control_address, buffer.data_ptr(), nbytes)
            self.arrived[(src, tag)].append((buffer, raw))
            moved = True
        while (message := channel.pull(self.reading[src], lambda tag, n: self._buffer_for(src, tag, n))) is not None:
            moved = True
            if message.done < message.record:  # the rest is not written yet
                self.reading[src] = message
                break
            self.reading[src] = None
            self.arrived[(src, message.tag)].append((message.buffer, message.raw))
        if moved:
            self._room_made(src)

    def _take(self, src: int, tag: int) -> torch.Tensor | None:
        """The common receive in one call into C: nothing before it from src, its buffer posted, nothing of
        this rank's waiting to be sent; it polls half of spin_s at most (then _wait does the rest). None
        when that is not the case, or the message is not the next whole one in src's ring by then."""
        key, channel = (src, tag), self.incoming[src]
        buffer = self.posted.get(key)
        if buffer is None or self.reading[src] is not None or self.arrived.get(key) or any(self.queues.values()):
            return None
        if native.wait_take(channel.ring_address, channel.capacity, channel.control_address, tag, buffer.data_ptr(),
                            buffer.nbytes, self.spin_s / 2) != 1:
            return None
        del self.posted[key]
        self._room_made(src)
        return buffer

    def _room_made(self, src: int) -> None:
        """After reading from src's ring: wake src if it waits for the room just made."""
        channel = self.incoming[src]
        if channel.segment.words[channel.stalled_word]:
            self.segments[src].ring(self.rank)

    def _buffer_for(self, src: int, tag: int, nbytes: int) -> tuple[torch.Tensor, bool]:
        """Where a new message goes: its posted buffer, or (a later pass's, or not yet posted) new bytes."""
        key = (src, tag)
        if key in self.posted and not self.arrived.get(key):
            buffer = self.posted.pop(key)
            self._check_size(src, nbytes, buffer.nbytes)
            return buffer, False
        return torch.empty(nbytes, dtype=torch.uint8), True

    def _check_size(self, src: int, got: int, expected: int) -> None:
        if got != expected:
            raise PeerTimeout(f"rank {self.rank}: a message from rank {src} has {got} bytes where {expected} "
                              "were expected (do both ranks run the same config?)")

    def _progress(self) -> None:
        for src in self.incoming:
            self._pull(src)
        for dst, queue in self.queues.items():
            if queue:
                self._push(dst)

    def _wait(self, done: Callable[[], bool], what: str, peers: list[int], began: float | None = None) -> None:
        """Make progress until done(): poll until spin_s after `began` (the caller's start, or now), then sleep
        on the doorbell; bounded by dist.timeout_s."""
        start = time.monotonic() if began is None else began
        deadline, next_check = start + self.timeout_s, start + LIVENESS_S
        while True:
            bell = self.own.bell[0]  # read before looking, so news that comes after wakes the sleep below
            self._progress()
            if done():
                return
            now = time.monotonic()
            if now >= next_check:
                self._check_alive(peers, what)
                next_check = now + LIVENESS_S
            if now >= deadline:
                raise PeerTimeout(f"rank {self.rank}: no answer within {self.timeout_s:g} s (dist.timeout_s) "
                                  f"at {what} (shared memory)")
            wake = min(deadline, next_check, now + STALLED_S if any(self.queues.values()) else deadline)
            if now - start >= self.spin_s:
                if native is not None:
                    native.sleep(self.own.address, bell, wake - now)
                else:
                    self.own.bell[1] = 1
                    _futex_wait(self.own.address, bell, wake - now)
            elif native is not None:  # poll in C: news is seen within a few cycles, the GIL let go
                native.spin(self.own.address, bell, min(wake, start + self.spin_s) - now)

    def _check_alive(self, peers: list[int], what: str) -> None:
        gone = gone_peers({peer: self.pids[peer] for peer in peers}, settle_s=0.0)
        if gone:
            raise PeerTimeout(f"rank {self.rank}: rank {gone[0]} (pid {self.pids[gone[0]]}) is gone at {what} "
                              "(shared memory)")

    def _describe_pending(self) -> str:
        pending = self.pending_sends()
        return "WAIT_SENDS: " + ", ".join(pending[:3]) + (" ..." if len(pending) > 3 else "")
