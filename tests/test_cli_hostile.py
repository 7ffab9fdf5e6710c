"""Hostile input for every command: each row asserts the exit code, a message substring, that there is no
traceback (nor an uncaught exception inside CliRunner), and that no (half-)written output file is left behind.

Rows whose ids are in ``KNOWN_BUGS`` fail today and are marked xfail(strict): when a fix lands they XPASS, which
fails the run, and the id must be removed from the set.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import shlex
import textwrap
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_non_finite_models

from lingraft.cli.main import cli

torch.set_num_threads(1)

# Row ids that currently fail; see the report to the lead for the exact fixes.
KNOWN_BUGS: set = set()


EVIL_MARK = "EVIL_RAN"


class _Evil:
    """Unpickling this would create a marker file (it must never happen)."""

    def __init__(self, mark: str):
        self.mark = mark

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.mark)}",))


def _onnx_files(d: Path, good_onnx: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    g = onnx.load(str(good_onnx))
    g.opset_import[0].version = 99
    onnx.save(g, str(d / "opset99.onnx"))
    g = onnx.load(str(good_onnx))
    for dim in g.graph.input[0].type.tensor_type.shape.dim[1:]:
        dim.dim_param = "h"
    onnx.save(g, str(d / "dynamic.onnx"))
    rng = np.random.default_rng(0)

    def gemm_model(in_shape, nodes_after, path):
        n_in = int(np.prod(in_shape[1:]))
        w = helper.make_tensor("W", TensorProto.FLOAT, [10, n_in], rng.standard_normal(10 * n_in).astype(np.float32))
        nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "W"], ["g"], transB=1)]
        last = "g"
        for k, op in enumerate(nodes_after):
            nodes.append(helper.make_node(op, [last], [f"o{k}"], name=f"{op.lower()}{k}"))
            last = f"o{k}"
        graph = helper.make_graph(
            nodes,
            "m",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, 10])],
            [w],
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))

    gemm_model([1, 1, 8, 8], ["Sigmoid", "Softmax"], d / "unsupported.onnx")
    gemm_model([1, 1, 10, 10], [], d / "shape10.onnx")


@pytest.fixture(scope="module")
def hd(tmp_path_factory) -> Path:
    """A folder of hostile (and a few good) inputs."""
    from lingraft.data.datasets import dataset_info
    from lingraft.io.checkpoint import save_checkpoint
    from lingraft.io.onnx import export_onnx
    from lingraft.models import create_model

    d = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)

    def ckpt(name, ds):
        info = dataset_info(ds)
        kw = dict(in_shape=list(info.in_shape), num_classes=10, mean=list(info.mean), std=list(info.std))
        m = create_model("mlp", **kw)
        save_checkpoint(d / name, m, arch="mlp", arch_kwargs=kw, dataset=ds, meta={"eps": 0.05})
        return m

    m = ckpt("good.pt", "digits")
    ckpt("mnist.pt", "mnist")
    ckpt("cifar.pt", "cifar10")
    export_onnx(m, d / "good.onnx", (1, 8, 8))
    write_non_finite_models(d, m)  # nan.pt, nanbuf.pt, inf.onnx
    raw = (d / "good.pt").read_bytes()
    (d / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    rng = np.random.default_rng(1)
    (d / "rand.pt").write_bytes(rng.bytes(3000))
    (d / "rand.onnx").write_bytes(rng.bytes(3000))
    (d / "empty.pt").write_bytes(b"")
    (d / "empty.onnx").write_bytes(b"")
    torch.save(m.state_dict(), d / "bare.pt")
    mark = str(d / EVIL_MARK)
    torch.save({"format": "lingraft-checkpoint", "x": _Evil(mark)}, d / "evil.pt")
    (d / "evil-raw.pt").write_bytes(pickle.dumps(_Evil(mark), protocol=2))
    _onnx_files(d, d / "good.onnx")
    # a fake CIFAR-10 folder (20 images per batch) and one whose test batch tries to run code
    for name, evil in (("fakecifar", False), ("evilcifar", True)):
        f = d / name / "cifar-10-batches-py"
        f.mkdir(parents=True)
        for b in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
            payload = {
                b"data": rng.integers(0, 255, (20, 3072), dtype=np.uint8),
                b"labels": [int(v) for v in rng.integers(0, 10, 20)],
            }
            if evil:
                payload[b"data"] = _Evil(mark)
            (f / b).write_bytes(pickle.dumps(payload, protocol=2))
    (d / "bad.yaml").write_text("eps: [0.1\nmethod: crown\n")
    (d / "unk.yaml").write_text("num-sample: 5\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "dup.yaml").write_text("eps: 0.1\neps: 0.2\n")
    (d / "bad-baseline.json").write_text('{"clean_acc": 1.0}')
    (d / "not-json.mask").write_text("this is not json")
    (d / "adir").mkdir()
    (d / "compare-typo.yaml").write_text("epz: 0.1\n")
    (d / "eps-bad.yaml").write_text("eps: 2/x\n")
    (d / "eps-big.yaml").write_text("eps: 8\n")
    (d / "eps-frac.yaml").write_text("vnnlib-eps: 300/255\n")
    (d / "export-typo.yaml").write_text("opsett: 13\n")
    (d / "export-bad-value.yaml").write_text("opset: many\n")
    (d / "verify-typo.yaml").write_text("timout: 3\n")
    # VNN-LIB: one for good.onnx (64 inputs in [0.5, 0.51], 10 outputs), a truncated one, a 1-input one
    xs = [f"(declare-const X_{i} Real)" for i in range(64)] + [f"(declare-const Y_{i} Real)" for i in range(10)]
    box = [f"(assert (<= X_{i} 0.51))\n(assert (>= X_{i} 0.5))" for i in range(64)]
    (d / "p64.vnnlib").write_text("\n".join(xs + box + ["(assert (>= Y_0 Y_1))"]) + "\n")
    (d / "bad.vnnlib").write_text("(declare-const X_0 Real)\n(assert (<= X_0 1.0)\n")
    (d / "one-input.vnnlib").write_text(
        "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
        "(assert (<= X_0 1.0))\n(assert (>= X_0 0.0))\n(assert (<= Y_0 0.0))\n"
    )
    (d / "instances-bad.csv").write_text("just-one-field\n")
    (d / "instances-good.csv").write_text("good.onnx,p64.vnnlib,10\n")
    _integrity_files(d)
    return d


def _integrity_files(d: Path) -> None:
    """flipped.pt: good.pt with 50 bytes of weights flipped (torch still loads it) beside good.pt's sidecar;
    mask.pt: a grafted checkpoint whose mask holds 0.2 and 0.7; inshape.pt: 28x28 inputs recorded for digits."""
    from lingraft.data.datasets import dataset_info
    from lingraft.io.checkpoint import replace_module, save_checkpoint
    from lingraft.models import create_model
    from lingraft.models.layers import GraftedReLU

    raw = bytearray((d / "good.pt").read_bytes())
    ck = torch.load(d / "good.pt", weights_only=True)
    w = next(v for k, v in ck["state_dict"].items() if k.endswith("weight")).numpy().tobytes()
    off = bytes(raw).find(w[:64])
    for i in range(50):
        raw[off + 100 + i] ^= 0xFF
    (d / "flipped.pt").write_bytes(bytes(raw))
    (d / "flipped.json").write_text((d / "good.json").read_text())
    torch.load(d / "flipped.pt", weights_only=True)  # loadable: only the sidecar check can tell

    info = dataset_info("digits")
    kw = dict(in_shape=list(info.in_shape), num_classes=10, mean=list(info.mean), std=list(info.std))
    m = create_model("mlp", **kw)
    relu = next(n for n, mod in m.named_modules() if isinstance(mod, torch.nn.ReLU))
    width = next(mod.out_features for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    replace_module(m, relu, GraftedReLU((width,), (torch.arange(width) % 3 == 0).float()))
    save_checkpoint(d / "mask-src.pt", m, arch="mlp", arch_kwargs=kw, dataset="digits", meta={"eps": 0.05})
    ck = torch.load(d / "mask-src.pt", weights_only=True)
    mask = ck["state_dict"][f"{relu}.mask"]
    mask[:2] = torch.tensor([0.2, 0.7])
    torch.save(ck, d / "mask.pt")

    mk = dataset_info("mnist")
    kw = dict(in_shape=list(mk.in_shape), num_classes=10, mean=list(mk.mean), std=list(mk.std))
    save_checkpoint(
        d / "inshape.pt", create_model("mlp", **kw), arch="mlp", arch_kwargs=kw, dataset="digits", meta={"eps": 0.05}
    )


# ------------------------------------------------------------------------------------------------------ rows
# (id, argv with {d}=hostile folder and {o}=fresh output folder, exit code, message substring)
D_OPTS = "-n 3 --pgd-steps 2 --json {o}/r.json --csv {o}/r.csv"
GRAFT = "--score-images 20 --epochs 0 -n 0 --num-train 20 --out {o}/g.pt"
TRAIN = "--dataset digits --epochs 1 --num-train 64 --val-size 64 --no-progress --out {o}/t.pt"
# a model with NaN/inf weights is refused up front, naming its first non-finite tensor (inspect shows it instead)
NAN_PT = "non-finite weights: parameter '4.weight' holds NaN"
NAN_BUFFER = "non-finite weights: buffer '0.mean' holds NaN"
INF_ONNX = "non-finite weights: initializer '"  # the exporter's name; test_cli_nonfinite checks it exactly

ROWS = [
    # --- certify
    ("certify-missing", f"certify {{d}}/nope.pt {D_OPTS}", 1, "not found"),
    ("certify-directory", f"certify {{d}}/adir {D_OPTS}", 1, "is a directory"),
    ("certify-empty-pt", f"certify {{d}}/empty.pt {D_OPTS}", 1, "is empty"),
    ("certify-empty-onnx", f"certify {{d}}/empty.onnx {D_OPTS}", 1, "empty"),
    ("certify-truncated", f"certify {{d}}/trunc.pt {D_OPTS}", 1, "truncated or corrupted"),
    ("certify-random-pt", f"certify {{d}}/rand.pt {D_OPTS}", 1, "not a PyTorch file"),
    ("certify-random-onnx", f"certify {{d}}/rand.onnx --dataset digits {D_OPTS}", 1, "cannot parse"),
    ("certify-opset-99", f"certify {{d}}/opset99.onnx --dataset digits {D_OPTS}", 1, "opset 99"),
    ("certify-dynamic-onnx", f"certify {{d}}/dynamic.onnx --dataset digits {D_OPTS}", 1, "dynamic non-batch dims"),
    (
        "certify-unsupported-ops",
        f"certify {{d}}/unsupported.onnx --dataset digits {D_OPTS}",
        1,
        "Sigmoid (node 'sigmoid0'), Softmax (node 'softmax1')",
    ),
    ("certify-non-finite-pt", f"certify {{d}}/nan.pt {D_OPTS}", 1, NAN_PT),
    ("certify-non-finite-buffer", f"certify {{d}}/nanbuf.pt {D_OPTS}", 1, NAN_BUFFER),
    ("certify-non-finite-onnx", f"certify {{d}}/inf.onnx --dataset digits {D_OPTS}", 1, INF_ONNX),
    ("certify-onnx-shape", f"certify {{d}}/shape10.onnx --dataset digits {D_OPTS}", 2, "(1, 10, 10)"),
    ("certify-onnx-no-dataset", f"certify {{d}}/good.onnx {D_OPTS}", 2, "pass --dataset"),
    ("certify-eps-nan", f"certify {{d}}/good.pt --eps nan {D_OPTS}", 2, "finite"),
    ("certify-eps-inf", f"certify {{d}}/good.pt --eps inf {D_OPTS}", 2, "finite"),
    ("certify-timeout-inf", f"certify {{d}}/good.pt --timeout inf {D_OPTS}", 2, "--timeout must be a finite"),
    ("certify-bab-timeout-nan", f"certify {{d}}/good.pt --bab-timeout nan {D_OPTS}", 2, "--bab-timeout must be"),
    ("certify-bab-timeout-l2", f"certify {{d}}/good.pt --bab-timeout 1 --norm 2 {D_OPTS}", 2, "--norm inf only"),
    ("certify-eps-negative", f"certify {{d}}/good.pt --eps -0.1 {D_OPTS}", 2, ">= 0"),
    ("certify-eps-too-big", f"certify {{d}}/good.pt --eps 1.5 {D_OPTS}", 2, "exceeds the input range"),
    ("certify-eps-text", f"certify {{d}}/good.pt --eps abc {D_OPTS}", 2, "'abc', not a number; give e.g. 0.1 or 2/255"),
    ("certify-eps-fraction-text", f"certify {{d}}/good.pt --eps 2/x {D_OPTS}", 2, "not a number"),
    ("certify-eps-fraction-zero", f"certify {{d}}/good.pt --eps 1/0 {D_OPTS}", 2, "not a number"),
    ("certify-eps-fraction-too-big", f"certify {{d}}/good.pt --eps 300/255 {D_OPTS}", 2, "exceeds the input range"),
    ("certify-eps-fraction-negative", f"certify {{d}}/good.pt --eps=-2/255 {D_OPTS}", 2, ">= 0"),
    ("certify-eps-pixel-levels", f"certify {{d}}/good.pt --eps 8 {D_OPTS}", 2, "[0, 1] pixel space (for 8 of 255"),
    ("certify-config-eps-text", f"certify {{d}}/good.pt --config {{d}}/eps-bad.yaml {D_OPTS}", 2, "eps-bad.yaml"),
    ("certify-config-eps-too-big", f"certify {{d}}/good.pt --config {{d}}/eps-big.yaml {D_OPTS}", 2, "eps-big.yaml"),
    (
        "certify-channel-mismatch",
        f"certify {{d}}/mnist.pt --dataset cifar10 --data-dir {{d}}/fakecifar {D_OPTS}",
        2,
        "(3, 32, 32)",
    ),
    ("certify-dataset-typo", f"certify {{d}}/good.pt --dataset cifra10 {D_OPTS}", 2, "did you mean 'cifar10'"),
    ("certify-cifar-no-data", f"certify {{d}}/cifar.pt {D_OPTS}", 1, "--data-dir"),
    ("certify-evil-dataset", f"certify {{d}}/cifar.pt --data-dir {{d}}/evilcifar {D_OPTS}", 1, "refusing to load"),
    ("certify-bare-state-dict", f"certify {{d}}/bare.pt {D_OPTS}", 1, "bare state_dict"),
    ("certify-evil-pickle", f"certify {{d}}/evil.pt {D_OPTS}", 1, "never runs code"),
    ("certify-evil-raw-pickle", f"certify {{d}}/evil-raw.pt {D_OPTS}", 1, "never runs code"),
    ("certify-config-malformed", f"certify {{d}}/good.pt --config {{d}}/bad.yaml {D_OPTS}", 1, "malformed YAML at"),
    (
        "certify-config-unknown-key",
        f"certify {{d}}/good.pt --config {{d}}/unk.yaml {D_OPTS}",
        2,
        "did you mean 'num-samples'",
    ),
    ("certify-config-list", f"certify {{d}}/good.pt --config {{d}}/list.yaml {D_OPTS}", 1, "must be a mapping"),
    ("certify-config-duplicate", f"certify {{d}}/good.pt --config {{d}}/dup.yaml {D_OPTS}", 1, "duplicate key"),
    ("certify-config-missing", f"certify {{d}}/good.pt --config {{d}}/nope.yaml {D_OPTS}", 1, "not found"),
    (
        "certify-baseline-missing",
        f"certify {{d}}/good.pt --baseline {{d}}/nope.json {D_OPTS}",
        1,
        "baseline file not found",
    ),
    (
        "certify-baseline-malformed",
        f"certify {{d}}/good.pt --baseline {{d}}/bad-baseline.json {D_OPTS}",
        1,
        "not a lingraft certify JSON result",
    ),
    ("certify-offset", f"certify {{d}}/good.pt --offset 100000 {D_OPTS}", 2, "past the end"),
    ("certify-too-many", "certify {d}/good.pt -n 100000 --json {o}/r.json", 2, "has only 359"),
    ("certify-json-is-dir", "certify {d}/good.pt -n 3 --pgd-steps 2 --json {d}/adir", 2, "is a directory"),
    (
        "certify-state-parent-is-file",
        "certify {d}/good.pt -n 3 --pgd-steps 2 --state {d}/not-json.mask/s.state",
        1,
        "not-json.mask is not a directory",
    ),
    ("certify-sidecar-mismatch", f"certify {{d}}/flipped.pt {D_OPTS}", 1, "flipped.pt does not match its sidecar"),
    ("certify-mask-not-binary", f"certify {{d}}/mask.pt {D_OPTS}", 1, "mask holds values other than 0/1"),
    (
        "certify-json-parent-is-file",
        "certify {d}/good.pt -n 3 --pgd-steps 2 --json {d}/not-json.mask/r.json",
        1,
        "not-json.mask is not a directory",
    ),
    # --- inspect
    ("inspect-missing", "inspect {d}/nope.pt --json {o}/i.json", 1, "not found"),
    ("inspect-empty", "inspect {d}/empty.pt --json {o}/i.json", 1, "is empty"),
    ("inspect-truncated", "inspect {d}/trunc.pt --json {o}/i.json", 1, "truncated or corrupted"),
    ("inspect-random-onnx", "inspect {d}/rand.onnx --json {o}/i.json", 1, "cannot parse"),
    (
        "inspect-unsupported-ops",
        "inspect {d}/unsupported.onnx --json {o}/i.json",
        1,
        "Sigmoid (node 'sigmoid0'), Softmax (node 'softmax1')",
    ),
    ("inspect-dynamic", "inspect {d}/dynamic.onnx --json {o}/i.json", 1, "dynamic non-batch dims"),
    ("inspect-bare-state-dict", "inspect {d}/bare.pt --json {o}/i.json", 1, "bare state_dict"),
    ("inspect-evil-pickle", "inspect {d}/evil.pt --json {o}/i.json", 1, "never runs code"),
    ("inspect-json-is-dir", "inspect {d}/good.pt --json {d}/adir", 2, "is a directory"),
    ("inspect-sidecar-mismatch", "inspect {d}/flipped.pt --json {o}/i.json", 1, "does not match its sidecar"),
    ("inspect-mask-not-binary", "inspect {d}/mask.pt --json {o}/i.json", 1, "other than 0/1"),
    # --- export
    ("export-missing", "export {d}/nope.pt --out {o}/m.onnx", 1, "not found"),
    ("export-truncated", "export {d}/trunc.pt --out {o}/m.onnx", 1, "truncated or corrupted"),
    ("export-evil-pickle", "export {d}/evil.pt --out {o}/m.onnx", 1, "never runs code"),
    ("export-unsupported-onnx", "export {d}/unsupported.onnx --out {o}/m.onnx", 1, "Sigmoid"),
    ("export-non-finite-pt", "export {d}/nan.pt --out {o}/m.onnx", 1, NAN_PT),
    ("export-non-finite-buffer", "export {d}/nanbuf.pt --out {o}/m.onnx", 1, NAN_BUFFER),
    ("export-non-finite-onnx", "export {d}/inf.onnx --out {o}/m.onnx", 1, INF_ONNX),
    ("export-opset-99", "export {d}/good.pt --out {o}/m.onnx --opset 99", 2, "opset 99"),
    ("export-opset-3", "export {d}/good.pt --out {o}/m.onnx --opset 3", 2, "opset 3"),
    ("export-out-is-dir", "export {d}/good.pt --out {d}/adir", 2, "is a directory"),
    ("export-tol-nan", "export {d}/good.pt --out {o}/m.onnx --tol nan", 2, "--tol"),
    ("export-vnnlib-eps-nan", "export {d}/good.pt --out {o}/m.onnx --vnnlib-samples 2 --vnnlib-eps nan", 2, "finite"),
    ("export-json-is-dir", "export {d}/good.pt --out {o}/m.onnx --json {d}/adir", 2, "is a directory"),
    (
        "export-vnnlib-eps-fraction-text",
        "export {d}/good.pt --out {o}/m.onnx --vnnlib-samples 2 --vnnlib-eps 2/x",
        2,
        "not a number",
    ),
    (
        "export-config-vnnlib-eps-too-big",
        "export {d}/good.pt --out {o}/m.onnx --vnnlib-samples 2 --config {d}/eps-frac.yaml",
        2,
        "eps-frac.yaml",
    ),
    ("export-config-unknown-key", "export {d}/good.pt --out {o}/m.onnx --config {d}/export-typo.yaml", 2, "'opset'"),
    (
        "export-config-bad-value",
        "export {d}/good.pt --out {o}/m.onnx --config {d}/export-bad-value.yaml",
        2,
        "bad value for 'opset' in",
    ),
    ("export-config-missing", "export {d}/good.pt --out {o}/m.onnx --config {d}/nope.yaml", 1, "not found"),
    ("export-model-is-dir", "export {d}/adir --out {o}/m.onnx", 1, "is a directory"),
    (
        "export-in-shape-mismatch",
        "export {d}/inshape.pt --out {o}/m.onnx",
        1,
        "takes inputs (1, 28, 28) but its dataset digits has (1, 8, 8)",
    ),
    (
        "export-out-parent-is-file",
        "export {d}/good.pt --out {d}/not-json.mask/m.onnx",
        1,
        "not-json.mask is not a directory",
    ),
    ("export-sidecar-mismatch", "export {d}/flipped.pt --out {o}/m.onnx", 1, "does not match its sidecar"),
    # --- graft
    ("graft-missing", f"graft {{d}}/nope.pt {GRAFT}", 1, "not found"),
    ("graft-onnx", f"graft {{d}}/good.onnx {GRAFT}", 2, "ONNX models can be certified but not grafted"),
    ("graft-bare-state-dict", f"graft {{d}}/bare.pt {GRAFT}", 1, "bare state_dict"),
    ("graft-evil-pickle", f"graft {{d}}/evil.pt {GRAFT}", 1, "never runs code"),
    ("graft-non-finite-pt", f"graft {{d}}/nan.pt {GRAFT}", 1, NAN_PT),
    ("graft-non-finite-buffer", f"graft {{d}}/nanbuf.pt {GRAFT}", 1, NAN_BUFFER),
    ("graft-eps-nan", f"graft {{d}}/good.pt --eps nan {GRAFT}", 2, "finite"),
    ("graft-eps-too-big", f"graft {{d}}/good.pt --eps 2 {GRAFT}", 2, "exceeds the input range [0, 1]"),
    ("graft-eps-fraction-text", f"graft {{d}}/good.pt --eps 2/x {GRAFT}", 2, "not a number"),
    ("graft-config-eps-text", f"graft {{d}}/good.pt --config {{d}}/eps-bad.yaml {GRAFT}", 2, "eps-bad.yaml"),
    ("graft-ratio-nan", f"graft {{d}}/good.pt --ratio nan {GRAFT}", 2, "--ratio"),
    ("graft-gammas-text", f"graft {{d}}/good.pt --gammas a,b {GRAFT}", 2, "--gammas"),
    ("graft-gammas-nan", f"graft {{d}}/good.pt --gammas nan,1 {GRAFT}", 2, "--gammas"),
    ("graft-lr-nan", f"graft {{d}}/good.pt --lr nan {GRAFT}", 2, "--lr"),
    ("graft-lr-negative", f"graft {{d}}/good.pt --lr -1 {GRAFT}", 2, "--lr"),
    ("graft-mask-not-json", f"graft {{d}}/good.pt --mask {{d}}/not-json.mask {GRAFT}", 1, "is not JSON"),
    ("graft-mask-missing", f"graft {{d}}/good.pt --mask {{d}}/nope.json {GRAFT}", 1, "not found"),
    ("graft-config-malformed", f"graft {{d}}/good.pt --config {{d}}/bad.yaml {GRAFT}", 1, "malformed YAML"),
    ("graft-config-unknown-key", f"graft {{d}}/good.pt --config {{d}}/unk.yaml {GRAFT}", 2, "did you mean"),
    (
        "graft-channel-mismatch",
        f"graft {{d}}/mnist.pt --dataset cifar10 --data-dir {{d}}/fakecifar {GRAFT}",
        2,
        "(3, 32, 32)",
    ),
    (
        "graft-out-parent-is-file",
        "graft {d}/good.pt --score-images 20 --epochs 0 -n 0 --num-train 20 --out {d}/not-json.mask/g.pt",
        1,
        "not-json.mask is not a directory",
    ),
    ("graft-mask-not-binary", f"graft {{d}}/mask.pt {GRAFT}", 1, "other than 0/1"),
    (
        "graft-in-shape-mismatch",
        f"graft {{d}}/inshape.pt {GRAFT}",
        1,
        "takes inputs (1, 28, 28) but its dataset digits has (1, 8, 8)",
    ),
    ("graft-out-json", "graft {d}/good.pt --score-images 20 --epochs 0 -n 0 --out {o}/g.json", 2, "sidecar"),
    # --- train
    ("train-arch-typo", f"train --arch mlpp {TRAIN}", 2, "did you mean 'mlp'"),
    ("train-cifar-no-data", f"train --arch mlp {TRAIN} --dataset cifar10", 1, "--data-dir"),
    (
        "train-data-dir-missing",
        f"train --arch mlp {TRAIN} --dataset cifar10 --data-dir {{d}}/nope",
        1,
        "does not exist",
    ),
    ("train-eps-nan", f"train --arch mlp {TRAIN} --method fgsm --eps nan", 2, "finite"),
    ("train-eps-fraction-text", f"train --arch mlp {TRAIN} --method fgsm --eps 2/x", 2, "not a number"),
    ("train-config-eps-too-big", f"train --arch mlp {TRAIN} --config {{d}}/eps-big.yaml", 2, "eps-big.yaml"),
    ("train-lr-nan", f"train --arch mlp {TRAIN} --lr nan", 2, "lr"),
    ("train-loss-typo", f"train --arch mlp {TRAIN} --loss nkdd", 2, "unknown loss"),
    ("train-teacher-evil", f"train --arch mlp {TRAIN} --loss kd --teacher {{d}}/evil.pt", 1, "never runs code"),
    ("train-teacher-truncated", f"train --arch mlp {TRAIN} --loss kd --teacher {{d}}/trunc.pt", 1, "truncated"),
    ("train-teacher-shape", f"train --arch mlp {TRAIN} --loss kd --teacher {{d}}/mnist.pt", 2, "teacher"),
    ("train-config-malformed", f"train --arch mlp {TRAIN} --config {{d}}/bad.yaml", 1, "malformed YAML"),
    ("train-config-unknown-key", f"train --arch mlp {TRAIN} --config {{d}}/unk.yaml", 2, "unknown key 'num-sample'"),
    (
        "train-out-json",
        "train --arch mlp --dataset digits --epochs 1 --num-train 64 --val-size 64 --no-progress --out {o}/t.json",
        2,
        "sidecar",
    ),
    (
        "train-out-parent-is-file",
        "train --arch mlp --dataset digits --epochs 1 --num-train 64 --val-size 64 "
        "--no-progress --out {d}/not-json.mask/t.pt",
        1,
        "not-json.mask is not a directory",
    ),
    ("train-json-is-dir", f"train --arch mlp {TRAIN} --json {{d}}/adir", 2, "is a directory"),
]

# `lingraft run` rows: (id, sweep YAML body, exit code, substring). The sweep is written to {o}/sweep.yaml.
_SW = "models: [{d}/good.pt]\nmethods: [ibp]\neps: [0.01]\noptions: {{num-samples: 3}}\n"
RUN_ROWS = [
    ("run-empty-file", "", 2, "has no 'models' list"),
    ("run-malformed", "models: [a\nmethods: [ibp]\n", 1, "malformed YAML at"),
    ("run-top-level-list", "- a\n- b\n", 1, "must be a mapping"),
    ("run-duplicate-key", _SW + "eps: [0.02]\n", 1, "duplicate key"),
    ("run-unknown-key", _SW.replace("methods", "methds"), 2, "did you mean 'methods'"),
    ("run-unknown-method", _SW.replace("[ibp]", "[crwn]"), 2, "did you mean 'crown'"),
    ("run-unknown-option", _SW.replace("num-samples", "num-sample"), 2, "did you mean 'num-samples'"),
    ("run-bad-option-value", _SW.replace("num-samples: 3", "num-samples: -1"), 2, "num-samples"),
    ("run-bad-option-type", _SW.replace("num-samples: 3", "lr: fast"), 2, "'lr'"),
    ("run-eps-nan", _SW.replace("[0.01]", "[.nan]"), 2, "finite"),
    ("run-eps-negative", _SW.replace("[0.01]", "[-0.1]"), 2, ">= 0"),
    ("run-eps-too-big", _SW.replace("[0.01]", "[1.5]"), 2, "exceeds the input range"),
    ("run-eps-text", _SW.replace("[0.01]", "[small]"), 2, "not a number"),
    ("run-eps-fraction-text", _SW.replace("[0.01]", "[2/x]"), 2, "not a number"),
    ("run-eps-fraction-too-big", _SW.replace("[0.01]", "[300/255]"), 2, "exceeds the input range"),
    (
        "run-every-invalid-entry",
        _SW.replace("[0.01]", "[small, 2]").replace("[ibp]", "[crwn]") + "ratios: [2]\n",
        2,
        "4 invalid entries",
    ),
    ("run-ratio-too-big", _SW + "ratios: [2]\n", 2, "must be in [0, 1]"),
    ("run-model-missing", _SW.replace("good.pt", "nope.pt"), 1, "not found"),
    ("run-model-truncated", _SW.replace("good.pt", "trunc.pt"), 1, "truncated or corrupted"),
    ("run-model-evil", _SW.replace("good.pt", "evil.pt"), 1, "never runs code"),
    ("run-model-non-finite", _SW.replace("good.pt", "nan.pt"), 1, NAN_PT),
    ("run-model-bare", _SW.replace("good.pt", "bare.pt"), 1, "bare state_dict"),
    ("run-model-unsupported", _SW.replace("good.pt", "unsupported.onnx"), 1, "Sigmoid"),
    ("run-model-arch-name", _SW.replace("{d}/good.pt", "fc-8x200"), 2, "architecture name without weights"),
    (
        "run-graft-onnx",
        _SW.replace("good.pt", "good.onnx").replace("num-samples: 3", "num-samples: 3, dataset: digits")
        + "ratios: [0.5]\n",
        2,
        "cannot be grafted",
    ),
    (
        "run-channel-mismatch",
        _SW.replace("good.pt", "mnist.pt").replace(
            "num-samples: 3", "num-samples: 3, dataset: cifar10, data-dir: {d}/fakecifar"
        ),
        2,
        "(3, 32, 32)",
    ),
    ("run-too-many-samples", _SW.replace("num-samples: 3", "num-samples: 100000"), 2, "lower num-samples"),
    ("run-results-is-dir", _SW + "results: {d}/adir\n", 1, "is a directory"),
]


def _params(rows):
    return [
        pytest.param(
            *r,
            id=r[0],
            marks=[pytest.mark.xfail(strict=True, reason="known bug, see KNOWN_BUGS")] if r[0] in KNOWN_BUGS else [],
        )
        for r in rows
    ]


def _invoke(argv: list[str]):
    res = CliRunner().invoke(cli, argv, catch_exceptions=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        tb = "".join(traceback.format_exception(res.exception))
        pytest.fail(f"uncaught exception (a user would see a traceback):\n{tb}")
    return res


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _check(res, code: int, needle: str, out_dir: Path, before: set[str], hd: Path) -> None:
    text = res.output
    assert "Traceback" not in text, text
    assert res.exit_code == code, f"exit {res.exit_code} != {code}; output:\n{text}"
    assert needle.lower() in text.lower(), f"{needle!r} not in:\n{text}"
    err_lines = [ln for ln in res.stderr.splitlines() if ln.startswith(("error:", "Error:"))]
    assert len(err_lines) == 1, res.stderr  # exactly one line names the problem
    assert _listing(out_dir) == before, f"left behind: {_listing(out_dir) - before}"
    assert not (hd / EVIL_MARK).exists(), "a pickle ran code"
    assert not list(hd.rglob("*.tmp")), "temporary file left in the input folder"


@pytest.mark.parametrize("rid,argv,code,needle", _params(ROWS))
def test_hostile(hd, tmp_path, monkeypatch, rid, argv, code, needle):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    before = _listing(out)
    res = _invoke(shlex.split(argv.format(d=hd, o=out)))
    _check(res, code, needle, out, before, hd)


@pytest.mark.parametrize("rid,body,code,needle", _params(RUN_ROWS))
def test_hostile_run(hd, tmp_path, monkeypatch, rid, body, code, needle):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.yaml").write_text(body.format(d=hd))
    monkeypatch.chdir(out)
    before = _listing(out)
    res = _invoke(["run", str(out / "sweep.yaml"), "--no-progress"])
    _check(res, code, needle, out, before, hd)


@pytest.mark.parametrize(
    "argv", ["export {d}/good.pt --out {o}/m.onnx", "certify {d}/good.pt -n 3 --pgd-steps 2 --json {o}/r.json"]
)
def test_no_space_left_names_the_file(hd, tmp_path, monkeypatch, argv):
    """A full disk: one line naming the file that could not be written (it used to be just the strerror)."""
    import errno

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    argv = shlex.split(argv.format(d=hd, o=out))
    res = _invoke(argv)
    _check(res, 1, "no space left on device", out, set(), hd)
    assert argv[argv.index("--out" if "--out" in argv else "--json") + 1] in res.stderr


def test_run_sweep_file_missing_and_directory(hd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = _invoke(["run", "nope.yaml"])
    _check(res, 1, "sweep file nope.yaml not found", tmp_path, set(), hd)
    res = _invoke(["run", str(hd / "adir")])
    _check(res, 1, "is a directory", tmp_path, set(), hd)


# -------------------------------------------------------------------------------------------- unreadable files


@pytest.fixture
def deny_read(monkeypatch):
    """Make open() of chosen paths fail with EACCES (chmod 000 does not stop root, which runs CI here)."""
    denied: set[str] = set()
    real_open = io.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    return lambda p: denied.add(os.path.abspath(p))


UNREADABLE = [
    ("certify-unreadable", "certify {f} -n 3 --json {o}/r.json", "good.pt"),
    ("inspect-unreadable-onnx", "inspect {f}", "good.onnx"),
    ("export-unreadable", "export {f} --out {o}/m.onnx", "good.pt"),
    ("certify-unreadable-config", "certify {d}/good.pt --config {f}", "unk.yaml"),
    ("run-unreadable-sweep", "run {f}", "unk.yaml"),
]


@pytest.mark.parametrize("rid,argv,name", _params(UNREADABLE))
def test_unreadable(hd, tmp_path, monkeypatch, deny_read, rid, argv, name):
    monkeypatch.chdir(tmp_path)
    f = hd / name
    deny_read(f)
    res = _invoke(shlex.split(argv.format(d=hd, o=tmp_path, f=f)))
    _check(res, 1, "permission denied", tmp_path, set(), hd)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read chmod 000 files")
def test_unreadable_chmod(hd, tmp_path, monkeypatch):
    f = tmp_path / "locked.yaml"
    f.write_text("eps: 0.1\n")
    f.chmod(0)
    monkeypatch.chdir(tmp_path)
    res = _invoke(["certify", str(hd / "good.pt"), "--config", str(f)])
    assert res.exit_code == 1 and "permission" in res.output.lower()


# ------------------------------------------------------------------------------------------ commands added later
# compare/verify are written by others; their rows run only when the command is registered.
COMPARE_ROWS = [
    ("compare-missing", "compare {o}/nope.yaml --out-dir {o}/cmp", 1, "not found"),
    ("compare-malformed", "compare {d}/bad.yaml --out-dir {o}/cmp", 1, "malformed YAML at"),
    ("compare-top-level-list", "compare {d}/list.yaml --out-dir {o}/cmp", 1, "must be a mapping"),
    ("compare-duplicate-key", "compare {d}/dup.yaml --out-dir {o}/cmp", 1, "duplicate key"),
    ("compare-unknown-key", "compare {d}/compare-typo.yaml --out-dir {o}/cmp", 2, "did you mean 'eps'"),
    ("compare-threads-zero", "compare {d}/compare-typo.yaml --threads 0 --out-dir {o}/cmp", 2, "--threads"),
]


def _late(rows, command):
    if command in cli.commands:
        return _params(rows)
    return [pytest.param(*rows[0], marks=pytest.mark.skip(reason=f"no '{command}' command yet"))]


@pytest.mark.parametrize("rid,argv,code,needle", _late(COMPARE_ROWS, "compare"))
def test_hostile_compare(hd, tmp_path, monkeypatch, rid, argv, code, needle):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    res = _invoke(shlex.split(argv.format(d=hd, o=out)))
    _check(res, code, needle, out, set(), hd)


VERIFY_ROWS = [
    ("verify-onnx-missing", "verify {d}/nope.onnx {d}/p64.vnnlib --result {o}/r.txt", 1, "not found"),
    ("verify-vnnlib-missing", "verify {d}/good.onnx {d}/nope.vnnlib --result {o}/r.txt", 1, "not found"),
    ("verify-vnnlib-malformed", "verify {d}/good.onnx {d}/bad.vnnlib --result {o}/r.txt", 1, "unclosed '('"),
    (
        "verify-vnnlib-mismatch",
        "verify {d}/good.onnx {d}/one-input.vnnlib --result {o}/r.txt",
        1,
        "declares 1 inputs but 64 were expected",
    ),
    ("verify-random-onnx", "verify {d}/rand.onnx {d}/p64.vnnlib --result {o}/r.txt", 1, "cannot parse"),
    ("verify-unsupported-ops", "verify {d}/unsupported.onnx {d}/p64.vnnlib --result {o}/r.txt", 1, "Sigmoid"),
    ("verify-non-finite-onnx", "verify {d}/inf.onnx {d}/p64.vnnlib --result {o}/r.txt", 1, INF_ONNX),
    ("verify-non-finite-pt", "verify {d}/nan.pt {d}/p64.vnnlib --result {o}/r.txt", 1, NAN_PT),
    ("verify-dynamic-onnx", "verify {d}/dynamic.onnx {d}/p64.vnnlib --result {o}/r.txt", 1, "dynamic"),
    ("verify-timeout-negative", "verify {d}/good.onnx {d}/p64.vnnlib --timeout -1", 2, "--timeout"),
    ("verify-timeout-nan", "verify {d}/good.onnx {d}/p64.vnnlib --timeout nan --result {o}/r.txt", 2, "--timeout"),
    ("verify-no-args", "verify", 2, "missing MODEL and PROP"),
    ("verify-no-prop", "verify {d}/good.onnx", 2, "missing PROP: give a VNN-LIB property file after"),
    ("verify-model-is-dir", "verify {d}/adir {d}/p64.vnnlib --result {o}/r.txt", 1, "is a directory"),
    ("verify-config-unknown-key", "verify {d}/good.onnx {d}/p64.vnnlib --config {d}/verify-typo.yaml", 2, "'timeout'"),
    ("verify-config-missing", "verify {d}/good.onnx {d}/p64.vnnlib --config {d}/nope.yaml", 1, "not found"),
    ("verify-instances-dir", "verify --instances {d}/adir --out {o}/r.jsonl", 2, "is a directory"),
    ("verify-instances-missing", "verify --instances {d}/nope.csv --out {o}/r.jsonl", 1, "not found"),
    (
        "verify-instances-malformed",
        "verify --instances {d}/instances-bad.csv --out {o}/r.jsonl",
        1,
        "expected 'onnx,vnnlib,timeout'",
    ),
    (
        "verify-instances-out-parent-is-file",
        "verify --instances {d}/instances-good.csv --out {d}/not-json.mask/r.jsonl",
        1,
        "not-json.mask is not a directory",
    ),
    ("verify-json-is-dir", "verify {d}/good.onnx {d}/p64.vnnlib --json {d}/adir", 2, "is a directory"),
]
KNOWN_BUGS |= set()  # verify rows: all fixed


@pytest.mark.parametrize("rid,argv,code,needle", _late(VERIFY_ROWS, "verify"))
def test_hostile_verify(hd, tmp_path, monkeypatch, rid, argv, code, needle):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    res = _invoke(shlex.split(argv.format(d=hd, o=out)))
    # VNN-COMP convention: a failed instance still gets a complete result file saying 'error'
    result = out / "r.txt"
    if result.exists():
        assert result.read_text().strip() == "error"
        result.unlink()
    _check(res, code, needle, out, set(), hd)


def test_rows_cover_every_command():
    covered = {r[1].split()[0] for r in ROWS + COMPARE_ROWS + VERIFY_ROWS} | {"run"}
    assert set(cli.commands) <= covered, f"commands without hostile rows: {set(cli.commands) - covered}"
    assert not (KNOWN_BUGS - {r[0] for r in ROWS + RUN_ROWS + UNREADABLE + COMPARE_ROWS + VERIFY_ROWS}), (
        "stale KNOWN_BUGS ids"
    )


def test_fixture_checks_itself(hd):
    """The hostile files are what the rows claim (so a row cannot pass for the wrong reason)."""
    assert (hd / "trunc.pt").stat().st_size * 2 <= (hd / "good.pt").stat().st_size + 1
    assert (hd / "empty.pt").stat().st_size == 0
    for name, key in (("nan.pt", "4.weight"), ("nanbuf.pt", "0.mean")):
        sd = torch.load(hd / name, weights_only=True)["state_dict"]
        assert [k for k, v in sd.items() if not torch.isfinite(v).all()] == [key], name
    assert textwrap.dedent((hd / "bad.yaml").read_text()).startswith("eps: [0.1")
    data = pickle.loads((hd / "fakecifar" / "cifar-10-batches-py" / "test_batch").read_bytes())
    assert data[b"data"].shape == (20, 3072)
