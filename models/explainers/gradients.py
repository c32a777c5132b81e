"""Input-gradient saliency: the plain gradient and guided backpropagation (spec §3.10, seed 002 §2.5.2).

``gradient``: ``d y_c / d x``; ``guidedbackprop``: the same with every ReLU passing ``g * 1[a>0] * 1[g>0]``.
Both are visualised as ``n(max_channels |g|)`` (per-pixel maximum of the absolute gradient over the input
channels, then per-image min-max), already at input resolution, 2D and 3D.

Guided backprop uses the zoo's single implementation, :func:`models.guided_gradients.guided_backprop`
(a ``TorchFunctionMode`` that also catches functional / in-place ReLUs and refuses smooth activations
such as GELU with a clear error, so ViTs are refused); captum's ``GuidedBackprop`` (``nn.ReLU`` modules
only) is the fallback if that module is missing.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Explainer, gather_logit, normalize_saliency

__all__ = ["Gradient", "GuidedBackprop", "gradient_map"]


def gradient_map(g: Tensor) -> Tensor:
    """``(B, C, *spatial)`` gradient -> ``n(max_c |g|)`` ``(B, *spatial)``."""
    return normalize_saliency(g.abs().amax(dim=1))


class Gradient(Explainer):
    """Plain input gradient (vanilla saliency) of the target logit."""

    name = "gradient"
    uses_layers = False

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        x = x.requires_grad_(True)
        (g,) = torch.autograd.grad(gather_logit(self.model(x), targets).sum(), x)
        return gradient_map(g)


class GuidedBackprop(Explainer):
    """Guided backpropagation of the target logit (ReLU networks; smooth activations are refused)."""

    name = "guidedbackprop"
    uses_layers = False

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        try:
            from ..guided_gradients import guided_backprop
        except ImportError:  # pragma: no cover - fallback
            from captum.attr import GuidedBackprop as _Captum

            g = _Captum(self.model).attribute(x, target=targets)
        else:
            g = guided_backprop(self.model, x, targets)
        return gradient_map(g)
