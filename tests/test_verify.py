"""Complete verification: attack + bounds + branch and bound, result files, the VNN-COMP runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED as VNNCOMP
from conftest import needs_shared as needs_vnncomp
from torch import nn

from lingraft.bounds import BoundedNetwork
from lingraft.clock import now
from lingraft.models.layers import GraftedReLU
from lingraft.spec.region import region_spec
from lingraft.spec.vnnlib import OutputConstraint, Region, VnnlibProperty, parse_vnnlib, read_counterexample
from lingraft.verify import PROVE_TOL, verify_property
from lingraft.verify.bounding import bound_domains
from lingraft.verify.relu_bab import ReluBaB
from lingraft.verify.runner import verify_instances, write_result
from lingraft.verify.witness import confirm

REPO = Path(__file__).resolve().parents[1]

TEST_EXPECTED = {
    "test_nano.onnx": "unsat",
    "test_tiny.onnx": "unsat",
    "test_small.onnx": "unsat",
    "test_sat.onnx": "sat",
    "test_unsat.onnx": "unsat",
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_net(seed: int, grafted: bool = False) -> nn.Module:
    """2 -> 16 -> 16 -> 1 ReLU network (optionally with every other neuron grafted)."""
    torch.manual_seed(seed)
    if grafted:
        mask = torch.zeros(16)
        mask[::2] = 1
        acts = [GraftedReLU((16,), mask), GraftedReLU((16,), mask.flip(0))]
    else:
        acts = [nn.ReLU(), nn.ReLU()]
    return nn.Sequential(nn.Linear(2, 16), acts[0], nn.Linear(16, 16), acts[1], nn.Linear(16, 1)).eval()


def below(threshold: float) -> VnnlibProperty:
    """Unsafe iff y <= threshold for some x in [-1, 1]^2."""
    reg = Region(
        np.array([-1.0, -1.0]), np.array([1.0, 1.0]), [OutputConstraint(np.array([[1.0]]), np.array([threshold]))]
    )
    return VnnlibProperty(num_inputs=2, num_outputs=1, regions=[reg], path=None)


def grid_min(model: nn.Module, n: int = 401) -> tuple[float, float]:
    """(minimum on an n x n grid of [-1, 1]^2, a certified lower bound of the true minimum via Lipschitz)."""
    g = torch.linspace(-1, 1, n)
    X = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        m = float(model(X).min())
    lip = 1.0
    for layer in model:
        if isinstance(layer, nn.Linear):
            lip *= float(torch.linalg.matrix_norm(layer.weight.detach(), 2))
        elif isinstance(layer, GraftedReLU):
            lip *= max(1.0, float((layer.a.detach() * layer.mask).abs().max()))
    return m, m - lip * (2 / (n - 1)) / 2 * 2**0.5


def alpha_lower(model: nn.Module, prop: VnnlibProperty) -> float:
    spec = region_spec(prop.regions[0], (2,), 1)
    res = bound_domains(BoundedNetwork(model, (2,)), spec.x_L, spec.x_U, spec.C[None], iterations=50)
    return float(spec.lower_margin(res.lower))


# ---------------------------------------------------------------------------------------------- boxes / spec
def test_region_boxes_round_outward_for_bounds_and_inward_for_attacks():
    lo = np.array([0.1, -0.3, 1 / 3])
    up = np.array([0.2, 0.7, 1 / 3 + 1e-3])
    reg = Region(lo, up, [OutputConstraint(np.array([[1.0, -1.0]]), np.array([0.1]))])
    spec = region_spec(reg, (3,), 2)
    xl, xu = spec.x_L.double().numpy()[0], spec.x_U.double().numpy()[0]
    al, au = spec.a_L.double().numpy()[0], spec.a_U.double().numpy()[0]
    assert np.all(xl <= lo) and np.all(xu >= up)  # bounds cover the real box
    assert np.all(al >= lo) and np.all(au <= up) and np.all(al <= au)  # attack points lie inside it
    assert spec.b.dtype == torch.float64 and float(spec.b[0]) == 0.1


# ---------------------------------------------------------------------------------------------- tiny networks
def hand_built() -> nn.Module:
    """y = -2 relu(-2 x1 - 2 x2) - 2 relu(-x1 + 2 x2 + 1) on [-1, 1]^2.

    h1 + h2 is convex, so its maximum is at a corner: 4 (at (-1, -1) and at (-1, 1)), hence min y = -8. The two
    neurons peak at DIFFERENT corners, but the relaxation lets both sit at their upper lines at once (each
    unstable: z1 in [-4, 4], z2 in [-2, 4]): (alpha-)CROWN only gets y >= -12. One split separates the corners.
    """
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[-2.0, -2.0], [-1.0, 2.0]]))
        m[0].bias.copy_(torch.tensor([0.0, 1.0]))
        m[2].weight.copy_(torch.tensor([[-2.0, -2.0]]))
        m[2].bias.zero_()
    return m.eval()


def test_hand_built_network_needs_branching():
    model = hand_built()
    prop = below(-10.0)  # unsafe iff y <= -10: never (min y = -8)
    assert alpha_lower(model, prop) < -1.5  # alpha-CROWN: y >= about -12, no proof
    res = verify_property(model, prop, in_shape=(2,), split="relu", timeout=30)
    assert res.status == "unsat" and res.stats["method"] == "bab-relu" and res.stats["branches"] >= 2
    res = verify_property(model, below(-7.9), in_shape=(2,), split="relu", timeout=30)  # -8 is reachable
    assert res.status == "sat" and res.counterexample[1][0] <= -7.9


def test_relu_bab_proves_what_alpha_crown_cannot():
    model = tiny_net(5)
    m, certified = grid_min(model)
    prop = below(-0.2)
    assert certified > -0.2 + 0.05  # the property holds ...
    assert alpha_lower(model, prop) < 0  # ... but alpha-CROWN alone cannot show it
    res = verify_property(model, prop, in_shape=(2,), split="relu", timeout=30)
    assert res.status == "unsat", res
    assert res.stats["method"] == "bab-relu" and res.stats["branches"] > 2


def test_root_alpha_crown_reuses_crown_bounds_and_leaves_time_for_branching(monkeypatch):
    """The root alpha-CROWN step starts from step 1's CROWN intermediate bounds (no second CROWN pass of the whole
    box) and may use at most ROOT_ALPHA_SHARE of the time left; branch and bound still proves the property."""
    import lingraft.verify.core as core

    model = tiny_net(5)
    calls: list[dict] = []
    real = core.bound_domains

    def spy(net, x_L, x_U, C, **kw):
        calls.append({"kw": kw, "at": now()})
        return real(net, x_L, x_U, C, **kw)

    monkeypatch.setattr(core, "bound_domains", spy)
    timeout = 30.0
    t0 = now()
    res = verify_property(model, below(-0.2), in_shape=(2,), split="relu", timeout=timeout)
    assert res.status == "unsat" and res.stats["method"] == "bab-relu"
    crown, root = calls[0], calls[1]
    assert crown["kw"]["iterations"] == 0 and root["kw"]["intermediate_alpha"]
    assert root["kw"]["base_bounds"] is not None  # step 1's bounds, not recomputed
    left = t0 + timeout - root["at"]
    assert root["kw"]["deadline"] <= root["at"] + core.ROOT_ALPHA_SHARE * left + 1e-3
    assert 0 < core.ROOT_ALPHA_SHARE < 1


def test_input_bab_proves_the_same_property():
    model = tiny_net(5)
    res = verify_property(model, below(-0.2), in_shape=(2,), split="input", timeout=30)
    assert res.status == "unsat" and res.stats["branches"] > 2 and res.stats["method"] == "bab-input"


@pytest.mark.parametrize("split", ["relu", "input"])
def test_sat_counterexample_is_found_and_rechecked(split):
    model = tiny_net(5)
    m, _ = grid_min(model)
    prop = below(m + 0.03)
    res = verify_property(model, prop, in_shape=(2,), split=split, timeout=30)
    assert res.status == "sat"
    x, y = res.counterexample
    assert prop.is_violated_by(x, y)
    with torch.no_grad():
        y_again = model(torch.tensor(x, dtype=torch.float32)[None]).double().numpy()[0]
    np.testing.assert_allclose(y, y_again, atol=1e-5)
    assert np.all(x >= -1) and np.all(x <= 1)


def test_confirm_rejects_a_candidate_the_reference_pass_does_not_support():
    model = tiny_net(5)
    prop = below(-10.0)  # nothing is that low
    spec = region_spec(prop.regions[0], (2,), 1)
    x = spec.a_L.expand(3, -1).clone()
    # the search claims violations, the float64 forward pass disagrees: no counterexample
    assert confirm(x, torch.full((3,), -1.0), prop, model, None) is None


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_branch_and_bound_never_proves_a_violated_property(seed):
    """Without any attack, BaB must not answer unsat where the grid shows a violation (and must prove the
    thresholds safely below the certified minimum)."""
    model = tiny_net(seed)
    m, certified = grid_min(model)
    for split in ("relu", "input"):
        # the work is bounded by rounds, not by the clock (the timeout is only a safety net)
        bad = verify_property(
            model, below(m + 0.01), in_shape=(2,), split=split, attack=False, max_rounds=40, timeout=300
        )
        assert bad.status in ("sat", "unknown"), (seed, split, bad)
        good = verify_property(
            model, below(certified - 0.03), in_shape=(2,), split=split, attack=False, max_rounds=2000, timeout=300
        )
        assert good.status == "unsat", (seed, split, good)


def test_grafted_neurons_are_never_split():
    model = tiny_net(3, grafted=True)
    _, certified = grid_min(model)
    prop = below(-0.13)
    assert certified > -0.13 and alpha_lower(model, prop) < 0  # needs branching
    net = BoundedNetwork(model, (2,))
    spec = region_spec(prop.regions[0], (2,), 1)
    root = bound_domains(net, spec.x_L, spec.x_U, spec.C[None], iterations=20, record_lA=True)
    bab = ReluBaB(net, spec, model, lambda xs, v: None, now() + 30, batch_size=4)
    assert int(bab.grafted.sum()) == 16
    sc = bab.scores(root, torch.zeros(1, bab.N, dtype=torch.int8), torch.ones(1, 1))
    assert torch.isinf(sc[0, bab.grafted]).all() and torch.isfinite(sc[0, ~bab.grafted]).any()
    out = bab.run(root)
    assert out.status == "unsat" and out.branches > 2
    assert bab.branched.any() and not (bab.branched & bab.grafted).any()


def test_timeout_is_respected():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    ).eval()
    m, _ = grid_min(model)
    # violated, and with the attacks off nothing can show it: branch and bound runs until the clock stops it
    for budget in (0.5, 1.5):
        t0 = time.perf_counter()
        res = verify_property(model, below(m + 0.01), in_shape=(2,), split="relu", attack=False, timeout=budget)
        wall = time.perf_counter() - t0
        # branch and bound ran (how far it got in the budget depends on the machine's load: not asserted)
        assert res.status == "timeout" and res.stats["branches"] >= 1
        # the search stops at its deadline, not when it runs out of work (generous slack: a busy machine)
        assert res.time_s <= budget + 5 and wall <= budget + 5
    res = verify_property(model, below(m - 1.0), in_shape=(2,), timeout=0.0)
    assert res.status == "timeout"


def test_bad_inputs_give_error_status():
    model = tiny_net(5)
    bad = VnnlibProperty(num_inputs=3, num_outputs=1, regions=[], path=None)
    res = verify_property(model, bad, in_shape=(2,))
    assert res.status == "error" and "inputs" in res.stats["error"]
    res = verify_property(REPO / "does-not-exist.onnx", below(0.0))
    assert res.status == "error" and "not found" in res.stats["error"]


def test_result_files(tmp_path):
    model = tiny_net(5)
    m, _ = grid_min(model)
    prop = below(m + 0.03)
    res = verify_property(model, prop, in_shape=(2,), timeout=30)
    write_result(tmp_path / "sat.txt", res)
    assert (tmp_path / "sat.txt").read_text().startswith("sat\n")
    x, y = read_counterexample(tmp_path / "sat.txt")
    assert prop.is_violated_by(x, y)
    res = verify_property(model, below(-0.2), in_shape=(2,), timeout=30)
    write_result(tmp_path / "unsat.txt", res)
    assert (tmp_path / "unsat.txt").read_text() == "unsat\n"


# ---------------------------------------------------------------------------------------------- VNN-COMP data
@needs_vnncomp
@pytest.mark.vnncomp
def test_vnncomp_test_folder_all_correct(tmp_path):
    folder = VNNCOMP / "test"
    out = tmp_path / "test.jsonl"
    lines = []
    recs = verify_instances(folder / "instances.csv", out=out, results_dir=tmp_path / "res", echo=lines.append)
    assert len(recs) == 5
    for r in recs:
        assert r["status"] == TEST_EXPECTED[r["onnx"]], r
        assert r["time_s"] < r["timeout"]
    # the sat result file holds a counterexample that onnxruntime confirms
    from lingraft.io.onnx import run_onnxruntime

    x, y = read_counterexample(tmp_path / "res" / "test_sat_test_prop.txt")
    y_ort = run_onnxruntime(folder / "test_sat.onnx", torch.tensor(x, dtype=torch.float32).reshape(1, 1, 1, 5))
    np.testing.assert_allclose(y, y_ort.numpy()[0], rtol=0, atol=1e-6)
    assert parse_vnnlib(folder / "test_prop.vnnlib").is_violated_by(x, y)
    assert "5 instances: 4 verified, 1 falsified" in lines[-1]
    # resume: nothing is recomputed
    lines2 = []
    again = verify_instances(folder / "instances.csv", out=out, echo=lines2.append)
    assert [r["status"] for r in again] == [r["status"] for r in recs]
    assert all("(resumed)" in s for s in lines2[:-1])
    assert len(out.read_text().splitlines()) == 5


@needs_vnncomp
@pytest.mark.vnncomp
def test_cli_run_and_shell_scripts(tmp_path):
    folder = VNNCOMP / "test"
    env = dict(os.environ, LINGRAFT_PYTHON=sys.executable)
    res_file = tmp_path / "r.txt"
    p = subprocess.run(
        [
            "bash",
            str(REPO / "vnncomp" / "prepare_instance.sh"),
            "v1",
            "test",
            str(folder / "test_sat.onnx"),
            str(folder / "test_prop.vnnlib"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    p = subprocess.run(
        [
            "bash",
            str(REPO / "vnncomp" / "run_instance.sh"),
            "v1",
            "test",
            str(folder / "test_sat.onnx"),
            str(folder / "test_prop.vnnlib"),
            str(res_file),
            "60",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.split("\n", 1)[1])["status"] == "sat"  # the script's own line, then the JSON
    x, y = read_counterexample(res_file)
    assert parse_vnnlib(folder / "test_prop.vnnlib").is_violated_by(x, y)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "lingraft.cli.main",
            "verify",
            str(folder / "missing.onnx"),
            str(folder / "test_prop.vnnlib"),
            "--result",
            str(res_file),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert p.returncode == 1 and "not found" in p.stderr and res_file.read_text() == "error\n"


@needs_vnncomp
@pytest.mark.vnncomp
def test_mnist_fc_three_instances():
    folder = VNNCOMP / "mnist_fc"
    net = folder / "onnx" / "mnist-net_256x2.onnx"
    for prop, want in (("prop_1", "sat"), ("prop_6", "unsat"), ("prop_8", "unsat")):
        res = verify_property(net, folder / "vnnlib" / f"{prop}_0.03.vnnlib.gz", timeout=120)
        assert res.status == want, (prop, res)
        if want == "sat":
            x, y = res.counterexample
            assert parse_vnnlib(folder / "vnnlib" / f"{prop}_0.03.vnnlib.gz").is_violated_by(x, y)
        else:
            assert res.stats["method"] == "bab-relu"  # these two need branch and bound


@needs_vnncomp
@pytest.mark.vnncomp
@pytest.mark.slow
@pytest.mark.parametrize("bench", ["mnist_fc", "verivital"])
def test_benchmark_matches_expected(bench, tmp_path):
    recs = verify_instances(VNNCOMP / bench / "instances.csv", out=tmp_path / f"{bench}.jsonl", echo=lambda s: None)
    assert recs and all(r["expected"] in ("sat", "unsat") for r in recs)
    assert not [r for r in recs if r["wrong"]]
    assert all(r["status"] == r["expected"] for r in recs), [(r["vnnlib"], r["status"]) for r in recs]
    assert all(r["time_s"] < r["timeout"] for r in recs)
    assert PROVE_TOL > 0


def test_cli_verify_accepts_checkpoints_like_their_onnx(digits_mlp_pt, tmp_path):
    """A .pt checkpoint verifies directly (no ONNX), with the same answers as its ONNX export."""
    from click.testing import CliRunner

    from lingraft.cli.main import cli
    from lingraft.data.datasets import load_dataset, subset
    from lingraft.io.loader import load_model
    from lingraft.spec.benchmark import robustness_vnnlib

    lm = load_model(digits_mlp_pt)
    onnx_path = tmp_path / "mlp.onnx"
    assert CliRunner().invoke(cli, ["export", str(digits_mlp_pt), "--out", str(onnx_path)]).exit_code == 0
    x, y = subset(*load_dataset("digits", "test"), 6)
    answers = []
    for k in range(6):
        prop = tmp_path / f"p{k}.vnnlib"
        prop.write_text(robustness_vnnlib(x[k], int(y[k]), 0.05, 10))
        got = []
        for model in (digits_mlp_pt, onnx_path):
            res = CliRunner().invoke(cli, ["verify", str(model), str(prop), "--timeout", "20", "--json", "-"])
            assert res.exit_code == 0, res.output
            got.append(json.loads(res.stdout)["status"])
        assert got[0] == got[1], (k, got)
        answers.append(got[0])
    assert set(answers) <= {"sat", "unsat"} and "unsat" in answers, answers
    assert lm.in_shape == (1, 8, 8)


def test_cli_verify_batch_size_reaches_branch_and_bound(digits_mlp_pt, tmp_path, monkeypatch):
    """--batch-size is passed to verify_property (one instance and --instances); 0 is a usage error."""
    from click.testing import CliRunner

    import lingraft.verify as lv
    from lingraft.cli.main import cli
    from lingraft.data.datasets import load_dataset, subset
    from lingraft.spec.benchmark import robustness_vnnlib

    seen = []
    real = lv.verify_property

    def spy(*a, **kw):
        seen.append(kw.get("batch_size"))
        return real(*a, **kw)

    monkeypatch.setattr(lv, "verify_property", spy)
    monkeypatch.setattr("lingraft.verify.runner.verify_property", spy)
    x, y = subset(*load_dataset("digits", "test"), 1)
    prop = tmp_path / "p.vnnlib"
    prop.write_text(robustness_vnnlib(x[0], int(y[0]), 0.05, 10))
    res = CliRunner().invoke(cli, ["verify", str(digits_mlp_pt), str(prop), "--batch-size", "7", "--json", "-"])
    assert res.exit_code == 0, res.output
    assert seen == [7] and json.loads(res.stdout)["status"] in ("sat", "unsat")
    res = CliRunner().invoke(cli, ["verify", str(digits_mlp_pt), str(prop)])
    assert res.exit_code == 0 and seen[-1] is None
    csv = tmp_path / "instances.csv"
    csv.write_text(f"{digits_mlp_pt},{prop.name},20\n")
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(cli, ["verify", "--instances", str(csv), "--out", str(out), "--batch-size", "5", "-q"])
    assert res.exit_code == 0, res.output
    assert seen[-1] == 5
    res = CliRunner().invoke(cli, ["verify", str(digits_mlp_pt), str(prop), "--batch-size", "0"])
    assert res.exit_code == 2 and "--batch-size" in res.output


# ---------------------------------------------------------------------------------------------- float32 rounding
def offset_net() -> nn.Module:
    """2 -> 2 -> 1 network with outputs near 1088 (both ReLUs active on [-1, 1]^2, so it is affine there).

    Found by search: on [-1, 1]^2 the float64 minimum of y is 1088.339481858635 (at a corner), below
    b = 1088.33949, but CROWN's float32 lower bound rounds to about b + 1.1e-4 (one float32 step at 1088)."""
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[-0.78, -0.59], [-0.43, -0.37]]))
        m[0].bias.copy_(torch.tensor([2.0, 2.0]))
        m[2].weight.copy_(torch.tensor([[-0.37, 0.15]]))
        m[2].bias.copy_(torch.tensor([1089.16638]))
    return m.eval()


def test_proof_tolerance_is_relative_to_the_magnitudes():
    from lingraft.bounds.tolerance import ABS_TOL, REL_TOL, is_proved, proof_margin

    assert ABS_TOL == PROVE_TOL == 1e-5 and 1e-6 <= REL_TOL <= 1e-4
    m = proof_margin(torch.tensor([0.0, 1088.0], dtype=torch.float64))
    assert float(m[0]) == ABS_TOL and float(m[1]) > 50 * float(np.spacing(np.float32(1088)))
    assert is_proved(torch.tensor([2e-5]), torch.tensor([0.0])).item()
    assert not is_proved(torch.tensor([1.1e-4]), torch.tensor([1088.0])).item()


def test_float32_rounding_never_proves_a_violated_property():
    model = offset_net()
    b = 1088.33949
    prop = below(b)
    corners = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    with torch.no_grad():
        y64 = model.double()(corners)[:, 0]
        model.float()
    assert float(y64.min()) <= b  # violated (float64 reference, as used to confirm counterexamples)
    assert alpha_lower(model, prop) > 1e-4  # yet float32 bounds clear b by more than the old 1e-5 tolerance
    for split in ("relu", "input"):
        res = verify_property(model, prop, in_shape=(2,), split=split, timeout=5)
        assert res.status == "sat", (split, res)
        assert prop.is_violated_by(*res.counterexample)
        res = verify_property(model, prop, in_shape=(2,), split=split, attack=False, max_rounds=20, timeout=300)
        assert res.status in ("sat", "unknown"), (split, res)
    # a threshold a little lower is proved (the tolerance is a few hundred float32 steps, not more)
    res = verify_property(model, below(b - 0.1), in_shape=(2,), timeout=5)
    assert res.status == "unsat", res


# ---------------------------------------------------------------------------------------------- VNN-LIB details
@pytest.mark.parametrize("split", ["input", "relu"])
def test_point_box_off_the_float32_grid_can_be_sat(split):
    model = tiny_net(5)
    pt = np.array([0.1, -0.3])  # a point box; neither coordinate is a float32 number
    with torch.no_grad():
        y0 = float(model(torch.tensor(pt, dtype=torch.float32)[None])[0, 0])
    reg = Region(pt.copy(), pt.copy(), [OutputConstraint(np.array([[1.0]]), np.array([y0 + 0.5]))])
    prop = VnnlibProperty(num_inputs=2, num_outputs=1, regions=[reg], path=None)
    res = verify_property(model, prop, in_shape=(2,), split=split, timeout=3)
    assert res.status == "sat", res
    x, y = res.counterexample
    np.testing.assert_array_equal(x, pt.astype(np.float32).astype(np.float64))
    assert not prop.is_violated_by(x, y) and prop.is_violated_by_float32(x, y)
    assert res.note == "counterexample checked to float32 precision"
    # an ordinary counterexample carries no note
    m, _ = grid_min(model)
    res = verify_property(model, below(m + 0.03), in_shape=(2,), split=split, timeout=30)
    assert res.status == "sat" and res.note == ""


def test_empty_disjunct_does_not_make_the_property_an_error():
    model = tiny_net(5)
    text = "(declare-const X_0 Real)(declare-const X_1 Real)(declare-const Y_0 Real)\n(assert (or\n"
    text += " (and (>= X_0 2) (<= X_0 1) (>= X_1 -1) (<= X_1 1) (<= Y_0 100))\n"
    text += " (and (>= X_0 -1) (<= X_0 1) (>= X_1 -1) (<= X_1 1) (<= Y_0 -0.2))))"
    res = verify_property(model, text, in_shape=(2,), timeout=30)
    assert res.status == "unsat", res  # the empty first disjunct would be unsafe everywhere if it were not empty


@pytest.mark.parametrize("split", ["relu", "input"])
def test_round_budget_bounds_the_search_without_a_clock(split):
    """max_rounds is a work budget independent of the machine's speed: an undecidable-by-bounds search stops after
    that many rounds with 'unknown' (never 'timeout': the clock is far away), the same answer on any machine."""
    model = tiny_net(0)
    m, _ = grid_min(model)
    runs = [
        verify_property(model, below(m + 0.01), in_shape=(2,), split=split, attack=False, max_rounds=3, timeout=300)
        for _ in range(2)
    ]
    assert all(r.status in ("unknown", "sat") for r in runs), runs
    assert runs[0].status == runs[1].status and runs[0].stats["branches"] == runs[1].stats["branches"]


def test_round_size_fits_the_time_left():
    """A search pops at most batch_size items, and no more than the last round's seconds per item say fit before
    the deadline (so the last seconds still bound a smaller round); none when not one fits or rounds run out."""
    from lingraft.verify.search import BranchAndBound, SearchOutcome

    # 1000 s budget at 300 s per item: 3 fit for the whole first 100 s, so a stalled machine cannot change it
    bab = BranchAndBound(None, None, None, None, now() + 1000.0, batch_size=8)  # type: ignore[arg-type]
    out = SearchOutcome("unsat")
    assert bab.round_size(out, 0.0, 20) == 8  # before the first round: the batch
    assert bab.round_size(out, 1.0, 5) == 5  # what is queued
    assert bab.round_size(out, 300.0, 20) == 3  # about 1000 s left at 300 s per item
    assert out.status == "unsat"
    assert bab.round_size(out, 2000.0, 20) == 0 and out.status == "timeout"
    capped = BranchAndBound(None, None, None, None, now() + 100.0, max_rounds=2)  # type: ignore[arg-type]
    done = SearchOutcome("unsat", rounds=2)
    assert capped.round_size(done, 1.0, 20) == 0 and done.status == "unknown"
