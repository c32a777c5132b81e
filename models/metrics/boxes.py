"""The weakly-supervised localisation family of seed 001 (eqs 1.16-1.22): OM, LE, F1, BoxAcc, SM (2D).

Notation (seed 001 §1.3.3): S the saliency map of the ground-truth class c, B_p the bounding box of the
largest connected component (8-connectivity, as OpenCV contours) of ``1[S > mean(S)]``, 𝔅 the class's
ground-truth boxes (``[y0, x0, y1, x1]``, exclusive ends), U their union, c_p the predicted class.

* OM ↓ (1.16) ``1 - max_B IoU(B, B_p) 1[c_p = c]``; LE ↓ (1.17) ``1 - max_B IoU(B, B_p)``;
* F1 ↑ ``2PR/(P + R)`` with P = ``sum_U S / sum S`` (1.18) and R = ``sum_U S / |U|`` (1.19);
* BoxAcc ↑ (1.20): ``max_B 1[IoU(B_p^eta, B) >= delta]`` with ``B_p^eta`` the box of the largest component of
  ``1[S > eta]``; averaged over images, the maximum over the eta grid, then the mean over delta
  (defaults eta = 0, 0.05, ..., 0.95 and delta = {0.3, 0.5, 0.7}; not in the seed, spec §6.16);
* SM ↓ (1.22, unbounded, not ×100): ``log max(0.05, |B_p| / (hw)) - log p_c``.

OM, LE, F1 and BoxAcc are reported ×100. IoU is over pixel sets; an empty B_p has IoU 0 and size 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from .localization import mask_bbox  # noqa: F401  (re-exported: box metrics' public helper)
from .peritem import PerItemMetric, gt_boxes, gt_region

__all__ = ["connected_components", "largest_component_box", "mask_bbox", "box_iou_max", "localization_terms",
           "OfficialMetric", "LocalizationError", "PixelF1", "BoxAccuracy", "SaliencyMetric"]


def connected_components(mask: Tensor, connectivity: int = 8) -> Tensor:
    """Component labels ``(N, H, W)`` long (0 = background; a component's label = 1 + its largest raster
    index), by iterated max-propagation inside the mask (batched, pure torch)."""
    if mask.dim() != 3:
        raise ValueError(f"connected_components expects (N, H, W) masks, got {tuple(mask.shape)}.")
    N, H, W = mask.shape
    m = mask.bool()
    lab = torch.where(m, torch.arange(1, H * W + 1, device=mask.device).view(1, H, W).expand(N, H, W),
                      torch.zeros((), dtype=torch.long, device=mask.device)).float()
    mf = m.float()
    for _ in range(H * W):
        if connectivity == 8:
            new = F.max_pool2d(lab.unsqueeze(1), 3, 1, 1).squeeze(1)
        else:
            p = F.pad(lab, (1, 1, 1, 1))
            new = torch.stack([lab, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0)
        new = new * mf
        if torch.equal(new, lab):
            break
        lab = new
    return lab.long()


def largest_component_box(mask: Tensor):
    """``(boxes (N, 4), non-empty (N,))``: box of the largest 8-connected component (ties: the component that
    reaches furthest in raster order)."""
    lab = connected_components(mask)
    N, H, W = lab.shape
    counts = torch.zeros(N, H * W + 1, device=mask.device, dtype=torch.long)
    counts.scatter_add_(1, lab.view(N, -1), torch.ones_like(lab.view(N, -1)))
    counts[:, 0] = 0
    best = counts.flip(1).argmax(1)  # ties -> highest label
    best = H * W - best
    return mask_bbox(lab == best.view(N, 1, 1))


def box_iou_max(pred: Tensor, gt: Tensor, valid: Tensor) -> Tensor:
    """``max_B IoU(B, pred)`` over the valid GT boxes ``gt`` (N, M, 4); pixel-set IoU, exclusive ends."""
    p = pred.unsqueeze(1)
    ih = (torch.minimum(p[..., 2], gt[..., 2]) - torch.maximum(p[..., 0], gt[..., 0])).clamp_min(0)
    iw = (torch.minimum(p[..., 3], gt[..., 3]) - torch.maximum(p[..., 1], gt[..., 1])).clamp_min(0)
    inter = ih * iw
    area = lambda b: (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)  # noqa: E731
    union = area(p) + area(gt) - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))
    iou = torch.where(valid, iou, torch.full_like(iou, -1.0))
    return iou.amax(1).clamp_min(0)


def localization_terms(maps: Tensor, gt_box: Tensor, gt_valid: Tensor, gt_mask: Tensor, pred_cls: Tensor,
                       targets: Tensor, p_c: Tensor) -> dict:
    """Per-item OM, LE, F1, SM (fractions; NaN where the class has no ground truth)."""
    N = maps.shape[0]
    s = maps.double()
    binm = s > s.flatten(1).mean(1).view(N, 1, 1)
    box, _ = largest_component_box(binm)
    iou = box_iou_max(box, gt_box.to(box.device).float(), gt_valid.to(box.device))
    has = gt_valid.any(1)
    nan = torch.full((N,), float("nan"), dtype=torch.float64, device=maps.device)
    iou = iou.double()
    om = torch.where(has, 1 - iou * (pred_cls.view(-1) == targets.view(-1)).double(), nan)
    le = torch.where(has, 1 - iou, nan)
    flat, u = s.flatten(1), gt_mask.flatten(1).to(s.device).double()
    inside, total, nu = (flat * u).sum(1), flat.sum(1), u.sum(1)
    P = torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total))
    R = inside / nu.clamp_min(1)
    f1 = torch.where(P + R > 0, 2 * P * R / (P + R).clamp_min(1e-300), torch.zeros_like(P))
    f1 = torch.where(nu > 0, f1, nan)
    size = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    hw = maps[0].numel()
    sm = torch.log((size.double() / hw).clamp_min(0.05)) - torch.log(p_c.double().clamp_min(1e-300))
    return dict(om=om, le=le, f1=f1, sm=sm)


class _LocMetric(PerItemMetric):
    key = "om"
    scale = 100.0

    def update(self, maps: Tensor, gt_box: Tensor, gt_valid: Tensor, gt_mask: Tensor, pred_cls: Tensor,
               targets: Tensor, p_c: Tensor) -> None:
        if maps.dim() != 3:
            raise ValueError("the localisation family is 2D: maps must be (N, H, W).")
        self._add(localization_terms(maps, gt_box, gt_valid, gt_mask, pred_cls, targets, p_c)[self.key])

    def update_from_context(self, ctx: dict) -> None:
        boxes = gt_boxes(ctx)
        mask = gt_region(ctx)
        if boxes is None or mask is None:
            raise ValueError(f"{type(self).__name__} needs ground-truth boxes or masks in the batches.")
        p_c = ctx["logits"].float().softmax(1).gather(1, ctx["targets"].view(-1, 1)).squeeze(1)
        self.update(ctx["maps"], boxes[0], boxes[1], mask, ctx["logits"].argmax(1), ctx["targets"], p_c)


class OfficialMetric(_LocMetric):
    """OM ↓ (seed 001 eq 1.16), ×100."""

    higher_is_better = False
    key = "om"


class LocalizationError(_LocMetric):
    """LE ↓ (seed 001 eq 1.17), ×100."""

    higher_is_better = False
    key = "le"


class PixelF1(_LocMetric):
    """Pixel-wise F1 ↑ of saliency mass vs the GT union (seed 001 eqs 1.18-1.19), ×100."""

    higher_is_better = True
    key = "f1"


class SaliencyMetric(_LocMetric):
    """SM ↓ (seed 001 eq 1.22), unbounded, not scaled."""

    higher_is_better = False
    key = "sm"
    scale = 1.0


class BoxAccuracy(PerItemMetric):
    """BoxAcc ↑ (seed 001 eq 1.20), ×100: mean over images, max over ``etas``, mean over ``deltas``.

    Keeps the per-image hits ``(N, n_eta, n_delta)``; :meth:`per_item` gives each image's hit at the best eta
    of each delta, averaged over delta (their mean is the metric).
    """

    higher_is_better = True
    scale = 100.0

    def __init__(self, etas: Sequence[float] = tuple(i / 20 for i in range(20)),
                 deltas: Sequence[float] = (0.3, 0.5, 0.7), **kwargs) -> None:
        super().__init__(**kwargs)
        self.etas, self.deltas = tuple(float(e) for e in etas), tuple(float(d) for d in deltas)
        self.add_state("hits", default=[], dist_reduce_fx="cat")

    def update(self, maps: Tensor, gt_box: Tensor, gt_valid: Tensor) -> None:
        N, H, W = maps.shape
        E = len(self.etas)
        etas = torch.tensor(self.etas, device=maps.device, dtype=maps.dtype)
        binm = maps.unsqueeze(1) > etas.view(1, E, 1, 1)  # (N, E, H, W)
        box, _ = largest_component_box(binm.reshape(N * E, H, W))
        iou = box_iou_max(box, gt_box.to(box.device).float().repeat_interleave(E, 0),
                          gt_valid.to(box.device).repeat_interleave(E, 0)).view(N, E)
        hits = (iou.unsqueeze(-1) >= torch.tensor(self.deltas, device=iou.device).view(1, 1, -1)).double()
        has = gt_valid.any(1).to(hits.device)
        hits = torch.where(has.view(N, 1, 1), hits, torch.full_like(hits, float("nan")))
        self.hits.append(hits.to(self.device))

    def update_from_context(self, ctx: dict) -> None:
        boxes = gt_boxes(ctx)
        if boxes is None:
            raise ValueError("BoxAccuracy needs ground-truth boxes or masks in the batches.")
        self.update(ctx["maps"], boxes[0], boxes[1])

    def _hits(self) -> Tensor:
        if isinstance(self.hits, list) and not self.hits:
            return torch.zeros(0, len(self.etas), len(self.deltas), dtype=torch.float64)
        h = dim_zero_cat(self.hits)
        return h[~torch.isnan(h[:, 0, 0])]

    def curve(self) -> Tensor:
        """Mean hit rate ``(n_eta, n_delta)``."""
        h = self._hits()
        return h.mean(0) if h.shape[0] else torch.full(h.shape[1:], float("nan"), dtype=torch.float64)

    def per_item(self) -> Tensor:
        h = self._hits()
        if h.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float64)
        best = h.mean(0).argmax(0)  # (n_delta,)
        return h[:, best, torch.arange(h.shape[2])].mean(1)

    def compute(self) -> Tensor:
        h = self._hits()
        if h.shape[0] == 0:
            return torch.tensor(float("nan"))
        return (100.0 * h.mean(0).amax(0).mean()).float()
