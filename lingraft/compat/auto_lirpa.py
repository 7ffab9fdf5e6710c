"""auto_LiRPA 0.3 as an independent bound oracle: runtime compatibility patches + a small API.

auto_LiRPA 0.3 (PyPI, 2022) pins torch<1.13 and numpy 1.x.  Importing this module applies runtime
monkeypatches (no site-packages file is edited) and then imports auto_LiRPA.  ``available()`` says
whether that worked; the bound functions raise ``LingraftError`` otherwise.

Patches (each applied only when needed)
---------------------------------------
Before importing auto_LiRPA:
  P1 ``numpy.lib.arraysetops`` (removed in numpy 2): shim module in ``sys.modules`` with ``isin``.
  P2 ``appdirs`` (undeclared when installed --no-deps; used for one data dir): tiny shim module.
  P3 ``torch.onnx.symbolic_helper._set_opset_version`` (removed): sets the TorchScript exporter's
     ``GLOBALS.export_onnx_opset_version``.
  P4 the opset-11/12 symbolic functions are imported so that they are registered; torch 2.x only
     loads opsets 9 and 10 eagerly, and without this ``ZeroPad2d`` traces to an opset-9 ``Pad``
     (pads as an attribute) that auto_LiRPA's ``BoundPad`` cannot run.
  P5 ``torch._C.Node.__getitem__`` (removed; parse_graph does ``n[k]``): attribute lookup by kind.
After importing:
  P6 ``BoundedModule._named_members`` accepts torch 2's ``remove_duplicate`` argument.
  P7 ``BoundedModule.register_parameter`` used ``torch._six`` (removed): use ``nn.Module``'s.
  P8 ``BoundBuffers`` nodes were marked ``from_input`` (as if they depended on the input), so
     buffer-derived constants (``Normalize`` mean/std, ``GraftedReLU`` mask) got a batch dimension
     and broke CROWN.  Buffers are now constants (``from_input = False``).
  P9 ``BoundMul``/``BoundDiv`` only treated ``Constant``/``Buffer``/``Params`` *leaf* inputs as
     constants; an input computed from buffers/params (``mean.reshape(..)``, ``1 - mask``,
     ``mask * a``) was relaxed as a bilinear product and CROWN crashed.  Any unperturbed input
     that does not depend on the model input is now a constant (checked after graph build).
     IBP of a Mul/Div with BOTH operands constant returned x*x (GraftedReLU's t = mask * a came
     out as mask): unsound IBP, and unsound sparse-CROWN references; now the exact product.
  P10 ``BoundMul._multiply_by_const`` in patches mode only handled per-channel [B, C, 1, 1]
     constants; scalars and element-wise [C, H, W] constants (GraftedReLU) are now unfolded.
  P11 a constant operand of Add/Sub (Normalize's mean, GraftedReLU's c) reached by a Patches A
     was turned into a bias by summing whole patches, zero-padding positions included: unsound
     CROWN on cnn-b (ZeroPad2d/conv padding after Normalize) in patches mode.  The constant is
     now broadcast to the consumer's shape and unfolded (padding contributes 0).
  (+) ``bounded_module`` puts the BoundedModule in eval mode and detaches constants traced with
     autograd history (else alpha-CROWN fails: "modified by an inplace operation").
Options (not patches): ``sparse_features_alpha=False`` (with True, 0.3's alpha-CROWN crashes on
cnn-b once many ReLUs are unstable, e.g. eps=0.02: "shape mismatch: value tensor of shape
[10, 1, 250] cannot be broadcast ..."); everything else is auto_LiRPA's default, see
``DEFAULT_BOUND_OPTS``.
ReLU relaxation option ``relu='adaptive'`` (the default).  Importing auto_LiRPA also calls
``torch._C._jit_set_profiling_executor(False)`` (auto_LiRPA's own import side effect).

Grafted models: ``GraftedReLU`` (relu(s*x) + t*x + c) traces and bounds in IBP, CROWN and
alpha-CROWN, in both ``patches`` and ``matrix`` conv modes (see tests).  The ReLU's input node is
the ``Mul`` s*x, so the intermediate bounds of a grafted layer are bounds of s*x (= x for ordinary
neurons, exactly 0 for grafted ones).

How auto_LiRPA 0.3 computes CROWN ("backward") bounds  (verified numerically, see the tests)
-----------------------------------------------------------------------------------------
File:line refs are to site-packages/auto_LiRPA/.  ``compute_bounds(method='CROWN')``
(bound_general.py:1012) does NOT compute IBP first for the whole net (IBP=False); it walks the graph
(check_prior_bounds, :837) and, for every input of a ReLU (and of any node in
``requires_input_bounds``), calls ``compute_intermediate_bounds`` (:854):

1. First linear layer: a ``Linear``/``Conv`` whose input is *directly* the ``BoundInput`` gets plain
   IBP bounds (interval_bound.py:126 ``check_IBP_first_linear``) -- exact for one affine layer.
   With lingraft's ``Normalize`` in front the first layer's input is ``Div``/``Flatten``, so CROWN is
   used instead; mathematically the same (exact) bounds.
2. Every other ReLU pre-activation node (``sparse_intermediate_bounds=True``, default, :907-935):
   a. reference bounds r = IBP of this node only (``IBP_general(node)``, interval_bound.py:5),
      starting from the bounds already stored on earlier nodes: i.e. ``W @ [relu(l_prev),
      relu(u_prev)] + b`` from the previous layer's final (CROWN) bounds, NOT IBP from the input.
      (Nodes with no stored bounds on the way, e.g. the t*x branch of a grafted layer, are
      IBP-propagated recursively until nodes with bounds.)
   b. unstable set U = {j : r_l[b, j] < 0 < r_u[b, j] for SOME batch element b}
      (backward_bound.py:670 ``get_unstable_locations``; the union over the batch, so a sample's
      bounds depend on the other samples in the batch).
   c. if 0 < |U| <= 0.9 * dim (``minimum_sparsity``; backward_bound.py:289 Linear, :314 Conv
      patches, :344 Add/Sub patches, :386 other nodes, e.g. Conv in matrix mode, GraftedReLU's
      Mul): CROWN is run only for neurons in U; every neuron outside U gets r (restore_sparse_bounds,
      backward_bound.py:405).  If |U| = 0, all neurons get r and no CROWN is run.
      If |U| > 0.9 * dim: CROWN for ALL neurons and r is discarded (no intersection at all).
   d. CROWN results are NOT intersected with r (no max/min) -- only user ``reference_bounds``
      would be (bound_general.py:962, empty by default).  So a neuron in U keeps its CROWN bounds
      even when r is tighter on one side; a neuron outside U keeps r even if CROWN is tighter.
   For the final bounds only the resulting relaxation matters: a stable neuron's relaxation does
   not depend on its bound values, so (c)/(d) change final bounds only through (i) neurons in U
   whose CROWN bounds are looser than r (no intersection) and (ii) dense layers (|U| > 0.9 dim) in
   which CROWN finds a neuron unstable that r proves stable.
   Conv layers in patches mode use the same rule (``sparse_conv_intermediate_bounds=True``), with U
   as (c, h, w) positions; Add/Sub (residual) pre-activations likewise.
3. ReLU relaxation for the backward pass (operators/activation.py:510 ``_relu_upper_bound``, :532
   ``_backward_relaxation``), from the pre-activation bounds (l, u) stored above:
     l_r = min(l, 0), u_r = max(u, 0), u_r = max(u_r, l_r + 1e-8)
     upper: slope d_u = u_r / (u_r - l_r), intercept -l_r * d_u   (stable-active: 1, 0;
            stable-inactive: 0, 0)
     lower ('adaptive', :655): slope d_l = 1 if d_u > 0.5 else 0, intercept 0, i.e. 1 iff u > -l
            (strictly; u == -l gives 0); stable-active 1, stable-inactive 0.
   The SAME d_l is used for the lower-bound pass (positive coefficients) and the upper-bound pass
   (negative coefficients) (activation.py:735-738), and for every start node.
4. The final node (the spec C @ logits) is one CROWN backward pass with C as the start matrix; no
   IBP intersection (bound_general.py:1319).
Alpha-CROWN (``CROWN-Optimized``; optimized_bounds.py:396): lower and upper bounds are two separate
optimizations.  Alphas are initialised from the CROWN d_l above (init_slope, :985), one alpha set per
(ReLU, start node) -- intermediate layers have their own alphas and are re-bounded in every
iteration (``intermediate_layer_bounds`` stays None); stable/unstable sets come from the iteration-0
bounds (``aux_reference_bounds``); Adam with ``lr_alpha``, lr decay 0.98, ``keep_best``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import types
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lingraft.bounds.methods import METHODS as BOUND_METHODS
from lingraft.errors import LingraftError, UsageError

__all__ = [
    "available",
    "import_error",
    "DEFAULT_BOUND_OPTS",
    "METHODS",
    "bounded_module",
    "autolirpa_bounds",
    "autolirpa_intermediate_bounds",
]

#: bound_opts passed to every BoundedModule built here (auto_LiRPA defaults otherwise).
DEFAULT_BOUND_OPTS: dict[str, Any] = {
    "relu": "adaptive",
    "sparse_intermediate_bounds": True,
    "sparse_conv_intermediate_bounds": True,
    "sparse_intermediate_bounds_with_ibp": True,
    "minimum_sparsity": 0.9,
    "sparse_features_alpha": False,
}

#: lingraft bound method (:data:`lingraft.bounds.METHODS`, same order) -> auto_LiRPA method name.
METHODS = dict(zip(BOUND_METHODS, ("IBP", "backward", "CROWN-Optimized")))

_IMPORT_ERROR: str | None = None
_lirpa: Any = None  # the auto_LiRPA module once patched and imported


# --------------------------------------------------------------------------- patches before import
def _patch_numpy() -> None:
    try:
        import numpy.lib.arraysetops  # noqa: F401
    except ImportError:
        shim = types.ModuleType("numpy.lib.arraysetops")
        for name in ("isin", "unique", "intersect1d", "setdiff1d", "union1d", "in1d"):
            if hasattr(np, name):
                setattr(shim, name, getattr(np, name))
        sys.modules["numpy.lib.arraysetops"] = shim


def _patch_appdirs() -> None:
    try:
        import appdirs  # noqa: F401
    except ImportError:
        shim = types.ModuleType("appdirs")
        shim.user_data_dir = lambda appname=None, *a, **k: os.path.join(  # type: ignore[attr-defined]
            tempfile.gettempdir(), appname or "appdata"
        )
        sys.modules["appdirs"] = shim


def _patch_torch_onnx() -> None:
    import torch.onnx.symbolic_helper as sh

    try:  # P4: register opset 11/12 symbolics (auto_LiRPA exports at opset 12)
        import torch.onnx.symbolic_opset11  # noqa: F401
        import torch.onnx.symbolic_opset12  # noqa: F401
    except ImportError:
        pass
    if not hasattr(sh, "_set_opset_version"):
        try:
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
        except ImportError:
            from torch.onnx._globals import GLOBALS  # type: ignore[no-redef]

        def _set_opset_version(opset_version: int) -> None:
            GLOBALS.export_onnx_opset_version = opset_version

        sh._set_opset_version = _set_opset_version
    if not hasattr(torch._C.Node, "__getitem__"):

        def _node_getitem(self, key):
            # kindOf gives the accessor name: 'f', 'i', 's', 't', 'fs', 'is', 'ival', ...
            return getattr(self, self.kindOf(key))(key)

        torch._C.Node.__getitem__ = _node_getitem


# ---------------------------------------------------------------------------- patches after import
def _patch_auto_lirpa(lirpa) -> None:
    """Apply the after-import fixes P6-P11 (module docstring) once to the imported auto_LiRPA."""
    BM = lirpa.BoundedModule
    if getattr(BM, "_lingraft_patched", False):
        return
    _patch_named_members(BM)
    _patch_register_parameter(BM)
    _patch_buffers_not_from_input()
    is_const = _patch_constant_input_check()
    _patch_constant_ops_at_init(BM, is_const)
    _patch_constant_products(is_const)
    _patch_multiply_patches_by_const()
    _patch_constant_add_sub(is_const)
    _patch_patches_bias()
    BM._lingraft_patched = True


def _patch_named_members(BM) -> None:
    """P6: accept torch 2's ``remove_duplicate`` argument of ``_named_members``."""
    orig_named_members = BM._named_members

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True, **kw):
        return orig_named_members(self, get_members_fn, prefix, recurse)

    BM._named_members = _named_members


def _patch_register_parameter(BM) -> None:
    """P7: ``register_parameter`` without ``torch._six`` (removed from torch)."""
    if not hasattr(torch, "_six"):
        BM.register_parameter = nn.Module.register_parameter


def _patch_buffers_not_from_input() -> None:
    """P8: buffers do not depend on the input (auto_LiRPA marked them ``from_input``)."""
    from auto_LiRPA.operators.leaf import BoundBuffers

    orig_buffers_init = BoundBuffers.__init__

    def _buffers_init(self, *args, **kwargs):
        orig_buffers_init(self, *args, **kwargs)
        self.from_input = False

    BoundBuffers.__init__ = _buffers_init


def _patch_constant_input_check() -> Callable[[Any], bool]:
    """P9: a node computed from buffers only (not from the input, not perturbed) is a constant operand.
    Returns the new check, which the other patches share."""
    from auto_LiRPA.operators.bivariate import BoundMul

    orig_check_const = BoundMul._check_const_input

    def _check_const_input(inp) -> bool:
        if orig_check_const(inp):
            return True
        return (not getattr(inp, "from_input", True)) and not getattr(inp, "perturbed", False)

    BoundMul._check_const_input = staticmethod(_check_const_input)
    return _check_const_input


def _patch_constant_ops_at_init(BM, is_const: Callable[[Any], bool]) -> None:
    """P9 (cont.): mark Mul/Div nodes with such a constant operand as constant ops when the module is built."""
    from auto_LiRPA.operators.bivariate import BoundDiv, BoundMul

    orig_bm_init = BM.__init__

    def _bm_init(self, model, *args, **kwargs):
        orig_bm_init(self, model, *args, **kwargs)
        if isinstance(model, BM):  # the copy constructor copies the fixed nodes
            return
        for node in self._modules.values():
            if isinstance(node, (BoundMul, BoundDiv)) and not node.is_constant_op:
                if any(is_const(i) for i in node.inputs):
                    node.is_constant_op = True
                    node.requires_input_bounds = []

    BM.__init__ = _bm_init


def _patch_constant_products(is_const: Callable[[Any], bool]) -> None:
    """IBP of a constant product tells the constant operand by `lower is upper`; a computed constant
    (e.g. 1 - mask) has equal but distinct lower/upper tensors.  A product of two constants
    (GraftedReLU's t = mask * a) came out as mask * mask: unsound IBP (and sparse CROWN references)."""
    from auto_LiRPA.operators.bivariate import BoundDiv, BoundMul

    def _wrap_interval(cls):
        orig = cls.interval_propagate

        def interval_propagate(self, *v):
            if len(v) == 2 and all(is_const(i) for i in self.inputs):
                # both operands constant: 0.3's code would return x * x (it takes x as the
                # constant and, since y is constant too, x again as the variable)
                r = self.forward(v[0][0], v[1][0])
                return r, r
            if self.is_constant_op and len(v) == 2:
                v = tuple(
                    (iv[0], iv[0]) if is_const(inp) and iv[0] is not iv[1] else iv for inp, iv in zip(self.inputs, v)
                )
            return orig(self, *v)

        cls.interval_propagate = interval_propagate

    _wrap_interval(BoundMul)
    _wrap_interval(BoundDiv)


def _patch_multiply_patches_by_const() -> None:
    """P10: multiply a Patches A by a constant of any broadcastable shape, not only per channel."""
    from auto_LiRPA.operators.bivariate import BoundMul
    from auto_LiRPA.patches import Patches, maybe_unfold_patches

    orig_mul_const = BoundMul._multiply_by_const

    def _multiply_by_const(x, const):
        if isinstance(x, Patches) and isinstance(const, Tensor) and x.patches is not None:
            if const.numel() == 1:
                return x.create_similar(x.patches * const.reshape(()))
            per_channel = (
                const.ndim == 4
                and const.size(0) == x.patches.size(1)
                and const.size(1) == x.patches.size(-3)
                and const.size(2) == const.size(3) == 1
            )
            if not per_channel:
                c = const
                while c.ndim < 4:
                    c = c.unsqueeze(0)
                c = c.expand(x.patches.size(1), *c.shape[1:])  # [B, C, H, W]
                # unfold like a ReLU slope: [1, B, C, H, W] -> the shape of x.patches
                return x.create_similar(x.patches * maybe_unfold_patches(c.unsqueeze(0), x))
        return orig_mul_const(x, const)

    BoundMul._multiply_by_const = staticmethod(_multiply_by_const)


def _patch_constant_add_sub(is_const: Callable[[Any], bool]) -> None:
    """P11: a constant operand of Add/Sub (Normalize's mean, GraftedReLU's c) reached with a Patches A
    was turned into a bias by summing whole patches (Bound.get_bias, batch_dim == -1), counting
    the zero-padding positions outside the image: unsound bounds (seen on cnn-b: ZeroPad2d and
    conv padding after Normalize).  Tag such A with the consumer's full shape (here) and unfold the
    broadcast constant instead (:func:`_patch_patches_bias`), so that padding positions contribute 0."""
    from auto_LiRPA.operators.bivariate import BoundAdd, BoundSub
    from auto_LiRPA.patches import Patches

    def _wrap_add_sub(cls):
        orig = cls.bound_backward

        def bound_backward(self, last_lA, last_uA, *inputs, **kw):
            As, lbias, ubias = orig(self, last_lA, last_uA, *inputs, **kw)
            shape = getattr(self, "output_shape", None)
            if shape is None or len(shape) != 4:
                return As, lbias, ubias
            out = []
            for inp, pair in zip(self.inputs, As):
                if is_const(inp):
                    pair = tuple(
                        A.create_similar(input_shape=tuple(shape))
                        if isinstance(A, Patches) and A.patches is not None
                        else A
                        for A in pair
                    )
                out.append(pair)
            return out, lbias, ubias

        cls.bound_backward = bound_backward

    _wrap_add_sub(BoundAdd)
    _wrap_add_sub(BoundSub)


def _patch_patches_bias() -> None:
    """P11 (cont.): the bias of a tagged Patches A unfolds the constant, so padding positions contribute 0."""
    from auto_LiRPA.operators.base import Bound
    from auto_LiRPA.patches import Patches, inplace_unfold

    orig_get_bias = Bound.get_bias

    def get_bias(self, A, bias):
        full = getattr(A, "input_shape", None) if isinstance(A, Patches) else None
        if full is None or A.patches is None or self.batch_dim != -1 or not isinstance(bias, Tensor) or len(full) != 4:
            return orig_get_bias(self, A, bias)
        b = torch.broadcast_to(bias.to(A.patches), tuple(full))  # [B, C, H, W]
        # [B, out_h, out_w, C, kh, kw]; positions in the padding are 0
        b = inplace_unfold(
            b,
            kernel_size=A.patches.shape[-2:],
            stride=A.stride,
            padding=A.padding,
            inserted_zeros=A.inserted_zeros,
            output_padding=A.output_padding,
        )
        if A.unstable_idx is not None:  # sparse patches [U, B, C, kh, kw] -> [U, B]
            b = b[:, A.unstable_idx[1], A.unstable_idx[2]]
            return torch.einsum("bschw,sbchw->sb", b, A.patches)
        return torch.einsum("bijchw,sbijchw->sbij", b, A.patches)  # -> [S, B, out_h, out_w]

    Bound.get_bias = get_bias


def _load() -> None:
    global _IMPORT_ERROR, _lirpa
    try:
        _patch_numpy()
        _patch_appdirs()
        _patch_torch_onnx()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # auto_LiRPA calls warnings.simplefilter('once') at import (a global side effect that
            # would also re-enable torch.jit.script's deprecation noise); keep our filters instead
            real_simplefilter = warnings.simplefilter
            warnings.simplefilter = lambda *a, **k: None
            try:
                import auto_LiRPA
            finally:
                warnings.simplefilter = real_simplefilter
        _patch_auto_lirpa(auto_LiRPA)
        _lirpa = auto_LiRPA
    except Exception as e:  # noqa: BLE001 -- any failure means "oracle not available"
        _IMPORT_ERROR = f"{type(e).__name__}: {e}"
        _lirpa = None


_load()


def available() -> bool:
    """True when auto_LiRPA imported and was patched successfully."""
    return _lirpa is not None


def import_error() -> str | None:
    """Why auto_LiRPA is not available (None when it is)."""
    return _IMPORT_ERROR


def _require() -> Any:
    if _lirpa is None:
        raise LingraftError(
            f"auto_LiRPA is not usable ({_IMPORT_ERROR}); install auto_LiRPA==0.3 "
            "with pip install --no-deps auto_LiRPA==0.3"
        )
    return _lirpa


# ------------------------------------------------------------------------------------------ API
def bounded_module(model: nn.Module, example_input: Tensor, conv_mode: str = "patches", bound_opts: dict | None = None):
    """Wrap ``model`` in an auto_LiRPA ``BoundedModule`` traced with ``example_input`` [B, *in_shape].

    ``bound_opts`` override ``DEFAULT_BOUND_OPTS``; ``conv_mode`` is 'patches' or 'matrix'.
    """
    lirpa = _require()
    if conv_mode not in ("patches", "matrix"):
        raise UsageError(f"conv_mode must be 'patches' or 'matrix', not {conv_mode!r}")
    opts = dict(DEFAULT_BOUND_OPTS, conv_mode=conv_mode)
    opts.update(bound_opts or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation noise from torch.jit
        bm = lirpa.BoundedModule(model, example_input, bound_opts=opts, device=example_input.device)
    # Bounds are w.r.t. the input only.  In train mode BoundParams.forward switches requires_grad on
    # for the model's own parameters, and constants computed from them during tracing (mask * a)
    # keep that autograd graph in `.value`; alpha-CROWN's backward then runs into it and fails
    # ("modified by an inplace operation", the tracer's load_state_dict bumped the versions).
    bm.eval()
    for node in bm._modules.values():
        if not getattr(node, "from_input", True) and node.inputs:
            for attr in ("value", "forward_value"):
                v = getattr(node, attr, None)
                if isinstance(v, Tensor) and v.requires_grad:
                    setattr(node, attr, v.detach())
    return bm


def _prepare(model: nn.Module, x_lower: Tensor, x_upper: Tensor, method: str):
    if method not in METHODS:
        raise UsageError(f"unknown bound method {method!r}; use one of {', '.join(METHODS)}")
    if x_lower.shape != x_upper.shape:
        raise UsageError(f"x_lower {tuple(x_lower.shape)} and x_upper {tuple(x_upper.shape)} differ in shape")
    if bool((x_lower > x_upper).any()):
        raise UsageError("x_lower > x_upper somewhere; pass a valid input box")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = x_lower.device
    return x_lower.to(device).float(), x_upper.to(device).float(), device


def _bounded_input(x_lower: Tensor, x_upper: Tensor):
    lirpa = _require()
    center = (x_lower + x_upper) / 2
    ptb = lirpa.PerturbationLpNorm(norm=np.inf, x_L=x_lower, x_U=x_upper)
    return lirpa.BoundedTensor(center, ptb)


class _KeepRequiresGrad:
    """auto_LiRPA's BoundParams.forward calls ``param.requires_grad_(training)`` on the model's own
    parameters (it shares them); restore the flags afterwards."""

    def __init__(self, model: nn.Module):
        self.flags = [(p, p.requires_grad) for p in model.parameters()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        return False


def autolirpa_bounds(
    model: nn.Module,
    x_lower: Tensor,
    x_upper: Tensor,
    method: str,
    C: Tensor | None = None,
    conv_mode: str = "patches",
    alpha_iterations: int = 20,
    alpha_lr: float = 0.1,
    bound_opts: dict | None = None,
    bound_upper: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Bounds of ``C @ model(x)`` over the box ``x_lower <= x <= x_upper`` computed by auto_LiRPA.

    x_lower, x_upper: [B, *in_shape].  method: 'ibp' | 'crown' | 'alpha-crown'.
    C: [B, S, num_outputs] specification (None = identity, S = num_outputs).
    bound_upper=False skips the upper bound (alpha-CROWN then runs one optimisation, not two; ub is None).
    Returns (lb, ub), each [B, S], detached, on the model's device.  Note that CROWN bounds of one
    sample can depend on the other samples of the batch (see the module docstring, 2b).
    """
    xl, xu, device = _prepare(model, x_lower, x_upper, method)
    if C is not None:
        C = C.to(device).float()
        if C.dim() != 3 or C.shape[0] != xl.shape[0]:
            raise UsageError(f"C must be [B, S, num_outputs] with B = {xl.shape[0]}, got {tuple(C.shape)}")
    with _KeepRequiresGrad(model):
        bm = bounded_module(model, (xl + xu) / 2, conv_mode, bound_opts)
        if method == "alpha-crown":
            bm.set_bound_opts(
                {"optimize_bound_args": {"iteration": int(alpha_iterations), "lr_alpha": float(alpha_lr)}}
            )
        x = _bounded_input(xl, xu)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if method == "alpha-crown":
                lb, ub = bm.compute_bounds(
                    x=(x,), C=C, method=METHODS[method], bound_lower=True, bound_upper=bound_upper
                )
            else:
                with torch.no_grad():
                    lb, ub = bm.compute_bounds(x=(x,), C=C, method=METHODS[method], bound_upper=bound_upper)
    return lb.detach(), None if ub is None else ub.detach()


def autolirpa_intermediate_bounds(
    model: nn.Module,
    x_lower: Tensor,
    x_upper: Tensor,
    method: str = "crown",
    conv_mode: str = "patches",
    bound_opts: dict | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Pre-activation bounds of every ReLU, in graph order, as auto_LiRPA computes them.

    method: 'ibp' | 'crown'.  Returns [(lb, ub)], each [B, *relu_shape] (for a GraftedReLU these
    are the bounds of its ReLU's input s * x: x for ordinary neurons, 0 for grafted ones).
    """
    if method not in ("ibp", "crown"):
        raise UsageError(f"intermediate bounds are available for 'ibp' and 'crown', not {method!r}")
    xl, xu, _ = _prepare(model, x_lower, x_upper, method)
    with _KeepRequiresGrad(model):
        bm = bounded_module(model, (xl + xu) / 2, conv_mode, bound_opts)
        x = _bounded_input(xl, xu)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            bm.compute_bounds(x=(x,), method=METHODS[method])
        out = []
        for relu in bm.relus:
            pre = relu.inputs[0]
            if getattr(pre, "lower", None) is None:
                continue  # ReLU not on the path to the output
            out.append((pre.lower.detach().clone(), pre.upper.detach().clone()))
    return out
