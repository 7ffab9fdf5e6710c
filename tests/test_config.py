"""Tests for lingraft.config: loading errors, key validation, hashing, click defaults."""

from __future__ import annotations

import os

import click
import pytest

from lingraft.config import (
    canonical_json,
    click_default_map,
    config_hash,
    config_option,
    load_config,
    normalize_keys,
    parse_eps,
    parse_number,
    validate_keys,
)
from lingraft.errors import LingraftError, UsageError


def _write(tmp_path, text, name="config.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------------ loading


def test_load_valid(tmp_path):
    p = _write(tmp_path, "epochs: 3\nlr: 0.1\nbatch-size: 64\nmodels: [a, b]\n")
    assert load_config(p) == {"epochs": 3, "lr": 0.1, "batch-size": 64, "models": ["a", "b"]}


def test_load_empty_file_is_empty_mapping(tmp_path):
    assert load_config(_write(tmp_path, "# only a comment\n")) == {}


def test_load_missing_file(tmp_path):
    with pytest.raises(LingraftError) as ei:
        load_config(tmp_path / "nope.yaml")
    assert ei.value.exit_code == 1
    assert "not found" in str(ei.value) and "nope.yaml" in str(ei.value)


def test_load_directory(tmp_path):
    with pytest.raises(LingraftError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_load_unreadable(tmp_path):
    p = _write(tmp_path, "a: 1\n")
    p.chmod(0)
    try:
        with pytest.raises(LingraftError, match="cannot read config file") as ei:
            load_config(p)
        assert ei.value.exit_code == 1
    finally:
        p.chmod(0o644)


def test_load_not_utf8(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(LingraftError, match="not UTF-8"):
        load_config(p)


def test_malformed_yaml_reports_line_and_column(tmp_path):
    p = _write(tmp_path, "epochs: 3\nlr: 0.1\nmodels: [a, b\nratio: 0.5\n")
    with pytest.raises(LingraftError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert ei.value.exit_code == 1
    assert "\n" not in msg
    assert f"{p}:4:" in msg  # the unclosed flow sequence is detected on line 4
    assert msg.startswith("malformed YAML")


def test_malformed_yaml_bad_indent_line(tmp_path):
    p = _write(tmp_path, "a: 1\nb:\n  c: 2\n d: 3\n")
    with pytest.raises(LingraftError, match=r"config\.yaml:4:2"):
        load_config(p)


def test_duplicate_key_rejected_with_lines(tmp_path):
    p = _write(tmp_path, "eps: 0.1\nepochs: 2\neps: 0.2\n")
    with pytest.raises(LingraftError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert f"{p}:3:1" in msg and "duplicate key 'eps'" in msg and "line 1" in msg


def test_top_level_not_mapping(tmp_path):
    with pytest.raises(LingraftError, match="must be a mapping.*not a list") as ei:
        load_config(_write(tmp_path, "- a\n- b\n"))
    assert ei.value.exit_code == 1
    with pytest.raises(LingraftError, match="not a string"):
        load_config(_write(tmp_path, "just text\n", "s.yaml"))


# --------------------------------------------------------------------------------------------- validation


def test_unknown_key_did_you_mean():
    with pytest.raises(UsageError) as ei:
        validate_keys({"epoch": 3}, {"epochs", "lr"}, "config.yaml")
    assert str(ei.value) == "unknown key 'epoch' in config.yaml (did you mean 'epochs'?)"
    assert ei.value.exit_code == 2


def test_unknown_key_suggestion_keeps_dash_style():
    with pytest.raises(UsageError, match=r"did you mean 'batch-size'\?"):
        validate_keys({"bach-size": 3}, {"batch_size"}, "c.yaml")


def test_unknown_key_without_close_match_lists_allowed():
    with pytest.raises(UsageError, match=r"unknown key 'zzz' in c.yaml \(allowed keys: epochs, lr\)"):
        validate_keys({"zzz": 1}, {"epochs", "lr"}, "c.yaml")


def test_dashes_and_underscores_interchangeable():
    validate_keys({"batch-size": 1, "num_workers": 2}, {"batch_size", "num-workers"}, "c.yaml")
    assert normalize_keys({"batch-size": 1, "lr": 2}) == {"batch_size": 1, "lr": 2}


def test_colliding_keys_and_non_string_keys():
    with pytest.raises(UsageError, match="same setting"):
        validate_keys({"batch-size": 1, "batch_size": 2}, {"batch_size"}, "c.yaml")
    with pytest.raises(UsageError, match="key 1 in c.yaml is not a name"):
        validate_keys({1: "x"}, {"a"}, "c.yaml")


# ------------------------------------------------------------------------------------------------ hashing


def test_hash_stable_and_order_independent():
    a = {"eps": 0.1, "models": ["a", "b"], "opts": {"x": 1, "y": [1, 2]}}
    b = {"opts": {"y": [1, 2], "x": 1}, "models": ["a", "b"], "eps": 0.1}
    h = config_hash(a)
    assert h == config_hash(b)
    assert len(h) == 16 and all(c in "0123456789abcdef" for c in h)
    # Pinned value: the hash must not change between releases (job ids in results files depend on it).
    assert canonical_json(a) == '{"eps":0.1,"models":["a","b"],"opts":{"x":1,"y":[1,2]}}'
    import hashlib

    assert h == hashlib.sha256(canonical_json(a).encode()).hexdigest()[:16]
    assert config_hash({"a": 1}) == "015abd7f5cc57a2d"


def test_hash_sensitive_to_values():
    base = config_hash({"eps": 0.1, "models": ["a", "b"]})
    assert config_hash({"eps": 0.2, "models": ["a", "b"]}) != base
    assert config_hash({"eps": 0.1, "models": ["b", "a"]}) != base  # list order matters
    assert config_hash({"eps": 0.0}) == config_hash({"eps": -0.0})
    assert config_hash({"t": (1, 2)}) == config_hash({"t": [1, 2]})


def test_hash_rejects_nan_and_objects():
    with pytest.raises(UsageError, match="NaN"):
        config_hash({"eps": float("nan")})
    with pytest.raises(UsageError, match="cannot be hashed"):
        config_hash({"f": object()})


# ------------------------------------------------------------------------------------------- click wiring


@click.command()
@config_option()
@click.option("--epochs", type=int, default=10)
@click.option("--lr", type=float, default=0.01)
@click.option("--batch-size", type=int, default=32)
@click.option("--tag", multiple=True)
def _train(config_path, epochs, lr, batch_size, tag):
    click.echo(f"{epochs} {lr} {batch_size} {','.join(tag)}")


def _invoke(args):
    from click.testing import CliRunner

    return CliRunner().invoke(_train, args)


def test_click_default_map_precedence(tmp_path):
    dm = click_default_map({"epochs": 3, "batch-size": 8}, ["config_path", "epochs", "lr", "batch_size", "tag"])
    assert dm == {"epochs": 3, "batch_size": 8}
    ctx = _train.make_context("train", ["--epochs", "5"], default_map=dm)
    # flag > file > default
    assert ctx.params["epochs"] == 5
    assert ctx.params["batch_size"] == 8
    assert ctx.params["lr"] == 0.01


def test_click_default_map_accepts_command_and_rejects_unknown():
    assert click_default_map({"lr": 0.5}, _train) == {"lr": 0.5}
    with pytest.raises(UsageError, match=r"unknown key 'epoch' in run.yaml \(did you mean 'epochs'\?\)"):
        click_default_map({"epoch": 1}, _train, where="run.yaml")


def test_config_option_end_to_end(tmp_path):
    p = _write(tmp_path, "epochs: 4\nbatch-size: 16\ntag: [a, b]\n")
    r = _invoke(["--config", str(p), "--lr", "0.5"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "4 0.5 16 a,b"
    # the flag wins even when given before --config
    r = _invoke(["--epochs", "7", "--config", str(p)])
    assert r.output.strip() == "7 0.01 16 a,b"
    # no config: built-in defaults
    assert _invoke([]).output.strip() == "10 0.01 32"


def test_config_option_errors(tmp_path):
    bad = _write(tmp_path, "epoch: 4\n", "bad.yaml")
    r = _invoke(["--config", str(bad)])
    assert isinstance(r.exception, UsageError) and "did you mean 'epochs'" in str(r.exception)
    nested = _write(tmp_path, "config: other.yaml\n", "n.yaml")
    r = _invoke(["--config", str(nested)])
    assert isinstance(r.exception, UsageError)  # the config file cannot point at another config
    r = _invoke(["--config", str(tmp_path / "missing.yaml")])
    assert isinstance(r.exception, LingraftError) and r.exception.exit_code == 1


def test_config_option_bad_value_names_the_file(tmp_path):
    """A value of the wrong type in a config file names the file and the key (click's own message would
    blame a flag that was never given)."""
    p = _write(tmp_path, "epochs: many\n", "cfg.yaml")
    r = _invoke(["--config", str(p)])
    assert isinstance(r.exception, UsageError)
    assert f"bad value for 'epochs' in {p}" in str(r.exception) and "many" in str(r.exception)


# ------------------------------------------------------------------------------------- numbers and eps (14.3)


@pytest.mark.parametrize(
    "value,want",
    [(0.1, 0.1), (1, 1.0), ("0.1", 0.1), ("2/255", 2 / 255), (" 8 / 255 ", 8 / 255), ("1e-3", 1e-3), (-0.0, 0.0)],
)
def test_parse_number_accepts_numbers_and_fractions(value, want):
    assert parse_number(value, "x") == want


@pytest.mark.parametrize(
    "value,needle",
    [
        ("abc", "not a number"),
        ("2/x", "not a number"),
        ("1/0", "not a number"),
        (True, "not a number"),
        ([1], "not a number"),
        ("nan", "finite"),
        (float("inf"), "finite"),
        ("1/0.0", "not a number"),
    ],
)
def test_parse_number_rejects(value, needle):
    with pytest.raises(UsageError, match=needle) as ei:
        parse_number(value, "'eps' in f.yaml")
    assert str(ei.value).startswith("'eps' in f.yaml")


def test_parse_eps_range_message_speaks_of_pixel_space():
    assert parse_eps("2/255") == 2 / 255 and parse_eps(0) == 0.0 and parse_eps("1") == 1.0
    with pytest.raises(UsageError, match=">= 0"):
        parse_eps("-1/255")
    with pytest.raises(UsageError) as ei:
        parse_eps(8, "--eps")
    msg = str(ei.value)
    assert "--eps 8 exceeds the input range [0, 1]" in msg and "[0, 1] pixel space" in msg and "8/255" in msg
    assert "pixel/255" not in msg
    assert parse_eps("8/255") == 8 / 255  # what the message suggests is accepted
