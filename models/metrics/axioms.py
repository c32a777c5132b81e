"""Axiom errors of CAM weights (seed 002 eqs 5.5-5.6, from XGrad-CAM; the XRelevance-CAM thesis's check).

For image n, target layer activations ``A`` (K channels), the explainer's channel weights ``w_k`` and the
contribution ``c_k = sum_ij w_k A^k_ij`` (element-wise weights for HiResCAM / Layer-CAM), score ``S(A)`` and
``Δ_k = S(A) - S(A \\ A^k)`` (channel k of the layer set to 0, a real forward pass):

* sensitivity ↓ (5.5): ``sum_k |Δ_k - c_k| / sum_k |Δ_k|``;
* conservation ↓ (5.6): ``|S(A) - sum_k c_k| / |S(A)|``; mean over images (not ×100).

The seed writes ``R_ij(A; k)`` in place of ``A^k_ij`` in 5.5-5.6; with XRelevance-CAM's weights (4.2)
``sum_ij w_k A^k_ij = sum_ij R^k_ij``, so the two readings agree for it, and for the other CAMs only the
activation form is defined (XGrad-CAM's axioms, eqs 2.15-2.16). Score: the logit ``y_t`` for gradient CAMs; for
Relevance-CAM / XRelevance-CAM the contrastive score of eq 4.4, ``y_t / C`` (= the total initial relevance of
the XRelevance contrast). Supported explainers: cam, gradcam, gradcampp, xgradcam, hirescam, layercam,
relevancecam, xrelevancecam (single target layer); others raise a clear error.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..explainers.base import capture_outputs, explain_mode, gather_logit
from .peritem import PerItemMetric

__all__ = ["AXIOM_EXPLAINERS", "channel_contributions", "ablated_scores", "axiom_errors", "AxiomSensitivity",
           "AxiomConservation"]

AXIOM_EXPLAINERS = ("cam", "gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "relevancecam",
                    "xrelevancecam")


def _layer(explainer) -> nn.Module:
    layers = getattr(explainer, "target_layers", None)
    if not layers or len(layers) != 1:
        raise ValueError("axiom errors need an explainer with exactly one target layer.")
    return layers[0]


def channel_contributions(explainer, x: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor, Tensor, str]:
    """``(A (B, K, *s), c (B, K), S (B,), score kind)`` for ``explainer`` on ``x`` (see module docstring)."""
    name = getattr(explainer, "name", type(explainer).__name__)
    if name not in AXIOM_EXPLAINERS:
        raise ValueError(f"axiom errors need the explainer's channel weights; {name!r} does not expose them. "
                         f"Supported: {', '.join(AXIOM_EXPLAINERS)}.")
    model = explainer.model
    layer = _layer(explainer)
    with explain_mode(model):
        x = x.detach().clone()
        if name in ("relevancecam", "xrelevancecam"):
            explainer.explain(x, targets)
            info = explainer.last_info
            a, w = info["activations"][0], info["weights"][0]
            c = w * a.flatten(2).sum(2)
            score = gather_logit(info["logits"], targets).float() / info["logits"].shape[1]
            return a, c, score, "contrastive y_t/C"
        xr = x.requires_grad_(True)
        with capture_outputs([layer]) as cap:
            logits = model(xr)
        a = cap.last()[0]
        y = gather_logit(logits, targets)
        if name == "cam":
            w = explainer.fc.weight[targets].detach().float()
            a = a.detach().float()
            return a, w * a.flatten(2).sum(2), y.detach().float(), "logit"
        (g,) = torch.autograd.grad(y.sum(), a)
        a, g = a.detach().float(), g.detach().float()
        if name == "hirescam":
            c = (g * a).flatten(2).sum(2)
        elif name == "layercam":
            c = (g.clamp(min=0) * a).flatten(2).sum(2)
        else:
            an, gn = a.cpu().numpy(), g.cpu().numpy()
            w = explainer._cls.get_cam_weights(None, None, None, None, an, gn)
            w = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(a.device)
            c = w * a.flatten(2).sum(2)
        return a, c, y.detach().float(), "logit"


@torch.no_grad()
def ablated_scores(explainer, x: Tensor, targets: Tensor, acts: Tensor, contrastive: bool,
                   batch_size: int = 64) -> Tensor:
    """``S(A \\ A^k)`` ``(B, K)``: forward passes with channel k of the target layer set to 0."""
    from ..explainers.cam import AblationCAM

    model = explainer.model
    layer = _layer(explainer)
    with explain_mode(model), torch.no_grad():
        helper = AblationCAM(model, target_layers=[layer])
        module = helper._on_path(layer, acts, x)
        B, K = acts.shape[:2]
        img = torch.arange(B, device=x.device).repeat_interleave(K)
        ch = torch.arange(K, device=x.device).repeat(B)
        out = torch.empty(B * K, device=x.device)
        C = None
        for s in range(0, B * K, batch_size):
            sl = slice(s, s + batch_size)
            ii, cc = img[sl], ch[sl]
            sub = acts[ii].clone()
            sub[torch.arange(len(ii), device=x.device), cc] = 0.0
            h = module.register_forward_hook(lambda m, i, o, sub=sub: sub.to(o.dtype))
            try:
                logits = model(x[ii])
            finally:
                h.remove()
            C = logits.shape[1]
            out[sl] = gather_logit(logits, targets[ii]).float()
    out = out.view(B, K)
    return out / C if contrastive else out


def axiom_errors(explainer, x: Tensor, targets: Tensor, batch_size: int = 64) -> Tuple[Tensor, Tensor]:
    """Per-image ``(sensitivity (5.5), conservation (5.6))`` errors of ``explainer`` on ``x``."""
    targets = targets.to(x.device).long().view(-1)
    a, c, s, kind = channel_contributions(explainer, x, targets)
    abl = ablated_scores(explainer, x, targets, a, contrastive=kind != "logit", batch_size=batch_size)
    c, s = c.double(), s.double()
    delta = s.view(-1, 1) - abl.double()
    den = delta.abs().sum(1)
    sens = torch.where(den > 0, (delta - c).abs().sum(1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))
    cons = torch.where(s != 0, (s - c.sum(1)).abs() / s.abs().clamp_min(1e-300), torch.full_like(s, float("nan")))
    return sens, cons


class _Axiom(PerItemMetric):
    higher_is_better = False
    which = 0

    def __init__(self, batch_size: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        self.batch_size = int(batch_size)

    def update(self, explainer, images: Tensor, targets: Tensor) -> None:
        self._add(axiom_errors(explainer, images, targets, self.batch_size)[self.which])

    def update_from_context(self, ctx: dict) -> None:
        ex = ctx["explainer"]
        if getattr(ex, "name", None) not in AXIOM_EXPLAINERS:  # not defined for this explainer: NaN items
            self._add(torch.full((ctx["images"].shape[0],), float("nan")))
            return
        self.update(ex, ctx["images"], ctx["targets"])


class AxiomSensitivity(_Axiom):
    """Sensitivity-axiom error ↓ (seed 002 eq 5.5); NaN (reported as such) for explainers without weights."""

    which = 0


class AxiomConservation(_Axiom):
    """Conservation-axiom error ↓ (seed 002 eq 5.6); NaN for explainers without channel weights."""

    which = 1
