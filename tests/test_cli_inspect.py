"""``lingraft inspect``: normalization printed without float32 noise, an ONNX file's baked-in Sub/Div normalization
recognized, ``--config``; and the JSON sidecar passed as the model (every command) pointing to the .pt."""

from __future__ import annotations

import json
import shlex
import traceback
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import needs_onnxruntime

from lingraft.cli.main import cli

torch.set_num_threads(1)

MEAN, STD = 0.1307, 0.3081  # float32 0.1307 is 0.1307000070810318 as a float64


@pytest.fixture(scope="module")
def md(tmp_path_factory) -> Path:
    """m.pt + its sidecar m.json (a random MLP on digits with MNIST's normalization), m.onnx (its export),
    other.json (JSON that is not a sidecar), p64.vnnlib (a box for the 64 inputs)."""
    from lingraft.io.checkpoint import save_checkpoint
    from lingraft.models import create_model

    d = tmp_path_factory.mktemp("inspect")
    torch.manual_seed(0)
    kw = dict(in_shape=[1, 8, 8], num_classes=10, mean=[MEAN], std=[STD])
    m = create_model("mlp", **kw)
    save_checkpoint(d / "m.pt", m, arch="mlp", arch_kwargs=kw, dataset="digits", meta={"eps": 0.05})
    (d / "other.json").write_text('{"clean_acc": 0.9}')
    xs = [f"(declare-const X_{i} Real)" for i in range(64)] + [f"(declare-const Y_{i} Real)" for i in range(10)]
    box = [f"(assert (<= X_{i} 0.51))\n(assert (>= X_{i} 0.5))" for i in range(64)]
    (d / "p64.vnnlib").write_text("\n".join(xs + box + ["(assert (>= Y_0 Y_1))"]) + "\n")
    return d


def _invoke(argv: list[str]):
    res = CliRunner().invoke(cli, [str(a) for a in argv], catch_exceptions=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        pytest.fail("uncaught exception:\n" + "".join(traceback.format_exception(res.exception)))
    return res


@pytest.fixture(scope="module")
def onnx_path(md) -> Path:
    pytest.importorskip("onnx")
    from lingraft.io.checkpoint import load_checkpoint
    from lingraft.io.onnx import export_onnx

    model, _ = load_checkpoint(md / "m.pt")
    export_onnx(model, md / "m.onnx", (1, 8, 8))
    return md / "m.onnx"


def test_inspect_prints_normalization_without_float32_noise(md):
    res = _invoke(["inspect", md / "m.pt"])
    assert res.exit_code == 0, res.output
    assert "normalization: mean [0.1307], std [0.3081]\n" in res.stdout
    assert "0.13070000" not in res.stdout
    info = json.loads(_invoke(["inspect", md / "m.pt", "--json", "-"]).stdout)
    assert info["normalization"] == {"mean": [MEAN], "std": [STD]}


@needs_onnxruntime
def test_inspect_recognizes_onnx_sub_div_normalization(onnx_path):
    res = _invoke(["inspect", onnx_path])
    assert res.exit_code == 0, res.output
    assert "normalization: mean [0.1307], std [0.3081] (the ONNX graph's first Sub/Div)" in res.stdout
    info = json.loads(_invoke(["inspect", onnx_path, "--json", "-"]).stdout)
    assert info["normalization"] == {"mean": [MEAN], "std": [STD]}


@needs_onnxruntime
def test_inspect_onnx_sub_mul_and_no_normalization(tmp_path):
    """Sub then Mul by a constant is normalization too (std = 1 / factor); a graph starting with Gemm has none."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    def save(first_nodes, inits, name):
        w = helper.make_tensor("W", TensorProto.FLOAT, [10, 4], np.ones(40, dtype=np.float32))
        nodes = first_nodes + [
            helper.make_node("Flatten", [first_nodes[-1].output[0] if first_nodes else "x"], ["f"]),
            helper.make_node("Gemm", ["f", "W"], ["y"], transB=1),
        ]
        graph = helper.make_graph(
            nodes,
            "m",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
            [w, *inits],
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / name))
        return tmp_path / name

    mean = helper.make_tensor("mu", TensorProto.FLOAT, [1, 1, 1, 1], [0.5])
    scale = helper.make_tensor("k", TensorProto.FLOAT, [1, 1, 1, 1], [4.0])
    sub_mul = [helper.make_node("Sub", ["x", "mu"], ["s"]), helper.make_node("Mul", ["s", "k"], ["n"])]
    info = json.loads(_invoke(["inspect", save(sub_mul, [mean, scale], "sm.onnx"), "--json", "-"]).stdout)
    assert info["normalization"] == {"mean": [0.5], "std": [0.25]}
    res = _invoke(["inspect", save([], [], "plain.onnx")])
    assert res.exit_code == 0, res.output
    assert "normalization: none inside the model" in res.stdout


def test_inspect_takes_config(md, tmp_path):
    cfg = tmp_path / "inspect.yaml"
    cfg.write_text(f"model: {md / 'm.pt'}\njson-out: '-'\n")
    res = _invoke(["inspect", "--config", cfg])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["path"] == str(md / "m.pt")
    cfg.write_text("modle: x\n")
    res = _invoke(["inspect", "--config", cfg])
    assert res.exit_code == 2 and "did you mean 'model'" in res.output


SIDECAR_ROWS = [
    ("inspect", "inspect {d}/m.json"),
    ("certify", "certify {d}/m.json -n 2 --pgd-steps 1"),
    ("graft", "graft {d}/m.json --ratio 0.5 --eps 0.05 --out {o}/g.pt"),
    ("export", "export {d}/m.json --out {o}/m.onnx"),
    ("verify", "verify {d}/m.json {d}/p64.vnnlib --result {o}/r.txt"),
]


@pytest.mark.parametrize("rid,argv", SIDECAR_ROWS, ids=[r[0] for r in SIDECAR_ROWS])
def test_sidecar_as_model_points_to_the_pt(md, tmp_path, rid, argv):
    res = _invoke(shlex.split(argv.format(d=md, o=tmp_path)))
    assert res.exit_code == 1, res.output
    assert (
        f"is the JSON sidecar of a lingraft checkpoint (metadata only, no weights); pass the checkpoint "
        f"itself: {md / 'm.pt'}" in res.output
    )
    assert "ONNX" not in res.output and "Traceback" not in res.output
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, res.stderr
    assert not (tmp_path / "g.pt").exists() and not (tmp_path / "m.onnx").exists()


def test_other_json_as_model_is_no_model(md):
    res = _invoke(["inspect", md / "other.json"])
    assert res.exit_code == 1
    assert "is a JSON file, not a model; pass a .pt checkpoint or an .onnx file" in res.output


# ---------------------------------------------------------------------------------------------------------------
# issue 14 item 9, train: the resume state left after a finished run is explained (it is what lets a rerun with
# more epochs continue, so it is kept)


@pytest.mark.trains
def test_train_says_why_the_resume_state_is_kept(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "m.pt"
    argv = ["train", "--arch", "mlp", "--dataset", "digits", "--epochs", "1", "--num-train", "128"]
    argv += ["--val-size", "50", "--method", "ce", "--no-progress", "--out", out]
    res = _invoke(argv)
    assert res.exit_code == 0, res.output
    state = tmp_path / "m.pt.state"
    assert state.is_file()
    assert f"kept the resume state {state}: a rerun with more epochs continues from it" in res.stderr
    res = _invoke([*argv[:6], "2", *argv[7:]])
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.stderr and "1 epoch(s)" in res.stderr
