"""Shared base of the seed metrics of issue 18: one value per item, kept (``cat`` state, DDP-synced).

A :class:`PerItemMetric` stores every item's value in ``values`` (``dist_reduce_fx="cat"``), so bootstrap
intervals can be computed from :meth:`PerItemMetric.per_item` after a DDP run, and ``compute()`` is the mean
over the items whose value is defined (NaN = not defined, e.g. no ground truth), times ``scale``.

``update_from_context(ctx)`` is the runner's entry point (:func:`models.metrics.run_interpretability`); ``ctx``
is a dict with ``model``, ``images`` (N, C, *spatial), ``maps`` (N, *spatial) in [0, 1], ``targets`` (N,),
``logits`` (N, K) of the clean images, ``p`` (N,) clean class scores, ``score`` ("softmax" | "sigmoid" |
"logit"), ``explainer`` (the callable that produced ``maps``) and, when the data has them, ``mask``
(N, *spatial) label masks and ``boxes`` (N, M, 1 + 2d).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .localization import boxes_to_mask, class_masks, mask_bbox

__all__ = ["PerItemMetric", "gt_region", "gt_boxes"]


class PerItemMetric(Metric):
    """Mean (× ``scale``) of per-item values over the items where the value is defined (not NaN)."""

    is_differentiable = False
    full_state_update = False
    scale: float = 1.0

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def _add(self, v: Tensor) -> None:
        self.values.append(v.detach().double().reshape(-1).to(self.device))

    def per_item(self) -> Tensor:
        """Every item's value (NaN where undefined), in update order (rank order after a DDP sync)."""
        if isinstance(self.values, list) and not self.values:
            return torch.zeros(0, dtype=torch.float64)
        return dim_zero_cat(self.values)

    def skipped(self) -> int:
        """Items whose value is undefined (NaN)."""
        return int(torch.isnan(self.per_item()).sum())

    def compute(self) -> Tensor:
        v = self.per_item()
        v = v[~torch.isnan(v)]
        if v.numel() == 0:
            return torch.tensor(float("nan"))
        return (self.scale * v.mean()).float()

    def update_from_context(self, ctx: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def gt_region(ctx: dict) -> Optional[Tensor]:
    """Boolean ground-truth region of each item's class from ``ctx["mask"]`` or ``ctx["boxes"]`` (None if absent)."""
    images, t = ctx["images"], ctx["targets"]
    if ctx.get("mask") is not None:
        return class_masks(ctx["mask"].to(images.device), t)
    if ctx.get("boxes") is not None:
        return boxes_to_mask(ctx["boxes"].to(images.device), t, images.shape[2:])
    return None


def gt_boxes(ctx: dict) -> Optional[tuple]:
    """``(boxes (N, M, 4) as [y0, x0, y1, x1] exclusive, valid (N, M))`` of each item's class (2D), from
    ``ctx["boxes"]`` (``[class, x0, y0, x1, y1]``) or, without boxes, the bounding box of the class mask."""
    t = ctx["targets"]
    if ctx.get("boxes") is not None:
        b = ctx["boxes"].to(t.device).float()
        if b.shape[-1] != 5:
            raise ValueError(f"box metrics are 2D: boxes must be (N, M, 5) [class, x0, y0, x1, y1], got "
                             f"{tuple(b.shape)}.")
        valid = b[..., 0].long() == t.view(-1, 1)
        return torch.stack([b[..., 2], b[..., 1], b[..., 4], b[..., 3]], -1), valid
    if ctx.get("mask") is not None:
        m = class_masks(ctx["mask"].to(t.device), t)
        if m.dim() != 3:
            raise ValueError("box metrics are 2D: masks must be (N, H, W).")
        box, ok = mask_bbox(m)
        return box.unsqueeze(1), ok.unsqueeze(1)
    return None
