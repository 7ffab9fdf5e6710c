"""``lingraft compare``: config validation, a tiny end-to-end run, resume without recomputation, --only,
invalidation of changed entries, losses/attention entries through the CLI, and the optional plot."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import HAVE_MPL, HAVE_SKLEARN

from lingraft.cli.main import cli
from lingraft.errors import UsageError
from lingraft.experiments.compare_config import load_compare, parse_compare
from lingraft.experiments.compare_report import plot_cert_vs_eps
from lingraft.io.checkpoint import load_checkpoint
from lingraft.io.files import read_jsonl

pytestmark = pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn not installed (digits dataset)")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(**over) -> dict:
    """Tiny digits/mlp compare: a few optimizer steps per model, 20 test images."""
    cfg = {
        "dataset": "digits",
        "eps": 0.05,
        "eps_grid": [0.02, 0.05],
        "train": {
            "epochs": 1,
            "batch_size": 32,
            "optimizer": "adam",
            "lr": 0.01,
            "num_train": 320,
            "val_size": 200,
            "eval_pgd_steps": 2,
        },
        "graft": {"ratio": 0.5, "epochs": 1, "num_train": 160, "score_images": 16, "batch_size": 32},
        "certify": {"num_samples": 20, "methods": ["crown", "alpha-crown"], "pgd_steps": 5, "alpha_iterations": 3},
        "entries": [
            {"name": "ce", "arch": "mlp", "method": "ce"},
            {"name": "fgsm", "arch": "mlp", "method": "fgsm", "train_eps": 0.05},
            {"name": "kd", "arch": "mlp", "loss": "kd", "teacher": "fgsm"},
        ],
    }
    cfg.update(over)
    return cfg


def _write(tmp_path, cfg: dict, name: str = "cmp.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


class Counter:
    """Wrap lingraft.train.train / lingraft.graft.run_graft / lingraft.certify.certify and count calls."""

    def __init__(self, monkeypatch):
        import lingraft.certify.pipeline as certify_mod
        import lingraft.graft.pipeline as graft_mod
        import lingraft.train.loop as train_mod

        self.calls = {"train": [], "graft": [], "certify": 0}
        orig_train, orig_graft, orig_cert = train_mod.train, graft_mod.run_graft, certify_mod.certify

        def train(cfg, out_path, **kw):
            self.calls["train"].append(str(out_path))
            return orig_train(cfg, out_path, **kw)

        def run_graft(path, **kw):
            self.calls["graft"].append(str(path))
            return orig_graft(path, **kw)

        def certify(*a, **kw):
            self.calls["certify"] += 1
            return orig_cert(*a, **kw)

        monkeypatch.setattr(train_mod, "train", train)
        monkeypatch.setattr(graft_mod, "run_graft", run_graft)
        monkeypatch.setattr(certify_mod, "certify", certify)

    def trained(self) -> list[str]:
        return sorted(p.split("/")[-2] for p in self.calls["train"])


def _run(args) -> click.testing.Result:  # noqa: F821
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    return res


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c.update(entires=c.pop("entries")), r"unknown key 'entires'.*did you mean 'entries'"),
        (lambda c: c["entries"][1].update(tran_eps=0.1), r"did you mean 'train_eps'"),
        (lambda c: c["train"].update(epoch=2), r"unknown key 'epoch'.*did you mean 'epochs'"),
        (lambda c: c["graft"].update(ratoi=0.3), r"did you mean 'ratio'"),
        (lambda c: c["certify"].update(methods=["crwn"]), r"unknown certify method 'crwn'.*did you mean 'crown'"),
        (lambda c: c["entries"][2].update(teacher="fgsn"), r"unknown teacher 'fgsn'.*did you mean 'fgsm'"),
        (lambda c: c["entries"][2].update(teacher="missing/teacher.pt"), r"teacher checkpoint .* not found"),
        (lambda c: c["entries"][2].pop("teacher"), r"loss 'kd' needs a teacher"),
        (lambda c: c["entries"][0].update(teacher="fgsm"), r"does not use one"),
        (lambda c: c["entries"].append({"name": "ce", "arch": "mlp"}), r"'ce' appears twice"),
        (lambda c: c["entries"][0].update(arch="mpl"), r"did you mean 'mlp'"),
        (lambda c: c["entries"][0].update(loss="zipff"), r"did you mean 'zipf'"),
        (lambda c: c["entries"][0].update(name="a/b"), r"needs a 'name'"),
        (lambda c: c.update(eps=0), r"eps must be in \(0, 1\]"),
    ],
)
def test_validation_errors(mutate, match):
    cfg = _config()
    mutate(cfg)
    with pytest.raises(UsageError, match=match):
        parse_compare(cfg)


def test_teacher_cycles_and_order():
    cfg = _config(
        entries=[
            {"name": "a", "arch": "mlp", "loss": "kd", "teacher": "b"},
            {"name": "b", "arch": "mlp", "loss": "nkd", "teacher": "a"},
        ]
    )
    with pytest.raises(UsageError, match=r"teacher cycle (a -> b -> a|b -> a -> b)"):
        parse_compare(cfg)
    with pytest.raises(UsageError, match="teacher cycle s -> s"):
        parse_compare(_config(entries=[{"name": "s", "arch": "mlp", "loss": "kd", "teacher": "s"}]))
    # students listed before their teacher are trained after it
    spec = parse_compare(
        _config(entries=[{"name": "kd", "arch": "mlp", "loss": "kd", "teacher": "t"}, {"name": "t", "arch": "mlp"}])
    )
    assert [e.name for e in spec.entries] == ["t", "kd"]
    assert spec.entry("kd").teacher_entry and spec.entry("kd").train["eps"] == 0.05  # top-level eps by default
    assert spec.entry("t").train["lr"] == 0.01  # shared train defaults


def test_cli_config_error_is_one_line(tmp_path):
    cfg = _config()
    cfg["entries"][2]["teacher"] = "fgsn"
    res = CliRunner().invoke(cli, ["compare", str(_write(tmp_path, cfg)), "--out-dir", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "did you mean 'fgsm'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_help_has_examples():
    res = CliRunner().invoke(cli, ["compare", "--help"])
    assert res.exit_code == 0 and "Examples:" in res.output and "--only" in res.output


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full tiny compare run shared by the tests below (the expensive part)."""
    d = tmp_path_factory.mktemp("compare")
    cfg_path = _write(d, _config())
    out = d / "out"
    res = _run(["compare", str(cfg_path), "--out-dir", str(out), "--json", str(d / "res.json")])
    assert res.exit_code == 0, res.output
    return d, cfg_path, out, res


def test_full_run_outputs(tiny_run):
    d, cfg_path, out, res = tiny_run
    table = json.loads((out / "table.json").read_text())
    rows = table["rows"]
    assert [(r["entry"], r["variant"]) for r in rows] == [
        (n, v) for n in ("ce", "fgsm", "kd") for v in ("plain", "grafted")
    ]
    assert json.loads((d / "res.json").read_text())["rows"] == rows  # --json FILE is the same result
    for r in rows:
        assert 0 <= r["certified"]["crown"] <= r["pgd_acc"] <= r["clean_acc"] <= 1
        assert r["certified"]["alpha-crown"] <= r["pgd_acc"]
        assert set(r["cert_vs_eps"]) == {"0.02", "0.05"}
        assert r["cert_vs_eps"]["0.05"] == r["certified"]["crown"]  # the grid reuses the main CROWN unit
        assert r["train_s"] > 0
    by = {(r["entry"], r["variant"]): r for r in rows}
    for n in ("ce", "fgsm", "kd"):
        plain, graft = by[(n, "plain")], by[(n, "grafted")]
        assert graft["grafted_neurons"] == 100 and graft["relu_neurons"] == 200  # ratio 0.5 of mlp's 2 x 100
        assert plain["grafted_neurons"] == 0 and plain["graft_s"] is None and graft["graft_s"] > 0
        if plain["unstable"] is not None and graft["unstable"] is not None:
            assert graft["unstable"] <= 100  # at most the 100 non-grafted neurons can be unstable
    # results.jsonl: per entry, per variant: crown + alpha-crown at 0.05 and crown at 0.02 (0.05 shared)
    recs = read_jsonl(out / "results.jsonl")
    assert len(recs) == 3 * 2 * 3
    assert len({r["unit"] for r in recs}) == len(recs)
    assert {(r["eps"], r["method"]) for r in recs} == {(0.05, "crown"), (0.05, "alpha-crown"), (0.02, "crown")}
    # CSV and markdown carry the same rows
    lines = list(csv.DictReader((out / "table.csv").read_text().splitlines()))
    assert [(x["entry"], x["variant"]) for x in lines] == [(r["entry"], r["variant"]) for r in rows]
    assert float(lines[0]["cert_crown"]) == rows[0]["certified"]["crown"]
    md = (out / "table.md").read_text()
    assert md.count("| kd | grafted |") == 2 and "crown cert %" in md and "eps 0.02" in md
    assert "kd" in res.output and "grafted" in res.output  # the terminal table
    # the student was trained with the teacher's checkpoint, which the compare trained first
    _, info = load_checkpoint(out / "kd" / "model.pt")
    assert info["meta"]["config"]["loss"] == "kd"
    assert info["meta"]["config"]["teacher"] == str(out / "fgsm" / "model.pt")
    assert (out / "cert_vs_eps.png").exists() == HAVE_MPL


def test_rerun_reuses_everything(tiny_run, monkeypatch):
    d, cfg_path, out, _ = tiny_run
    counter = Counter(monkeypatch)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*.pt")}
    n_lines = len(read_jsonl(out / "results.jsonl"))
    before = json.loads((out / "table.json").read_text())["rows"]
    res = _run(["compare", str(cfg_path), "--out-dir", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert counter.calls == {"train": [], "graft": [], "certify": 0}
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.pt")} == mtimes
    assert len(read_jsonl(out / "results.jsonl")) == n_lines
    assert json.loads((out / "table.json").read_text())["rows"] == before


def test_changed_teacher_retrains_student_only(tiny_run, monkeypatch, tmp_path):
    """Editing the teacher's config retrains it and its student; ce and its results are reused."""
    d, _, out, _ = tiny_run
    cfg = _config()
    cfg["entries"][1]["train_eps"] = 0.04
    cfg["certify"]["methods"] = ["crown"]  # fewer units: the alpha-crown rows are simply not asked for
    counter = Counter(monkeypatch)
    res = _run(["compare", str(_write(d, cfg, "changed.yaml")), "--out-dir", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert counter.trained() == ["fgsm", "kd"]
    assert sorted(p.split("/")[-2] for p in counter.calls["graft"]) == ["fgsm", "kd"]
    assert counter.calls["certify"] == 2 * 2 * 2  # fgsm, kd x plain, grafted x (0.05, 0.02) crown
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert len(rows) == 6 and all(set(r["certified"]) == {"crown"} for r in rows)


def test_only_filter(tmp_path, monkeypatch):
    counter = Counter(monkeypatch)
    cfg_path = _write(tmp_path, _config())
    out = tmp_path / "out"
    res = _run(["compare", str(cfg_path), "--out-dir", str(out), "--only", "kd", "--no-plot", "--json", "-"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # logs go to stderr, the JSON alone to stdout
    assert [(r["entry"], r["variant"]) for r in data["rows"]] == [("kd", "plain"), ("kd", "grafted")]
    assert counter.trained() == ["fgsm", "kd"]  # the teacher is trained, but neither grafted nor certified
    assert [p.split("/")[-2] for p in counter.calls["graft"]] == ["kd"]
    assert not (out / "fgsm" / "grafted.pt").exists() and not (out / "ce").exists()
    assert {r["entry"] for r in read_jsonl(out / "results.jsonl")} == {"kd"}
    assert not (out / "cert_vs_eps.png").exists()
    # a second --only run adds its rows; the teacher is reused, not retrained
    counter.calls["train"].clear()
    res = _run(["compare", str(cfg_path), "--out-dir", str(out), "--only", "fgsm", "--no-plot", "-q"])
    assert res.exit_code == 0, res.output
    assert counter.trained() == []
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert {r["entry"] for r in rows} == {"fgsm", "kd"}
    res = CliRunner().invoke(cli, ["compare", str(cfg_path), "--out-dir", str(out), "--only", "kdd"])
    assert res.exit_code == 2 and "did you mean 'kd'" in res.output


def test_losses_and_attention_entries(tmp_path):
    """Every loss plugin and both attention nets go through train -> graft -> certify from the CLI."""
    cfg = _config(eps_grid=[0.05])
    cfg["train"].update(num_train=128)
    cfg["graft"].update(num_train=64, score_images=8)
    cfg["certify"].update(num_samples=8, methods=["crown"])
    cfg["entries"] = [
        {"name": "ls", "arch": "mlp", "loss": "ls", "loss_kwargs": {"smoothing": 0.2}},
        {"name": "nkd", "arch": "mlp", "loss": "nkd", "teacher": "ls"},
        {"name": "uskd", "arch": "mlp", "loss": "uskd"},
        {"name": "zipf", "arch": "mlp", "loss": "zipf"},
        {"name": "sasa", "arch": "sasa-s", "method": "fgsm", "num_train": 64},
        {"name": "acmix", "arch": "acmix-s", "method": "fgsm", "num_train": 64},
    ]
    out = tmp_path / "out"
    res = _run(["compare", str(_write(tmp_path, cfg)), "--out-dir", str(out), "--no-plot", "-q"])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert [(r["entry"], r["variant"]) for r in rows] == [
        (e["name"], v) for e in cfg["entries"] for v in ("plain", "grafted")
    ]
    for e in cfg["entries"]:
        _, info = load_checkpoint(out / e["name"] / "model.pt")
        c = info["meta"]["config"]
        assert (info["arch"], c["loss"], c["method"]) == (e["arch"], e.get("loss", "ce"), e.get("method", "ce"))
        _, ginfo = load_checkpoint(out / e["name"] / "grafted.pt")
        assert ginfo["grafted"], f"{e['name']}: no grafted layer"
    assert load_checkpoint(out / "ls" / "model.pt")[1]["meta"]["config"]["loss_kwargs"] == {"smoothing": 0.2}
    by = {(r["entry"], r["variant"]): r for r in rows}
    assert by[("sasa", "grafted")]["grafted_neurons"] == by[("sasa", "grafted")]["relu_neurons"] // 2


def test_teacher_path_is_relative_to_config(tiny_run, tmp_path):
    _, _, out, _ = tiny_run
    sub = tmp_path / "cfgs"
    sub.mkdir()
    (tmp_path / "teacher.pt").write_bytes((out / "fgsm" / "model.pt").read_bytes())
    cfg = _config(entries=[{"name": "kd", "arch": "mlp", "loss": "kd", "teacher": "../teacher.pt"}])
    spec = load_compare(_write(sub, cfg))
    assert spec.entry("kd").teacher == str((tmp_path / "teacher.pt").resolve())
    assert not spec.entry("kd").teacher_entry


def test_plot_without_matplotlib_warns(tiny_run, monkeypatch, tmp_path):
    _, _, out, _ = tiny_run
    result = json.loads((out / "table.json").read_text())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib" raise ImportError
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_cert_vs_eps(result, tmp_path / "p.png") is False
    assert not (tmp_path / "p.png").exists()


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed")
def test_plot_writes_png(tiny_run, tmp_path):
    _, _, out, _ = tiny_run
    result = json.loads((out / "table.json").read_text())
    assert plot_cert_vs_eps(result, tmp_path / "p.png") is True
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
