"""Issue 14 (what a new user meets): eps fractions, one recipe for the shipped model, the README's export -> verify
path, --config on every command, every failed gate at once, fast failures before torch is imported, docs that
speak of the project."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lingraft.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> Path:
    """A small digits MLP checkpoint (8x8 inputs, trained eps 0.05)."""
    import torch

    from lingraft.data.datasets import dataset_info
    from lingraft.io.checkpoint import save_checkpoint
    from lingraft.models import create_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ux")
    info = dataset_info("digits")
    kw = dict(in_shape=list(info.in_shape), num_classes=10, mean=list(info.mean), std=list(info.std))
    save_checkpoint(d / "net.pt", create_model("mlp", **kw), arch="mlp", arch_kwargs=kw, dataset="digits", meta={})
    return d / "net.pt"


def _run(argv):
    res = CliRunner().invoke(cli, [str(a) for a in argv], catch_exceptions=False)
    assert "Traceback" not in res.output
    return res


# ------------------------------------------------------------------------------------------ 14.3 eps fractions


def test_certify_eps_fraction_flag_and_config(net, tmp_path):
    res = _run(["certify", net, "--eps", "2/255", "-n", "3", "--pgd-steps", "2", "--json", "-"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["eps"] == pytest.approx(2 / 255, abs=0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eps: 8/255\nnum-samples: 3\npgd-steps: 2\n")
    res = _run(["certify", net, "--config", cfg, "--json", "-"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["eps"] == pytest.approx(8 / 255, abs=0)


def test_eps_range_error_says_pixel_space(net):
    res = _run(["certify", net, "--eps", "8", "-n", "3"])
    assert res.exit_code == 2
    assert "[0, 1] pixel space" in res.output and "write 8/255" in res.output and "pixel/255" not in res.output


def test_config_eps_error_names_the_file(net, tmp_path):
    cfg = tmp_path / "bad-eps.yaml"
    cfg.write_text("eps: 2/x\n")
    res = _run(["certify", net, "--config", cfg, "-n", "3"])
    assert res.exit_code == 2
    assert f"bad value for 'eps' in {cfg}" in res.stderr and "not a number" in res.stderr


def test_compare_file_eps_fraction_uses_the_shared_parser():
    from lingraft.config import parse_eps
    from lingraft.experiments.compare_config import _eps

    assert _eps("2/255", "'eps' in c.yaml") == parse_eps("2/255") == 2 / 255
    with pytest.raises(Exception, match=r"'eps' in c.yaml 300/255 exceeds the input range \[0, 1\]"):
        _eps("300/255", "'eps' in c.yaml")


# ------------------------------------------------------------------- 14.5 / 14.6 export -> verify, --config


def test_export_vnnlib_fraction_then_verify_a_file_it_wrote(net, tmp_path):
    """The README path: export with --vnnlib-samples, then verify one of the properties it wrote (the file names
    the README shows: bench/vnnlib/prop_<i>_eps<eps>.vnnlib)."""
    cfg = tmp_path / "export.yaml"
    cfg.write_text("vnnlib-samples: 4\nvnnlib-eps: 1/255\n")
    onnx = tmp_path / "bench" / "net.onnx"
    res = _run(["export", net, "--out", onnx, "--config", cfg])
    assert res.exit_code == 0, res.output
    props = sorted((tmp_path / "bench" / "vnnlib").glob("prop_*_eps*.vnnlib"))
    assert props and all(p.name.endswith(f"_eps{1 / 255:g}.vnnlib") for p in props)
    vcfg = tmp_path / "verify.yaml"
    vcfg.write_text("timeout: 30\n")
    res = _run(["verify", onnx, props[0], "--config", vcfg, "--json", "-"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] in ("unsat", "sat", "unknown", "timeout")


def test_verify_without_property_names_it(net):
    res = _run(["verify", net])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: missing PROP") and "--vnnlib-samples" in lines[0]


@pytest.mark.parametrize("name", ["certify", "graft", "train", "export", "verify", "compare", "run", "inspect"])
def test_every_command_takes_config(name):
    """docs/quickstart.md and docs/concepts.md: every command takes --config FILE.yaml."""
    assert "--config" in _run([name, "--help"]).output


# --------------------------------------------------------------------------------------------- 14.7 gates


def test_every_failed_gate_is_reported(net, tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"certified_acc": 1.0}))
    argv = ["certify", net, "-n", "20", "--pgd-steps", "2", "--eps", "0.05", "--min-certified-acc", "1"]
    res = _run(argv + ["--min-clean-acc", "1", "--baseline", base, "--max-drop", "0"])
    assert res.exit_code == 3, res.output
    gates = [ln for ln in res.stderr.splitlines() if ln.startswith("gate failed:")]
    assert len(gates) == 3, res.stderr
    assert "--min-clean-acc" in gates[0] and "--min-certified-acc" in gates[1] and "baseline" in gates[2]


# ---------------------------------------------------------------------- 14.10 no torch before cheap checks

_PROBE = """
import sys
from click.testing import CliRunner
from lingraft.cli.main import cli
before = 'torch' in sys.modules
res = CliRunner().invoke(cli, sys.argv[1:])
print(res.exit_code, before, 'torch' in sys.modules)
print(res.output)
"""

_FAST = [
    ("certify missing.pt -n 3", 1, "not found"),
    ("certify . -n 3", 1, "is a directory"),
    ("certify --baseline missing.json", 1, "baseline file not found"),
    ("certify --timeout inf", 2, "--timeout"),
    ("export missing.pt --out m.onnx", 1, "not found"),
    ("export --out m.onnx --tol nan", 2, "--tol"),
    ("verify missing.onnx p.vnnlib", 1, "model file not found"),
    ("verify {net} missing.vnnlib", 1, "property file not found"),
    ("verify {net}", 2, "missing PROP"),
    ("verify --instances missing.csv", 1, "instances file not found"),
    ("certify --eps 2/x", 2, "not a number"),
    ("graft missing.pt --out g.pt", 1, "not found"),
    ("train --arch mlp --loss kd --teacher missing.pt --out t.pt", 1, "not found"),
]


@pytest.mark.parametrize(
    "argv,code,needle",
    [pytest.param(*r) for r in _FAST],
)
def test_wrong_path_fails_before_torch_is_imported(net, tmp_path, argv, code, needle):
    """The error comes from the cheap checks: torch is not even imported (no timing involved)."""
    args = [a.format(net=net) for a in argv.split()]
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    first, *rest = out.stdout.splitlines()
    assert first == f"{code} False False", out.stdout
    assert needle in "\n".join(rest)


# ------------------------------------------------------------------------------ 14.4 / 14.5 / 14.11 the docs


def _docs() -> dict[str, str]:
    """README, docs/ (docs/cli.md is --help text, checked through --help) and the model card."""
    docs = [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "cli.md"]
    files = [ROOT / "README.md", *docs, ROOT / "models" / "mnist-cnn-b-fgsm.md"]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def _train_recipe(text: str) -> str | None:
    m = re.search(r"lingraft train --arch cnn-b --dataset mnist[^`\n]*", text)
    return None if m is None else re.sub(r"\s*--(out|no-progress)( \S+)?", "", m.group(0)).strip()


def test_one_recipe_for_the_shipped_model():
    card = _train_recipe((ROOT / "models" / "mnist-cnn-b-fgsm.md").read_text())
    assert card is not None and "--optimizer adam --lr 1e-3 --epochs 3" in card
    for name, text in _docs().items():
        recipe = _train_recipe(text)
        assert recipe is None or recipe == card, (name, recipe, card)


def test_docs_examples_never_write_into_models():
    for name, text in _docs().items():
        assert not re.search(r"--out\s+models/", text), name


def test_train_help_example_does_not_overwrite_the_shipped_model():
    res = _run(["train", "--help"])
    assert _train_recipe(res.output) == _train_recipe((ROOT / "models" / "mnist-cnn-b-fgsm.md").read_text())


def test_readme_verify_uses_a_file_the_export_writes():
    text = (ROOT / "README.md").read_text()
    export = re.search(r"lingraft export (\S+) --out (\S+)/(\S+\.onnx) --vnnlib-samples \d+ --vnnlib-eps (\S+)", text)
    assert export, "the README must show the export with --vnnlib-samples"
    folder, onnx, eps = export.group(2), export.group(3), export.group(4)
    verify = re.search(r"lingraft verify (\S+) (\S+\.vnnlib)", text)
    assert verify and verify.start() > export.start()
    assert verify.group(1) == f"{folder}/{onnx}"
    assert re.fullmatch(rf"{re.escape(folder)}/vnnlib/prop_\d+_eps{re.escape(eps)}\.vnnlib", verify.group(2))
    assert "net.onnx prop.vnnlib" not in text


def test_docs_speak_of_the_project_and_one_compare_time():
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "graft_effect.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for name, text in {**_docs(), "benchmarks/graft_effect.py --help": help_text}.items():
        assert "the issue" not in text.lower(), name
    measured = re.search(r"Ran in (\d+) min (\d+) s wall", (ROOT / "docs" / "compare.md").read_text())
    assert measured
    for name, text in _docs().items():
        for line in text.splitlines():
            if "compare" in line.lower():
                for got in re.findall(r"(\d+(?:\.\d+)?) min", line):
                    assert got == measured.group(1), (name, line)


def test_compare_example_states_the_measured_time():
    measured = re.search(r"Ran in (\d+) min", (ROOT / "docs" / "compare.md").read_text()).group(1)
    text = (ROOT / "examples" / "compare-mnist.yaml").read_text()
    assert re.findall(r"(\d+(?:\.\d+)?) min", text) in ([], [measured])


def test_verbose_table_says_what_decided_each_sample_and_its_time(net):
    res = _run(["certify", net, "-n", "12", "--eps", "0.05", "-v"])
    assert res.exit_code in (0, 3)
    header = next(line for line in res.stdout.splitlines() if line.startswith("index"))
    assert "decided by" in header and "time s" in header
    assert any(w in res.stdout for w in ("bounds", "PGD", "clean check"))


def test_train_help_documents_the_kept_resume_state():
    out = " ".join(_run(["train", "--help"]).output.split())
    assert "OUT.state is kept after a finished run" in out
