"""Explanations that need no post-hoc computation: the model's own map and two sanity baselines.

* ``intrinsic``: ``model.forward_explain(x, targets)[1]`` (the zoo interface, :mod:`models.base`).
* ``random``: i.i.d. uniform map, seeded (``seed``) and re-seeded at every call, so the same inputs
  give the same map.
* ``fakecam`` (Poppi et al.; seed 001 §2.4): 1 everywhere except the top-left pixel (voxel), which is 0
  -- it nearly maximises AD/AI while failing AG, a check that a metric can be gamed.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Explainer

__all__ = ["Intrinsic", "RandomMap", "FakeCAM"]


class Intrinsic(Explainer):
    name = "intrinsic"
    uses_layers = False

    def __init__(self, model: nn.Module, target_layers=None) -> None:
        super().__init__(model, None)
        if not hasattr(model, "forward_explain"):
            raise ValueError(f"{type(model).__name__} has no forward_explain(); 'intrinsic' needs a zoo model "
                             "(models.InterpretableClassifier).")

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        return self.model.forward_explain(x, targets)[1]


class RandomMap(Explainer):
    name = "random"
    uses_layers = False
    control = True

    def __init__(self, model: nn.Module, target_layers=None, seed: int = 0) -> None:
        super().__init__(model, None)
        self.seed = int(seed)

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.rand((x.shape[0],) + tuple(x.shape[2:]), generator=gen).to(x.device)


class FakeCAM(Explainer):
    name = "fakecam"
    uses_layers = False
    control = True

    def __init__(self, model: nn.Module, target_layers=None) -> None:
        super().__init__(model, None)

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        s = torch.ones((x.shape[0],) + tuple(x.shape[2:]), device=x.device)
        s[(slice(None),) + (0,) * (x.dim() - 2)] = 0.0
        return s
