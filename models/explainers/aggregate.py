"""Multi-layer saliency: layer-wise aggregation (seed 002 §4.4.2) and HAM (seed 000 eqs 3.1, 3.18).

* Layer-wise aggregation ``S_agg = n(mean_l n(up(ReLU(S_l))))`` is what every CAM-type explainer does
  when given several target layers (``create_explainer("xrelevancecam", m, target_layers=[-1, -2, -3])``);
  :func:`aggregate_maps` is the function (= pytorch_grad_cam's ``BaseCAM.aggregate_multi_layers``).
* HAM (spec §3.14): per stage n, ``M_n = n(ReLU((1/m_n) sum_k (ds/dF_n^k) * F_n^k))`` (a channel-averaged
  HiResCAM map; ReLU before the min-max, spec decision 13); the maps of the later stages are upsampled to
  the resolution of the earliest stage, fused by the pixel-wise **max** (3.18; ``fusion="sum"`` gives
  3.1), upsampled to the input and min-max normalised. Default stages: ``model.backbone.taps[-3:]``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import (Explainer, LayerSpec, capture_outputs, gather_logit, normalize_saliency, postprocess_layer_maps,
                   upsample_to)

__all__ = ["aggregate_maps", "HAM"]


def aggregate_maps(maps: Sequence[Tensor], size: Sequence[int], relu: bool = True) -> Tensor:
    """Layer-wise aggregation of raw per-layer maps ``(B, *h_l)`` to ``(B, *size)`` (seed 002 §4.4.2)."""
    return postprocess_layer_maps(maps, size, relu=relu)


class HAM(Explainer):
    """Hierarchical attention map of a multi-stage network (seed 000 eq 3.18)."""

    name = "ham"

    def __init__(self, model: nn.Module, target_layers: LayerSpec = None, fusion: str = "max") -> None:
        if target_layers is None:
            taps = getattr(getattr(model, "backbone", None), "taps", None)
            if taps is None:
                raise ValueError(f"HAM needs the stages of a multi-stage network: {type(model).__name__} has no "
                                 "backbone.taps; pass target_layers=[stage modules].")
            target_layers = list(taps[-3:])
        if fusion not in ("max", "sum"):
            raise ValueError(f"fusion must be 'max' (eq 3.18) or 'sum' (eq 3.1), got {fusion!r}.")
        super().__init__(model, target_layers)
        self.fusion = fusion

    def stage_maps(self, x: Tensor, targets: Tensor):
        """Per-stage ``M_n`` ``(B, *h_n)`` in forward order."""
        x = x.requires_grad_(True)
        with capture_outputs(self.target_layers) as cap:
            logits = self.model(x)
        feats = cap.last()
        grads = torch.autograd.grad(gather_logit(logits, targets).sum(), feats, allow_unused=True)
        if any(g is None for g in grads):
            raise ValueError("HAM: a stage does not lie on the path to the logits (ViT intermediate taps are side "
                             "outputs that the classifier never reads); HAM needs a multi-stage CNN, or pass "
                             "target_layers on the path to the logits.")
        feats, grads = [self._reshape(f) for f in feats], [self._reshape(g) for g in grads]  # ViT tokens -> maps
        return [normalize_saliency((g * f).float().mean(dim=1).clamp(min=0)) for f, g in zip(feats, grads)]

    @staticmethod
    def fuse(maps: Sequence[Tensor], size: Sequence[int], fusion: str = "max") -> Tensor:
        """Upsample to the largest (earliest) stage, fuse (max / sum), upsample to ``size``, normalise."""
        ref = max(maps, key=lambda m: m[0].numel()).shape[1:]
        up = torch.stack([upsample_to(m.unsqueeze(1), ref).squeeze(1) for m in maps])
        fused = up.amax(0) if fusion == "max" else up.sum(0)
        return normalize_saliency(fused, size)

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        maps = self.stage_maps(x, targets)
        self.last_info = dict(stage_maps=maps)
        return self.fuse(maps, x.shape[2:], self.fusion)
