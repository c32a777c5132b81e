"""Faithfulness metrics of saliency maps: AD / AI / AG and insertion / deletion AUC.

Spec ``explainers_and_metrics.md`` §4. Notation for item ``i`` (an image and one class ``c``):
``p_i = score(f(x_i))_c`` and ``o_i = score(f(x_i ⊙ S_i))_c`` with ``S_i ∈ [0,1]`` at input resolution,
broadcast over channels, masking in **pixel space** (images in [0, 1]; zoo models normalise inside, so
"black" is 0). ``score`` is the softmax by default (seed 001 §1.3.3).

* AD ↓ (seed 001 eq. 1.10): ``100/N Σ [p − o]₊ / p``
* AI ↑ (eq. 1.11):           ``100/N Σ 1[p < o]``
* AG ↑ (eq. 2.8):            ``100/N Σ [o − p]₊ / (1 − p)``, with 0/0 := 0
* Insertion ↑ / Deletion ↓ (Petsiuk et al.; seed 001 §2.7.1, Alg. 1-2 as corrected in spec §6.9):
  pixels ranked by ``S`` (descending, stable sort, all channels of a pixel move together), ``n`` steps,
  curve of ``n + 1`` scores including the start, ``AUC = (Σ_k s_k − (s_0 + s_n)/2) / n``; reported ×100.

Every metric is a :class:`torchmetrics.Metric` with ``sum`` states, so it syncs under DDP and two
instances merge with ``merge_state``. Nothing loops over images: insertion/deletion build the perturbed
images of every image of the batch for several steps at once and score them in one forward call
(``max_batch`` images per call).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

__all__ = [
    "class_scores", "masked_images", "check_saliency", "confidence_change", "AverageDrop", "AverageIncrease",
    "AverageGain", "gaussian_blur", "perturbation_curves", "curve_auc", "InsertionAUC", "DeletionAUC",
    "default_steps", "saliency_ranks",
]

ScoreName = str  # "softmax" | "sigmoid" | "logit"


# ---------------------------------------------------------------------------------------------- helpers
def _score(logits: Tensor, targets: Tensor, score: ScoreName = "softmax") -> Tensor:
    if score == "softmax":
        s = logits.float().softmax(dim=1)
    elif score == "sigmoid":
        s = logits.float().sigmoid()
    elif score == "logit":
        s = logits.float()
    else:
        raise ValueError(f"score must be 'softmax', 'sigmoid' or 'logit', got {score!r}.")
    return s.gather(1, targets.view(-1, 1).long()).squeeze(1)


@torch.no_grad()
def class_scores(model: nn.Module, images: Tensor, targets: Tensor, score: ScoreName = "softmax") -> Tensor:
    """``score(f(images))[b, targets[b]]`` as a ``(B,)`` float tensor (softmax probability by default)."""
    return _score(model(images), targets, score)


def check_saliency(maps: Tensor, images: Tensor, name: str = "saliency") -> Tensor:
    """Validate ``maps`` against ``images`` and return them as ``(B, *spatial)`` floats in [0, 1].

    Accepts ``(B, *spatial)`` or ``(B, 1, *spatial)``. Raises a clear error on a wrong shape, NaNs or
    values outside [0, 1] (beyond a 1e-4 rounding tolerance, which is clipped).
    """
    if not torch.is_tensor(maps):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, *spatial), got {type(maps).__name__}.")
    spatial = tuple(images.shape[2:])
    if maps.dim() == images.dim() and maps.shape[1] == 1:
        maps = maps.squeeze(1)
    if tuple(maps.shape) != (images.shape[0],) + spatial:
        raise ValueError(
            f"{name} has shape {tuple(maps.shape)} but the images {tuple(images.shape)} need "
            f"{(images.shape[0],) + spatial} (one map per image at input resolution). Resize and normalise "
            "them with models.normalize_saliency(maps, images.shape[2:]).")
    maps = maps.to(device=images.device, dtype=torch.float32)
    if not torch.isfinite(maps).all():
        raise ValueError(f"{name} contains NaN or inf values.")
    lo, hi = float(maps.min()), float(maps.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"{name} must lie in [0, 1] but spans [{lo:.4g}, {hi:.4g}]. Normalise it with "
                         "models.normalize_saliency(maps).")
    return maps.clamp(0, 1)


def masked_images(images: Tensor, maps: Tensor) -> Tensor:
    """``x ⊙ S`` in pixel space, the map broadcast over channels (spec §1, "masking space: pixel")."""
    return images * maps.unsqueeze(1).to(images.dtype)


@torch.no_grad()
def confidence_change(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
                      score: ScoreName = "softmax", p: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Return ``(p, o)``: the class scores of the images and of the masked images ``x ⊙ S``.

    ``p`` may be passed in when already known (the runner shares it between explainers).
    """
    maps = check_saliency(maps, images)
    if p is None:
        p = class_scores(model, images, targets, score)
    o = class_scores(model, masked_images(images, maps), targets, score)
    return p, o


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with ``0 / 0 := 0`` (seed 001 eq. 2.8 convention; ``num`` is 0 whenever ``den`` is)."""
    return torch.where(num > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


# ---------------------------------------------------------------------------------------------- AD/AI/AG
class _ConfidenceMetric(Metric):
    """Mean over items of a per-item value of ``(p, o)``, ×100; ``update(p, o)`` with ``(N,)`` tensors."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def per_item(p: Tensor, o: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, p: Tensor, o: Tensor) -> None:
        p, o = torch.as_tensor(p).reshape(-1).double(), torch.as_tensor(o).reshape(-1).double()
        if p.shape != o.shape:
            raise ValueError(f"p and o must have the same number of items, got {p.numel()} and {o.numel()}.")
        self.total += self.per_item(p, o).sum().to(self.total.device)
        self.count += p.numel()

    def compute(self) -> Tensor:
        return (100.0 * self.total / self.count.clamp_min(1)).float()


class AverageDrop(_ConfidenceMetric):
    """AD ↓ (seed 001 eq. 1.10): ``100/N Σ [p − o]₊ / p``."""

    higher_is_better = False

    @staticmethod
    def per_item(p: Tensor, o: Tensor) -> Tensor:
        return _safe_div((p - o).clamp_min(0), p)


class AverageIncrease(_ConfidenceMetric):
    """AI ↑ (seed 001 eq. 1.11): ``100/N Σ 1[p < o]`` (strict)."""

    higher_is_better = True

    @staticmethod
    def per_item(p: Tensor, o: Tensor) -> Tensor:
        return (p < o).to(p.dtype)


class AverageGain(_ConfidenceMetric):
    """AG ↑ (seed 001 eq. 2.8): ``100/N Σ [o − p]₊ / (1 − p)``, ``0/0 := 0``."""

    higher_is_better = True

    @staticmethod
    def per_item(p: Tensor, o: Tensor) -> Tensor:
        return _safe_div((o - p).clamp_min(0), 1 - p)


# ---------------------------------------------------------------------------------------------- blur
def _gauss1d(klen: int, sigma: float, device, dtype) -> Tensor:
    r = torch.arange(klen, device=device, dtype=torch.float64) - (klen - 1) / 2
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur(images: Tensor, klen: int = 11, sigma: float = 5.0) -> Tensor:
    """Per-channel Gaussian blur with zero padding (RISE's insertion start: 11×11, σ = 5).

    Separable: one 1-D convolution per spatial axis, equal to the full ``klen^d`` kernel (the outer
    product of the normalised 1-D Gaussian). Works for 2D images and 3D volumes. RISE builds its
    kernel with ``scipy.ndimage.gaussian_filter`` on a delta (reflect mode), which differs from the
    normalised sampled Gaussian used here by < 2 % per tap; documented in docs/metrics.md.
    """
    nd = images.dim() - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"gaussian_blur expects (B, C, *spatial) with 1-3 spatial dims, got {tuple(images.shape)}.")
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    C = images.shape[1]
    k = _gauss1d(klen, sigma, images.device, images.dtype)
    out = images
    for axis in range(nd):
        shape = [1, 1] + [1] * nd
        shape[2 + axis] = klen
        weight = k.view(shape).expand([C] + shape[1:]).contiguous()
        pad = [0] * nd
        pad[axis] = klen // 2
        out = conv(out, weight, padding=tuple(pad), groups=C)
    return out


def _baseline(kind: Union[str, float, Callable[[Tensor], Tensor]], images: Tensor,
              blur_klen: int = 11, blur_sigma: float = 5.0) -> Tensor:
    if callable(kind):
        out = kind(images)
    elif isinstance(kind, (int, float)):
        out = torch.full_like(images, float(kind))
    elif kind == "black":
        out = torch.zeros_like(images)
    elif kind == "blur":
        out = gaussian_blur(images, blur_klen, blur_sigma)
    elif kind == "mean":  # per-image, per-channel mean colour
        out = images.flatten(2).mean(2).view(images.shape[:2] + (1,) * (images.dim() - 2)).expand_as(images)
    else:
        raise ValueError(f"baseline must be 'black', 'blur', 'mean', a number or a callable, got {kind!r}.")
    if out.shape != images.shape:
        raise ValueError(f"baseline produced shape {tuple(out.shape)} for images {tuple(images.shape)}.")
    return out


# ---------------------------------------------------------------------------------------------- curves
def default_steps(spatial: Sequence[int]) -> int:
    """Default number of steps: ``ceil(sqrt(#pixels))`` (224 steps of 224 pixels at 224×224, seed 001 §2.7.1)."""
    return max(1, math.ceil(math.sqrt(math.prod(spatial))))


def saliency_ranks(maps: Tensor) -> Tensor:
    """Rank of every pixel (0 = most salient) by a stable descending sort: ties keep raster order."""
    flat = maps.flatten(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


@torch.no_grad()
def perturbation_curves(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, mode: str = "deletion",
                        steps: Optional[int] = None, baseline: Union[str, float, Callable, None] = None,
                        max_batch: int = 64, score: ScoreName = "softmax", blur_klen: int = 11,
                        blur_sigma: float = 5.0, channels_last: bool = True) -> Tensor:
    """Deletion / insertion curves ``(B, steps + 1)`` of class scores, batched over images and steps.

    Step ``k`` (k = 0..n) has the ``min(k·⌈P/n⌉, P)`` most salient pixels (of ``P``) changed:
    deletion starts from ``x`` and replaces them by ``baseline`` (default black = 0); insertion starts
    from ``baseline`` (default ``Blur(x)``, RISE) and copies those pixels of ``x`` in. All channels of a
    pixel move together. ``max_batch`` bounds the images per forward call: ``max(1, max_batch // B)``
    steps of the whole batch go through the model at once. ``channels_last``: feed 2D batches in
    channels-last memory format (same values, ~25 % faster convolutions on CPU; falls back to the
    default layout if the model needs contiguous inputs).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}.")
    maps = check_saliency(maps, images)
    B, C = images.shape[:2]
    spatial = tuple(images.shape[2:])
    P = math.prod(spatial)
    n = int(steps) if steps is not None else default_steps(spatial)
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}.")
    per_step = math.ceil(P / n)
    if baseline is None:
        baseline = "black" if mode == "deletion" else "blur"
    base = _baseline(baseline, images, blur_klen, blur_sigma)
    # x^(k) = where(rank < count_k, src, start)
    src, start = (base, images) if mode == "deletion" else (images, base)
    src, start = src.flatten(2), start.flatten(2)  # (B, C, P)
    ranks = saliency_ranks(maps)  # (B, P)
    counts = (torch.arange(n + 1, device=images.device) * per_step).clamp_max(P)  # (n+1,)
    targets = targets.to(images.device).long().view(-1)
    curves = torch.empty(B, n + 1, device=images.device)
    # several steps per forward call; if the batch alone exceeds max_batch, split it too
    img_chunk = min(B, max(1, int(max_batch)))
    for b0 in range(0, B, img_chunk):
        b1 = min(B, b0 + img_chunk)
        nb = b1 - b0
        t_chunk = max(1, int(max_batch) // nb)
        r, s, st, tg = ranks[b0:b1], src[b0:b1], start[b0:b1], targets[b0:b1]
        for k0 in range(0, n + 1, t_chunk):
            k1 = min(n + 1, k0 + t_chunk)
            m = r.unsqueeze(0) < counts[k0:k1].view(-1, 1, 1)  # (T, nb, P)
            x = torch.where(m.unsqueeze(2), s.unsqueeze(0), st.unsqueeze(0))  # (T, nb, C, P)
            x = x.reshape((k1 - k0) * nb, C, *spatial)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                logits = model(x)
            except RuntimeError as e:  # e.g. a .view() on the input inside the model
                if not (channels_last and x.dim() == 4 and ("view" in str(e) or "contiguous" in str(e))):
                    raise
                channels_last = False
                logits = model(x.contiguous())
            sc = _score(logits, tg.repeat(k1 - k0), score)  # (T*nb,)
            curves[b0:b1, k0:k1] = sc.view(k1 - k0, nb).t()
    return curves


def curve_auc(curves: Tensor) -> Tensor:
    """Trapezoid area of ``(B, n+1)`` curves sampled uniformly on [0, 1]: ``(Σ s_k − (s_0+s_n)/2)/n``."""
    n = curves.shape[-1] - 1
    if n < 1:
        raise ValueError("a curve needs at least 2 points.")
    return (curves.sum(-1) - 0.5 * (curves[..., 0] + curves[..., -1])) / n


class _CurveAUC(Metric):
    """Mean AUC (×100) of perturbation curves; also keeps the mean curve (``mean_curve()``).

    ``update(curves)`` with ``(N, steps+1)`` curves from :func:`perturbation_curves`, or
    ``update_from_model(model, images, maps, targets)`` which computes them with this metric's settings.
    """

    is_differentiable = False
    full_state_update = False
    mode = "deletion"

    def __init__(self, steps: Optional[int] = None, baseline: Union[str, float, Callable, None] = None,
                 max_batch: int = 64, score: ScoreName = "softmax", **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps, self.baseline, self.max_batch, self.score = steps, baseline, max_batch, score
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # the mean curve, kept when ``steps`` is fixed at construction (states need a fixed shape for DDP)
        n = 0 if steps is None else int(steps) + 1
        self.add_state("curve_sum", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, curves: Tensor) -> None:
        curves = curves.detach().double()
        if curves.dim() != 2:
            raise ValueError(f"curves must be (N, steps+1), got {tuple(curves.shape)}.")
        self.total += curve_auc(curves).sum().to(self.total.device)
        self.count += curves.shape[0]
        if self.steps is not None:
            if curves.shape[1] != self.steps + 1:
                raise ValueError(f"this metric was built with steps={self.steps} but got curves with "
                                 f"{curves.shape[1] - 1} steps.")
            self.curve_sum += curves.sum(0).to(self.curve_sum.device)

    def update_from_model(self, model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor) -> Tensor:
        curves = perturbation_curves(model, images, maps, targets, self.mode, self.steps, self.baseline,
                                     self.max_batch, self.score)
        self.update(curves)
        return curves

    def compute(self) -> Tensor:
        return (100.0 * self.total / self.count.clamp_min(1)).float()

    def mean_curve(self) -> Tensor:
        """Mean curve ``(steps+1,)`` (empty unless ``steps`` was given at construction)."""
        return (self.curve_sum / self.count.clamp_min(1)).float()


class DeletionAUC(_CurveAUC):
    """Deletion AUC ↓: most salient pixels first replaced by black (seed 001 §3.6); ×100."""

    higher_is_better = False
    mode = "deletion"


class InsertionAUC(_CurveAUC):
    """Insertion AUC ↑: most salient pixels of ``x`` first copied into ``Blur(x)`` (RISE); ×100."""

    higher_is_better = True
    mode = "insertion"
