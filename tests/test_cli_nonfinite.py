"""Models with NaN or infinite weights: certify, graft, export and verify refuse them up front with one line naming
the first non-finite tensor (a checkpoint's parameter/buffer name, an ONNX initializer's name); inspect shows it.
Also the ONNX import check against onnxruntime naming non-finite outputs as its cause."""

from __future__ import annotations

import json
import shlex
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import needs_onnxruntime

from lingraft.cli.main import cli
from lingraft.errors import LingraftError

torch.set_num_threads(1)

pytestmark = needs_onnxruntime


@pytest.fixture(scope="module")
def nf(tmp_path_factory) -> Path:
    """good.pt (a random digits MLP), nan.pt (a NaN in '4.weight'), nanbuf.pt (a NaN in the Normalize buffer
    '0.mean'), inf.onnx (good.onnx with +inf in one Gemm initializer), p64.vnnlib (a box for the 64 inputs)."""
    import onnx

    from lingraft.data.datasets import dataset_info
    from lingraft.io.checkpoint import save_checkpoint
    from lingraft.io.onnx import export_onnx
    from lingraft.models import create_model

    d = tmp_path_factory.mktemp("nonfinite")
    torch.manual_seed(0)
    info = dataset_info("digits")
    kw = dict(in_shape=list(info.in_shape), num_classes=10, mean=list(info.mean), std=list(info.std))

    def save(name, edit=None):
        m = create_model("mlp", **kw)
        if edit is not None:
            with torch.no_grad():
                edit(m.state_dict())
        save_checkpoint(d / name, m, arch="mlp", arch_kwargs=kw, dataset="digits", meta={"eps": 0.05})
        return m

    good = save("good.pt")
    save("nan.pt", lambda sd: sd["4.weight"].view(-1)[3].fill_(float("nan")))
    save("nanbuf.pt", lambda sd: sd["0.mean"].fill_(float("nan")))
    export_onnx(good, d / "good.onnx", (1, 8, 8))
    g = onnx.load(str(d / "good.onnx"))
    target = next(i for i in g.graph.initializer if len(i.dims) == 2)  # the first weight matrix
    arr = onnx.numpy_helper.to_array(target).copy()
    arr.flat[5] = np.inf
    target.CopyFrom(onnx.numpy_helper.from_array(arr, target.name))
    onnx.save(g, str(d / "inf.onnx"))
    (d / "inf-name.txt").write_text(target.name)
    xs = [f"(declare-const X_{i} Real)" for i in range(64)] + [f"(declare-const Y_{i} Real)" for i in range(10)]
    box = [f"(assert (<= X_{i} 0.51))\n(assert (>= X_{i} 0.5))" for i in range(64)]
    (d / "p64.vnnlib").write_text("\n".join(xs + box + ["(assert (>= Y_0 Y_1))"]) + "\n")
    return d


def _invoke(argv: list[str]):
    res = CliRunner().invoke(cli, argv, catch_exceptions=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        pytest.fail("uncaught exception:\n" + "".join(traceback.format_exception(res.exception)))
    return res


PT_NEEDLE = "non-finite weights: parameter '4.weight' holds NaN"
BUF_NEEDLE = "non-finite weights: buffer '0.mean' holds NaN"
ONNX_NEEDLE = "non-finite weights: initializer '{init}' holds inf"

REFUSALS = [
    ("certify-pt", "certify {d}/nan.pt -n 3 --pgd-steps 2 --json {o}/r.json", PT_NEEDLE),
    ("certify-pt-buffer", "certify {d}/nanbuf.pt -n 3 --pgd-steps 2", BUF_NEEDLE),
    ("certify-onnx", "certify {d}/inf.onnx --dataset digits -n 3 --pgd-steps 2 --json {o}/r.json", ONNX_NEEDLE),
    ("graft-pt", "graft {d}/nan.pt --ratio 0.5 --eps 0.05 --out {o}/g.pt", PT_NEEDLE),
    ("export-pt", "export {d}/nan.pt --out {o}/m.onnx", PT_NEEDLE),
    ("export-pt-buffer", "export {d}/nanbuf.pt --out {o}/m.onnx", BUF_NEEDLE),
    ("verify-onnx", "verify {d}/inf.onnx {d}/p64.vnnlib --json {o}/r.json", ONNX_NEEDLE),
    ("verify-pt", "verify {d}/nan.pt {d}/p64.vnnlib --json {o}/r.json", PT_NEEDLE),
]


@pytest.mark.parametrize("rid,argv,needle", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_non_finite_model_is_refused_in_one_line(nf, tmp_path, monkeypatch, rid, argv, needle):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    res = _invoke(shlex.split(argv.format(d=nf, o=out)))
    text = res.output
    needle = needle.format(init=(nf / "inf-name.txt").read_text())
    assert "Traceback" not in text, text
    assert res.exit_code == 1, f"exit {res.exit_code}; output:\n{text}"
    assert needle in text, f"{needle!r} not in:\n{text}"
    assert "retrain" in text  # the fix
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), res.stderr
    if rid.startswith("verify"):  # VNN-COMP convention: a failed instance still gets a result saying 'error'
        result = json.loads((out / "r.json").read_text())
        assert result["status"] == "error" and needle in result["stats"]["error"]
        (out / "r.json").unlink()
    assert not list(out.iterdir()), "an output file was written for a refused model"


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
    with pytest.raises(LingraftError, match="non-finite weights: initializer"):
        load_onnx(nf / "inf.onnx", check=False)
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
