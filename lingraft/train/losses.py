"""Training losses of the baseline papers, and the feature taps the trainer needs for them.

Losses (each returns a scalar tensor, batch-mean; plain CE is part of every loss, as in the official code):
  ce, ls (label smoothing), kd (Hinton), nkd (Yang et al., arXiv 2303.13005, "NKD"),
  uskd (same paper, teacher-free "USKD"), zipf (Liang et al., arXiv 2207.12980, Zipf's label smoothing).

Shapes: logits [B, C] (raw scores), target [B] (int64 class indices). Teacher logits are always detached.
Everything is pure torch (no .cuda()); tensors stay on the device of the inputs.

Feature taps (for the zoo's nn.Sequential models and resnet-4b):
  split_at_flatten(model)   -> (features, head): features give the last conv feature map [B, K, H, W],
                               head maps it to logits [B, C] (Flatten -> Linear -> ... ).
  dense_logits_from_head    -> [B, C, H, W] per-location logits for Zipf's votes.
  uskd_feature_layer(model) -> the activation module whose output feeds USKD's weak linear head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lingraft.errors import UsageError
from lingraft.models.layers import GraftedReLU

_ACTIVATIONS = (nn.ReLU, GraftedReLU)


# ----------------------------------------------------------------------------------------------- helpers
def _check(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got {tuple(logits.shape)}")
    if target.shape != (logits.shape[0],):
        raise ValueError(f"target must be [B]={logits.shape[0]}, got {tuple(target.shape)}")


def non_target(x: Tensor, target: Tensor) -> Tensor:
    """The C-1 non-target entries of each row, in class order (the target is removed, not masked).

    x: [B, C], target: [B] -> [B, C-1]. Differentiable w.r.t. x.
    """
    b, c = x.shape
    j = torch.arange(c - 1, device=x.device).expand(b, c - 1)
    # skip over the target column: index j for j < y, j + 1 for j >= y
    idx = j + (j >= target.view(-1, 1)).long()
    return x.gather(1, idx)


def competition_rank(scores: Tensor) -> Tensor:
    """Rank each row descending, ties sharing the LOWEST rank of their group ("1224" / scipy method='min').

    rank_i = 1 + #{j : scores_j > scores_i}. scores: [B, C] -> int64 [B, C], rank 1 = largest.
    Example: votes [5, 3, 3, 0, 0] -> ranks [1, 2, 2, 4, 4] (zero-vote classes share the next free rank).
    """
    neg = -scores.detach()
    sorted_neg = torch.sort(neg, dim=1).values.contiguous()
    # number of entries strictly smaller in -scores (= strictly larger in scores)
    return torch.searchsorted(sorted_neg, neg.contiguous(), right=False) + 1


def _soft_ce(log_probs: Tensor, soft: Tensor) -> Tensor:
    """-mean_b sum_j soft[b, j] * log_probs[b, j]; both [B, K]."""
    return -(soft * log_probs).sum(dim=1).mean()


# ----------------------------------------------------------------------------------------------- losses
def ce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross entropy, batch mean. logits [B, C], target [B] -> scalar."""
    _check(logits, target)
    return F.cross_entropy(logits, target)


def label_smoothing_loss(logits: Tensor, target: Tensor, smoothing: float = 0.1) -> Tensor:
    """CE against the smoothed label (1 - smoothing) * onehot + smoothing / C (Szegedy et al.).

    logits [B, C], target [B] -> scalar. smoothing=0 is plain CE.
    """
    _check(logits, target)
    return F.cross_entropy(logits, target, label_smoothing=float(smoothing))


def kd_loss(logits_s: Tensor, logits_t: Tensor, target: Tensor, temperature: float = 4.0, alpha: float = 0.9) -> Tensor:
    """Hinton KD: (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(p_t^T || p_s^T), KL summed over classes, batch mean.

    p^T = softmax(z / T). logits_s, logits_t: [B, C] (teacher detached), target [B] -> scalar.
    """
    _check(logits_s, target)
    t = float(temperature)
    log_ps = F.log_softmax(logits_s / t, dim=1)
    log_pt = F.log_softmax(logits_t.detach() / t, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()
    return (1.0 - alpha) * F.cross_entropy(logits_s, target) + alpha * t * t * kl


def nkd_loss(
    logits_s: Tensor, logits_t: Tensor, target: Tensor, temperature: float = 1.0, gamma: float = 1.5
) -> Tensor:
    """Normalized KD (NKD, arXiv 2303.13005), with plain CE added as in the official trainer.

    L = CE(z_s, y) - mean_b(p^t_y * log p^s_y) - gamma * T^2 * mean_b(sum_{j != y} q^t_j * log q^s_j)
    p = softmax(z) over all C classes (T = 1); q = softmax(z_nt / T) over the C-1 NON-target logits z_nt (the
    target column is removed before the softmax: the fixed official code, not the pre-2023-10 bug that kept it).
    logits_s, logits_t: [B, C] (teacher detached), target [B] -> scalar. Needs C >= 2.
    """
    _check(logits_s, target)
    t = float(temperature)
    zt = logits_t.detach()
    y = target.view(-1, 1)
    log_ps = F.log_softmax(logits_s, dim=1)
    pt = F.softmax(zt, dim=1)
    loss_t = -(pt.gather(1, y) * log_ps.gather(1, y)).mean()
    log_qs = F.log_softmax(non_target(logits_s, target) / t, dim=1)
    qt = F.softmax(non_target(zt, target) / t, dim=1)
    loss_non = -gamma * t * t * (qt * log_qs).sum(dim=1).mean()
    return F.cross_entropy(logits_s, target) + loss_t + loss_non


def uskd_non_target_label(logits: Tensor, weak_logits: Tensor, target: Tensor, official_rank: bool = False) -> Tensor:
    """USKD's Zipf soft label over the C-1 non-target classes (detached). [B, C], [B, C], [B] -> [B, C-1].

    Default (the paper's formula, as the lead's brief asks): score_j = w_j / (1 - w_y) + s_j / (1 - s_y) for
    the non-target j only, with s = softmax(logits), w = softmax(weak_logits); rank 1..C-1 descending (exact
    ties broken by class index), weight 1/rank, renormalized to sum 1.
    official_rank=True reproduces the official code (yzd-v/cls_KD uskd.py) exactly: it uses log_softmax(logits)
    in place of s in the score (the variable is overwritten before the ranking), ranks all C classes
    including the target, takes 1/rank, drops the target column and renormalizes.
    """
    b, c = logits.shape
    y = target.view(-1, 1)
    with torch.no_grad():
        w = F.softmax(weak_logits.detach(), dim=1)
        w_y = w.gather(1, y)
        if official_rank:
            log_s = F.log_softmax(logits.detach(), dim=1)
            score = w / (1 - w_y + 1e-6) + log_s / (1 - log_s.gather(1, y) + 1e-6)
        else:
            s = F.softmax(logits.detach(), dim=1)
            s_y = s.gather(1, y)
            score = non_target(w, target) / (1 - w_y + 1e-6) + non_target(s, target) / (1 - s_y + 1e-6)
        n = score.shape[1]
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        ranks = torch.arange(1, n + 1, device=logits.device, dtype=logits.dtype).expand(b, n)
        rank = torch.empty_like(score).scatter_(1, order, ranks)
        z = 1.0 / rank
        if official_rank:
            z = non_target(z, target)
        return z / z.sum(dim=1, keepdim=True)


def uskd_loss(
    logits: Tensor,
    weak_logits: Tensor,
    target: Tensor,
    alpha: float = 0.1,
    beta: float = 0.1,
    mu: float = 0.1,
    official_rank: bool = False,
) -> Tensor:
    """Teacher-free USKD (arXiv 2303.13005). Defaults = the official CIFAR-100 config (alpha=beta=mu=0.1).

    logits [B, C]: the model's output; weak_logits [B, C]: a weak linear head (trained by this loss) applied to
    intermediate features -- global-average-pooled output of uskd_feature_layer(model) for a CNN ([B, K]),
    or that layer's output itself for an MLP. target [B] -> scalar.
      s = softmax(logits), w = softmax(weak_logits)
      p_t = s_y^2 + 1 - mean_b(s_y^2)  (detached);        L_t = -mean_b(p_t * log s_y)
      L_w = mu * CE(weak_logits, 0.9 * onehot + 0.1 / C)   (soft-label CE; the only loss on the weak head)
      L_non = soft-label CE(uskd_non_target_label(...), softmax over the C-1 non-target logits)
      total = CE(logits, y) + alpha * L_t + beta * L_non + L_w
    """
    _check(logits, target)
    if weak_logits.shape != logits.shape:
        raise ValueError(f"weak_logits must match logits {tuple(logits.shape)}, got {tuple(weak_logits.shape)}")
    b, c = logits.shape
    y = target.view(-1, 1)
    log_s = F.log_softmax(logits, dim=1)
    log_s_y = log_s.gather(1, y)
    with torch.no_grad():
        s_y2 = log_s_y.exp() ** 2
        p_t = s_y2 + 1.0 - s_y2.mean()
    loss_t = -(p_t * log_s_y).mean()

    soft = torch.full_like(logits, 0.1 / c).scatter_add_(1, y, torch.full_like(log_s_y, 0.9))
    loss_w = mu * _soft_ce(F.log_softmax(weak_logits, dim=1), soft.detach())

    z = uskd_non_target_label(logits, weak_logits, target, official_rank=official_rank)
    loss_non = _soft_ce(F.log_softmax(non_target(logits, target), dim=1), z)
    return F.cross_entropy(logits, target) + alpha * loss_t + beta * loss_non + loss_w


def zipf_votes(dense_logits: Tensor) -> Tensor:
    """Per-class vote counts: argmax over C at every location.

    [B, C, *spatial] -> float [B, C] (rows sum to #locations)."""
    b, c = dense_logits.shape[:2]
    am = dense_logits.detach().reshape(b, c, -1).argmax(dim=1)  # [B, L]
    return torch.zeros(b, c, device=dense_logits.device, dtype=torch.float32).scatter_add_(
        1, am, torch.ones_like(am, dtype=torch.float32)
    )


def zipf_soft_label(dense_logits: Tensor, target: Tensor, power: float = 1.0) -> Tensor:
    """Zipf's soft label over the non-target classes, as in the official code (jiajunliang/Zipfs-LS). Detached.

    dense_logits [B, C, H, W] (or any [B, C, *spatial]): scores = per-class votes (zipf_votes);
    dense_logits [B, C]: scores = those logits themselves (the MLP variant: pass the model's own logits).
    All C classes (target included) are ranked descending by score with competition ranking (ties share the
    lowest rank of their group, e.g. votes [5,3,3,0,0] -> ranks [1,2,2,4,4]; all zero-vote classes share the next
    free rank); z = rank^-power; the target column is dropped and z renormalized to sum 1. -> [B, C-1].
    """
    scores = zipf_votes(dense_logits) if dense_logits.dim() > 2 else dense_logits.detach()
    if scores.shape[0] != target.shape[0]:
        raise ValueError(f"dense_logits batch {scores.shape[0]} != target batch {target.shape[0]}")
    rank = competition_rank(scores).to(torch.float64)
    z = non_target(rank.pow(-float(power)), target)
    return (z / z.sum(dim=1, keepdim=True)).detach()


def zipf_loss(logits: Tensor, dense_logits: Tensor, target: Tensor, lam: float = 0.1, power: float = 1.0) -> Tensor:
    """Zipf's label smoothing (arXiv 2207.12980): CE(logits, y) + lam * KL(z || softmax(non-target logits)).

    logits [B, C]; dense_logits [B, C, H, W] (classifier at every location, see dense_logits_from_head) or
    [B, C] (ranked directly; pass the model's own logits for MLPs); target [B] -> scalar. z = zipf_soft_label.
    KL summed over the C-1 non-target classes, batch mean (the official loss_mask option is not implemented).
    """
    _check(logits, target)
    z = zipf_soft_label(dense_logits, target, power).to(logits.dtype)
    log_q = F.log_softmax(non_target(logits, target), dim=1)
    kl = (z * (z.log() - log_q)).sum(dim=1).mean()
    return F.cross_entropy(logits, target) + lam * kl


# ----------------------------------------------------------------------------------------------- dense logits
def _fast_flatten_linear(head: Callable[[Tensor], Tensor], shape: tuple[int, int, int]):
    """(linear, rest) if head is Sequential(Flatten, Linear(K*H*W, O), *rest), else None."""
    if (
        isinstance(head, nn.Sequential)
        and len(head) >= 2
        and isinstance(head[0], nn.Flatten)
        and isinstance(head[1], nn.Linear)
        and head[1].in_features == shape[0] * shape[1] * shape[2]
    ):
        return head[1], head[2:]
    return None


def dense_logits_from_head(
    features: Tensor, head: Callable[[Tensor], Tensor], upsample_small: bool = True, max_chunk_elems: int = 1 << 24
) -> Tensor:
    """Per-location logits of a Flatten->Linear->... head, for Zipf's votes. Computed without autograd.

    features [B, K, H, W] (last feature map); head maps a tensor shaped like features to logits [B, C].
    Location (h, w) gets head(features * onehot(h, w)) (every other location zeroed) -> [B, C, H, W].
    Small maps (max(H, W) <= 4, never the case for the zoo on 28x28 / 32x32 inputs) with upsample_small: the
    features are upsampled x2 (nearest), each of the 2H*2W locations is masked at that resolution and the map
    average-pooled back to H x W before the head -> [B, C, 2H, 2W]. For this head that equals evaluating
    features / 4 at the coarse location (h // 2, w // 2), so each 2x2 block repeats one vote: the Zipf paper's
    upsampling only adds information for heads applied per location (GAP + Linear), not for Flatten heads.
    Fast path: if head is Sequential(Flatten, Linear, *rest), the first Linear is applied per location with one
    einsum (its input is linear in the masked features), costing about one forward; otherwise the masked copies
    are batched through head in chunks of at most max_chunk_elems input elements.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be [B, K, H, W], got {tuple(features.shape)}")
    b, k, h, w = features.shape
    up = upsample_small and max(h, w) <= 4
    f = 2 if up else 1
    hu, wu = h * f, w * f
    with torch.no_grad():
        fast = _fast_flatten_linear(head, (k, h, w))
        if fast is not None:
            lin, rest = fast
            wt = lin.weight.reshape(lin.out_features, k, h, w)
            pre = torch.einsum("okhw,bkhw->bhwo", wt, features) / (f * f)  # per-location contribution
            if lin.bias is not None:
                pre = pre + lin.bias
            if up:
                pre = pre.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
            out = rest(pre.reshape(b * hu * wu, -1))
            return out.reshape(b, hu, wu, -1).permute(0, 3, 1, 2).contiguous()

        x = F.interpolate(features, scale_factor=2, mode="nearest") if up else features
        n_loc = hu * wu
        masks = torch.eye(n_loc, device=x.device, dtype=x.dtype).reshape(n_loc, 1, hu, wu)
        chunk = max(1, max_chunk_elems // max(1, b * x[0].numel()))
        outs = []
        for i in range(0, n_loc, chunk):
            m = masks[i : i + chunk]  # [l, 1, hu, wu]
            masked = (x[:, None] * m[None]).reshape(-1, k, hu, wu)  # [B*l, K, hu, wu]
            if up:
                masked = F.avg_pool2d(masked, 2)
            outs.append(head(masked).reshape(b, m.shape[0], -1))
        out = torch.cat(outs, dim=1)  # [B, L, C]
        return out.permute(0, 2, 1).reshape(b, -1, hu, wu).contiguous()


# ----------------------------------------------------------------------------------------------- feature taps
def _is_resnet_like(model: nn.Module) -> bool:
    return all(
        hasattr(model, a) for a in ("norm", "conv1", "relu1", "block1", "block2", "flatten", "fc1", "relu_fc", "fc2")
    )


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def split_at_flatten(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(features, head) sharing the model's modules: head(features(x)) == model(x).

    nn.Sequential CNN (cnn-b, convbig): features = layers before the single Flatten (ending with the last conv's
    ReLU / GraftedReLU) -> [B, K, H, W]; head = Flatten and everything after -> [B, C].
    resnet-4b: features = norm, conv1, relu1, block1, block2; head = flatten, fc1, relu_fc, fc2.
    MLPs (no conv feature map) and other models raise UsageError.
    """
    if _is_resnet_like(model):
        return (
            nn.Sequential(model.norm, model.conv1, model.relu1, model.block1, model.block2),
            nn.Sequential(model.flatten, model.fc1, model.relu_fc, model.fc2),
        )
    if not isinstance(model, nn.Sequential):
        raise UsageError(
            f"cannot split {_model_name(model)} into features and head; use an nn.Sequential zoo "
            "model (cnn-b, convbig) or resnet-4b"
        )
    flat = [i for i, m in enumerate(model) if isinstance(m, nn.Flatten)]
    if len(flat) != 1:
        raise UsageError(f"cannot split the model at Flatten: it has {len(flat)} Flatten layers, need exactly 1")
    i = flat[0]
    has_conv = any(isinstance(m, nn.Conv2d) for m in model[:i])
    if not has_conv or not isinstance(model[i - 1], _ACTIVATIONS):
        raise UsageError(
            "the model has no conv feature map before Flatten (an MLP?); zipf on MLPs ranks the "
            "model's own logits: pass them as dense_logits instead of a feature map"
        )
    return model[:i], model[i:]


def uskd_feature_layer(model: nn.Module) -> nn.Module:
    """The activation module whose output feeds USKD's weak linear head (register a forward hook on it).

    CNN (Sequential with convs before Flatten): the ReLU after the second-to-last conv (output [B, K, H, W];
    the caller global-average-pools it to [B, K]). resnet-4b: block1's output ReLU (block1.relu2).
    MLP: the ReLU after the first hidden Linear (output [B, hidden], used as is).
    Raises UsageError for models with one conv, no hidden layer, or an unknown structure.
    """
    if _is_resnet_like(model):
        return model.block1.relu2
    if not isinstance(model, nn.Sequential):
        raise UsageError(
            f"cannot find USKD's intermediate layer in {_model_name(model)}; use an nn.Sequential "
            "zoo model or resnet-4b"
        )
    layers = list(model)

    def act_after(i: int) -> nn.Module | None:
        for m in layers[i + 1 :]:
            if isinstance(m, _ACTIVATIONS):
                return m
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Flatten)):
                return None
        return None

    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    if convs:
        if len(convs) < 2:
            raise UsageError("USKD needs an intermediate conv block: the model has only one conv layer")
        act = act_after(convs[-2])
    else:
        linears = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
        act = act_after(linears[0]) if len(linears) >= 2 else None
    if act is None:
        raise UsageError("USKD needs a ReLU after an intermediate conv / hidden linear layer; this model has none")
    return act


# ----------------------------------------------------------------------------------------------- registry
LOSSES: dict[str, Callable[..., Tensor]] = {
    "ce": ce_loss,
    "ls": label_smoothing_loss,
    "kd": kd_loss,
    "nkd": nkd_loss,
    "uskd": uskd_loss,
    "zipf": zipf_loss,
}
_TEACHER = {"kd", "nkd"}
_FEATURES = {"uskd": "weak", "zipf": "dense"}


def get_loss(name: str) -> Callable[..., Tensor]:
    """The loss function registered as name (one of LOSSES)."""
    if name not in LOSSES:
        raise UsageError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name]


def needs_teacher(name: str) -> bool:
    """True if the loss takes teacher logits (kd, nkd): loss(logits_s, logits_t, target, ...)."""
    get_loss(name)
    return name in _TEACHER


def needs_features(name: str) -> str | None:
    """'weak' (uskd: loss(logits, weak_logits, target)), 'dense' (zipf: loss(logits, dense_logits, target)) or None."""
    get_loss(name)
    return _FEATURES.get(name)
