"""Tests for the VNN-LIB parser and counterexample files (lingraft.spec.vnnlib)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED as VNNCOMP
from conftest import needs_shared as needs_vnncomp

from lingraft.spec import (
    OutputConstraint,
    VnnlibError,
    VnnlibProperty,
    parse_vnnlib,
    read_counterexample,
    write_counterexample,
)


def _real_files() -> list[Path]:
    if not VNNCOMP.is_dir():
        return []
    return sorted(p for p in VNNCOMP.rglob("*") if p.name.endswith((".vnnlib", ".vnnlib.gz")))


def _mnist_label(path: Path) -> int:
    text = gzip.decompress(path.read_bytes()).decode()
    return int(re.search(r"label: (\d+)", text).group(1))


# ----------------------------------------------------------------------------------------------
# Real competition files
# ----------------------------------------------------------------------------------------------


@needs_vnncomp
@pytest.mark.vnncomp
def test_all_real_files_parse():
    files = _real_files()
    assert len(files) >= 39  # 4 test + 15 mnist_fc + 20 verivital
    for f in files:
        prop = parse_vnnlib(f)
        assert prop.path == str(f)
        assert prop.num_inputs >= 1 and prop.num_outputs >= 1
        assert prop.regions, f
        for r in prop.regions:
            assert r.lower.shape == r.upper.shape == (prop.num_inputs,)
            assert np.all(r.lower <= r.upper)
            for oc in r.outputs:
                assert oc.A.shape[1] == prop.num_outputs and oc.A.shape[0] == oc.b.shape[0]
                assert oc.A.dtype == np.float64 and oc.b.dtype == np.float64


@needs_vnncomp
@pytest.mark.vnncomp
@pytest.mark.parametrize("folder", ["mnist_fc/vnnlib", "verivital/vnnlib/maxpool_specs"])
def test_mnist_properties_exact_structure(folder):
    files = sorted((VNNCOMP / folder).glob("*.vnnlib.gz"))
    assert files
    for f in files:
        eps = float(re.search(r"_([0-9.]+)\.vnnlib", f.name).group(1))
        prop = parse_vnnlib(f, num_inputs=784, num_outputs=10)
        assert (prop.num_inputs, prop.num_outputs) == (784, 10)
        assert len(prop.regions) == 1
        (r,) = prop.regions
        assert np.all(r.lower >= 0.0) and np.all(r.upper <= 1.0)
        assert np.all(r.upper - r.lower <= 2 * eps + 1e-6)
        assert np.any(r.upper - r.lower > 0)
        # unsafe iff some other class j scores >= the label:  Y_label - Y_j <= 0
        label = _mnist_label(f)
        others = [j for j in range(10) if j != label]
        assert len(r.outputs) == 9
        for oc, j in zip(r.outputs, others):
            expected = np.zeros((1, 10))
            expected[0, label], expected[0, j] = 1.0, -1.0
            np.testing.assert_array_equal(oc.A, expected)
            np.testing.assert_array_equal(oc.b, [0.0])


@needs_vnncomp
@pytest.mark.vnncomp
def test_mnist_property_parses_to_one_784_input_box():
    """A 784-input MNIST property: one region, a box of width <= 2 * 0.03 in [0, 1], 9 output disjuncts
    (parse speed is measured by benchmarks/vnnlib_parse.py --file, not asserted here)."""
    prop = parse_vnnlib(VNNCOMP / "mnist_fc" / "vnnlib" / "prop_0_0.03.vnnlib.gz")
    assert len(prop.regions) == 1
    r = prop.regions[0]
    assert r.lower.size == 784 and (r.lower <= r.upper).all()
    assert (r.lower >= 0).all() and (r.upper <= 1).all() and float((r.upper - r.lower).max()) <= 0.06 + 1e-6
    assert len(r.outputs) == 9


@needs_vnncomp
@pytest.mark.vnncomp
def test_acas_property_3_exact():
    prop = parse_vnnlib(VNNCOMP / "test" / "test_prop.vnnlib")
    assert (prop.num_inputs, prop.num_outputs) == (5, 5)
    (r,) = prop.regions
    np.testing.assert_array_equal(r.lower, [-0.30353115613746867, -0.009549296585513092, 0.4933803235848431, 0.3, 0.3])
    np.testing.assert_array_equal(r.upper, [-0.29855281193475053, 0.009549296585513092, 0.49999999998567607, 0.5, 0.5])
    (oc,) = r.outputs  # four plain asserts = one conjunction
    expected = np.array([[1, -1, 0, 0, 0], [1, 0, -1, 0, 0], [1, 0, 0, -1, 0], [1, 0, 0, 0, -1]], float)
    np.testing.assert_array_equal(oc.A, expected)
    np.testing.assert_array_equal(oc.b, np.zeros(4))
    x = (r.lower + r.upper) / 2
    assert prop.is_violated_by(x, np.array([-1.0, 0, 0, 0, 0]))  # CoC minimal -> unsafe
    assert not prop.is_violated_by(x, np.array([1.0, 0, 2, 2, 2]))


@needs_vnncomp
@pytest.mark.vnncomp
@pytest.mark.parametrize(
    "name, lower, upper, A, b",
    [
        ("test_nano.vnnlib", [-1.0], [1.0], [[1.0]], [-1.0]),
        ("test_tiny.vnnlib", [-1.0], [1.0], [[-1.0]], [-100.0]),
        ("test_small.vnnlib", [-1.0], [1.0], [[-1.0]], [-100.0]),
    ],
)
def test_small_test_files_exact(name, lower, upper, A, b):
    prop = parse_vnnlib(VNNCOMP / "test" / name)
    (r,) = prop.regions
    np.testing.assert_array_equal(r.lower, lower)
    np.testing.assert_array_equal(r.upper, upper)
    (oc,) = r.outputs
    np.testing.assert_array_equal(oc.A, A)
    np.testing.assert_array_equal(oc.b, b)


def _counterexample_files() -> list[Path]:
    folder = VNNCOMP / "mnist_fc" / "counterexamples"
    return sorted(folder.glob("*.counterexample.gz")) if folder.is_dir() else []


@needs_vnncomp
@pytest.mark.vnncomp
def test_real_counterexamples_violate_their_property():
    files = _counterexample_files()
    assert len(files) == 3
    for f in files:
        prop_name = re.search(r"(prop_\d+_[0-9.]+)\.counterexample", f.name).group(1)
        prop = parse_vnnlib(VNNCOMP / "mnist_fc" / "vnnlib" / f"{prop_name}.vnnlib.gz")
        x, y = read_counterexample(f)
        assert x.shape == (784,) and y.shape == (10,)
        assert prop.regions[0].contains(x, tol=1e-6)
        assert prop.is_violated_by(x, y)
        # the witness really misclassifies: some class beats the label
        label = _mnist_label(VNNCOMP / "mnist_fc" / "vnnlib" / f"{prop_name}.vnnlib.gz")
        assert int(np.argmax(y)) != label
        # making the label win removes the violation; moving x out of the box too
        y_safe = y.copy()
        y_safe[label] = y.max() + 1.0
        assert not prop.is_violated_by(x, y_safe)
        x_out = x.copy()
        x_out[0] = 2.0
        assert not prop.is_violated_by(x_out, y)


# ----------------------------------------------------------------------------------------------
# Hand-written files, one per supported form
# ----------------------------------------------------------------------------------------------

DECL = "".join(f"(declare-const X_{i} Real)\n" for i in range(2)) + "".join(
    f"(declare-const Y_{j} Real)\n" for j in range(3)
)
BOX = "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 -1))\n(assert (<= X_1 2))\n"


def _one_region(prop: VnnlibProperty):
    assert len(prop.regions) == 1
    r = prop.regions[0]
    np.testing.assert_array_equal(r.lower, [0.0, -1.0])
    np.testing.assert_array_equal(r.upper, [1.0, 2.0])
    return r


def _check(oc: OutputConstraint, A, b):
    np.testing.assert_array_equal(oc.A, np.array(A, dtype=np.float64))
    np.testing.assert_array_equal(oc.b, np.array(b, dtype=np.float64))


def test_plain_asserts_are_a_conjunction():
    prop = parse_vnnlib(DECL + BOX + "(assert (<= Y_0 Y_1))\n(assert (>= Y_2 0.5))\n")
    assert (prop.num_inputs, prop.num_outputs, prop.path) == (2, 3, None)
    (oc,) = _one_region(prop).outputs
    _check(oc, [[1, -1, 0], [0, 0, -1]], [0, -0.5])


def test_constant_first_bounds():
    text = DECL + "(assert (<= 0 X_0))(assert (>= 1 X_0))(assert (< -1 X_1))(assert (> 2 X_1))(assert (<= 3 Y_0))"
    (oc,) = _one_region(parse_vnnlib(text)).outputs
    _check(oc, [[-1, 0, 0]], [-3])


def test_or_of_ands():
    text = DECL + BOX + "(assert (or (and (>= Y_0 Y_2) (<= Y_1 1)) (and (>= Y_1 Y_2))))"
    r = _one_region(parse_vnnlib(text))
    assert len(r.outputs) == 2
    _check(r.outputs[0], [[-1, 0, 1], [0, 1, 0]], [0, 1])
    _check(r.outputs[1], [[0, -1, 1]], [0])


def test_single_and_assert():
    text = DECL + "(assert (and (>= X_0 0) (<= X_0 1) (>= X_1 -1) (<= X_1 2) (<= Y_0 Y_1) (<= Y_1 Y_2)))"
    (oc,) = _one_region(parse_vnnlib(text)).outputs
    _check(oc, [[1, -1, 0], [0, 1, -1]], [0, 0])


def test_linear_terms():
    text = (
        DECL
        + BOX
        + (
            "(assert (<= (+ Y_0 (* -1.0 Y_2)) 0))\n"
            "(assert (>= (- Y_0 Y_1) 2))\n"
            "(assert (<= (* 2 Y_1) 3))\n"
            "(assert (<= (+ Y_0 1) (* 2 Y_1)))\n"
            "(assert (<= (- Y_2) (/ Y_0 4)))\n"
            "(assert (<= (* 2 (+ Y_0 Y_1 1) 0.5) (- 3 Y_1 1)))\n"
        )
    )
    (oc,) = _one_region(parse_vnnlib(text)).outputs
    _check(
        oc,
        [[1, 0, -1], [-1, 1, 0], [0, 2, 0], [1, -2, 0], [-0.25, 0, -1], [1, 2, 0]],
        [0, -2, 3, -1, 0, 1],
    )


def test_or_of_single_inequalities():
    text = DECL + BOX + "(assert (or (>= Y_0 Y_2) (>= Y_1 Y_2) (<= Y_2 -1)))"
    r = _one_region(parse_vnnlib(text))
    assert len(r.outputs) == 3
    _check(r.outputs[0], [[-1, 0, 1]], [0])
    _check(r.outputs[1], [[0, -1, 1]], [0])
    _check(r.outputs[2], [[0, 0, 1]], [-1])


def test_disjunction_of_regions():
    text = DECL + (
        "(assert (or\n"
        "  (and (<= X_0 1) (>= X_0 0) (<= X_1 1) (>= X_1 0) (<= Y_0 Y_1))\n"
        "  (and (<= X_0 3) (>= X_0 2) (<= X_1 1) (>= X_1 0) (<= Y_1 Y_2) (>= Y_0 7))\n"
        "  (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_2 Y_0))\n"
        "))"
    )
    prop = parse_vnnlib(text)
    assert len(prop.regions) == 2  # the first and third disjuncts share a box
    r0, r1 = prop.regions
    np.testing.assert_array_equal(r0.lower, [0, 0])
    np.testing.assert_array_equal(r0.upper, [1, 1])
    assert len(r0.outputs) == 2
    _check(r0.outputs[0], [[1, -1, 0]], [0])
    _check(r0.outputs[1], [[-1, 0, 1]], [0])
    np.testing.assert_array_equal(r1.lower, [2, 0])
    np.testing.assert_array_equal(r1.upper, [3, 1])
    (oc,) = r1.outputs
    _check(oc, [[0, 1, -1], [-1, 0, 0]], [0, -7])
    # semantics: x in region 1 with Y_0 >= 7 and Y_1 <= Y_2 is unsafe; same y in region 0 is not
    y = np.array([8.0, 5.0, 1.0])  # violates r1? Y_1 <= Y_2 fails -> no
    assert not prop.is_violated_by([2.5, 0.5], y)
    assert prop.is_violated_by([0.5, 0.5], y)  # r0: Y_2 <= Y_0
    assert prop.is_violated_by([2.5, 0.5], [8.0, 1.0, 5.0])
    assert not prop.is_violated_by([1.5, 0.5], [8.0, 1.0, 5.0])  # between the boxes
    assert prop.is_violated_by([1.0 + 1e-7, 0.5], [0.0, 1.0, 5.0], tol=1e-6)
    assert not prop.is_violated_by([1.0 + 1e-7, 0.5], [0.0, 1.0, 5.0])


def test_shared_box_and_disjunctive_regions_product():
    text = DECL + BOX + "(assert (or (and (<= X_0 0.5)) (and (>= X_0 0.5))))(assert (or (<= Y_0 0) (<= Y_1 0)))"
    prop = parse_vnnlib(text)
    assert len(prop.regions) == 2
    np.testing.assert_array_equal(prop.regions[0].upper, [0.5, 2])
    np.testing.assert_array_equal(prop.regions[1].lower, [0.5, -1])
    assert all(len(r.outputs) == 2 for r in prop.regions)


def test_numbers_comments_whitespace():
    text = (
        "; header comment\n(declare-const X_0 Real) ; trailing comment\r\n"
        "(declare-const\tX_1\n Real)(declare-const Y_0 Real)\n"
        "(assert(>= X_0 1e-3))(assert (<= X_0 .5))\n"
        "(assert (>=  X_1   -0.5 ))\n(assert\n(<=\nX_1\n3.))\n"
        "(assert (<= Y_0 +2.5E+1)) ; done"
    )
    prop = parse_vnnlib(text)
    (r,) = prop.regions
    np.testing.assert_array_equal(r.lower, [1e-3, -0.5])
    np.testing.assert_array_equal(r.upper, [0.5, 3.0])
    _check(r.outputs[0], [[1]], [25])


def test_strict_equal_and_tightening():
    text = DECL + (
        "(assert (= X_0 0.25))(assert (> X_1 -3))(assert (>= X_1 -1))(assert (< X_1 5))(assert (<= X_1 2))"
        "(assert (< Y_0 Y_1))(assert (= Y_2 1))"
    )
    (r,) = parse_vnnlib(text).regions
    np.testing.assert_array_equal(r.lower, [0.25, -1])
    np.testing.assert_array_equal(r.upper, [0.25, 2])
    _check(r.outputs[0], [[1, -1, 0], [0, 0, 1], [0, 0, -1]], [0, 1, -1])


def test_box_only_means_every_output_unsafe():
    prop = parse_vnnlib(DECL + BOX)
    (oc,) = _one_region(prop).outputs
    assert oc.A.shape == (0, 3) and oc.b.shape == (0,)
    assert prop.is_violated_by([0.5, 0.0], [1.0, 2.0, 3.0])
    assert not prop.is_violated_by([1.5, 0.0], [1.0, 2.0, 3.0])


def test_gzip_detected_by_magic_not_suffix(tmp_path):
    text = DECL + BOX + "(assert (<= Y_0 Y_1))"
    gz_no_suffix = tmp_path / "prop.vnnlib"
    gz_no_suffix.write_bytes(gzip.compress(text.encode()))
    plain_with_gz_suffix = tmp_path / "plain.vnnlib.gz"
    plain_with_gz_suffix.write_text(text)
    a = parse_vnnlib(gz_no_suffix)
    b = parse_vnnlib(str(plain_with_gz_suffix))
    c = parse_vnnlib(text.encode())
    for p in (a, b, c):
        _check(_one_region(p).outputs[0], [[1, -1, 0]], [0])
    assert a.path == str(gz_no_suffix)


def test_declared_sizes_checked():
    text = DECL + BOX
    parse_vnnlib(text, num_inputs=2, num_outputs=3)
    with pytest.raises(VnnlibError, match=r"declares 2 inputs but 784"):
        parse_vnnlib(text, num_inputs=784)
    with pytest.raises(VnnlibError, match=r"declares 3 outputs but 10"):
        parse_vnnlib(text, num_outputs=10)


def long_generated_property(n_inputs: int = 3072) -> str:
    """A CIFAR-sized property: one box over n_inputs inputs, 9 alternative output conjunctions over 10 outputs.
    (benchmarks/vnnlib_parse.py times the parser on the same kind of file.)"""
    n = n_inputs
    lines = [f"(declare-const X_{i} Real)" for i in range(n)] + [f"(declare-const Y_{j} Real)" for j in range(10)]
    lines += [f"(assert (<= X_{i} {0.5 + i * 1e-4}))\n(assert (>= X_{i} {-i * 1e-4}))" for i in range(n)]
    lines.append("(assert (or " + " ".join(f"(and (>= Y_{j} Y_3))" for j in range(10) if j != 3) + "))")
    return "\n".join(lines)


def test_long_generated_file_parses_to_one_box():
    prop = parse_vnnlib(long_generated_property(3072))
    assert (prop.num_inputs, prop.num_outputs) == (3072, 10)
    (r,) = prop.regions
    i = np.arange(3072)
    np.testing.assert_allclose(r.lower, -i * 1e-4, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.upper, 0.5 + i * 1e-4, rtol=0, atol=1e-12)
    assert r.lower[100] == pytest.approx(-0.01) and r.upper[3071] == pytest.approx(0.5 + 0.3071)
    assert len(r.outputs) == 9
    for oc, j in zip(r.outputs, [j for j in range(10) if j != 3]):
        want = np.zeros((1, 10))
        want[0, 3], want[0, j] = 1.0, -1.0  # Y_j >= Y_3  <=>  Y_3 - Y_j <= 0
        np.testing.assert_array_equal(oc.A, want)
        np.testing.assert_array_equal(oc.b, [0.0])


# ----------------------------------------------------------------------------------------------
# Malformed input
# ----------------------------------------------------------------------------------------------

BAD = [
    ("unbalanced_open", DECL + BOX + "(assert (<= Y_0 Y_1)\n", "10:1", r"unclosed '\('"),
    ("unbalanced_close", DECL + BOX + "(assert (<= Y_0 Y_1)))\n", "10:22", r"unexpected '\)'"),
    ("undeclared", DECL + BOX + "(assert (<= Y_0 Y_7))", "10:17", r"undeclared variable 'Y_7'"),
    ("unknown_op", DECL + BOX + "(assert (=> (<= Y_0 1) (<= Y_1 1)))", "10:9", r"unknown operator '=>'"),
    ("unknown_term_op", DECL + BOX + "(assert (<= (exp Y_0) 1))", "10:13", r"unknown operator 'exp'"),
    ("non_box", DECL + BOX + "(assert (<= (+ X_0 X_1) 1))", "10:9", r"non-box input constraint"),
    ("mixed", DECL + BOX + "(assert (<= X_0 Y_1))", "10:9", r"mixing input \(X\) and output \(Y\)"),
    ("nonlinear", DECL + BOX + "(assert (<= (* Y_0 Y_1) 1))", "10:20", r"not linear"),
    (
        "missing_bound",
        DECL + "(assert (>= X_0 0))(assert (<= X_0 1))(assert (>= X_1 0))",
        "2:16",
        r"X_1 has no upper bound",
    ),
    ("empty", "", "1:1", r"empty property file"),
    ("only_comments", "; nothing here\n  \n", "1:1", r"empty property file"),
    (
        "lower_gt_upper",
        DECL + "(assert (>= X_0 2))\n(assert (<= X_0 1))\n(assert (>= X_1 0))(assert (<= X_1 1))",
        "7:9",
        r"lower bound 2.0 > upper bound 1.0",
    ),
    ("unknown_symbol", DECL + BOX + "(assert (<= Y_0 foo))", "10:17", r"unknown symbol 'foo'"),
    ("top_level_atom", DECL + "hello", "6:1", r"unexpected 'hello' at top level"),
    ("unknown_command", DECL + "(push 1)", "6:1", r"unknown command 'push'"),
    ("bad_sort", "(declare-const X_0 Int)", "1:20", r"sort Real"),
    ("bad_name", "(declare-const Z_0 Real)", "1:16", r"unsupported variable name 'Z_0'"),
    ("duplicate", "(declare-const X_0 Real)\n(declare-const X_0 Real)", "2:16", r"declared twice"),
    (
        "gap",
        "(declare-const X_0 Real)\n(declare-const X_2 Real)\n(declare-const Y_0 Real)",
        "2:16",
        r"X_2 declared but X_1 is not",
    ),
    ("no_outputs", "(declare-const X_0 Real)(assert (<= X_0 1))(assert (>= X_0 0))", "1:1", r"no output variables"),
    ("deep", DECL + "(assert " + "(and " * 150 + ")" * 151, "6:", r"nested deeper"),
    ("comparison_in_term", DECL + BOX + "(assert (<= (<= Y_0 1) 1))", "10:13", r"inside an arithmetic term"),
]


@pytest.mark.parametrize("name, text, where, pattern", BAD, ids=[b[0] for b in BAD])
def test_malformed_text(name, text, where, pattern):
    with pytest.raises(VnnlibError) as info:
        parse_vnnlib(text)
    msg = str(info.value)
    assert msg.startswith(f"<string>:{where}"), msg
    assert re.search(pattern, msg), msg
    assert "\n" not in msg
    assert info.value.exit_code == 1


def test_garbage_bytes_file(tmp_path):
    f = tmp_path / "garbage.vnnlib"
    f.write_bytes(b"(declare-const X_0 Real)\n(assert \xff\xfe\x00)")
    with pytest.raises(VnnlibError, match=re.escape(f"{f}:2:9: invalid byte 0xff")):
        parse_vnnlib(f)
    # valid UTF-8 but not VNN-LIB
    f.write_bytes(bytes(range(1, 40)))
    with pytest.raises(VnnlibError, match=re.escape(f"{f}:") + r"\d+:\d+: "):
        parse_vnnlib(f)


def test_truncated_gzip(tmp_path):
    data = gzip.compress((DECL + BOX).encode())
    f = tmp_path / "prop.vnnlib.gz"
    for cut in (5, 20, len(data) - 4):
        f.write_bytes(data[:cut])
        with pytest.raises(VnnlibError, match=re.escape(f"{f}:1:1: truncated or corrupt gzip")):
            parse_vnnlib(f)


def test_missing_file(tmp_path):
    with pytest.raises(VnnlibError, match=r":1:1: file not found"):
        parse_vnnlib(tmp_path / "nope.vnnlib")


# ----------------------------------------------------------------------------------------------
# Counterexample files
# ----------------------------------------------------------------------------------------------


def test_counterexample_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(7).astype(np.float32)  # float32 values must survive exactly
    y = rng.standard_normal(3)
    f = tmp_path / "out" / "result.txt"
    write_counterexample(f, x, y)
    text = f.read_text()
    lines = text.splitlines()
    assert lines[0] == "sat"
    assert lines[1].startswith("((X_0 ") and lines[-1].endswith("))")
    assert lines[8].startswith("(Y_0 ")
    assert len(lines) == 1 + 7 + 3
    assert [p.name for p in f.parent.iterdir()] == ["result.txt"]  # no temp files left behind
    x2, y2 = read_counterexample(f)
    np.testing.assert_array_equal(x2, x.astype(np.float64))
    np.testing.assert_array_equal(y2, y)


def test_counterexample_other_verdicts(tmp_path):
    f = tmp_path / "r.txt"
    write_counterexample(f, None, None, verdict="unsat")
    assert f.read_text() == "unsat\n"
    with pytest.raises(VnnlibError, match=r":1:1: result is 'unsat'"):
        read_counterexample(f)


def test_counterexample_variants_and_errors(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("(\n(X_1 2.0)\n(X_0 (- 1.5))\n(Y_0 .5)\n)\n")  # bare witness, unordered, (- v)
    x, y = read_counterexample(f)
    np.testing.assert_array_equal(x, [-1.5, 2.0])
    np.testing.assert_array_equal(y, [0.5])
    f.write_text("sat\n((X_0 1)\n(X_2 1)\n(Y_0 1))")
    with pytest.raises(VnnlibError, match=r":3:1: X_1 is missing"):
        read_counterexample(f)
    f.write_text("sat\n((X_0 abc)\n(Y_0 1))")
    with pytest.raises(VnnlibError, match=r":2:7: expected a number"):
        read_counterexample(f)
    with pytest.raises(Exception, match=r"NaN or infinite"):
        write_counterexample(f, np.array([np.nan]), np.array([1.0]))


# ----------------------------------------------------------------------------------------------
# Empty disjuncts, float32-aware box checks
# ----------------------------------------------------------------------------------------------

EMPTY_X0 = "(>= X_0 2) (<= X_0 1) (>= X_1 0) (<= X_1 1)"  # X_0 in [2, 1]: no point


def test_empty_disjunct_is_dropped_not_an_error():
    # the property is a union over its disjuncts: an empty one adds nothing to it
    text = DECL + f"(assert (or (and {EMPTY_X0} (<= Y_0 0)) (and (>= X_0 0) (<= X_0 1) (>= X_1 -1) (<= X_1 2) "
    text += "(<= Y_1 0))))"
    prop = parse_vnnlib(text)
    r = _one_region(prop)
    (oc,) = r.outputs
    _check(oc, [[0, 1, 0]], [0])


def test_all_disjuncts_empty_is_still_an_error():
    text = DECL + f"(assert (or (and {EMPTY_X0} (<= Y_0 0)) (and {EMPTY_X0} (<= Y_1 0))))"
    with pytest.raises(VnnlibError, match=r"empty input box: X_0 lower bound 2.0 > upper bound 1.0"):
        parse_vnnlib(text)


def test_float32_box_check_accepts_the_rounding_of_a_box_point():
    prop = parse_vnnlib(DECL + "(assert (= X_0 0.1))(assert (>= X_1 -0.3))(assert (<= X_1 -0.3))(assert (<= Y_0 0))")
    (r,) = prop.regions
    x32 = np.array([0.1, -0.3], dtype=np.float32).astype(np.float64)  # neither is a float32 number
    y = np.array([-1.0, 0.0, 0.0])
    assert not r.contains(x32) and not prop.is_violated_by(x32, y)
    assert r.contains_float32(x32) and prop.is_violated_by_float32(x32, y)
    assert not prop.is_violated_by_float32(x32, np.array([1.0, 0.0, 0.0]))  # outputs are checked exactly
    # one float32 step further is not the rounding of any point of the box
    far = x32.copy()
    far[0] = float(np.nextafter(np.float32(far[0]), np.float32(1)))
    assert not r.contains_float32(far)
    # a wide box: float32 points just outside it round from no point inside it unless within half a step
    w = parse_vnnlib(DECL + BOX + "(assert (<= Y_0 0))").regions[0]
    up = np.float32(2.0)
    assert w.contains_float32([0.5, 2.0]) and not w.contains_float32([0.5, float(np.nextafter(up, np.float32(3)))])
