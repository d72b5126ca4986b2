"""Run directories: a default name no two runs share, the lock a live run holds, and the record of each segment.

    runs/DATE/HH-MM-SS-PID       one process: its start and pid (no two live processes on a host share a pid)
    runs/DATE/torchrun-ID        a torchrun job with a run id (--standalone or --rdzv-id): the same on every rank
    runs/DATE/HH-MM-SS-PID       a single-node job without one (run id "none"): torchrun's start and pid,
                                 read by every rank from /proc, since all of them are its children
    runs/DATE/torchrun-ADDR-PORT a multi-node job without one: the rendezvous address, all the nodes share

    RUN_DIR/run.lock         {"pid", "host", "job", "started", "ticks"}: flock'ed by global rank 0 for the whole run
    RUN_DIR/.hydra/          config.yaml, overrides.yaml, hydra.yaml of the first segment, never overwritten
    RUN_DIR/segments.jsonl   a row per segment (the fresh start and each resume)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import ConfigError
from pipeline.runtime.distributed import Env, read_env

LOCK = "run.lock"
SEGMENTS = "segments.jsonl"
_names: dict[str, str] = {}  # root -> the name this process resolved first


class RunDirBusy(ConfigError):
    """The run directory is held by another live run."""


def default_dir(root: str = "runs") -> str:
    """ROOT/DATE/NAME of this job (see the module docstring), resolved once per process.

    Hydra resolves the name more than once; a later call, a second on, must still give the same directory.
    """
    if root not in _names:
        _names[root] = f"{root}/{_job_name(read_env())}"
    return _names[root]


def _job_name(env: Env) -> str:
    if env.run_id is None and env.world_size == 1:
        return _stamp(time.time(), os.getpid())
    single_node, launcher = env.local_world_size == env.world_size, os.getppid()
    started = (_process_started(launcher) if single_node else None) or time.time()
    if env.run_id and env.run_id != "none":
        return f"{time.strftime('%Y-%m-%d', time.localtime(started))}/torchrun-{env.run_id}"
    if single_node:  # every rank is a child of the same torchrun agent
        return _stamp(started, launcher)
    addr, port = os.environ.get("MASTER_ADDR", "localhost"), os.environ.get("MASTER_PORT", "0")
    return f"{time.strftime('%Y-%m-%d', time.localtime(started))}/torchrun-{addr}-{port}"


def _stamp(started: float, pid: int) -> str:
    return time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(started)) + f"-{pid}"


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat field 22); None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])  # fields[0] is field 3, the state
    except (OSError, IndexError, ValueError):
        return None


def _process_started(pid: int) -> float | None:
    """The wall-clock time process `pid` started; every process that asks gets the same figure."""
    ticks = _start_ticks(pid)
    try:
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    return None if ticks is None else boot + ticks / os.sysconf("SC_CLK_TCK")


def job_of(env: Env) -> str:
    """What every rank of one job shares and no other live job does: the lock's `job` field."""
    if env.run_id is None and env.world_size == 1:
        return f"pid {os.getpid()}"
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return f"torchrun {env.run_id} {address}" if env.run_id else address


@contextlib.contextmanager
def hold(run_dir: str | Path, env: Env) -> Iterator[None]:
    """Global rank 0 holds RUN_DIR/run.lock while the block runs and removes it after; the other ranks
    only refuse a directory that another live job holds (their rank 0 is refused too, but they would
    wait for it in the process group)."""
    path = Path(run_dir) / LOCK
    if env.rank != 0:
        _refuse_if_held_by_another(path, env)
        yield
        return
    fd = _acquire(path, env)
    try:
        yield
    finally:
        _release(fd, path)


def _acquire(path: Path, env: Env) -> int | None:
    """Lock the file and write our record in it; a record already there belongs to a dead run."""
    fd = _lock(path)
    if fd is None:
        return None
    previous = _parse(os.pread(fd, 4096, 0))
    if previous:  # the file is there but nobody holds it: its run died without cleaning up
        print(f"warning: {path}: taking over the lock of a run that is gone ({_holder(previous)})",
              file=sys.stderr, flush=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "job": job_of(env),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "ticks": _start_ticks(os.getpid())}
    try:
        with open(path, "w") as f:  # the inode we hold (checked in _lock; only the holder unlinks it)
            f.write(json.dumps(record))
    except OSError as err:  # a full disk: leave no empty lock behind, and name the file (a write names none)
        _release(fd, path)
        raise OSError(err.errno, err.strerror, str(path)) from None
    return fd


def _lock(path: Path) -> int | None:
    """flock the lock file: the kernel frees it when the holder dies, however it dies (os.open's fd is not
    inherited, so no child process keeps it). None: this file system has no locks.

    The descriptor that holds the lock is read-only: an open writer would stop the file system from
    being remounted read-only, and a run must fail on that like on any other write (see lifecycle)."""
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusy(_busy(path, _read(path))) from None
        except OSError as err:  # run anyway, but say that nothing guards the directory
            os.close(fd)
            print(f"warning: {path}: cannot be locked ({err.strerror}); another run using "
                  f"{path.parent} at the same time would not be noticed", file=sys.stderr, flush=True)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one


def _release(fd: int | None, path: Path) -> None:
    """Unlink before closing: whoever opened the old file in between sees another inode and retries."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        if _same_file(fd, path):
            path.unlink()
    os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _refuse_if_held_by_another(path: Path, env: Env) -> None:
    record = _read(path)
    if record and record.get("job") != job_of(env) and _alive(record):
        time.sleep(1.0)  # our rank 0, refused alike, says why; torchrun would end it on our exit before it does
        raise RunDirBusy(_busy(path, record))


def _alive(record: dict[str, Any]) -> bool:
    """Is the holder still running? Known only on its own host; the start time rules out a reused pid."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    ticks = _start_ticks(record["pid"])
    if ticks is None:  # gone, or no /proc to ask
        return _pid_exists(record["pid"])
    return record.get("ticks") in (None, ticks)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _holder(record: dict[str, Any] | None) -> str:
    if not record:
        return "its run.lock cannot be read yet"
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"


def _busy(path: Path, record: dict[str, Any] | None) -> str:
    return (f"hydra.run.dir={path.parent} is in use by another run ({_holder(record)}); wait for it to finish, "
            "or pick another hydra.run.dir")


def record_segment(run_dir: str | Path, cfg: Any, resumed_from: int | None, world_size: int) -> None:
    """Global rank 0 notes the segment that starts now: .hydra/ as Hydra writes it, by the first segment
    only (a resume must not erase what the run began with), and a row of segments.jsonl for every one."""
    run_dir = Path(run_dir)
    overrides, hydra_yaml = _hydra_state()
    task = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dataclasses.asdict(cfg))
    hydra_dir = run_dir / ".hydra"
    if not (hydra_dir / "config.yaml").exists():
        hydra_dir.mkdir(parents=True, exist_ok=True)
        files = {"overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(overrides)), "hydra.yaml": hydra_yaml,
                 "config.yaml": OmegaConf.to_yaml(task)}  # config.yaml last: it marks .hydra/ complete
        for name, text in files.items():
            if text is not None:
                (hydra_dir / name).write_text(text)
    path = run_dir / SEGMENTS
    row = {"segment": len(_rows(path)) + 1, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "resumed_from": resumed_from, "world_size": world_size, "overrides": overrides,
           "config": _resolved(task)}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _hydra_state() -> tuple[list[str], str | None]:
    """(the command line's overrides, hydra.yaml) under Hydra; train(cfg, run_dir) called directly has neither."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return [], None
    return list(HydraConfig.get().overrides.task), OmegaConf.to_yaml(HydraConfig.instance().cfg)


def _resolved(task: DictConfig) -> Any:
    try:
        return OmegaConf.to_container(task, resolve=True)
    except Exception:  # an interpolation only Hydra's job could fill in: keep it as written
        return OmegaConf.to_container(task, resolve=False)


def segments(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN_DIR/segments.jsonl, oldest first."""
    return _rows(Path(run_dir) / SEGMENTS)


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [row for line in path.read_text().splitlines() if (row := _parse(line.encode())) is not None]
