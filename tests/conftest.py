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


@pytest.fixture(scope="session")
def digits_mlp_pt(tmp_path_factory):
    """A tiny MLP trained 2 epochs (FGSM, eps 0.05) on sklearn digits, shared by the CLI tests (trained once):
    ~90% clean accuracy, some certified at eps 0.01, a good share unknown under CROWN at eps 0.06-0.1."""
    from lingraft.train.loop import TrainConfig, train

    d = tmp_path_factory.mktemp("digits-mlp")
    cfg = TrainConfig(arch="mlp", dataset="digits", epochs=2, batch_size=64, method="fgsm", eps=0.05, val_size=200,
                      device="cpu")
    train(cfg, d / "mlp.pt", progress=False, log=lambda s: None)
    return d / "mlp.pt"
