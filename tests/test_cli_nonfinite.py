"""Models with NaN or infinite weights, beyond the refusal rows of the hostile-input matrix
(``test_cli_hostile.py``: certify, graft, export, verify and run refuse them in one line): the exact ONNX initializer
named, verify's JSON result, what inspect shows, the loader's switch, and the ONNX import check against
onnxruntime naming non-finite outputs as its cause."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import needs_onnxruntime, write_non_finite_models

from lingraft.cli.main import cli
from lingraft.errors import LingraftError

torch.set_num_threads(1)

pytestmark = needs_onnxruntime


@pytest.fixture(scope="module")
def nf(tmp_path_factory) -> Path:
    """good.pt (a random digits MLP), good.onnx (its export), nan.pt, nanbuf.pt and inf.onnx
    (:func:`conftest.write_non_finite_models`; inf-name.txt holds the initializer's name), p64.vnnlib (a box for
    the 64 inputs)."""
    from lingraft.data.datasets import dataset_info
    from lingraft.io.checkpoint import save_checkpoint
    from lingraft.io.onnx import export_onnx
    from lingraft.models import create_model

    d = tmp_path_factory.mktemp("nonfinite")
    torch.manual_seed(0)
    info = dataset_info("digits")
    kw = dict(in_shape=list(info.in_shape), num_classes=10, mean=list(info.mean), std=list(info.std))
    good = create_model("mlp", **kw)
    save_checkpoint(d / "good.pt", good, arch="mlp", arch_kwargs=kw, dataset="digits", meta={"eps": 0.05})
    export_onnx(good, d / "good.onnx", (1, 8, 8))
    (d / "inf-name.txt").write_text(write_non_finite_models(d, good))
    xs = [f"(declare-const X_{i} Real)" for i in range(64)] + [f"(declare-const Y_{i} Real)" for i in range(10)]
    box = [f"(assert (<= X_{i} 0.51))\n(assert (>= X_{i} 0.5))" for i in range(64)]
    (d / "p64.vnnlib").write_text("\n".join(xs + box + ["(assert (>= Y_0 Y_1))"]) + "\n")
    return d


def _invoke(argv: list[str]):
    res = CliRunner().invoke(cli, argv, catch_exceptions=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        pytest.fail("uncaught exception:\n" + "".join(traceback.format_exception(res.exception)))
    return res


@pytest.mark.parametrize(
    "name,what", [("nan.pt", "parameter '4.weight' holds NaN"), ("inf.onnx", None)], ids=["pt", "onnx"]
)
def test_verify_refusal_names_the_tensor_and_the_fix(nf, tmp_path, monkeypatch, name, what):
    """The one line names the exact tensor (an ONNX initializer by its own name) and the fix; verify's JSON result
    still says 'error' with the same reason (VNN-COMP convention: a failed instance gets a result)."""
    monkeypatch.chdir(tmp_path)
    what = what or f"initializer '{(nf / 'inf-name.txt').read_text()}' holds inf"
    res = _invoke(["verify", str(nf / name), str(nf / "p64.vnnlib"), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 1, res.output
    assert f"non-finite weights: {what}" in res.stderr and "retrain" in res.stderr, res.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["status"] == "error" and f"non-finite weights: {what}" in result["stats"]["error"]


@pytest.mark.parametrize(
    "name,needle",
    [("nan.pt", "parameter '4.weight' holds NaN"), ("nanbuf.pt", "buffer '0.mean' holds NaN"), ("inf.onnx", None)],
)
def test_inspect_shows_non_finite_weights(nf, name, needle):
    needle = needle or f"initializer '{(nf / 'inf-name.txt').read_text()}' holds inf"
    res = _invoke(["inspect", str(nf / name)])
    assert res.exit_code == 0, res.output
    assert f"weights: NOT FINITE ({needle})" in res.stdout
    res = _invoke(["inspect", str(nf / name), "--json", "-"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["non_finite"] == needle


@pytest.mark.parametrize("name", ["good.pt", "good.onnx"])
def test_inspect_finite_model_has_no_weights_line(nf, name):
    res = _invoke(["inspect", str(nf / name)])
    assert res.exit_code == 0, res.output
    assert "NOT FINITE" not in res.stdout
    assert json.loads(_invoke(["inspect", str(nf / name), "--json", "-"]).stdout)["non_finite"] is None


def test_loader_refuses_and_allows(nf):
    from lingraft.io.loader import load_model
    from lingraft.io.onnx import load_onnx

    with pytest.raises(LingraftError, match=r"parameter '4\.weight' holds NaN"):
        load_model(nf / "nan.pt")
    assert load_model(nf / "nan.pt", allow_non_finite=True).non_finite == "parameter '4.weight' holds NaN"
    with pytest.raises(LingraftError) as e:
        load_onnx(nf / "inf.onnx", check=False)
    assert f"non-finite weights: initializer '{(nf / 'inf-name.txt').read_text()}' holds inf" in str(e.value)
    assert load_model(nf / "good.pt").non_finite is None


def test_onnx_check_names_non_finite_outputs(tmp_path):
    """Finite but huge weights overflow to inf on both sides: the check names that, not 'please report'."""
    import onnx
    from onnx import TensorProto, helper

    from lingraft.io.onnx import load_onnx

    w = helper.make_tensor("W", TensorProto.FLOAT, [10, 64], np.full(10 * 64, 3e38, dtype=np.float32))
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)],
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [w],
    )
    path = tmp_path / "huge.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(LingraftError) as e:
        load_onnx(path)
    assert "non-finite outputs" in str(e.value) and "please report" not in str(e.value)
    assert "onnxruntime" in str(e.value)


def test_onnx_inf_pad_value_is_not_a_broken_weight():
    """-inf as a Pad value (e.g. before a MaxPool) or a Clip bound is legitimate; NaN there, or inf in a weight,
    is not."""
    from onnx import TensorProto, helper

    from lingraft.io.onnx.analysis import onnx_non_finite

    def model(pad_value: float, w_value: float):
        inits = [
            helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 1, 1, 0, 0, 1, 1]),
            helper.make_tensor("pv", TensorProto.FLOAT, [], [pad_value]),
            helper.make_tensor("W", TensorProto.FLOAT, [10, 100], np.full(1000, w_value, dtype=np.float32)),
        ]
        nodes = [
            helper.make_node("Pad", ["x", "pads", "pv"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "W"], ["y"], transB=1),
        ]
        graph = helper.make_graph(
            nodes,
            "m",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
            inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    assert onnx_non_finite(model(-np.inf, 0.5)) is None
    assert onnx_non_finite(model(np.nan, 0.5)) == "initializer 'pv' holds NaN"
    assert onnx_non_finite(model(0.0, np.inf)) == "initializer 'W' holds inf"
