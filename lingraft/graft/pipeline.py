"""Linearity Grafting (Chen et al., ICML 2022): choose unstable, insignificant ReLU neurons, replace them by
learnable linear functions a*x + b, and fine-tune.

Scores are computed per ReLU neuron on N training images:
  instability   fraction of images whose pre-activation bounds at the graft eps cross zero (l < 0 < u);
  significance  mean |dL/d activation| ("gradient") or mean |pre-activation| ("magnitude"), on clean or FGSM inputs.
The paper's rule grafts in stages: score = gamma * rank(instability) - rank(significance) with gamma decaying
over the stages (default 2, 1.5, 1, 0), each stage taking an equal share of the requested ratio from the
neurons not chosen yet. Ranks are ascending (rank 0 = least unstable / least significant), computed globally
across layers (default) or within each layer.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lingraft.bounds import BoundedNetwork
from lingraft.bounds.ops import ReLUOp
from lingraft.io.checkpoint import replace_module
from lingraft.errors import UsageError
from lingraft.models.layers import GraftedReLU

RULES = ("lg", "random", "magnitude", "instability")
INITS = ("paper", "identity", "zero", "fit")


@dataclass
class NeuronScores:
    """Per ReLU layer (module name) tensors of the layer's activation shape."""

    instability: dict = field(default_factory=dict)
    gradient: dict = field(default_factory=dict)
    magnitude: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    grafted: dict = field(default_factory=dict)  # already-grafted neurons (bool), excluded from selection
    fit_a: dict = field(default_factory=dict)    # least-squares linear fit of relu(z) over the score images
    fit_b: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: {n: v.tolist() if torch.is_tensor(v) else v for n, v in getattr(self, k).items()}
                for k in ("instability", "gradient", "magnitude", "shapes", "grafted", "fit_a", "fit_b")}

    @classmethod
    def from_dict(cls, d: dict) -> "NeuronScores":
        s = cls()
        for k in ("instability", "gradient", "magnitude", "fit_a", "fit_b"):
            setattr(s, k, {n: torch.tensor(v, dtype=torch.float32) for n, v in d.get(k, {}).items()})
        s.grafted = {n: torch.tensor(v, dtype=torch.bool) for n, v in d.get("grafted", {}).items()}
        s.shapes = {n: tuple(v) for n, v in d.get("shapes", {}).items()}
        return s


def relu_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> nn.ReLU or GraftedReLU, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.ReLU, GraftedReLU))}


def compute_scores(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, in_shape=None, bound_method: str = "crown",
                   significance_input: str = "clean", batch_size: int = 50, device=None) -> NeuronScores:
    """Instability, gradient and magnitude scores of every ReLU neuron over images x [N, *in] with labels y [N]."""
    if bound_method not in ("ibp", "crown"):
        raise UsageError(f"graft bound method must be ibp or crown, got {bound_method!r}")
    model = model.eval()
    dev = device or next(model.parameters()).device
    in_shape = tuple(in_shape or x.shape[1:])
    relus = relu_modules(model)
    if not relus:
        raise UsageError("the model has no ReLU modules to graft (ReLUs must be nn.ReLU modules)")
    net = BoundedNetwork(model, in_shape, device=dev)
    # map engine ReLU nodes to module names
    node_of = {nd.module_name: k for k, nd in enumerate(net.nodes) if isinstance(nd.op, ReLUOp)}
    missing = [n for n in relus if n not in node_of]
    if missing:
        raise UsageError(f"ReLU modules {missing} are not on the model's forward path; cannot score them")
    sc = NeuronScores()
    acts: dict[str, Tensor] = {}
    pre: dict[str, Tensor] = {}

    def hook(name):
        def f(mod, inp, out):
            pre[name] = inp[0].detach()
            out.retain_grad()
            acts[name] = out
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in relus.items()]
    sums = {k: {n: 0.0 for n in relus} for k in ("inst", "grad", "mag", "z", "zz", "r", "zr")}
    N = x.shape[0]
    try:
        for s in range(0, N, batch_size):
            xb, yb = x[s:s + batch_size].to(dev), y[s:s + batch_size].to(dev)
            xl, xu = (xb - eps).clamp(0, 1), (xb + eps).clamp(0, 1)
            if bound_method == "ibp":
                bnds = net.ibp_all(xl, xu)
            else:
                bnds = net.intermediate_bounds(xl, xu)
                ibp = None
                for k, nd in enumerate(net.nodes):  # layers without computed bounds (fully grafted) use IBP
                    if isinstance(nd.op, ReLUOp) and bnds[nd.inputs[0]] is None:
                        ibp = ibp or net.ibp_all(xl, xu)
                        bnds[nd.inputs[0]] = ibp[nd.inputs[0]]
            for name in relus:
                lo, up = bnds[net.nodes[node_of[name]].inputs[0]]
                sums["inst"][name] = sums["inst"][name] + ((lo < 0) & (up > 0)).float().sum(0)
            xin = xb
            if significance_input == "fgsm" and eps > 0:
                from lingraft.train.attack import fgsm

                xin = fgsm(model, xb, yb, eps)
            with torch.enable_grad():
                out = model(xin)
                loss = F.cross_entropy(out, yb, reduction="sum")
                loss.backward()
            for name in relus:
                g = acts[name].grad
                z = pre[name]
                r = F.relu(z)
                sums["grad"][name] = sums["grad"][name] + g.abs().sum(0)
                sums["mag"][name] = sums["mag"][name] + z.abs().sum(0)
                sums["z"][name] = sums["z"][name] + z.sum(0)
                sums["zz"][name] = sums["zz"][name] + (z * z).sum(0)
                sums["r"][name] = sums["r"][name] + r.sum(0)
                sums["zr"][name] = sums["zr"][name] + (z * r).sum(0)
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    for name, m in relus.items():
        shape = tuple(sums["inst"][name].shape)
        sc.shapes[name] = shape
        sc.instability[name] = (sums["inst"][name] / N).cpu()
        sc.gradient[name] = (sums["grad"][name] / N).cpu()
        sc.magnitude[name] = (sums["mag"][name] / N).cpu()
        sc.grafted[name] = (m.mask.reshape(shape) > 0.5).cpu() if isinstance(m, GraftedReLU) \
            else torch.zeros(shape, dtype=torch.bool)
        mz, mzz, mr, mzr = (sums[k][name].cpu() / N for k in ("z", "zz", "r", "zr"))
        var = (mzz - mz * mz).clamp(min=1e-12)
        a = ((mzr - mz * mr) / var).clamp(0, 1)
        sc.fit_a[name], sc.fit_b[name] = a, mr - a * mz
    return sc


def _rank(v: Tensor) -> Tensor:
    """Ascending ranks 0..n-1 (ties broken by position, deterministic)."""
    order = torch.argsort(v, stable=True)
    r = torch.empty_like(order)
    r[order] = torch.arange(v.numel())
    return r.float()


def select_neurons(scores: NeuronScores, ratio: float, *, rule: str = "lg", scope: str = "global",
                   gammas=(2.0, 1.5, 1.0, 0.0), significance: str = "gradient", seed: int = 0) -> dict[str, Tensor]:
    """Masks (bool, layer activation shape) of the neurons to graft: ``ratio`` of all ReLU neurons (counting
    already-grafted ones, which stay grafted). Returns {layer: mask}."""
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise UsageError(f"--ratio must be in [0, 1], got {ratio}")
    if rule not in RULES:
        raise UsageError(f"unknown graft rule {rule!r}; choose one of {', '.join(RULES)}")
    if scope not in ("global", "layer"):
        raise UsageError(f"--scope must be global or layer, got {scope!r}")
    if significance not in ("gradient", "magnitude"):
        raise UsageError(f"--significance must be gradient or magnitude, got {significance!r}")
    names = list(scores.shapes)
    groups = [names] if scope == "global" else [[n] for n in names]
    masks = {n: scores.grafted[n].clone() for n in names}
    gen = torch.Generator().manual_seed(seed)
    for group in groups:
        inst = torch.cat([scores.instability[n].flatten() for n in group])
        sig_src = scores.gradient if significance == "gradient" else scores.magnitude
        sig = torch.cat([sig_src[n].flatten() for n in group])
        mag = torch.cat([scores.magnitude[n].flatten() for n in group])
        chosen = torch.cat([masks[n].flatten() for n in group])
        total = chosen.numel()
        target = int(round(ratio * total))
        need = target - int(chosen.sum())
        if need <= 0:
            continue
        if rule == "lg":
            stages = list(gammas)
            per = [need // len(stages) + (1 if i < need % len(stages) else 0) for i in range(len(stages))]
            r_sig = _rank(sig)
            r_inst = _rank(inst)
            for gamma, k in zip(stages, per):
                if k == 0:
                    continue
                score = gamma * r_inst - r_sig
                score[chosen] = -float("inf")
                idx = torch.topk(score, k).indices
                chosen[idx] = True
        else:
            if rule == "random":
                score = torch.rand(total, generator=gen)
            elif rule == "magnitude":
                score = -mag  # least significant first
            else:
                score = inst.clone()
            score[chosen] = -float("inf")
            chosen[torch.topk(score, need).indices] = True
        off = 0
        for n in group:
            k = masks[n].numel()
            masks[n] = chosen[off:off + k].reshape(masks[n].shape)
            off += k
    return masks


def apply_graft(model: nn.Module, masks: dict[str, Tensor], *, init: str = "paper", scores: NeuronScores | None = None,
                init_a: float = 0.4, init_b: float = 0.0) -> nn.Module:
    """Return a copy of ``model`` whose ReLU modules are GraftedReLU with the given masks. Already grafted neurons
    keep their a, b; new ones get the ``init`` values (paper: a=0.4, b=0; identity: a=1; zero: a=b=0; fit: the
    least-squares line of relu over the score images)."""
    if init not in INITS:
        raise UsageError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    model = copy.deepcopy(model)
    relus = relu_modules(model)
    unknown = set(masks) - set(relus)
    if unknown:
        raise UsageError(f"mask names layers the model does not have: {sorted(unknown)}")
    for name, mask in masks.items():
        old = relus[name]
        shape = tuple(mask.shape)
        g = GraftedReLU(shape, mask.float())
        a0 = {"paper": init_a, "identity": 1.0, "zero": 0.0, "fit": init_a}[init]
        b0 = {"paper": init_b, "identity": 0.0, "zero": 0.0, "fit": init_b}[init]
        with torch.no_grad():
            g.a.fill_(a0)
            g.b.fill_(b0)
            if init == "fit" and scores is not None:
                g.a.copy_(scores.fit_a[name].reshape(shape))
                g.b.copy_(scores.fit_b[name].reshape(shape))
            if isinstance(old, GraftedReLU):
                keep = old.mask.reshape(shape) > 0.5
                g.a[keep] = old.a.reshape(shape)[keep]
                g.b[keep] = old.b.reshape(shape)[keep]
        dev = next(model.parameters()).device
        replace_module(model, name, g.to(dev))
    return model


@dataclass
class FinetuneConfig:
    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3            # network weights
    lr_graft: float = 0.01      # grafted a, b
    weight_decay: float = 5e-4  # weights only; a, b get none
    momentum: float = 0.9
    eps: float = 0.1
    grad_align: float = 0.2
    fgsm_step: float = 1.25
    num_train: int | None = None
    val_size: int = 1000
    seed: int = 0


def finetune(model: nn.Module, x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, cfg: FinetuneConfig,
             *, log=print, progress=None) -> tuple[nn.Module, dict]:
    """The paper's recipe: FGSM + GradAlign at cfg.eps, SGD with two parameter groups, cosine schedule; keeps the
    weights with the best validation PGD accuracy. Masks never change (they are buffers)."""
    from lingraft.train.attack import fgsm
    from lingraft.train.loop import evaluate, grad_align_reg

    dev = next(model.parameters()).device
    graft_params = [p for n, p in model.named_parameters()
                    if (n.endswith(".a") or n.endswith(".b")) and isinstance(_owner(model, n), GraftedReLU)]
    graft_ids = {id(p) for p in graft_params}
    weights = [p for p in model.parameters() if id(p) not in graft_ids]
    opt = torch.optim.SGD([{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                           {"params": graft_params, "lr": cfg.lr_graft, "weight_decay": 0.0}],
                          momentum=cfg.momentum)
    N = x_train.shape[0]
    steps = max(1, cfg.epochs * math.ceil(N / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    best = evaluate(model, x_val, y_val, cfg.eps, seed=cfg.seed)
    best_state = copy.deepcopy(model.state_dict())
    history = [{"epoch": 0, **best}]
    log(f"finetune start: val clean {best['clean_acc']:.4f} pgd {best['pgd_acc']:.4f}")
    t0 = time.perf_counter()
    for ep in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(N, generator=gen)
        for s in range(0, N, cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            xb, yb = x_train[idx].to(dev), y_train[idx].to(dev)
            xa = fgsm(model, xb, yb, cfg.eps, step_size=cfg.fgsm_step * cfg.eps)
            loss = F.cross_entropy(model(xa), yb)
            if cfg.grad_align > 0:
                loss = loss + grad_align_reg(model, xb, yb, cfg.eps, cfg.grad_align)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                progress(len(idx))
        model.eval()
        ev = evaluate(model, x_val, y_val, cfg.eps, seed=cfg.seed)
        history.append({"epoch": ep, **ev})
        log(f"finetune epoch {ep}: val clean {ev['clean_acc']:.4f} pgd {ev['pgd_acc']:.4f}")
        if (ev["pgd_acc"], ev["clean_acc"]) > (best["pgd_acc"], best["clean_acc"]):
            best, best_state = ev, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return model, {"best": best, "history": history, "time_s": time.perf_counter() - t0}


def _owner(model, param_name):
    mod_name = param_name.rsplit(".", 1)[0]
    return dict(model.named_modules()).get(mod_name)


def graft_summary(model: nn.Module) -> dict:
    """{layer: {"neurons": n, "grafted": g}} over the model's ReLU modules."""
    out = {}
    for n, m in relu_modules(model).items():
        if isinstance(m, GraftedReLU):
            out[n] = {"neurons": m.num_neurons, "grafted": m.num_grafted}
        else:
            out[n] = {"neurons": None, "grafted": 0}
    return out


def save_masks(path, masks: dict[str, Tensor], meta: dict | None = None) -> None:
    """Masks as JSON {"format": "lingraft-graft-mask", "masks": {layer: {"shape": [...], "grafted": [flat indices]}}}."""
    from lingraft.io.files import atomic_write_json

    atomic_write_json(path, {"format": "lingraft-graft-mask", "version": 1, "meta": meta or {},
                             "masks": {n: {"shape": list(m.shape),
                                           "grafted": torch.nonzero(m.flatten()).flatten().tolist()}
                                       for n, m in masks.items()}})


def load_masks(path) -> dict[str, Tensor]:
    import json
    from pathlib import Path

    from lingraft.errors import LingraftError

    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise LingraftError(f"mask file not found: {p}") from None
    except (ValueError, UnicodeDecodeError):
        raise LingraftError(f"mask file {p} is not JSON; write one with 'lingraft graft ... --save-mask FILE'") from None
    if not isinstance(d, dict) or d.get("format") != "lingraft-graft-mask":
        raise LingraftError(f"{p} is not a lingraft graft mask (format 'lingraft-graft-mask')")
    out = {}
    try:
        for n, v in d["masks"].items():
            m = torch.zeros(int(math.prod(v["shape"])), dtype=torch.bool)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in v["grafted"]):
                raise ValueError  # 2.7 is no neuron index: refuse instead of truncating
            idx = torch.tensor(v["grafted"], dtype=torch.long)
            if idx.numel() and (idx.min() < 0 or idx.max() >= m.numel()):
                raise ValueError
            m[idx] = True
            out[n] = m.reshape(v["shape"])
    except (KeyError, TypeError, ValueError):
        raise LingraftError(f"mask file {p} is malformed (layer entries need 'shape' and in-range 'grafted')") from None
    return out


def check_masks_fit(model: nn.Module, masks: dict[str, Tensor], in_shape) -> None:
    """Raise UsageError unless every mask names a ReLU module of ``model`` with the right activation shape."""
    relus = relu_modules(model)
    shapes = {}
    hs = [m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
          for n, m in relus.items()]
    with torch.no_grad():
        model(torch.zeros(1, *in_shape, device=next(model.parameters()).device))
    for h in hs:
        h.remove()
    for n, m in masks.items():
        if n not in relus:
            raise UsageError(f"mask layer {n!r} is not a ReLU of this model (layers: {', '.join(relus)})")
        if tuple(m.shape) != shapes[n]:
            raise UsageError(f"mask layer {n!r} has shape {tuple(m.shape)} but the model's activation is {shapes[n]}")


def run_graft(model_path, *, out_path, ratio, eps, rule="lg", scope="global", gammas=(2.0, 1.5, 1.0, 0.0),
              significance="gradient", significance_input="clean", score_images=1000, score_bound="crown",
              init="paper", epochs=1, num_train=10000, batch_size=128, lr=1e-3, lr_graft=0.01, train_eps=None,
              scores_only=None, mask_path=None, save_mask=None, num_samples=200, methods=("crown", "alpha-crown"),
              dataset=None, data_dir=None, seed=0, device=None, log=print, command="") -> dict:
    """The whole ``lingraft graft`` job: load, score, select, graft, fine-tune, save, evaluate before/after."""
    from lingraft.certify.pipeline import certify, check_eps
    from lingraft.io.checkpoint import save_checkpoint
    from lingraft.data.datasets import load_dataset, subset
    from lingraft.io.files import atomic_write_json
    from lingraft.io.loader import check_input_matches_dataset, load_model

    torch.manual_seed(seed)
    lm = load_model(model_path, dataset=dataset)
    if lm.source != "checkpoint":
        raise UsageError("graft needs a lingraft checkpoint (.pt) so the grafted model can be fine-tuned and saved; "
                         "ONNX models can be certified but not grafted")
    ds = dataset or lm.dataset
    if ds is None:
        raise UsageError("the checkpoint does not record its dataset; pass --dataset")
    cfg_meta = lm.meta.get("config", {}) if isinstance(lm.meta, dict) else {}
    if eps is None:
        eps = float(lm.meta.get("eps", cfg_meta.get("eps", 0.1)) or 0.1)
    eps = check_eps(eps)
    train_eps = eps if train_eps is None else check_eps(train_eps)
    dev = device or torch.device("cpu")
    check_input_matches_dataset(lm, ds)
    model = lm.model.to(dev).eval()
    x_tr, y_tr = load_dataset(ds, "train", data_dir)
    g = torch.Generator().manual_seed(seed)
    val_size = min(1000, x_tr.shape[0] // 5)
    x_val, y_val = x_tr[-val_size:], y_tr[-val_size:]
    x_pool, y_pool = x_tr[:-val_size], y_tr[:-val_size]
    pick = torch.randperm(x_pool.shape[0], generator=g)[:score_images]
    xs, ys = x_pool[pick].reshape(-1, *lm.in_shape), y_pool[pick]
    t0 = time.perf_counter()
    scores = None
    if mask_path:
        masks = load_masks(mask_path)
        check_masks_fit(model, masks, lm.in_shape)
        log(f"loaded mask {mask_path}")
    else:
        log(f"scoring {sum(1 for _ in relu_modules(model))} ReLU layers on {xs.shape[0]} training images "
            f"({score_bound} bounds at eps {eps})")
        scores = compute_scores(model, xs, ys, eps, in_shape=lm.in_shape, bound_method=score_bound,
                                significance_input=significance_input, device=dev)
        if scores_only:
            atomic_write_json(scores_only, {"format": "lingraft-graft-scores", "model": lm.path, "eps": eps,
                                            "scores": scores.to_dict()})
            return {"schema_version": 1, "command": "graft", "scores_only": scores_only, "model": lm.path}
        masks = select_neurons(scores, ratio, rule=rule, scope=scope, gammas=gammas, significance=significance,
                               seed=seed)
    score_time = time.perf_counter() - t0
    if save_mask:
        save_masks(save_mask, masks, {"model": lm.path, "ratio": ratio, "rule": rule, "eps": eps})
    grafted = apply_graft(model, masks, init=init, scores=scores)
    ft = {"time_s": 0.0, "history": [], "best": None}
    if epochs > 0:
        xt, yt = x_pool[:num_train].reshape(-1, *lm.in_shape), y_pool[:num_train]
        fcfg = FinetuneConfig(epochs=epochs, batch_size=batch_size, lr=lr, lr_graft=lr_graft, eps=train_eps, seed=seed)
        grafted, ft = finetune(grafted, xt, yt, x_val.reshape(-1, *lm.in_shape), y_val, fcfg, log=log)
    summary = graft_summary(grafted)
    n_relu = sum(v["neurons"] for v in summary.values())
    n_graft = sum(v["grafted"] for v in summary.values())
    meta = {"graft": {"source": lm.path, "ratio": ratio, "rule": rule, "scope": scope, "gammas": list(gammas),
                      "significance": significance, "init": init, "eps": eps, "train_eps": train_eps,
                      "epochs": epochs, "num_train": num_train, "finetune": ft, "score_time_s": score_time},
            "eps": eps, "command": command, "parent_meta": lm.meta}
    if out_path:
        ckpt_kwargs = _arch_kwargs(lm)
        save_checkpoint(out_path, grafted, arch=lm.arch, arch_kwargs=ckpt_kwargs, dataset=ds, meta=meta)
        log(f"wrote {out_path}")
    evaluation = {"before": {}, "after": {}}
    if num_samples > 0:
        x_te, y_te = subset(*load_dataset(ds, "test", data_dir), num_samples)
        x_te = x_te.reshape(-1, *lm.in_shape)
        for tag, m in (("before", model), ("after", grafted)):
            for meth in methods:
                rep = certify(m, x_te, y_te, eps, in_shape=lm.in_shape, method=meth, seed=seed, device=dev)
                d = rep.to_dict()
                d.pop("samples")
                evaluation[tag][meth] = d
                log(f"{tag:6s} {meth:11s} clean {rep.clean_acc:.3f} pgd {rep.pgd_acc:.3f} "
                    f"certified {rep.certified_acc:.3f} ({rep.time_per_sample_s * 1000:.1f} ms/img)")
    warnings = _clean_drop_warning(evaluation)
    for w in warnings:
        log(f"warning: {w}")
    return {"schema_version": 1, "command": "graft", "model": lm.path, "out": out_path, "ratio": ratio, "rule": rule,
            "scope": scope, "eps": eps, "relu_neurons": n_relu, "grafted_neurons": n_graft, "layers": summary,
            "finetune": {"time_s": ft["time_s"], "best": ft["best"]}, "evaluation": evaluation, "warnings": warnings}


#: a clean-accuracy drop (test images of the before/after table) above this gets a warning with the usual fix
CLEAN_DROP_WARN = 0.03


def _clean_drop_warning(evaluation: dict) -> list[str]:
    """One warning when grafting cost more than CLEAN_DROP_WARN clean accuracy (narrow MLPs under-fine-tuned:
    fc-8x200 at ratio 0.5 lost 7 points after 1 epoch on 10k images and 0.2 after 3 epochs on all 59k)."""
    before, after = evaluation.get("before") or {}, evaluation.get("after") or {}
    common = [m for m in before if m in after]
    if not common:
        return []
    cb, ca = before[common[0]]["clean_acc"], after[common[0]]["clean_acc"]
    if ca >= cb - CLEAN_DROP_WARN:
        return []
    return [f"clean accuracy fell from {100 * cb:.1f}% to {100 * ca:.1f}% after grafting; fine-tune longer "
            "(e.g. --epochs 3 --num-train 59000) or graft a smaller --ratio"]


def _arch_kwargs(lm) -> dict:
    from lingraft.io.checkpoint import load_checkpoint

    _, ck = load_checkpoint(lm.path)
    return ck["arch_kwargs"]
