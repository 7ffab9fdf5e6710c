"""Shared test setup: one torch thread (the CI machine has 2 cores; small tensors are faster single-threaded),
and the path of the VNN-COMP fixtures in ../shared."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "vnncomp"


@pytest.fixture
def vnncomp_dir():
    if not SHARED.is_dir():
        pytest.skip("../shared/vnncomp is absent")
    return SHARED
