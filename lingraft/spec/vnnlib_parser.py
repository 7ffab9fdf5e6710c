"""Parser for the VNN-COMP subset of VNN-LIB: S-expressions -> declarations, DNF -> :class:`VnnlibProperty`.

A property file declares inputs ``X_0..X_{n-1}`` and outputs ``Y_0..Y_{m-1}`` and asserts constraints
that describe the UNSAFE set: the answer is ``sat`` iff some input satisfying the input constraints
produces outputs satisfying the output constraints.

The asserted formula is expanded into disjunctive normal form. Each disjunct is a conjunction of
input bounds (which must form a box: one variable per inequality) and linear output inequalities
``A @ y <= b``. Disjuncts that share the same box are grouped into one :class:`Region` whose
``outputs`` are the alternative output conjunctions. A disjunct whose box is empty (some lower bound above
the upper bound) is dropped: it adds nothing to the unsafe set (only a property whose disjuncts are ALL empty
is an error).

Conventions:
- ``>=`` is turned into ``<=`` by negation, so every output row reads ``A @ y <= b``.
- Strict ``<`` / ``>`` are treated as non-strict ``<=`` / ``>=``: this is the VNN-COMP convention
  (a counterexample on the boundary counts, and verifiers work in floating point anyway).
- ``=`` is accepted and becomes two inequalities.
- Negative literals (``-0.5``), ``.5``, ``3.`` and ``1e-3`` are accepted as numbers.
- The commands ``check-sat``, ``get-model``, ``exit``, ``set-logic``, ``set-info`` and ``set-option``
  are ignored; ``declare-fun X_0 () Real`` is accepted like ``declare-const``.

Errors raise :class:`VnnlibError` with one line ``path:line:col: what is wrong (how to fix)``.
"""

from __future__ import annotations

import numpy as np

from lingraft.spec.property import OutputConstraint, Region, VnnlibProperty
from lingraft.spec.sexpr import (
    START,
    VAR_RE,
    Node,
    PathOrText,
    SexprList,
    Source,
    Sym,
    VnnlibError,
    load_source,
    parse_number,
    read_sexprs,
)

# Cap on the DNF expansion of nested and/or (products of disjunctions grow exponentially).
MAX_TERMS = 100_000

_IGNORED_COMMANDS = {"check-sat", "get-model", "exit", "set-logic", "set-info", "set-option"}
_COMPARISONS = {"<=", ">=", "<", ">", "="}


# ----------------------------------------------------------------------------------------------
# Semantic pass: declarations, linear terms, DNF
# ----------------------------------------------------------------------------------------------

# Atoms of a DNF term (tuples; never mutated):
#   ("lo", i, value, pos)          X_i >= value
#   ("hi", i, value, pos)          X_i <= value
#   ("row", {j: coeff}, b, pos)    sum_j coeff * Y_j <= b
_Atom = tuple
_Term = list  # list[_Atom], a conjunction
_Dnf = list  # list[_Term], a disjunction; [] is false, [[]] is true

_Key = tuple  # ("X", i) or ("Y", j)
_Linear = tuple  # (dict[_Key, float], constant)


class _Parser:
    def __init__(self, src: Source):
        self.src = src
        self.vars: dict[str, _Key] = {}
        self.decl_pos: dict[_Key, int] = {}

    # -- helpers ---------------------------------------------------------------------------

    def err(self, node_or_pos, msg: str) -> VnnlibError:
        pos = node_or_pos if isinstance(node_or_pos, int) else node_or_pos.pos
        return self.src.error(pos, msg)

    def head(self, node: SexprList) -> str:
        if not node:
            raise self.err(node, "empty expression '()' (remove it)")
        h = node[0]
        if not isinstance(h, Sym):
            raise self.err(h, "expected an operator name after '(' (e.g. '(<= Y_0 Y_1)')")
        return h.text

    # -- top level -------------------------------------------------------------------------

    def run(self, forms: list[Node]) -> list:
        """Process commands; return the list of asserted formula nodes (in order)."""
        if not forms:
            raise self.err(START, "empty property file (expected declare-const and assert commands)")
        asserts = []
        for form in forms:
            if not isinstance(form, SexprList):
                raise self.err(form, f"unexpected '{form.text}' at top level (commands look like '(assert ...)')")
            cmd = self.head(form)
            if cmd == "declare-const":
                if len(form) != 3:
                    raise self.err(form, "declare-const takes a name and a sort (write '(declare-const X_0 Real)')")
                self.declare(form[1], form[2])
            elif cmd == "declare-fun":
                if len(form) != 4 or not isinstance(form[2], SexprList) or len(form[2]) != 0:
                    raise self.err(form, "only nullary declare-fun is supported (write '(declare-const X_0 Real)')")
                self.declare(form[1], form[3])
            elif cmd == "assert":
                if len(form) != 2:
                    raise self.err(form, "assert takes exactly one formula (wrap several in '(and ...)')")
                asserts.append(form[1])
            elif cmd in _IGNORED_COMMANDS:
                continue
            else:
                raise self.err(form, f"unknown command '{cmd}' (expected declare-const or assert)")
        return asserts

    def declare(self, name_node: Node, sort_node: Node) -> None:
        if not isinstance(name_node, Sym):
            raise self.err(name_node, "expected a variable name (X_i or Y_j)")
        name = name_node.text
        m = VAR_RE.match(name)
        if not m:
            raise self.err(name_node, f"unsupported variable name '{name}' (inputs must be X_i, outputs Y_j)")
        if not isinstance(sort_node, Sym) or sort_node.text != "Real":
            raise self.err(sort_node, f"variable '{name}' must have sort Real (write '(declare-const {name} Real)')")
        if name in self.vars:
            raise self.err(name_node, f"variable '{name}' declared twice (remove the duplicate declaration)")
        key = (m.group(1), int(m.group(2)))
        if f"{key[0]}_{key[1]}" != name:  # e.g. X_01 would alias X_1
            raise self.err(name_node, f"variable '{name}' has a leading zero (write {key[0]}_{key[1]})")
        self.vars[name] = key
        self.decl_pos[key] = name_node.pos

    def count(self, kind: str) -> int:
        """Number of declared X (or Y) variables; they must be numbered 0..n-1 without gaps."""
        idx = sorted(i for (k, i) in self.decl_pos if k == kind)
        n = len(idx)
        if n == 0:
            what = "input" if kind == "X" else "output"
            raise self.err(START, f"no {what} variables declared (add '(declare-const {kind}_0 Real)')")
        if idx[-1] != n - 1:
            missing = next(i for i, j in enumerate(idx) if i != j)
            later = next(j for j in idx if j > missing)
            raise self.err(
                self.decl_pos[(kind, later)],
                f"{kind}_{later} declared but {kind}_{missing} is not (declare {kind}_0..{kind}_{idx[-1]})",
            )
        return n

    # -- linear terms ----------------------------------------------------------------------

    def var(self, sym: Sym) -> _Key:
        key = self.vars.get(sym.text)
        if key is None:
            if VAR_RE.match(sym.text):
                raise self.err(sym, f"undeclared variable '{sym.text}' (add '(declare-const {sym.text} Real)' first)")
            raise self.err(sym, f"unknown symbol '{sym.text}' (expected a number or a declared X_i / Y_j)")
        return key

    def linear(self, node: Node) -> _Linear:
        """Evaluate a linear term to (coefficients, constant)."""
        if isinstance(node, Sym):
            v = parse_number(node.text)
            if v is not None:
                return {}, v
            return {self.var(node): 1.0}, 0.0
        op = self.head(node)
        args = [self.linear(a) for a in node[1:]]
        if op == "+":
            if not args:
                raise self.err(node, "'+' needs at least one argument")
            return _lin_sum(args, [1.0] * len(args))
        if op == "-":
            if not args:
                raise self.err(node, "'-' needs at least one argument")
            if len(args) == 1:
                return _lin_scale(args[0], -1.0)
            return _lin_sum(args, [1.0] + [-1.0] * (len(args) - 1))
        if op == "*":
            if not args:
                raise self.err(node, "'*' needs at least one argument")
            result: _Linear = ({}, 1.0)
            for a, child in zip(args, node[1:]):
                if not a[0]:
                    result = _lin_scale(result, a[1])
                elif not result[0]:
                    result = _lin_scale(a, result[1])
                else:
                    raise self.err(
                        child, "product of two variables is not linear (only constant * variable is supported)"
                    )
            return result
        if op == "/":
            if len(args) < 2:
                raise self.err(node, "'/' needs at least two arguments")
            result = args[0]
            for a, child in zip(args[1:], node[2:]):
                if a[0] or a[1] == 0.0:
                    raise self.err(child, "division only by a non-zero constant is supported")
                result = _lin_scale(result, 1.0 / a[1])
            return result
        if op in _COMPARISONS or op in ("and", "or"):
            raise self.err(node, f"'{op}' used inside an arithmetic term (comparisons cannot be nested in terms)")
        raise self.err(node, f"unknown operator '{op}' in a term (supported: + - * /)")

    # -- formulas --------------------------------------------------------------------------

    def dnf(self, node: Node) -> _Dnf:
        """Expand a formula into disjunctive normal form (list of atom conjunctions)."""
        if isinstance(node, Sym):
            if node.text == "true":
                return [[]]
            if node.text == "false":
                return []
            raise self.err(node, f"expected a formula but found '{node.text}' (e.g. '(<= Y_0 Y_1)')")
        op = self.head(node)
        if op == "and":
            result: _Dnf = [[]]
            for child in node[1:]:
                result = self.conjoin(result, self.dnf(child), child)
            return result
        if op == "or":
            result = []
            for child in node[1:]:
                result.extend(self.dnf(child))
                if len(result) > MAX_TERMS:
                    raise self.err(
                        node, f"disjunction has more than {MAX_TERMS} cases (split the property into several files)"
                    )
            return result
        if op in _COMPARISONS:
            return self.compare(node, op)
        raise self.err(node, f"unknown operator '{op}' (supported: and, or, <=, >=, <, >, =)")

    def conjoin(self, left: _Dnf, right: _Dnf, where: Node) -> _Dnf:
        if len(right) == 1:  # common case: extend in place (all term lists here are owned by `left`)
            extra = right[0]
            for t in left:
                t.extend(extra)
            return left
        if len(left) * len(right) > MAX_TERMS:
            raise self.err(
                where,
                f"conjunction of disjunctions expands to more than {MAX_TERMS} cases "
                "(split the property into several files)",
            )
        return [a + b for a in left for b in right]

    def compare(self, node: SexprList, op: str) -> _Dnf:
        if len(node) < 3:
            raise self.err(node, f"'{op}' needs at least two arguments")
        terms = [self.linear(a) for a in node[1:]]
        atoms: _Term = []
        for lhs, rhs in zip(terms, terms[1:]):  # chained comparisons, as in SMT-LIB
            if op in ("<=", "<"):
                pairs = [(lhs, rhs)]
            elif op in (">=", ">"):
                pairs = [(rhs, lhs)]
            else:  # "="
                pairs = [(lhs, rhs), (rhs, lhs)]
            for a, b in pairs:
                atom = self.less_equal(a, b, node)
                if atom is False:
                    return []
                if atom is not True:
                    atoms.append(atom)
        return [atoms]

    def less_equal(self, a: _Linear, b: _Linear, node: SexprList):
        """Atom for ``a <= b``; True/False if it has no variables."""
        coef = dict(a[0])
        for k, v in b[0].items():
            coef[k] = coef.get(k, 0.0) - v
        coef = {k: v for k, v in coef.items() if v != 0.0}
        const = a[1] - b[1]  # inequality: sum coef*v + const <= 0
        if not coef:
            return const <= 0.0
        kinds = {k for (k, _) in coef}
        if len(kinds) == 2:
            raise self.err(
                node,
                "inequality mixing input (X) and output (Y) variables is unsupported "
                "(constrain X by a box and Y separately)",
            )
        if "X" in kinds:
            if len(coef) != 1:
                raise self.err(
                    node, "non-box input constraint is unsupported (bound each input separately, e.g. '(<= X_0 1)')"
                )
            (((_, i), c),) = coef.items()
            bound = -const / c + 0.0  # + 0.0 turns -0.0 into 0.0
            return ("hi", i, bound, node.pos) if c > 0 else ("lo", i, bound, node.pos)
        return ("row", {j: c for (_, j), c in coef.items()}, 0.0 - const, node.pos)


def _lin_sum(args: list[_Linear], signs: list[float]) -> _Linear:
    coef: dict = {}
    const = 0.0
    for (c, k), s in zip(args, signs):
        for key, v in c.items():
            coef[key] = coef.get(key, 0.0) + s * v
        const += s * k
    return coef, const


def _lin_scale(a: _Linear, s: float) -> _Linear:
    return {k: s * v for k, v in a[0].items()}, s * a[1]


# ----------------------------------------------------------------------------------------------
# Assembly into regions
# ----------------------------------------------------------------------------------------------


def _apply_bounds(atoms: _Term, lower: np.ndarray, upper: np.ndarray, rows: list, n_in: int, p: _Parser) -> None:
    for atom in atoms:
        kind = atom[0]
        if kind == "row":
            rows.append(atom)
            continue
        i = atom[1]
        if i >= n_in:  # cannot happen with gap-free declarations; kept as a guard
            raise p.err(atom[3], f"X_{i} is out of range")
        if kind == "lo":
            if atom[2] > lower[i]:
                lower[i] = atom[2]
        elif atom[2] < upper[i]:
            upper[i] = atom[2]


def _check_box(lower: np.ndarray, upper: np.ndarray, common: _Term, term: _Term, p: _Parser) -> VnnlibError | None:
    """Raise if an input is unbounded; return the error describing an EMPTY box (None if it is not empty)."""
    missing = np.isinf(lower) | np.isinf(upper)
    if missing.any():
        i = int(np.argmax(missing))
        side, op = ("lower", ">=") if np.isinf(lower[i]) else ("upper", "<=")
        raise p.err(
            p.decl_pos[("X", i)],
            f"input X_{i} has no {side} bound (add '(assert ({op} X_{i} c))'; every input needs both bounds)",
        )
    bad = lower > upper
    if bad.any():
        i = int(np.argmax(bad))
        # report the later of the clashing bounds
        pos = max(a[3] for a in common + term if a[0] != "row" and a[1] == i)
        return p.err(
            pos,
            f"empty input box: X_{i} lower bound {float(lower[i])!r} > upper bound {float(upper[i])!r} "
            f"(fix the bounds of X_{i})",
        )
    return None


def _rows_to_constraint(rows: list, n_out: int, p: _Parser) -> OutputConstraint:
    A = np.zeros((len(rows), n_out), dtype=np.float64)
    b = np.empty(len(rows), dtype=np.float64)
    for r, (_, coef, rhs, pos) in enumerate(rows):
        for j, c in coef.items():
            if j >= n_out:  # guard; gap-free declarations make this unreachable
                raise p.err(pos, f"Y_{j} is out of range")
            A[r, j] = c
        b[r] = rhs
    return OutputConstraint(A=A, b=b)


def parse_vnnlib(
    path_or_text: PathOrText, *, num_inputs: int | None = None, num_outputs: int | None = None
) -> VnnlibProperty:
    """Parse a VNN-LIB property (plain or gzipped) into input boxes and output constraints.

    path_or_text: a path (str / PathLike), raw bytes, or the VNN-LIB text itself (a str containing
    '(', ';' or a newline is taken as text). num_inputs / num_outputs: if given, the declarations must
    match them (e.g. the network's input/output sizes).
    Raises VnnlibError (``path:line:col: problem (fix)``) for malformed or unsupported files.
    """
    src, path = load_source(path_or_text)
    forms = read_sexprs(src)
    p = _Parser(src)
    asserts = p.run(forms)
    n_in = p.count("X")
    n_out = p.count("Y")
    for given, n, what, kind in ((num_inputs, n_in, "inputs", "X"), (num_outputs, n_out, "outputs", "Y")):
        if given is not None and given != n:
            raise p.err(
                p.decl_pos[(kind, n - 1)],
                f"property declares {n} {what} but {given} were expected "
                "(use the property file that matches the network)",
            )

    # Asserts that are plain conjunctions (one DNF term) are shared by every region: apply them once.
    common: _Term = []
    disjunctive: list[tuple[_Dnf, Node]] = []
    for node in asserts:
        d = p.dnf(node)
        if len(d) == 1:
            common.extend(d[0])
        else:
            disjunctive.append((d, node))
    terms: _Dnf = [[]]
    for d, node in disjunctive:
        terms = p.conjoin(terms, d, node)

    base_lower = np.full(n_in, -np.inf)
    base_upper = np.full(n_in, np.inf)
    common_rows: list = []
    _apply_bounds(common, base_lower, base_upper, common_rows, n_in, p)

    regions: dict[bytes, Region] = {}  # insertion-ordered; key = box bytes
    empty: VnnlibError | None = None  # the first disjunct with an empty box
    for term in terms:
        lower, upper = base_lower.copy(), base_upper.copy()
        rows = list(common_rows)
        _apply_bounds(term, lower, upper, rows, n_in, p)
        err = _check_box(lower, upper, common, term, p)
        if err is not None:  # the property is a union over its disjuncts: an empty one adds nothing
            empty = empty or err
            continue
        key = lower.tobytes() + upper.tobytes()
        region = regions.get(key)
        if region is None:
            region = regions[key] = Region(lower=lower, upper=upper, outputs=[])
        region.outputs.append(_rows_to_constraint(rows, n_out, p))
    if empty is not None and not regions:  # every disjunct is empty: almost certainly a broken file
        raise empty
    return VnnlibProperty(num_inputs=n_in, num_outputs=n_out, regions=list(regions.values()), path=path)


# ----------------------------------------------------------------------------------------------
# Counterexample files (VNN-COMP result format)
# ----------------------------------------------------------------------------------------------
