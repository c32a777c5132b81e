"""Localisation metrics of saliency maps against ground truth: pointing game, energy pointing game, IoU.

Spec ``explainers_and_metrics.md`` §4. Each item is a saliency map ``S`` (``(*spatial)``, 2D or 3D) and the
ground-truth region ``U`` of the explained class (union of its masks or boxes). Items whose ``U`` is
empty are not counted (``skipped`` state). All reported ×100.

* Pointing game ↑ (seed 001 eq. 1.21): hit if ``argmax_p S_p`` (first maximum in raster order) lies in
  ``U`` dilated by a ball of radius ``tolerance_px`` (default 0; the original protocol uses 15 px).
  ``average="micro"`` = hit rate over items (seed 001), ``"macro"`` = mean of per-class hit rates
  (seed 004, Zhang et al.).
* Energy pointing game ↑: ``Σ_{p∈U} S_p / Σ_p S_p`` (= pixel precision, eq. 1.18), mean over items; 0/0 := 0.
* Weakly-supervised segmentation IoU ↑ (seed 002 eq. 5.1): ``M = 1[S > μ(S) + σ(S)]`` (statistics of the
  saliency map, population std), ``IoU = |M ∩ U| / |M ∪ U|`` (standard IoU, spec §6.12); mIoU = mean
  per-item IoU. Other rules: ``"mean"`` (``S > μ(S)``, seed 004's Grad-CAM baseline) or a fixed float
  ``t`` (``S > t``).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["boxes_to_mask", "class_masks", "binarize_saliency", "pointing_hits", "energy_in_region", "mask_iou",
           "PointingGame", "EnergyPointingGame", "SaliencyIoU", "Runtime"]


# ---------------------------------------------------------------------------------------------- GT
def class_masks(mask: Tensor, targets: Tensor) -> Tensor:
    """Ground-truth region of class ``targets[i]`` from label masks (0 = background, ``c+1`` = class c)."""
    return mask.long() == (targets.to(mask.device).long().view((-1,) + (1,) * (mask.dim() - 1)) + 1)


def boxes_to_mask(boxes: Tensor, targets: Tensor, spatial) -> Tensor:
    """Union of the boxes of class ``targets[i]`` as a boolean mask ``(N, *spatial)``.

    ``boxes`` ``(N, M, 1 + 2d)``: ``[class, x0, y0, x1, y1]`` (2D) or ``[class, z0, y0, x0, z1, y1, x1]`` (3D),
    pixel ``i`` inside when ``lo <= i < hi`` (the benchmark stores ``hi = last + 1``); class -1 = padding.
    """
    spatial = tuple(int(s) for s in spatial)
    d = len(spatial)
    if boxes.dim() != 3 or boxes.shape[-1] != 1 + 2 * d:
        raise ValueError(f"boxes must be (N, M, {1 + 2 * d}) for {d}D data, got {tuple(boxes.shape)}.")
    lo, hi = boxes[..., 1:1 + d], boxes[..., 1 + d:]
    if d == 2:  # stored as x, y: reorder to the (H, W) axis order
        lo, hi = lo.flip(-1), hi.flip(-1)
    keep = boxes[..., 0].long() == targets.to(boxes.device).long().view(-1, 1)  # (N, M)
    inside = keep.view(keep.shape + (1,) * d)
    for ax, size in enumerate(spatial):
        idx = torch.arange(size, device=boxes.device, dtype=boxes.dtype)
        view = [1] * d
        view[ax] = size
        idx = idx.view(view)
        l = lo[..., ax].view(keep.shape + (1,) * d)
        h = hi[..., ax].view(keep.shape + (1,) * d)
        inside = inside & (idx >= l) & (idx < h)
    return inside.any(dim=1)


def mask_bbox(mask: Tensor):
    """Bounding boxes ``(N, 4)`` ``[y0, x0, y1, x1]`` (exclusive ends) of boolean masks and ``(N,)`` non-empty."""
    N, H, W = mask.shape
    m = mask.bool()
    rows, cols = m.any(2), m.any(1)
    ar_h = torch.arange(H, device=mask.device)
    ar_w = torch.arange(W, device=mask.device)
    big = torch.tensor(10 ** 9, device=mask.device)
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    ok = rows.any(1)
    box = torch.stack([y0, x0, y1, x1], 1).float()
    return torch.where(ok.view(-1, 1), box, torch.zeros_like(box)), ok


def _check_pair(maps: Tensor, gt: Tensor) -> None:
    if maps.shape != gt.shape:
        raise ValueError(f"saliency maps {tuple(maps.shape)} and ground-truth masks {tuple(gt.shape)} must both "
                         "be (N, *spatial) at the same resolution.")


# ---------------------------------------------------------------------------------------------- per item
def _ball(radius: int, d: int, device) -> Tensor:
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    grids = torch.meshgrid(*([r] * d), indexing="ij")
    return (sum(g ** 2 for g in grids) <= radius ** 2 + 1e-6).float()


def dilate(gt: Tensor, radius: int) -> Tensor:
    """Dilate boolean masks ``(N, *spatial)`` by a Euclidean ball of ``radius`` pixels."""
    if radius <= 0:
        return gt.bool()
    d = gt.dim() - 1
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    k = _ball(int(radius), d, gt.device)
    return conv(gt.float().unsqueeze(1), k[None, None], padding=int(radius)).squeeze(1) > 0.5


def pointing_hits(maps: Tensor, gt: Tensor, tolerance_px: int = 0) -> Tensor:
    """``(N,)`` bool: the map's maximum (first in raster order) lies in ``gt`` (dilated by ``tolerance_px``)."""
    _check_pair(maps, gt)
    idx = maps.flatten(1).argmax(dim=1, keepdim=True)
    return dilate(gt, tolerance_px).flatten(1).gather(1, idx).squeeze(1)


def energy_in_region(maps: Tensor, gt: Tensor) -> Tensor:
    """``(N,)``: share of the saliency mass inside ``gt`` (0 for an all-zero map)."""
    _check_pair(maps, gt)
    s = maps.flatten(1).double()
    inside = (s * gt.flatten(1)).sum(1)
    total = s.sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total))


def binarize_saliency(maps: Tensor, threshold: Union[str, float] = "mean_std") -> Tensor:
    """Binary masks from saliency maps: ``"mean_std"`` = ``S > μ + σ`` (seed 002 eq. 5.1, population σ),
    ``"mean"`` = ``S > μ``, a float ``t`` = ``S > t``."""
    flat = maps.flatten(1).double()
    if isinstance(threshold, str):
        mu = flat.mean(1, keepdim=True)
        if threshold == "mean_std":
            t = mu + flat.std(1, unbiased=False, keepdim=True)
        elif threshold == "mean":
            t = mu
        else:
            raise ValueError(f"threshold must be 'mean_std', 'mean' or a number in [0, 1], got {threshold!r}.")
    else:
        t = torch.full_like(flat[:, :1], float(threshold))
    return (flat > t).view_as(maps)


def mask_iou(pred: Tensor, gt: Tensor) -> Tensor:
    """``(N,)`` IoU ``|A ∩ B| / |A ∪ B|`` of boolean masks (1 when both are empty)."""
    _check_pair(pred, gt)
    a, b = pred.flatten(1).bool(), gt.flatten(1).bool()
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


# ---------------------------------------------------------------------------------------------- metrics
class _RegionMetric(Metric):
    """Mean (×100) of a per-item value over items with a non-empty GT region; optional per-class states."""

    is_differentiable = False
    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: Optional[int] = None, average: str = "micro", **kwargs) -> None:
        super().__init__(**kwargs)
        if average not in ("micro", "macro"):
            raise ValueError(f"average must be 'micro' or 'macro', got {average!r}.")
        if average == "macro" and not num_classes:
            raise ValueError("average='macro' needs num_classes (the per-class rates are averaged).")
        self.average, self.num_classes = average, num_classes
        n = int(num_classes) if num_classes else 1
        self.add_state("total", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("skipped", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def per_item(self, maps: Tensor, gt: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, maps: Tensor, gt: Tensor, classes: Optional[Tensor] = None) -> None:
        """``maps`` ``(N, *spatial)`` saliency, ``gt`` ``(N, *spatial)`` bool region of the explained class,
        ``classes`` ``(N,)`` (needed when the metric has ``num_classes``)."""
        gt = gt.bool()
        _check_pair(maps, gt)
        valid = gt.flatten(1).any(1)
        self.skipped += int((~valid).sum())
        v = self.per_item(maps, gt).double() * valid
        if self.num_classes:
            if classes is None:
                raise ValueError(f"{type(self).__name__}(num_classes=...) needs classes in update().")
            c = classes.to(self.total.device).long().view(-1)
            self.total.index_add_(0, c, v.to(self.total.device))
            self.count.index_add_(0, c, valid.long().to(self.count.device))
        else:
            self.total += v.sum().to(self.total.device)
            self.count += valid.sum().to(self.count.device)

    def compute(self) -> Tensor:
        if self.average == "macro":
            seen = self.count > 0
            rates = self.total[seen] / self.count[seen]
            return (100.0 * rates.mean() if seen.any() else torch.tensor(0.0)).float()
        return (100.0 * self.total.sum() / self.count.sum().clamp_min(1)).float()


class PointingGame(_RegionMetric):
    """Pointing game hit rate ↑ (seed 001 eq. 1.21), ``tolerance_px`` default 0, ×100."""

    def __init__(self, tolerance_px: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if tolerance_px < 0:
            raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}.")
        self.tolerance_px = int(tolerance_px)

    def per_item(self, maps, gt):
        return pointing_hits(maps, gt, self.tolerance_px)


class EnergyPointingGame(_RegionMetric):
    """Energy pointing game ↑: share of saliency inside the GT region, ×100."""

    def per_item(self, maps, gt):
        return energy_in_region(maps, gt)


class SaliencyIoU(_RegionMetric):
    """Weakly-supervised segmentation mIoU ↑ (seed 002 eq. 5.1 threshold by default), mean per-item IoU ×100."""

    def __init__(self, threshold: Union[str, float] = "mean_std", **kwargs) -> None:
        super().__init__(**kwargs)
        binarize_saliency(torch.zeros(1, 2), threshold)  # validate early
        self.threshold = threshold

    def per_item(self, maps, gt):
        return mask_iou(binarize_saliency(maps, self.threshold), gt)


class Runtime(Metric):
    """Explainer runtime: ``update(seconds, n_images)`` once per call; ``compute()`` = seconds per image,
    ``per_call()`` = seconds per call (per batch; spec §6.6 asks for both)."""

    is_differentiable = False
    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("seconds", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("calls", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, seconds: float, n_images: int) -> None:
        if not math.isfinite(seconds) or seconds < 0 or n_images < 0:
            raise ValueError(f"invalid runtime update ({seconds} s for {n_images} images).")
        self.seconds += float(seconds)
        self.count += int(n_images)
        self.calls += 1

    def compute(self) -> Tensor:
        return (self.seconds / self.count.clamp_min(1)).float()

    def per_call(self) -> Tensor:
        return (self.seconds / self.calls.clamp_min(1)).float()
