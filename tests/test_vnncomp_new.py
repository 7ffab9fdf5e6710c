"""The three later VNN-COMP folders of ../shared/vnncomp: mnist_fc_deep (MLP 256x4 / 256x6, input [1,784,1]),
sri_resnet_a (CIFAR ResNet with residual Adds, normalised inputs) and cifar_biasfield (16 bias-field coefficients
-> Gemm -> Reshape to an image -> 8 convs).

Every network imports into the bound engine's vocabulary and computes what onnxruntime computes at points of
its properties' boxes (the importer's own check uses [0, 1] inputs, outside the normalised sri_resnet_a boxes);
the competitors' witnesses are counterexamples of the imported networks; a few fast instances get the consensus
verdict. Work is bounded by rounds and generous timeouts, never by asserting wall-clock time.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lingraft.io.onnx import list_unsupported_ops, load_onnx, run_onnxruntime
from lingraft.spec.vnnlib import parse_vnnlib, read_counterexample
from lingraft.verify.core import verify_property

torch.set_num_threads(1)

from conftest import SHARED as VNNCOMP  # noqa: E402  (after the torch thread setting above)

# the tier marker (vnncomp, or slow) is on each test: conftest refuses a tier set above a test that has its own
pytestmark = pytest.mark.skipif(not VNNCOMP.is_dir(), reason="../shared/vnncomp is absent")

FOLDERS = ("mnist_fc_deep", "sri_resnet_a", "cifar_biasfield")
PROPS_PER_NET = 3  # boxes sampled per network (sri_resnet_a has one network and 72 properties)


def _instances(folder: str) -> list[tuple[str, str]]:
    p = VNNCOMP / folder / "instances.csv"
    if not p.is_file():
        return []
    with open(p, newline="") as f:
        return [(r[0], r[1]) for r in csv.reader(f) if r and not r[0].startswith("#")]


def _networks() -> list[tuple[str, str, list[str]]]:
    """(folder, onnx, first PROPS_PER_NET vnnlib files that use it) for every network of the three folders."""
    out = []
    for folder in FOLDERS:
        props: dict[str, list[str]] = {}
        for onnx_file, vnnlib in _instances(folder):
            props.setdefault(onnx_file, []).append(vnnlib)
        out += [(folder, net, vs[:PROPS_PER_NET]) for net, vs in props.items()]
    return out


NETWORKS = _networks()

# (folder, onnx file name) -> (input shape, output shape, Linear layers, Conv2d layers, residual adds)
STRUCTURE = {
    ("mnist_fc_deep", "mnist-net_256x4.onnx"): ((784, 1), (10,), 5, 0, 0),
    ("mnist_fc_deep", "mnist-net_256x6.onnx"): ((784, 1), (10,), 7, 0, 0),
    ("sri_resnet_a", "resnet_3b2_bn_mixup_adv_4.0_bs128_lr-1.onnx"): ((3, 32, 32), (10,), 2, 10, 3),
}


def _box(folder: str, vnnlib: str, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    prop = parse_vnnlib(VNNCOMP / folder / vnnlib, num_inputs=n_in, num_outputs=n_out)
    assert len(prop.regions) >= 1
    r = prop.regions[0]
    return torch.tensor(r.lower, dtype=torch.float32), torch.tensor(r.upper, dtype=torch.float32)


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """max |got - ref| <= tol * max(1, max |ref|) (float32 round-off)."""
    got, ref = got.double().reshape(ref.shape), ref.double()
    d = float((got - ref).abs().max())
    assert d <= tol * max(1.0, float(ref.abs().max())), d


@pytest.mark.vnncomp
@pytest.mark.skipif(not NETWORKS, reason="the new VNN-COMP folders are absent")
@pytest.mark.parametrize("folder,onnx_file,props", NETWORKS, ids=[f"{f}/{Path(n).name}" for f, n, _ in NETWORKS])
def test_network_imports_and_matches_onnxruntime_in_its_boxes(folder, onnx_file, props):
    from lingraft.bounds import BoundedNetwork

    path = VNNCOMP / folder / onnx_file
    assert list_unsupported_ops(path) == []
    gm = load_onnx(path)  # also checks itself against onnxruntime on [0, 1] inputs
    n_in, n_out = math.prod(gm.input_shape), math.prod(gm.output_shape)
    assert n_out == 10
    want = STRUCTURE.get((folder, Path(onnx_file).name))
    if folder == "cifar_biasfield":  # Gemm 16 -> 3072, Reshape [1, 3, 32, 32], 8 convs
        want = ((16,), (10,), 1, 8, 0)
    if want is not None:
        ins, outs, n_lin, n_conv, n_add = want
        assert (gm.input_shape, gm.output_shape) == (ins, outs)
        assert sum(isinstance(m, nn.Linear) for m in gm.modules()) == n_lin
        assert sum(isinstance(m, nn.Conv2d) for m in gm.modules()) == n_conv
        import operator

        adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
        assert sum(all(isinstance(a, torch.fx.Node) and a.op != "get_attr" for a in n.args) for n in adds) == n_add
    BoundedNetwork(gm, gm.input_shape)  # the bound graph accepts every node
    g = torch.Generator().manual_seed(0)
    for vnnlib in props:
        lo, hi = _box(folder, vnnlib, n_in, n_out)
        x = lo + (hi - lo) * torch.rand(4, n_in, generator=g)
        x = torch.cat([x, lo[None], hi[None]]).reshape(-1, *gm.input_shape)  # random points and two corners
        with torch.no_grad():
            y = gm(x)
        assert tuple(y.shape) == (x.shape[0], *gm.output_shape)
        _close(y, run_onnxruntime(path, x))


WITNESSES = sorted(p for f in FOLDERS for p in (VNNCOMP / f / "counterexamples").glob("*.counterexample.gz"))


def _instance_of_witness(p: Path) -> tuple[str, str, str]:
    """(folder, onnx, vnnlib) of a witness file '<onnx stem>_<vnnlib stem>.counterexample.gz'."""
    folder = p.parent.parent.name
    stem = p.name[: -len(".counterexample.gz")]
    for onnx_file, vnnlib in _instances(folder):
        a, b = Path(onnx_file).stem, Path(vnnlib).name.removesuffix(".gz").removesuffix(".vnnlib")
        if stem == f"{a}_{b}":
            return folder, onnx_file, vnnlib
    raise AssertionError(f"no instance for {p}")


@pytest.mark.vnncomp
@pytest.mark.skipif(not WITNESSES, reason="no counterexample files")
def test_competition_witnesses_are_counterexamples_of_the_imported_networks():
    """debona's / MN-BaB's witnesses (checked with onnxruntime by whoever copied them) lie in the box and violate
    the property on lingraft's import too (idx_6283 by only 1e-4: the import must be that exact)."""
    assert len(WITNESSES) == 15  # 2 mnist_fc_deep + 12 sri_resnet_a + 1 cifar_biasfield
    nets: dict[Path, nn.Module] = {}
    for p in WITNESSES:
        folder, onnx_file, vnnlib = _instance_of_witness(p)
        path = VNNCOMP / folder / onnx_file
        if path not in nets:
            nets[path] = load_onnx(path, check=False)
        gm = nets[path]
        x, y_witness = read_counterexample(p)
        prop = parse_vnnlib(VNNCOMP / folder / vnnlib, num_inputs=x.size, num_outputs=y_witness.size)
        assert any(r.contains_float32(x) for r in prop.regions), p.name
        with torch.no_grad():
            y = gm(torch.tensor(x, dtype=torch.float32).reshape(1, *gm.input_shape)).double().reshape(-1).numpy()
        assert prop.is_violated_by_float32(x, y), (p.name, y, y_witness)
        np.testing.assert_allclose(y, y_witness, rtol=0, atol=1e-3 * max(1.0, float(np.abs(y_witness).max())))


# ----------------------------------------------------------------------------------------------------------------
# verdicts of a few fast instances (generous timeouts; the work is bounded by rounds)

SRI_NET = "resnet_3b2_bn_mixup_adv_4.0_bs128_lr-1.onnx"
FAST = [
    ("mnist_fc_deep", "mnist-net_256x4.onnx", "prop_1_0.03.vnnlib", "sat"),
    ("mnist_fc_deep", "mnist-net_256x6.onnx", "prop_6_0.03.vnnlib", "sat"),
    ("mnist_fc_deep", "mnist-net_256x4.onnx", "prop_0_0.03.vnnlib", "unsat"),  # CROWN
    ("mnist_fc_deep", "mnist-net_256x6.onnx", "prop_2_0.03.vnnlib", "unsat"),  # alpha-CROWN
    ("sri_resnet_a", SRI_NET, "cifar10_spec_idx_5611_eps_0.00039.vnnlib", "sat"),  # the quick attack
    ("sri_resnet_a", SRI_NET, "cifar10_spec_idx_2724_eps_0.00350.vnnlib", "unsat"),  # CROWN
]


def _check_verdict(folder: str, onnx_file: str, vnnlib: str, want: str, **kw) -> None:
    d = VNNCOMP / folder
    net, prop_path = d / "onnx" / onnx_file, d / "vnnlib" / vnnlib
    if not (net.is_file() and prop_path.is_file()):
        pytest.skip(f"{folder}: {onnx_file} / {vnnlib} absent")
    res = verify_property(net, prop_path, **kw)
    assert res.status == want, (vnnlib, res.status, res.stats)
    if want == "sat":
        x, y = res.counterexample
        prop = parse_vnnlib(prop_path)
        assert prop.is_violated_by_float32(x, y)
        gm = load_onnx(net, check=False)
        y_ort = run_onnxruntime(net, torch.tensor(x, dtype=torch.float32).reshape(1, *gm.input_shape))
        assert prop.is_violated_by_float32(x, y_ort.numpy()[0])  # onnxruntime agrees it is a counterexample


@pytest.mark.vnncomp
@pytest.mark.parametrize("folder,onnx_file,vnnlib,want", FAST, ids=[f"{Path(o).stem}-{v}" for _, o, v, _ in FAST])
def test_fast_instance_verdict(folder, onnx_file, vnnlib, want):
    _check_verdict(folder, onnx_file, vnnlib, want, timeout=300, max_rounds=20)


BIASFIELD_8 = ("cifar_biasfield", "cifar_bias_field_8.onnx", "prop_8.vnnlib")


@pytest.mark.vnncomp
def test_cifar_biasfield_8_attack_finds_a_confirmed_counterexample():
    """The one sat cifar_biasfield instance, decided by the counterexample search alone (the full
    verify_property spends about 35 s of one CPU thread in the root CROWN pass first: see the slow test)."""
    from lingraft.spec.region import region_spec
    from lingraft.verify.falsify import spec_attack
    from lingraft.verify.witness import confirm

    folder, onnx_file, vnnlib = BIASFIELD_8
    net = VNNCOMP / folder / "onnx" / onnx_file
    if not net.is_file():
        pytest.skip(f"{net} absent")
    gm = load_onnx(net)
    prop = parse_vnnlib(VNNCOMP / folder / "vnnlib" / vnnlib, num_inputs=16, num_outputs=10)
    assert len(prop.regions) == 1
    spec = region_spec(prop.regions[0], gm.input_shape, 10).set_output_scale(gm)
    xs, v = spec_attack(gm, spec, seed=0)
    cex = confirm(xs, v - spec.confirm_slack, prop, gm, str(net))  # onnxruntime's outputs, checked in float32
    assert cex is not None, float(v.min())
    x, y = cex
    assert prop.is_violated_by_float32(x, y)


@pytest.mark.slow
@pytest.mark.vnncomp
def test_cifar_biasfield_8_is_sat():
    _check_verdict(*BIASFIELD_8, "sat", timeout=600, max_rounds=5)


@pytest.mark.slow
@pytest.mark.vnncomp
def test_cifar_biasfield_0_is_unsat_by_input_splitting():
    """16 inputs: auto mode splits the input box; the children start from the root's intermediate bounds (about
    25 s of one CPU thread; work bounded by rounds)."""
    _check_verdict("cifar_biasfield", "cifar_bias_field_0.onnx", "prop_0.vnnlib", "unsat", timeout=600, max_rounds=6)
