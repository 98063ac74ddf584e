"""Shared fixtures: a fresh store directory and compiled target programs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.targets import build  # noqa: E402


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A path for a new store (not yet created)."""
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path):
    """A new, open page store (closed after the test)."""
    from snapfs.store import Store

    s = Store.open(store_dir)
    yield s
    s.close()


@pytest.fixture(scope="session")
def target_bin():
    """``target_bin("memwriter")`` -> path of the compiled ``tools/targets/memwriter.c``."""
    return build


def snapfs_cmd() -> list[str]:
    """The argv prefix that runs this checkout's snapfs CLI."""
    return [sys.executable, "-m", "snapfs"]


@pytest.fixture
def snapfs_env(store_dir: Path) -> dict[str, str]:
    """Environment for CLI subprocesses: this checkout on PYTHONPATH, the test store."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["SNAPFS_STORE"] = str(store_dir)
    return env
