"""The plain classifier every mechanism is compared against: timm backbone + GAP + linear.

Its intrinsic explanation is CAM (Zhou et al.; seed 001 eq. 1.3 with ``w_k^c = W_fc[c, k]``): the
class-``c`` row of the linear layer applied to the last feature map, computed in the same forward
pass (no gradients, exportable).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .backbones import Backbone
from .base import InterpretableClassifier, normalize_saliency
from .registry import register_model

__all__ = ["Baseline", "global_avg_pool"]


def global_avg_pool(f: Tensor) -> Tensor:
    """GAP over all spatial axes: ``(B, C, *spatial) -> (B, C)``."""
    return f.flatten(2).mean(dim=2)


@register_model("baseline", test_kwargs=dict(backbone="resnet18"))
class Baseline(InterpretableClassifier):
    """timm backbone (feature mode) -> GAP -> dropout -> linear.

    Args:
        num_classes: number of outputs.
        backbone: any timm model name with ``features_only`` support, or ``cnn3d`` for volumes.
        pretrained: timm hub weights (needs internet).
        backbone_weights: local weights file for the backbone (safetensors or state dict).
        in_chans: input channels (1 for grey-scale / MRI).
        drop_rate: dropout before the classifier.
        backbone_kwargs: extra timm kwargs (e.g. ``img_size`` for ViTs).
    """

    explanation_kind = "cam"

    def __init__(self, num_classes: int = 10, backbone: str = "resnet18", pretrained: bool = False,
                 backbone_weights: Optional[str] = None, in_chans: Optional[int] = None, drop_rate: float = 0.0,
                 backbone_kwargs: Optional[dict] = None) -> None:
        if in_chans is None:
            in_chans = 1 if backbone == "cnn3d" else 3
        self.backbone = None  # set below; declared for readers
        super().__init__(num_classes, in_chans)
        self.backbone = Backbone(backbone, pretrained=pretrained, weights=backbone_weights, in_chans=in_chans,
                                 **(backbone_kwargs or {}))
        self.spatial_dims = self.backbone.spatial_dims
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.backbone.num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Last stage feature map ``(B, C, *spatial)``."""
        self.check_input(x)
        return self.backbone(x)[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(global_avg_pool(self.features(x))))

    def forward_explain(self, x: Tensor, target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        f = self.features(x)
        logits = self.fc(self.drop(global_avg_pool(f)))
        c = self.resolve_target(logits, target)
        cam = torch.einsum("bc...,bc->b...", f, self.fc.weight[c])
        scale = torch.einsum("bc...,bc->b...", f.abs(), self.fc.weight[c].abs())  # cancellation-free magnitude
        return logits, normalize_saliency(cam, x.shape[2:], scale=scale)

    def cam_target_layer(self) -> nn.Module:
        return self.backbone.taps[-1]
