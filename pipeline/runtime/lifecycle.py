"""How a rank's process ends (at once after a failure, on Ctrl-C, when its launcher dies) and the notes it leaves."""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, NoReturn

EXIT_INTERRUPTED = 130  # what a shell reports for a process ended by Ctrl-C (128 + SIGINT)
STORE_TIMEOUT_S = 2.0  # a note is a courtesy: a store whose host is stopped must not delay the exit
LAUNCHER_POLL_S = 0.5

_store = None  # the rendezvous store of this run's process group (see keep_store)
_stopping = False  # set once this process has begun to leave: later signals change nothing
_deferred: BaseException | None = None  # a SIGTERM that came while the ranks were still checking the config
_launcher: int | None = None  # the pid of the launcher that watch_launcher watches


class Interrupted(Exception):
    """Ctrl-C (SIGINT) during training: the step that was running and the last checkpoint written."""

    def __init__(self, step: int, last_saved: int | None):
        kept = "no checkpoint was written" if last_saved is None else f"the last checkpoint is step {last_saved}"
        super().__init__(f"interrupted at step {step}; {kept}")


def leave(code: int) -> NoReturn:
    """Flush stdout and stderr, then exit now, skipping destructors and garbage collection.

    After a lost peer, gloo's worker thread can still sit in the timed-out collective; the process
    group's destructor joins that thread, and an ordinary exit would wait for it forever.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said anyway
            pass
    os._exit(code)


def begin_stopping() -> bool:
    """Mark this process as leaving; True if it already was (a second signal, or a signal during a failure)."""
    global _stopping
    already, _stopping = _stopping, True
    return already


def stopping() -> bool:
    """Has this process begun to leave?"""
    return _stopping


def on_interrupt(signum, frame) -> None:
    """SIGINT handler: the first one stops the run (as KeyboardInterrupt); torchrun's echo of it is ignored."""
    if begin_stopping():
        return
    raise KeyboardInterrupt


def defer(error: BaseException) -> None:
    """Hold a SIGTERM that came before the process group: every rank checks the same config, and the
    first to refuse it makes torchrun end the rest; finishing the checks lets local rank 0 say why."""
    global _deferred
    _deferred = error


def raise_deferred() -> None:
    """Where the process group is about to start: a SIGTERM held during the checks ends the run now."""
    if _deferred is not None:
        raise _deferred


def report_interrupt(error: BaseException) -> NoReturn:
    """One line from local rank 0 of each node, where the run stood; every rank exits 130."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        where = str(error) if isinstance(error, Interrupted) else "interrupted while starting or finishing"
        print(where, file=sys.stderr, flush=True)
    leave(EXIT_INTERRUPTED)


def keep_store(store) -> None:
    """Remember the rendezvous store: after a failure it carries this rank's note to its peers."""
    global _store
    _store = store


def note_failure(rank: int, message: str) -> None:
    """Leave `message` under failed/RANK, so that peers waiting on this rank can say why it is gone."""
    if _store is None:
        return
    prefix = f"rank {rank}: "
    try:
        with _native_warnings_silenced():
            _store.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
            _store.set(f"failed/{rank}", message[len(prefix):] if message.startswith(prefix) else message)
    except Exception:  # the store went with its host: peers then time out as they would have anyway
        pass


def failed_peers(rank: int, world_size: int) -> list[tuple[int, str]]:
    """(rank, message) of every other rank that left a failure note, without waiting for any."""
    if _store is None:
        return []
    found = []
    try:
        with _native_warnings_silenced():
            _store.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
            for peer in range(world_size):
                key = f"failed/{peer}"
                if peer != rank and _store.check([key]):
                    found.append((peer, _store.get(key).decode(errors="replace")))
    except Exception:  # no store to ask: no notes
        pass
    return found


@contextmanager
def _native_warnings_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null meanwhile: c10d logs a 20-line C++ stack trace there when
    the store's host is gone, and that is no news to a rank that is already leaving."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def watch_launcher() -> None:
    """Under torchrun, stop this worker soon after its launcher dies (after a kill -9 nobody else would)."""
    global _launcher
    if not (os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("LOCAL_RANK")):
        return
    _launcher = os.getppid()
    threading.Thread(target=_watch, name="launcher-watch", daemon=True).start()


def launcher_gone() -> str | None:
    """The line for a worker whose launcher has died (this process was re-parented), else None."""
    if _launcher is None or os.getppid() == _launcher:
        return None
    name = "torchrun, " if os.environ.get("TORCHELASTIC_RUN_ID") else ""
    return f"rank {os.environ.get('RANK', '0')}: the launcher ({name}pid {_launcher}) is gone; stopping"


def _watch() -> None:
    """Poll the parent pid every LAUNCHER_POLL_S; once the launcher is gone, say so and leave."""
    while (gone := launcher_gone()) is None:
        time.sleep(LAUNCHER_POLL_S)
    if begin_stopping():  # the main thread is already on its way out, with its own line
        return
    try:
        print(f"error: {gone}", file=sys.stderr, flush=True)
    except OSError:  # the launcher's end of the pipe may be gone with it
        pass
    leave(1)
