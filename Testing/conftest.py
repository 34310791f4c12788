"""Shared fixtures. Tests import the library from the source tree; torch uses few threads to share the CPU."""

import os
import sys
from pathlib import Path

import pytest

# Small tensors run fastest on one thread, and a loaded machine makes multi-threaded OpenMP barriers crawl
# (17x slower measured here under load). Set before torch is imported; subprocesses (CLI tests) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CONVLORASEG_HOME", str(ROOT / ".pytest-store"))

HEADS = ROOT.parent / "shared" / "data" / "heads"


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    """Every test gets its own user store, never the real one."""
    monkeypatch.setenv("CONVLORASEG_HOME", str(tmp_path / "store"))


@pytest.fixture(scope="session")
def heads_dir() -> Path:
    if not HEADS.is_dir():
        pytest.skip(f"shared heads not found at {HEADS}")
    return HEADS
