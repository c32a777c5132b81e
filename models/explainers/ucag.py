"""UCAG: up-sampled patches explained by any zoo explainer and stitched back (spec seed004_ucag_rsp §2-3).

``create_explainer("ucag", model, base="gradcam", n_units=6, crop=124, ref_size=224, alpha=2.6)``; in
``eval.py`` / ``run_interpretability`` spell it ``ucag:gradcam`` (``ucag:<base>``). Steps (2D, x in [0,1]):

1. geometry: crop ``c = floor(crop * H / ref_size)`` (same for W), starts ``s_i = round(i (H - c)/(n - 1))``;
2. unfold: the n^2 patches of every image, bicubic-resized (``align_corners=False``, no clamp) to
   ``floor(alpha c)`` (or the model's fixed input size), ``B n^2`` patches in image-major, row-major order;
3. conquer: ``(M_p, z_p) = base.explain_raw(X_p, t_p)`` -- raw signed maps at layer resolution plus the
   logits of the same forward (CAM family: ``sum_k w_k A^k`` before ReLU). Bases without ``explain_raw``
   give their [0, 1] maps and one extra no-grad forward (``last_info["patch_maps"] = "normalized"``);
4. confidence: ``p = softmax(z)_t``, ``w = exp(p) / max_patches exp(p)`` per image (``weighting``),
   ``M~ = w * bilinear(M -> c x c)``;
5. aggregation: ``A = sum place(M~)``, ``N = sum place(1)``, ``M = A / (N + count_offset)``;
6. post-process: CAM bases ``S = blur_{5x5, sigma 3, reflect}(n(ReLU(M)))`` then ``/ max``; signed bases
   (``base.signed``: RSP) ``S = ReLU(M) / max ReLU(M)``; optional fusion ``S <- n(S + lambda E(x, t))``.

All ``B n^2`` patches go through the base explainer in one call (``max_patches`` caps the patches per call;
an out-of-memory error halves the chunk and retries). 3D volumes: ``n_units_3d`` (3) patches per axis,
trilinear up-sampling (torch has no tricubic), a 3D count map and a separable 3D Gaussian blur; supported
when the base explainer supports 3D.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Explainer, LayerSpec, normalize_saliency

__all__ = ["UCAG", "patch_starts", "patch_geometry", "coverage_counts", "gaussian_blur_reflect"]


def patch_starts(size: int, crop: int, n: int) -> list:
    """``s_i = round(i (size - crop) / (n - 1))``, i = 0..n-1 (``[0]`` for n = 1): covers exactly [0, size)."""
    if n < 1:
        raise ValueError(f"n_units must be >= 1, got {n}.")
    if not 1 <= crop <= size:
        raise ValueError(f"patch size {crop} must lie in [1, {size}]; check crop / ref_size.")
    if n == 1:
        return [0]
    return [int(round(i * (size - crop) / (n - 1))) for i in range(n)]


def patch_geometry(spatial: Sequence[int], n_units: int, crop: int, ref_size: int) -> Tuple[list, list]:
    """Per spatial axis: crop size ``floor(crop * size / ref_size)`` and its starts."""
    crops = [max(1, int(math.floor(crop * s / ref_size))) for s in spatial]
    return crops, [patch_starts(s, c, n_units) for s, c in zip(spatial, crops)]


def _boxes(starts: Sequence[Sequence[int]]):
    """All patch positions (index tuple, start tuple) in row-major order over the axes."""
    return zip(itertools.product(*[range(len(s)) for s in starts]), itertools.product(*starts))


def coverage_counts(spatial: Sequence[int], crops: Sequence[int], starts: Sequence[Sequence[int]],
                    device=None) -> Tensor:
    """``N = sum place(1)``: how many patches cover each pixel (voxel), ``spatial``-shaped."""
    n = torch.zeros(tuple(spatial), device=device)
    for _, st in _boxes(starts):
        n[tuple(slice(s, s + c) for s, c in zip(st, crops))] += 1
    return n


def _gauss1d(klen: int, sigma: float, device, dtype) -> Tensor:
    r = torch.arange(klen, device=device, dtype=torch.float64) - (klen - 1) / 2
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur_reflect(maps: Tensor, klen: int = 5, sigma: float = 3.0) -> Tensor:
    """Separable Gaussian blur of ``(B, *spatial)`` maps (2D or 3D) with reflect borders (kornia's
    ``gaussian_blur2d``; replicate borders where a side is too small to reflect)."""
    k = _gauss1d(klen, sigma, maps.device, maps.dtype)
    x = maps.unsqueeze(1)
    d = x.dim() - 2
    p = klen // 2
    conv = {2: F.conv2d, 3: F.conv3d}[d]
    mode = "reflect" if min(x.shape[2:]) > p else "replicate"
    x = F.pad(x, (p,) * (2 * d), mode=mode)
    for axis in range(d):
        shape = [1, 1] + [1] * d
        shape[2 + axis] = klen
        x = conv(x, k.view(shape))
    return x.squeeze(1)


def _is_oom(e: BaseException) -> bool:
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg


def _fixed_input_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The input size a ViT/DeiT with strict patch embedding needs, else None."""
    for m in model.modules():
        pe = getattr(m, "patch_embed", None)
        if pe is not None and getattr(pe, "strict_img_size", False) and getattr(pe, "img_size", None) is not None:
            s = pe.img_size
            return (int(s[0]), int(s[1])) if isinstance(s, (tuple, list)) else (int(s), int(s))
    return None


class UCAG(Explainer):
    """UCAG wrapper (spec §3): ``UCAG(model, base="gradcam", target_layers=None, n_units=6, crop=124,
    ref_size=224, alpha=2.6, weighting="exp_softmax", count_offset=0, blur=(5, 3.0), global_weight=0.0,
    max_patches=None, patch_maps="auto", patch_size=None, **base_kwargs)``.

    ``base``: a registered explainer name or an :class:`Explainer` built for the same model. Output
    ``(B, H, W)`` in [0, 1]; ``last_info``: ``weights`` (B, n, n), ``probs`` (B, n, n), ``counts`` (H, W),
    ``aggregate`` (the stitched map M, B x H x W), ``alpha_eff``, ``patch_maps`` ("raw" | "normalized"),
    ``chunk`` (patches per base call), ``base_calls``.
    """

    name = "ucag"
    uses_layers = False

    def __init__(self, model: nn.Module, target_layers: LayerSpec = None, base: Union[str, Explainer] = "gradcam",
                 n_units: int = 6, crop: int = 124, ref_size: int = 224, alpha: float = 2.6,
                 weighting: str = "exp_softmax", count_offset: float = 0.0,
                 blur: Optional[Tuple[int, float]] = (5, 3.0), global_weight: float = 0.0,
                 max_patches: Optional[int] = None, patch_maps: str = "auto",
                 patch_size: Optional[Sequence[int]] = None, n_units_3d: int = 3, **base_kwargs) -> None:
        super().__init__(model, None)
        if isinstance(base, Explainer):
            if base.model is not model:
                raise ValueError("ucag: the base explainer was built for another model; build it for this one.")
            if base_kwargs or target_layers is not None:
                raise ValueError("ucag: pass target_layers / base options to the base explainer you built, "
                                 "or give base as a name.")
            self.base = base
        else:
            from . import create_explainer

            key = str(base).lower().replace("-", "").replace("_", "")
            if key == "ucag":
                raise ValueError("ucag: base must be another explainer (e.g. 'gradcam'), not 'ucag'.")
            self.base = create_explainer(key, model, target_layers=target_layers, **base_kwargs)
        if weighting not in ("exp_softmax", "softmax", "none"):
            raise ValueError(f"ucag: weighting must be 'exp_softmax', 'softmax' or 'none', got {weighting!r}.")
        if patch_maps not in ("auto", "raw", "normalized"):
            raise ValueError(f"ucag: patch_maps must be 'auto', 'raw' or 'normalized', got {patch_maps!r}.")
        if patch_maps == "raw" and not hasattr(self.base, "explain_raw"):
            raise ValueError(f"ucag: base {self.base.name!r} has no explain_raw(); use patch_maps='normalized'.")
        if alpha <= 0 or crop <= 0 or ref_size <= 0:
            raise ValueError(f"ucag: alpha, crop and ref_size must be > 0 (got {alpha}, {crop}, {ref_size}).")
        if max_patches is not None and int(max_patches) < 1:
            raise ValueError(f"ucag: max_patches must be >= 1 or None, got {max_patches}.")
        self.n_units, self.crop, self.ref_size, self.alpha = int(n_units), int(crop), int(ref_size), float(alpha)
        self.n_units_3d = int(n_units_3d)
        self.supports_3d = bool(getattr(self.base, "supports_3d", True))
        self.weighting, self.count_offset = weighting, float(count_offset)
        self.blur = tuple(blur) if blur else None
        self.global_weight = float(global_weight)
        self.max_patches = None if max_patches is None else int(max_patches)
        self.patch_maps = patch_maps
        self.patch_size = tuple(int(s) for s in patch_size) if patch_size is not None else _fixed_input_size(model)
        self.signed = bool(getattr(self.base, "signed", False))
        self.name = f"ucag:{self.base.name}"

    # ------------------------------------------------------------------------------------------
    def _base_raw(self, xp: Tensor, tp: Tensor) -> Tuple[Tensor, Tensor]:
        """Patch maps (N, h', w') and logits (N, K) for one chunk of patches."""
        if self.patch_maps != "normalized" and hasattr(self.base, "explain_raw"):
            maps, logits = self.base.explain_raw(xp, tp)
            return maps.detach().float(), logits.detach().float()
        maps = self.base.explain(xp, tp)
        with torch.no_grad():
            logits = self.model(xp)
        return maps.detach().float(), logits.float()

    def _conquer(self, xp: Tensor, tp: Tensor) -> Tuple[Tensor, Tensor]:
        n = xp.shape[0]
        chunk = min(n, self.max_patches or n)
        maps, logits, s, calls = [], [], 0, 0
        while s < n:
            try:
                m, z = self._base_raw(xp[s:s + chunk], tp[s:s + chunk])
            except RuntimeError as e:  # out of memory: halve the chunk, remember it, retry
                if not _is_oom(e) or chunk == 1:
                    raise
                if xp.is_cuda:
                    torch.cuda.empty_cache()
                chunk = max(1, chunk // 2)
                self.max_patches = chunk
                continue
            maps.append(m)
            logits.append(z)
            s += m.shape[0]
            calls += 1
        self.last_info["chunk"], self.last_info["base_calls"] = chunk, calls
        return torch.cat(maps), torch.cat(logits)

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        B, C = x.shape[:2]
        spatial = tuple(x.shape[2:])
        d = len(spatial)
        n = self.n_units if d == 2 else self.n_units_3d
        crops, starts = patch_geometry(spatial, n, self.crop, self.ref_size)
        if self.patch_size is not None:
            up = tuple(self.patch_size)
            if len(up) != d:
                raise ValueError(f"ucag: patch_size {up} does not match {d}D input.")
        else:
            up = tuple(max(1, int(math.floor(self.alpha * c))) for c in crops)
        np_ = n ** d
        # 2. unfold: (B, n^d, C, *crop) -> (B n^d, C, *up), image-major then row-major over the axes
        slices = [tuple(slice(s, s + c) for s, c in zip(st, crops)) for _, st in _boxes(starts)]
        xp = torch.stack([x[(slice(None), slice(None)) + sl] for sl in slices], 1).reshape(B * np_, C, *crops)
        if up != tuple(crops):  # bicubic in 2D; trilinear in 3D (torch has no tricubic)
            xp = F.interpolate(xp, size=up, mode="bicubic" if d == 2 else "trilinear", align_corners=False)
        tp = targets.repeat_interleave(np_)
        # 3. conquer
        self.last_info = {}
        maps, logits = self._conquer(xp, tp)
        if maps.dim() == d + 2 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.dim() != d + 1:
            raise RuntimeError(f"ucag: base {self.base.name!r} returned patch maps of shape {tuple(maps.shape)}; "
                               f"expected (N, *{d} spatial dims).")
        # 4. confidence refinement
        p = logits.softmax(1).gather(1, tp.view(-1, 1)).view(B, np_)
        if self.weighting == "exp_softmax":
            w = torch.exp(p - p.max(1, keepdim=True).values)  # = exp(p)/max exp(p)
        elif self.weighting == "softmax":
            w = p
        else:
            w = torch.ones_like(p)
        m = F.interpolate(maps.unsqueeze(1).float(), size=tuple(crops), mode="bilinear" if d == 2 else "trilinear",
                          align_corners=False)[:, 0]
        m = m.view(B, np_, *crops) * w.view(B, np_, *([1] * d))
        # 5. geometrical aggregation: A / (N + offset)
        acc = torch.zeros((B,) + spatial, device=x.device, dtype=m.dtype)
        for k, sl in enumerate(slices):
            acc[(slice(None),) + sl] += m[:, k]
        counts = coverage_counts(spatial, crops, starts, x.device).to(m.dtype)
        agg = acc / (counts + self.count_offset)
        # 6. post-process
        if self.signed:
            s = agg.clamp(min=0)
        else:
            s = normalize_saliency(agg.clamp(min=0))
            if self.blur is not None:
                s = gaussian_blur_reflect(s, int(self.blur[0]), float(self.blur[1]))
        s = s / s.flatten(1).amax(1).clamp_min(1e-12).view(B, *([1] * d))
        if self.global_weight > 0:
            s = normalize_saliency(s + self.global_weight * self.base.explain(x, targets))
        self.last_info.update(weights=w.view(B, *([n] * d)), probs=p.view(B, *([n] * d)), counts=counts,
                              aggregate=agg, alpha_eff=up[0] / crops[0], patch_size=up, crop=tuple(crops),
                              starts=starts, patch_maps="raw" if (self.patch_maps != "normalized"
                                                                  and hasattr(self.base, "explain_raw"))
                              else "normalized")
        if self.signed:
            self.last_info["raw"] = agg
        return s

    def native_resolution(self, x: Tensor) -> Optional[Tuple[int, ...]]:
        """Effective map grid: the base's grid on one patch, scaled from the crop to the image (metrics runner)."""
        from ..metrics.degenerate import native_resolution

        spatial = tuple(x.shape[2:])
        n = self.n_units if len(spatial) == 2 else self.n_units_3d
        crops, _ = patch_geometry(spatial, n, self.crop, self.ref_size)
        up = self.patch_size or tuple(max(1, int(math.floor(self.alpha * c))) for c in crops)
        patch = torch.zeros((1,) + tuple(x.shape[1:2]) + tuple(up), device=x.device, dtype=x.dtype)
        r = native_resolution(self.base, self.model, patch)
        if r is None:
            return None
        return tuple(min(s, int(round(g * s / c))) for g, s, c in zip(r, spatial, crops))

    def __repr__(self) -> str:
        return (f"UCAG(base={self.base.name!r}, n_units={self.n_units}, crop={self.crop}/{self.ref_size}, "
                f"alpha={self.alpha})")
