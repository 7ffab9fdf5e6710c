"""Per-neuron scores of Linearity Grafting, computed over N training images.

  instability   fraction of images whose pre-activation bounds at the graft eps cross zero (l < 0 < u);
  significance  mean |dL/d activation| ("gradient") or mean |pre-activation| ("magnitude"), on clean or FGSM inputs.

Alongside, the least-squares line a*z + b through relu(z) over the same images (the "fit" graft init).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lingraft.bounds import BoundedNetwork
from lingraft.errors import UsageError
from lingraft.models.layers import GraftedReLU

__all__ = ["NeuronScores", "relu_modules", "compute_scores"]

# running sums per layer: unstable count, |grad|, |z|, and the moments z, z^2, relu(z), z*relu(z) of the line fit
_SUMS = ("inst", "grad", "mag", "z", "zz", "r", "zr")


@dataclass
class NeuronScores:
    """Per ReLU layer (module name) tensors of the layer's activation shape."""

    instability: dict = field(default_factory=dict)
    gradient: dict = field(default_factory=dict)
    magnitude: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    grafted: dict = field(default_factory=dict)  # already-grafted neurons (bool), excluded from selection
    fit_a: dict = field(default_factory=dict)  # least-squares linear fit of relu(z) over the score images
    fit_b: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            k: {n: v.tolist() if torch.is_tensor(v) else v for n, v in getattr(self, k).items()}
            for k in ("instability", "gradient", "magnitude", "shapes", "grafted", "fit_a", "fit_b")
        }

    @classmethod
    def from_dict(cls, d: dict) -> NeuronScores:
        s = cls()
        for k in ("instability", "gradient", "magnitude", "fit_a", "fit_b"):
            setattr(s, k, {n: torch.tensor(v, dtype=torch.float32) for n, v in d.get(k, {}).items()})
        s.grafted = {n: torch.tensor(v, dtype=torch.bool) for n, v in d.get("grafted", {}).items()}
        s.shapes = {n: tuple(v) for n, v in d.get("shapes", {}).items()}
        return s


def relu_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> nn.ReLU or GraftedReLU, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.ReLU, GraftedReLU))}


def _relu_nodes(net: BoundedNetwork, relus: dict[str, nn.Module]) -> dict[str, int]:
    """ReLU module name -> index of its node in the bound engine's graph."""
    node_of = {nd.module_name: k for k, nd in enumerate(net.nodes) if nd.op is not None and nd.op.splittable}
    missing = [n for n in relus if n not in node_of]
    if missing:
        raise UsageError(f"ReLU modules {missing} are not on the model's forward path; cannot score them")
    return node_of


def _preactivation_bounds(net: BoundedNetwork, xl: Tensor, xu: Tensor, bound_method: str) -> list:
    """Bounds of every node over the box [xl, xu]; ReLU inputs without CROWN bounds (fully grafted) get IBP."""
    if bound_method == "ibp":
        return net.ibp_all(xl, xu)
    bnds = net.intermediate_bounds(xl, xu)
    ibp = None
    for nd in net.nodes:
        if nd.op is not None and nd.op.splittable and bnds[nd.inputs[0]] is None:
            ibp = ibp or net.ibp_all(xl, xu)
            bnds[nd.inputs[0]] = ibp[nd.inputs[0]]
    return bnds


class _ActivationRecorder:
    """Forward hooks keeping each ReLU's input z [B, ...] and output (with its gradient retained)."""

    def __init__(self, relus: dict[str, nn.Module]):
        self.pre: dict[str, Tensor] = {}
        self.out: dict[str, Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in relus.items()]

    def _hook(self, name: str):
        def record(mod, inp, out):
            self.pre[name] = inp[0].detach()
            out.retain_grad()
            self.out[name] = out

        return record

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _add_significance(sums: dict, rec: _ActivationRecorder) -> None:
    """Add a backpropagated batch's |grad|, |z| and line-fit moments to ``sums`` (summed over the batch)."""
    for name, out in rec.out.items():
        g = out.grad
        z = rec.pre[name]
        r = F.relu(z)
        sums["grad"][name] = sums["grad"][name] + g.abs().sum(0)
        sums["mag"][name] = sums["mag"][name] + z.abs().sum(0)
        sums["z"][name] = sums["z"][name] + z.sum(0)
        sums["zz"][name] = sums["zz"][name] + (z * z).sum(0)
        sums["r"][name] = sums["r"][name] + r.sum(0)
        sums["zr"][name] = sums["zr"][name] + (z * r).sum(0)


def _finish(sums: dict, relus: dict[str, nn.Module], n: int) -> NeuronScores:
    """Means over the n images, already-grafted masks and the least-squares line of relu(z) per neuron."""
    sc = NeuronScores()
    for name, m in relus.items():
        shape = tuple(sums["inst"][name].shape)
        sc.shapes[name] = shape
        sc.instability[name] = (sums["inst"][name] / n).cpu()
        sc.gradient[name] = (sums["grad"][name] / n).cpu()
        sc.magnitude[name] = (sums["mag"][name] / n).cpu()
        sc.grafted[name] = (
            (m.mask.reshape(shape) > 0.5).cpu() if isinstance(m, GraftedReLU) else torch.zeros(shape, dtype=torch.bool)
        )
        mz, mzz, mr, mzr = (sums[k][name].cpu() / n for k in ("z", "zz", "r", "zr"))
        var = (mzz - mz * mz).clamp(min=1e-12)
        a = ((mzr - mz * mr) / var).clamp(0, 1)
        sc.fit_a[name], sc.fit_b[name] = a, mr - a * mz
    return sc


def compute_scores(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    in_shape=None,
    bound_method: str = "crown",
    significance_input: str = "clean",
    batch_size: int = 50,
    device=None,
    progress=None,
) -> NeuronScores:
    """Instability, gradient and magnitude scores of every ReLU neuron over images x [N, *in] with labels y [N].
    ``progress(n)`` is called after each batch of n images."""
    if bound_method not in ("ibp", "crown"):
        raise UsageError(f"graft bound method must be ibp or crown, got {bound_method!r}")
    model = model.eval()
    dev = device or next(model.parameters()).device
    in_shape = tuple(in_shape or x.shape[1:])
    relus = relu_modules(model)
    if not relus:
        raise UsageError("the model has no ReLU modules to graft (ReLUs must be nn.ReLU modules)")
    net = BoundedNetwork(model, in_shape, device=dev)
    node_of = _relu_nodes(net, relus)
    rec = _ActivationRecorder(relus)
    sums = {k: {n: 0.0 for n in relus} for k in _SUMS}
    try:
        for s in range(0, x.shape[0], batch_size):
            xb, yb = x[s : s + batch_size].to(dev), y[s : s + batch_size].to(dev)
            xl, xu = (xb - eps).clamp(0, 1), (xb + eps).clamp(0, 1)
            bnds = _preactivation_bounds(net, xl, xu, bound_method)
            for name in relus:
                lo, up = bnds[net.nodes[node_of[name]].inputs[0]]
                sums["inst"][name] = sums["inst"][name] + ((lo < 0) & (up > 0)).float().sum(0)
            xin = xb
            if significance_input == "fgsm" and eps > 0:
                from lingraft.train.attack import fgsm

                xin = fgsm(model, xb, yb, eps)
            with torch.enable_grad():
                F.cross_entropy(model(xin), yb, reduction="sum").backward()
            _add_significance(sums, rec)
            model.zero_grad(set_to_none=True)
            if progress is not None:
                progress(len(xb))
    finally:
        rec.remove()
    return _finish(sums, relus, x.shape[0])
