import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DATA = Path(os.environ.get("STNREG_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture
def data_dir() -> Path:
    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA} (set STNREG_DATA)")
    return DATA
