"""Exact ground truth for the proof margin: float32 bounds against MILP minima (scipy's HiGHS).

For small piecewise-linear networks, the exact minimum of a specification row ``c^T f(x)`` over an input box is
a mixed-integer linear program: affine layers are linear equations, an unstable ReLU ``y = relu(x)`` with
``l < 0 < u`` is ``y >= x, y <= x - l (1 - d), y <= u d`` with a binary ``d``, and a max over a window is
``y >= x_j`` plus ``y <= x_j + (U - l_j)(1 - d_j)`` with one-hot binaries ``d`` (U: the largest upper bound).
The big-M constants ``l, u`` are float64 interval bounds, tightened by the LP relaxation. Everything of the
MILP is float64, built from the float32 weights (a float64 copy of the model), so it describes exactly the
function that the float32 engine bounds. HiGHS solves with a zero optimality gap and feasibility tolerances
of 1e-9; the minimizer it returns is evaluated by the float64 model, which gives an ACHIEVED value (``exact``;
the MILP objective must agree with it, which certifies optimality and checks the encoding, as do sampled
points never going below it).

The check: for IBP, CROWN and alpha-CROWN, ``lower - proof_margin(scale) <= exact`` for every row, with the
smaller of verify's and certify's scales (``lingraft.bounds.tolerance``): no certificate can be issued by
rounding alone. The raw float32 excess ``lower - exact`` (rounding beating the exact value) is allowed and
summarized at the end of the module (run with ``-s`` to see it).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _soundness import graft_randomly
from scipy import optimize as opt
from torch import nn

from lingraft.bounds import BoundedNetwork, input_box, margin_spec
from lingraft.bounds.tolerance import proof_margin
from lingraft.models.layers import GraftedReLU, Normalize

METHODS = ("ibp", "crown", "alpha-crown")
#: modules whose function is affine: encoded by evaluating the (float64) module on the expression's columns
AFFINE = (
    nn.Linear,
    nn.Conv2d,
    nn.AvgPool2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    Normalize,
    nn.Flatten,
    nn.ZeroPad2d,
    nn.Identity,
)
#: HiGHS options: exact optimum (no relative or absolute gap), tight feasibility
HIGHS = {
    "mip_rel_gap": 0.0,
    "mip_abs_gap": 0.0,
    "primal_feasibility_tolerance": 1e-9,
    "dual_feasibility_tolerance": 1e-9,
    "mip_feasibility_tolerance": 1e-9,
    "time_limit": 60.0,
}
#: per bound: (name, rows, rows whose raw bound is above the exact minimum, max (lower - exact) / scale, max scale)
STATS: list[tuple[str, int, int, float, float]] = []


# ------------------------------------------------------------------------------------------------------------
# the MILP encoder


class Expr:
    """A tensor of per-sample ``shape`` whose entries are affine in the MILP's continuous variables z:
    ``M @ z[:k] + c`` with M [n, k] float64 (k: the number of variables when it was made), c [n]."""

    def __init__(self, M: np.ndarray, c: np.ndarray, shape):
        self.M, self.c, self.shape = M, c, tuple(shape)

    def cols(self, k: int) -> np.ndarray:
        """M padded with zero columns to k variables."""
        return np.pad(self.M, ((0, 0), (0, k - self.M.shape[1])))


class MilpEncoder:
    """Builds the MILP of a float64 model over a box, module by module (see :meth:`run`).

    Variables: the inputs first, then one per unstable ReLU output / pooled max and the binaries. Constraints
    are dense rows ``lb <= row @ z <= ub`` (the problems are small).
    """

    def __init__(self, xl: np.ndarray, xu: np.ndarray):
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.binary: list[int] = []
        self.rows: list[tuple[np.ndarray, float, float]] = []
        for lo, hi in zip(xl.ravel(), xu.ravel(), strict=True):
            self.var(float(lo), float(hi))
        n = len(self.lo)
        self.n_in = n
        self.input = Expr(np.eye(n), np.zeros(n), xl.shape)

    def var(self, lo: float, hi: float, binary: bool = False) -> int:
        self.lo.append(lo)
        self.hi.append(hi)
        self.binary.append(int(binary))
        return len(self.lo) - 1

    def constrain(self, e: Expr, i: int, extra: dict[int, float], lb: float, ub: float) -> None:
        """lb <= e[i] + sum(coef * z[v] for v, coef in extra) <= ub."""
        row = np.zeros(len(self.lo))
        row[: e.M.shape[1]] = e.M[i]
        for v, coef in extra.items():
            row[v] += coef
        self.rows.append((row, lb - e.c[i], ub - e.c[i]))

    def bounds(self, e: Expr) -> tuple[np.ndarray, np.ndarray]:
        """Bounds of every entry of e (float64): interval bounds from the variables' bounds, tightened by the LP
        relaxation (binaries in [0, 1]) once there are binaries. Both are sound; tighter big-M constants only
        make the MILP faster to solve."""
        k = e.M.shape[1]
        lo, hi = np.array(self.lo[:k]), np.array(self.hi[:k])
        pos, neg = np.maximum(e.M, 0), np.minimum(e.M, 0)
        lo_e, hi_e = e.c + pos @ lo + neg @ hi, e.c + pos @ hi + neg @ lo
        if not any(self.binary):
            return lo_e, hi_e
        M = e.cols(len(self.lo))
        for i in range(len(e.c)):
            if lo_e[i] < 0 < hi_e[i]:  # only unstable entries matter for the encoding
                lo_lp = self._solve(M[i], relax=True)[0] + e.c[i]
                hi_lp = -self._solve(-M[i], relax=True)[0] + e.c[i]
                # widened by more than the LP's own tolerance
                lo_e[i] = max(lo_e[i], lo_lp - 1e-6 * (1 + abs(lo_lp)))
                hi_e[i] = min(hi_e[i], hi_lp + 1e-6 * (1 + abs(hi_lp)))
        return lo_e, hi_e

    # -- operations ---------------------------------------------------------------------------------------
    def run(self, module: nn.Module, e: Expr) -> Expr:
        """Encode ``module`` applied to e: Sequential, the modules in AFFINE, ReLU, GraftedReLU, MaxPool2d, or a
        test module with its own ``milp(encoder, expr)`` (branches: Add/Sub, Concat, Reshape)."""
        if isinstance(module, nn.Sequential):
            for m in module:
                e = self.run(m, e)
            return e
        if hasattr(module, "milp"):
            return module.milp(self, e)
        if isinstance(module, AFFINE):
            return self.affine(module, e)
        if isinstance(module, nn.ReLU):
            return self.relu(e)
        if isinstance(module, GraftedReLU):
            return self.relu(e, (module.mask.numpy().ravel() > 0.5, module.a.detach().numpy().ravel(), module.b))
        if isinstance(module, nn.MaxPool2d):
            return self.maxpool(module, e)
        raise TypeError(f"no MILP encoding for {type(module).__name__}")

    def affine(self, module: nn.Module, e: Expr) -> Expr:
        """An affine module, evaluated (float64) at the constant part and at every column of M."""
        k = e.M.shape[1]
        pts = np.concatenate([e.c[None], e.M.T]).reshape(k + 1, *e.shape)
        with torch.no_grad():
            out = module(torch.from_numpy(pts)).numpy()
            at0 = module(torch.zeros(1, *e.shape, dtype=torch.float64)).numpy().reshape(-1)
        flat = out.reshape(k + 1, -1)
        return Expr((flat[1:] - at0).T, flat[0], out.shape[1:])

    def relu(self, e: Expr, graft=None) -> Expr:
        """relu per entry (exact: big-M with one binary per unstable entry); graft = (mask, a, b): entries
        where mask holds are a x + b, the grafted neurons' exact linear function."""
        lo, hi = self.bounds(e)
        n, k = e.M.shape
        rows, c = [np.zeros(k) for _ in range(n)], np.zeros(n)
        new: dict[int, int] = {}  # entry -> its output variable
        for i in range(n):
            if graft is not None and graft[0][i]:
                a, b = float(graft[1][i]), float(graft[2].detach().numpy().ravel()[i])
                rows[i], c[i] = a * e.M[i], a * e.c[i] + b
            elif lo[i] >= 0:
                rows[i], c[i] = e.M[i], e.c[i]
            elif hi[i] > 0:
                y, d = self.var(0.0, float(hi[i])), self.var(0.0, 1.0, binary=True)
                self.constrain(e, i, {y: -1.0}, -np.inf, 0.0)  # x <= y
                self.constrain(e, i, {y: -1.0, d: float(lo[i])}, float(lo[i]), np.inf)  # y <= x - l (1 - d)
                self.rows.append((_row(len(self.lo), {y: 1.0, d: -float(hi[i])}), -np.inf, 0.0))  # y <= u d
                new[i] = y
        M = np.zeros((n, len(self.lo)))
        for i in range(n):
            M[i, :k] = rows[i]
            if i in new:
                M[i, new[i]] = 1.0
        return Expr(M, c, e.shape)

    def maxpool(self, module: nn.MaxPool2d, e: Expr) -> Expr:
        """Exact max over each window: y >= x_j, y <= x_j + (U - l_j)(1 - d_j), one-hot d over the candidates."""
        kh, kw = _pair(module.kernel_size)
        sh, sw = _pair(module.stride or module.kernel_size)
        assert _pair(module.padding) == (0, 0)
        C, H, W = e.shape
        idx = np.arange(C * H * W).reshape(C, H, W)
        lo, hi = self.bounds(e)
        Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
        outs = []  # per output entry: ("entry", index into e) or ("var", new variable)
        for ch in range(C):
            for r in range(Ho):
                for s in range(Wo):
                    win = idx[ch, r * sh : r * sh + kh, s * sw : s * sw + kw].ravel()
                    outs.append(self._window_max(e, win, lo, hi))
        M = np.zeros((len(outs), len(self.lo)))
        c = np.zeros(len(outs))
        for j, (kind, v) in enumerate(outs):
            if kind == "var":
                M[j, v] = 1.0
            else:
                M[j, : e.M.shape[1]], c[j] = e.M[v], e.c[v]
        return Expr(M, c, (C, Ho, Wo))

    def _window_max(self, e: Expr, win: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        """("entry", i) when entry i of e is the window's max on the whole box, else ("var", new variable)."""
        best = win[np.argmax(lo[win])]
        L, U = float(lo[best]), float(hi[win].max())
        cand = [j for j in win if hi[j] >= L]
        if len(cand) == 1:
            return "entry", int(best)
        y = self.var(L, U)
        ds = [self.var(0.0, 1.0, binary=True) for _ in cand]
        for j in win:
            self.constrain(e, j, {y: -1.0}, -np.inf, 0.0)  # x_j <= y
        for j, d in zip(cand, ds, strict=True):
            big = U - float(lo[j])  # y <= x_j + big (1 - d)
            self.constrain(e, j, {y: -1.0, d: -big}, -big, np.inf)
        self.rows.append((_row(len(self.lo), dict.fromkeys(ds, 1.0)), 1.0, 1.0))
        return "var", y

    def add(self, p: Expr, q: Expr, alpha: float = 1.0) -> Expr:
        k = max(p.M.shape[1], q.M.shape[1])
        return Expr(p.cols(k) + alpha * q.cols(k), p.c + alpha * q.c, p.shape)

    def cat(self, parts: list[Expr], dim: int) -> Expr:
        """Concatenation along per-sample dimension ``dim`` (0 = channels)."""
        k = max(p.M.shape[1] for p in parts)
        Ms = [p.cols(k).reshape(*p.shape, k) for p in parts]
        cs = [p.c.reshape(p.shape) for p in parts]
        M, c = np.concatenate(Ms, dim), np.concatenate(cs, dim)
        return Expr(M.reshape(-1, k), c.reshape(-1), c.shape)

    def reshape(self, e: Expr, shape) -> Expr:
        return Expr(e.M, e.c, shape)

    # -- solving ------------------------------------------------------------------------------------------
    def minimize(self, e: Expr, crow: np.ndarray) -> tuple[float, np.ndarray]:
        """min over the box of crow @ e: (MILP optimum, minimizing input [n_in])."""
        val, x = self._solve(crow @ e.cols(len(self.lo)), relax=False)
        return val + float(crow @ e.c), x[: self.n_in]

    def _solve(self, obj: np.ndarray, relax: bool) -> tuple[float, np.ndarray]:
        """min obj @ z subject to the constraints (relax: binaries continuous in [0, 1], an LP)."""
        n = len(self.lo)
        cons = []
        if self.rows:
            A = np.stack([np.pad(r, (0, n - len(r))) for r, _, _ in self.rows])
            cons = [opt.LinearConstraint(A, [lb for _, lb, _ in self.rows], [ub for _, _, ub in self.rows])]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
            res = opt.milp(
                obj,
                integrality=np.zeros(n) if relax else np.array(self.binary),
                bounds=opt.Bounds(self.lo, self.hi),
                constraints=cons,
                options=dict(HIGHS),
            )
        assert res.status == 0, f"MILP not solved: {res.message}"
        return float(res.fun), np.asarray(res.x)


def _row(n: int, coefs: dict[int, float]) -> np.ndarray:
    row = np.zeros(n)
    for v, coef in coefs.items():
        row[v] += coef
    return row


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


# ------------------------------------------------------------------------------------------------------------
# the check


def exact_minima(model64: nn.Module, xl: torch.Tensor, xu: torch.Tensor, C: np.ndarray) -> np.ndarray:
    """[S] exact minima of C @ f over the box: the float64 model at the MILP's minimizers (achieved values),
    after checking that each agrees with its MILP optimum (optimality and encoding)."""
    enc = MilpEncoder(xl[0].double().numpy(), xu[0].double().numpy())
    out = enc.run(model64, enc.input)
    out = enc.reshape(out, (int(np.prod(out.shape)),))
    exact = np.zeros(len(C))
    for s, crow in enumerate(C):
        opt_val, x = enc.minimize(out, crow)
        x = np.clip(x, xl[0].double().numpy().ravel(), xu[0].double().numpy().ravel())
        with torch.no_grad():
            exact[s] = float(
                model64(torch.from_numpy(x).reshape(1, *xl.shape[1:]))[0].flatten() @ torch.from_numpy(crow)
            )
        assert abs(opt_val - exact[s]) <= 1e-7 * (1 + abs(exact[s])), f"MILP optimum {opt_val} vs f(x*) {exact[s]}"
    return exact


def check_case(name: str, model: nn.Module, x0: torch.Tensor, xl: torch.Tensor, xu: torch.Tensor) -> None:
    """Every method's float32 lower bound, less the proof margin, is at most the exact minimum of each row
    (margin rows e_y - e_j of the predicted class y, and the output y alone)."""
    model.eval()
    model64 = copy.deepcopy(model).double()
    in_shape = tuple(x0.shape[1:])
    net = BoundedNetwork(model, in_shape)
    with torch.no_grad():
        y0 = model64(x0.double()).flatten()
        y_centre = model64(((xl + xu) / 2).double()).flatten()
        assert torch.allclose(net.forward(x0).double().flatten(), y0, rtol=1e-5, atol=1e-4)
    K = y0.numel()
    label = y0.argmax().reshape(1)
    C = torch.cat([margin_spec(label, K)[0].double(), torch.eye(K, dtype=torch.float64)[label]])
    exact = exact_minima(model64, xl, xu, C.numpy())
    with torch.no_grad():  # sampled points and corners never go below the exact minimum
        u = torch.rand(300, *in_shape, dtype=torch.float64)
        u[200:] = u[200:].round()
        vals = model64(xl.double() + (xu - xl).double() * u).reshape(300, -1) @ C.T
    assert (vals.min(0).values.numpy() >= exact - 1e-9 * (1 + np.abs(exact))).all()
    exact_t = torch.from_numpy(exact)
    out_scale = C.abs() @ y_centre.abs()  # verify: |C| |y(box centre)|
    for method in METHODS:
        res = net.compute_bounds(xl, xu, method, C.float().unsqueeze(0), bound_upper=False, alpha_iterations=5)
        lb = res.lower[0].double()
        verify_scale = torch.maximum(torch.maximum(lb.abs(), exact_t.abs()), out_scale)
        certify_scale = 2 * y0.abs().max() + lb.abs()
        scale = torch.minimum(verify_scale, certify_scale)
        excess = lb - exact_t
        ratio = float((excess / scale).max())
        STATS.append((f"{name}/{method}", len(C), int((excess > 0).sum()), ratio, float(scale.max())))
        unsound = lb - proof_margin(scale) > exact_t
        assert not unsound.any(), (
            f"{name} {method}: lower bound {lb[unsound].tolist()} minus the proof margin is above the exact "
            f"minimum {exact_t[unsound].tolist()} (scale {scale[unsound].tolist()})"
        )


@pytest.fixture(scope="module", autouse=True)
def _report():
    """Print the raw float32 excesses once the module ran (visible with ``pytest -s``)."""
    yield
    if STATS:
        rows = sum(s[1] for s in STATS)
        above = sum(s[2] for s in STATS)
        name, _, _, worst, _ = max(STATS, key=lambda s: s[3])
        print(
            f"\nMILP soundness: {len(STATS)} bounds, {rows} rows (scales up to {max(s[4] for s in STATS):.3g}); "
            f"float32 lower bound above the exact minimum in {above} rows; max (lower - exact) / scale = "
            f"{worst:.3g} ({name})"
        )


# ------------------------------------------------------------------------------------------------------------
# the networks


def _scaled(model: nn.Module, seed: int, weight: float, bias: float) -> nn.Module:
    """Random parameters: default init times ``weight``, biases ~ N(0, bias^2)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.reset_parameters()
            with torch.no_grad():
                m.weight.mul_(weight)
                if m.bias is not None:
                    m.bias.normal_(0.0, bias)
    return model.eval()


def _box(x0: torch.Tensor, clamped: bool, eps: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    return input_box(x0, eps) if clamped else (x0 - eps, x0 + eps)


RANDOM_NETS = {
    # input 2x7x4 as in the issue: 8 + 6 ReLUs
    "conv": lambda: nn.Sequential(
        nn.Conv2d(2, 1, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)
    ),
    # 10 + 6 ReLUs
    "mlp": lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(56, 10), nn.ReLU(), nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 4)
    ),
}
#: (weight factor, bias std): ordinary weights (outputs ~1e1-1e2 on these boxes), large ones (outputs ~1e3)
SCALES = {"ordinary": (1.0, 1.0), "large": (4.0, 60.0)}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("clamped", [True, False], ids=["clamped", "unclamped"])
@pytest.mark.parametrize("weights", list(SCALES))
@pytest.mark.parametrize("arch", list(RANDOM_NETS))
def test_random_nets_at_large_eps(arch, weights, clamped, seed):
    """eps 5 (the whole [0, 1] box when clamped), ordinary and large weights: no certificate by rounding."""
    model = _scaled(RANDOM_NETS[arch](), seed, *SCALES[weights])
    x0 = torch.rand(1, 2, 7, 4)
    xl, xu = _box(x0, clamped)
    check_case(f"{arch}-{weights}-{'clamped' if clamped else 'unclamped'}-{seed}", model, x0, xl, xu)


class Branches(nn.Module):
    """Two branches of the input, relu(conv_a(x)) and conv_b(x), joined by ``kind`` (add: a + 2 b, sub: a - b,
    cat: along channels), then relu, a reshape to [B, n] and a linear head.  x: [B, 2, 3, 3] -> [B, 4]."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv_a = nn.Conv2d(2, 1, 3, padding=1)
        self.conv_b = nn.Conv2d(2, 1, 3, padding=1)
        self.fc = nn.Linear((2 if kind == "cat" else 1) * 9, 4)

    def forward(self, x):
        a, b = F.relu(self.conv_a(x)), self.conv_b(x)
        if self.kind == "add":
            h = torch.add(a, b, alpha=2.0)
        elif self.kind == "sub":
            h = a - b
        else:
            h = torch.cat([a, b], dim=1)
        h = F.relu(h)
        return self.fc(h.reshape(h.shape[0], -1))

    def milp(self, enc: MilpEncoder, e: Expr) -> Expr:
        a, b = enc.relu(enc.affine(self.conv_a, e)), enc.affine(self.conv_b, e)
        if self.kind == "add":
            h = enc.add(a, b, 2.0)
        elif self.kind == "sub":
            h = enc.add(a, b, -1.0)
        else:
            h = enc.cat([a, b], 0)
        h = enc.relu(h)
        return enc.affine(self.fc, enc.reshape(h, (int(np.prod(h.shape)),)))


class ViewHead(nn.Module):
    """x.view to [B, 3, 2, 3], a conv on that, flatten by view.  x: [B, 2, 3, 3] -> [B, 4]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.conv(x.view(x.shape[0], 3, 2, 3)))
        return self.fc(h.view(h.shape[0], -1))

    def milp(self, enc: MilpEncoder, e: Expr) -> Expr:
        h = enc.relu(enc.affine(self.conv, enc.reshape(e, (3, 2, 3))))
        return enc.affine(self.fc, enc.reshape(h, (6,)))


def _batchnorm_net() -> nn.Module:
    bn2, bn1 = nn.BatchNorm2d(2), nn.BatchNorm1d(6)
    for bn in (bn2, bn1):
        with torch.no_grad():
            bn.running_mean.normal_(0.0, 2.0)
            bn.running_var.uniform_(0.2, 3.0)
            bn.weight.normal_(1.0, 0.5)
            bn.bias.normal_(0.0, 1.0)
    return nn.Sequential(
        Normalize([0.3, 0.6], [0.2, 0.4]),
        nn.Conv2d(2, 2, 3, padding=1),
        bn2,
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(18, 6),
        bn1,
        nn.ReLU(),
        nn.Linear(6, 4),
    )


def _grafted_net() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(18, 6), nn.ReLU(), nn.Linear(6, 4)
    )
    return graft_randomly(net, (2, 3, 3), 0.5, seed=3)


#: one small configuration per piecewise-linear operation of the registry (8 to 36 ReLUs); inputs [B, 2, 3, 3]
OPS = {
    "linear": lambda: nn.Sequential(nn.Flatten(), nn.Linear(18, 10), nn.ReLU(), nn.Linear(10, 4)),
    "conv-stride-pad-groups": lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(16, 4)
    ),
    "zeropad-conv": lambda: nn.Sequential(
        nn.ZeroPad2d((1, 0, 0, 1)), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4)
    ),
    "grafted-relu": _grafted_net,
    "avgpool": lambda: nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2, stride=1), nn.Flatten(), nn.Linear(8, 4)
    ),
    "avgpool-padded": lambda: nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, stride=2, padding=1), nn.Flatten(), nn.Linear(8, 4)
    ),
    "maxpool": lambda: nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 4)
    ),
    "maxpool-overlapping": lambda: nn.Sequential(
        nn.Conv2d(2, 1, 3, padding=1), nn.MaxPool2d(2, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(4, 4)
    ),
    "batchnorm-normalize": _batchnorm_net,
    "add": lambda: Branches("add"),
    "sub": lambda: Branches("sub"),
    "concat": lambda: Branches("cat"),
    "reshape-view": ViewHead,
}


@pytest.mark.parametrize("clamped", [True, False], ids=["clamped", "unclamped"])
@pytest.mark.parametrize("op", list(OPS))
def test_every_piecewise_linear_op(op, clamped):
    """Each registry op in a small configuration, large weights, eps 5: no certificate by rounding."""
    model = _scaled(OPS[op](), zlib_seed(op), 3.0, 30.0)
    x0 = torch.rand(1, 2, 3, 3)
    xl, xu = _box(x0, clamped)
    check_case(f"{op}-{'clamped' if clamped else 'unclamped'}", model, x0, xl, xu)


def zlib_seed(name: str) -> int:
    """A seed per name that does not depend on the interpreter's hash randomization."""
    return sum(ord(ch) * (i + 1) for i, ch in enumerate(name)) % 10_000


def test_encoder_matches_the_network_at_a_point():
    """A box of one point: the MILP optimum is the network's value there (the encoder's own check)."""
    model = _scaled(Branches("sub"), 5, 3.0, 30.0)
    x0 = torch.rand(1, 2, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model.double()(x0)[0]
    enc = MilpEncoder(x0[0].numpy(), x0[0].numpy())
    out = enc.reshape(enc.run(model, enc.input), (4,))
    for k in range(4):
        val, _ = enc.minimize(out, np.eye(4)[k])
        assert val == pytest.approx(float(y[k]), rel=1e-9, abs=1e-9)
