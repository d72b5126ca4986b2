"""Shared test helpers: compose the real Hydra config, make small data files, run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def make_cfg(*overrides: str):
    """The config `python -m pipeline.train OVERRIDES` would see (without the hydra section)."""
    import pipeline.train  # noqa: F401  registers the run-dir resolvers

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def write_npz(path: Path, n: int = 50, d: int = 10, classes: int = 3, seed: int = 11, **arrays) -> Path:
    """A small classification file like ../shared/contract/make_data.py writes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = np.argmax(x @ rng.normal(size=(d, classes)), axis=1).astype(np.int64)
    y[:classes] = np.arange(classes)
    contents = {"X": x, "y": y, **arrays}
    np.savez(path, **{k: v for k, v in contents.items() if v is not None})
    return path


def run_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ARGS` from the repository root and capture its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def npz_file(tmp_path: Path) -> Path:
    return write_npz(tmp_path / "data.npz")
