"""Seed metrics on saliency regions: region insertion, map density (seed 004), confidence drop (seed 002),
ADCC (seed 001). Every metric keeps its per-item values (:class:`~models.metrics.peritem.PerItemMetric`).

* **Region insertion** ↑ (seed 004; spec seed004_ucag_rsp §5.5): for k = 1..20, ``x^(k)`` = baseline with the
  top ``round(k P / 100)`` pixels of S copied from x (all channels of a pixel together, stable ranking);
  ``acc_k = 1[argmax f(x^(k)) = t]``; ``AUC = sum_{k=1}^{19} (acc_k + acc_{k+1}) / 2`` (max 19). Baseline:
  normalised-space 0, i.e. the model's normalisation mean in pixel space (``model.backbone.mean``; 0 for a
  model without one).
* **Map density** (spec §5.4, provisional): U = the class's ground-truth region,
  ``D+ = (sum_U S/|U|) / (sum S/|Ω|)`` ↑ and ``D- = (sum_{Ω\\U} S/|Ω\\U|) / (sum S/|Ω|)`` ↓, over items with
  ``0 < |U| < |Ω|`` and ``sum S > 0``; per item ``f D+ + (1 - f) D- = 1`` with ``f = |U|/|Ω|``.
* **Confidence drop** ↑ (seed 002 eqs 5.3-5.4): ``x^p = x (1 - S) + mu S``, ``CD = 100/N sum (s(x) - s(x^p))/s(x)``;
  ``mu`` = ``mean`` (a number or per-channel values; default: the mean intensity of the images in the
  update, an estimate of the dataset mean; pass the dataset mean for the thesis's protocol).
* **ADCC** ↑ (seed 001 eqs 1.12-1.14 with spec §4's corrections): ``Coherency = (rho + 1)/2`` with rho the
  Pearson correlation of ``E(x ⊙ S)`` and ``S = E(x)``; ``Complexity = ||S||_1 / |Ω|``;
  ``AD_i = [p - o]+/p`` with ``o = s(x ⊙ S)``; ``ADCC = 3 / (1/Coh + 1/(1 - Compl) + 1/(1 - AD_i))`` (0 when a
  term is 0), ×100. A constant map has rho := 0.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torchmetrics.utilities import dim_zero_cat

from .faithfulness import _score, check_saliency, class_scores, masked_images, saliency_ranks
from .peritem import PerItemMetric, gt_region

__all__ = ["region_insertion_accuracy", "region_insertion_auc", "normalized_zero", "map_density",
           "perturbed_with_mean", "pearson_per_item", "adcc_terms", "RegionInsertion", "PositiveDensity",
           "NegativeDensity", "ConfidenceDrop", "ADCC"]


# ---------------------------------------------------------------------------------------------- region insertion
def normalized_zero(model: nn.Module, images: Tensor) -> Tensor:
    """The pixel-space image that the model's input normalisation maps to 0 (its mean colour)."""
    mean = getattr(getattr(model, "backbone", None), "mean", None)
    if mean is None:
        return torch.zeros_like(images)
    mean = mean.to(images.device, images.dtype).reshape(1, -1, *([1] * (images.dim() - 2)))
    if mean.shape[1] not in (1, images.shape[1]):
        raise ValueError(f"the model normalises {mean.shape[1]} channels but the images have {images.shape[1]}.")
    return mean.expand_as(images).clone()


@torch.no_grad()
def region_insertion_accuracy(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
                              percents: Sequence[int] = tuple(range(1, 21)),
                              baseline: Union[str, float, Callable, None] = None, max_batch: int = 64) -> Tensor:
    """``(N, len(percents))`` top-1 correctness after inserting the top ``round(k P / 100)`` pixels of S into the
    baseline (default: normalised-space 0, :func:`normalized_zero`)."""
    maps = check_saliency(maps, images)
    N, C = images.shape[:2]
    spatial = tuple(images.shape[2:])
    P = images[0, 0].numel()
    if baseline is None:
        base = normalized_zero(model, images)
    elif callable(baseline):
        base = baseline(images)
    elif isinstance(baseline, (int, float)):
        base = torch.full_like(images, float(baseline))
    else:
        raise ValueError(f"baseline must be None (normalised-space 0), a number or a callable, got {baseline!r}.")
    counts = torch.tensor([int(round(k * P / 100.0)) for k in percents], device=images.device)
    ranks = saliency_ranks(maps)  # (N, P)
    src, start = images.flatten(2), base.flatten(2)
    t = targets.to(images.device).long().view(-1)
    out = torch.empty(N, len(counts), device=images.device)
    T, chunk = len(counts), max(1, int(max_batch))
    for b0 in range(0, N, chunk):  # several steps of a chunk of images per forward call
        b1 = min(N, b0 + chunk)
        nb = b1 - b0
        step = max(1, int(max_batch) // nb)
        for k0 in range(0, T, step):
            k1 = min(T, k0 + step)
            m = ranks[b0:b1].unsqueeze(0) < counts[k0:k1].view(-1, 1, 1)  # (k, nb, P)
            x = torch.where(m.unsqueeze(2), src[b0:b1].unsqueeze(0), start[b0:b1].unsqueeze(0))
            pred = model(x.reshape((k1 - k0) * nb, C, *spatial)).argmax(1).view(k1 - k0, nb)
            out[b0:b1, k0:k1] = (pred == t[b0:b1].view(1, -1)).float().t()
    return out


def region_insertion_auc(acc: Tensor) -> Tensor:
    """``sum_{k=1}^{n-1} (acc_k + acc_{k+1}) / 2`` per row (unit spacing per percent step)."""
    return (acc[:, :-1] + acc[:, 1:]).sum(1) / 2


class RegionInsertion(PerItemMetric):
    """Region-insertion AUC ↑ (seed 004): accuracy when only the top 1 %..20 % pixels are shown (max 19)."""

    higher_is_better = True

    def __init__(self, percents: Sequence[int] = tuple(range(1, 21)), baseline=None, max_batch: int = 64,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if len(percents) < 2:
            raise ValueError("region insertion needs at least two percentages.")
        self.percents, self.baseline, self.max_batch = tuple(int(p) for p in percents), baseline, int(max_batch)
        self.add_state("acc_sum", default=torch.zeros(len(self.percents), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor) -> Tensor:
        acc = region_insertion_accuracy(model, images, maps, targets, self.percents, self.baseline, self.max_batch)
        self._add(region_insertion_auc(acc))
        self.acc_sum += acc.double().sum(0).to(self.acc_sum.device)
        self.n += acc.shape[0]
        return acc

    def update_from_context(self, ctx: dict) -> None:
        self.update(ctx["model"], ctx["images"], ctx["maps"], ctx["targets"])

    def mean_curve(self) -> Tensor:
        """Mean accuracy at each percentage."""
        return (self.acc_sum / self.n.clamp_min(1)).float()


# ---------------------------------------------------------------------------------------------- density
def map_density(maps: Tensor, gt: Tensor):
    """``(D+, D-)`` per item (NaN where ``|U|`` is 0 or everything, or the map is all zero)."""
    s = maps.flatten(1).double()
    u = gt.flatten(1).to(s.device).bool()
    P = s.shape[1]
    nu = u.sum(1).double()
    total = s.sum(1)
    mean_all = total / P
    inside = (s * u).sum(1)
    dpos = (inside / nu.clamp_min(1)) / mean_all.clamp_min(1e-300)
    dneg = ((total - inside) / (P - nu).clamp_min(1)) / mean_all.clamp_min(1e-300)
    valid = (nu > 0) & (nu < P) & (total > 0)
    nan = torch.full_like(dpos, float("nan"))
    return torch.where(valid, dpos, nan), torch.where(valid, dneg, nan)


class _Density(PerItemMetric):
    which = 0

    def update(self, maps: Tensor, gt: Tensor) -> None:
        if maps.shape != gt.shape:
            raise ValueError(f"maps {tuple(maps.shape)} and ground-truth regions {tuple(gt.shape)} must match.")
        self._add(map_density(maps, gt)[self.which])

    def update_from_context(self, ctx: dict) -> None:
        gt = gt_region(ctx)
        if gt is None:
            raise ValueError("map density needs ground truth ('mask' or 'boxes' in the batches).")
        self.update(ctx["maps"], gt)


class PositiveDensity(_Density):
    """``D+`` ↑: mean saliency inside the GT region over the mean saliency of the image (spec §5.4)."""

    higher_is_better = True
    which = 0


class NegativeDensity(_Density):
    """``D-`` ↓: mean saliency outside the GT region over the mean saliency of the image (spec §5.4)."""

    higher_is_better = False
    which = 1


# ---------------------------------------------------------------------------------------------- confidence drop
def perturbed_with_mean(images: Tensor, maps: Tensor, mean=None) -> Tensor:
    """``x (1 - S) + mu S`` (seed 002 eq 5.3); ``mean`` None = the mean intensity of ``images``."""
    if mean is None:
        mu = images.mean()
    else:
        mu = torch.as_tensor(mean, dtype=images.dtype, device=images.device)
        if mu.numel() > 1:
            mu = mu.view(1, -1, *([1] * (images.dim() - 2)))
    s = maps.unsqueeze(1).to(images.dtype)
    return images * (1 - s) + mu * s


class ConfidenceDrop(PerItemMetric):
    """Confidence drop ↑ (seed 002 eq 5.4), ×100: relative score drop when the salient pixels become ``mu``."""

    higher_is_better = True
    scale = 100.0

    def __init__(self, mean=None, score: str = "softmax", **kwargs) -> None:
        super().__init__(**kwargs)
        self.mean, self.score = mean, score

    @torch.no_grad()
    def update(self, model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
               p: Optional[Tensor] = None) -> None:
        maps = check_saliency(maps, images)
        if p is None:
            p = class_scores(model, images, targets, self.score)
        q = class_scores(model, perturbed_with_mean(images, maps, self.mean), targets, self.score)
        p = p.double()
        self._add(torch.where(p != 0, (p - q.double()) / p, torch.zeros_like(p)))

    def update_from_context(self, ctx: dict) -> None:
        self.score = ctx.get("score", self.score)
        self.update(ctx["model"], ctx["images"], ctx["maps"], ctx["targets"], ctx.get("p"))


# ---------------------------------------------------------------------------------------------- ADCC
def pearson_per_item(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each pair of flattened maps; 0 when either is constant."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))


def adcc_terms(p: Tensor, o: Tensor, maps: Tensor, maps_masked: Tensor):
    """Per item ``(adcc, coherency, complexity, average drop)`` (seed 001 eqs 1.12-1.14, spec §4)."""
    p, o = p.double(), o.double()
    coh = (pearson_per_item(maps_masked, maps) + 1) / 2
    compl = maps.flatten(1).double().abs().mean(1)
    ad = torch.where(p > 0, (p - o).clamp_min(0) / p.clamp_min(1e-300), torch.zeros_like(p))
    terms = torch.stack([coh, 1 - compl, 1 - ad], 1)
    ok = (terms > 0).all(1)
    adcc = torch.where(ok, 3 / (1 / terms.clamp_min(1e-300)).sum(1), torch.zeros_like(p))
    return adcc, coh, compl, ad


class ADCC(PerItemMetric):
    """ADCC ↑ (seed 001 eq 1.14 corrected), ×100; ``components()`` gives mean coherency, complexity and AD.

    ``update(model, explainer, images, maps, targets)``: the explainer is run once more on ``x ⊙ S``.
    """

    higher_is_better = True
    scale = 100.0

    def __init__(self, score: str = "softmax", **kwargs) -> None:
        super().__init__(**kwargs)
        self.score = score
        self.add_state("coherency", default=[], dist_reduce_fx="cat")
        self.add_state("complexity", default=[], dist_reduce_fx="cat")
        self.add_state("drop", default=[], dist_reduce_fx="cat")

    def update(self, model: nn.Module, explainer: Callable, images: Tensor, maps: Tensor, targets: Tensor,
               p: Optional[Tensor] = None) -> None:
        maps = check_saliency(maps, images)
        xm = masked_images(images, maps)
        with torch.no_grad():
            if p is None:
                p = class_scores(model, images, targets, self.score)
            o = _score(model(xm), targets, self.score)
        with torch.enable_grad():
            maps2 = check_saliency(explainer(xm, targets).detach(), images, "explanation of x * S")
        adcc, coh, compl, ad = adcc_terms(p, o, maps, maps2)
        self._add(adcc)
        self.coherency.append(coh.to(self.device))
        self.complexity.append(compl.to(self.device))
        self.drop.append(ad.to(self.device))

    def update_from_context(self, ctx: dict) -> None:
        self.score = ctx.get("score", self.score)
        self.update(ctx["model"], ctx["explainer"], ctx["images"], ctx["maps"], ctx["targets"], ctx.get("p"))

    def components(self) -> dict:
        """Mean coherency, complexity and average drop (×100)."""
        out = {}
        for k in ("coherency", "complexity", "drop"):
            v = getattr(self, k)
            v = dim_zero_cat(v) if not (isinstance(v, list) and not v) else torch.zeros(0)
            out[k] = float(100 * v.double().mean()) if v.numel() else float("nan")
        return out
