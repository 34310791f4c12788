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


@pytest.fixture
def simulated_oom(monkeypatch):
    """Make every forward pass of more than 2 slices raise a (CUDA-like) out-of-memory error; returns the list of
    batch sizes tried, in order."""
    import torch

    from ConvLoRASegLib.model import ConvLoRASegModel

    real_forward, real_both = ConvLoRASegModel.forward, ConvLoRASegModel.forward_both
    seen = []

    def check(x):
        seen.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    def forward(self, x):
        check(x)
        return real_forward(self, x)

    def forward_both(self, x):  # the CLI's pass that also gives the ESH (for the label-free score)
        check(x)
        return real_both(self, x)

    monkeypatch.setattr(ConvLoRASegModel, "forward", forward)
    monkeypatch.setattr(ConvLoRASegModel, "forward_both", forward_both)
    return seen


@pytest.fixture
def scaled_steps(monkeypatch):
    """Records, for every backward pass through ``torch.amp.GradScaler.scale``, whether the scaler was enabled."""
    import torch

    seen = []
    orig = torch.amp.GradScaler.scale

    def spy(self, outputs):
        seen.append(self.is_enabled())
        return orig(self, outputs)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", spy)
    return seen
