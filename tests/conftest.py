import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _drop_stale_kernel_caches() -> None:
    """numba keys each cached kernel on its own module's file only, not on the helpers it inlines
    from ``stnreg/fast/trilinear.py``: after an edit there, the tests would run the old machine
    code. Cache files older than any kernel source are dropped, so they compile afresh."""
    fast = Path(__file__).resolve().parents[1] / "stnreg" / "fast"
    newest = max(f.stat().st_mtime for f in fast.glob("*.py"))
    for f in (*fast.glob("__pycache__/*.nbi"), *fast.glob("__pycache__/*.nbc")):
        if f.stat().st_mtime < newest:
            f.unlink(missing_ok=True)


_drop_stale_kernel_caches()

DATA = Path(os.environ.get("STNREG_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture
def data_dir() -> Path:
    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA} (set STNREG_DATA)")
    return DATA
