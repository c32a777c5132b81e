"""A convolutional stem for timm ViTs ("Early convolutions help transformers see better", Xiao et al. 2021).

The single patchify convolution (kernel = stride = patch) of timm's ``PatchEmbed`` is replaced by
``log2(patch)`` 3x3 stride-2 conv-BN-ReLU layers (widths ``stem_channels``; extra widths add stride-1 3x3
layers) and a 1x1 projection to ``embed_dim`` (``proj``). It plugs into timm's ``VisionTransformer`` through
timm's own ``embed_layer`` argument, so the token grid (``img_size / patch``), the position embedding and the
blocks are exactly those of the plain ViT (eX-ViT's E-MHA and X-Pruner's head/MLP masks act on the blocks).

    timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8,
                      embed_layer=conv_stem_embed_layer([24, 48, 96]))

In the zoo the option is the JSON-able timm kwarg ``conv_stem: [24, 48, 96]`` (``backbone_kwargs`` of any ViT
model, translated by :func:`models.backbones.vit_stem_kwargs`); no name is ever read from a file.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

from timm.layers import PatchEmbed, to_2tuple
from timm.layers.format import Format, nchw_to
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ConvStemPatchEmbed", "conv_stem_embed_layer"]


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` with a conv stem: (B, C, H, W) -> tokens with the same grid, format and padding rules.

    Args (beyond timm's ``PatchEmbed``):
        stem_channels: widths of the 3x3 conv-BN-ReLU layers; the first ``log2(patch)`` have stride 2, the rest
            stride 1. ``proj`` is the final 1x1 conv to ``embed_dim`` (bias as timm's ``bias``).
    """

    def __init__(self, *args, stem_channels: Sequence[int] = (24, 48, 96), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        ph, pw = self.patch_size
        n_down = int(round(math.log2(ph))) if ph > 0 else -1
        if ph != pw or ph < 2 or 2 ** n_down != ph:
            raise ValueError(f"conv_stem needs a square power-of-two patch (2, 4, 8, 16...), got patch_size "
                             f"{self.patch_size}; use the plain patchify stem (no conv_stem) for this patch size.")
        widths = [int(c) for c in stem_channels]
        if len(widths) < n_down or min(widths, default=0) < 1:
            raise ValueError(f"conv_stem needs at least log2(patch) = {n_down} positive widths for patch {ph} "
                             f"(one stride-2 3x3 conv each), got {list(stem_channels)}.")
        in_chans, embed_dim = self.proj.in_channels, self.proj.out_channels
        layers, c = [], in_chans
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, stride=2 if i < n_down else 1, padding=1, bias=False),
                       nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, embed_dim, kernel_size=1, bias=self.proj.bias is not None)
        self.stem_channels = tuple(widths)

    def set_input_size(self, img_size=None, patch_size=None):
        if patch_size is not None and tuple(to_2tuple(patch_size)) != tuple(self.patch_size):
            raise ValueError("a conv-stem patch embedding cannot change its patch size (its stem fixes it).")
        super().set_input_size(img_size=img_size)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        if self.img_size is not None and self.strict_img_size and (H, W) != tuple(self.img_size):
            raise ValueError(f"Input size ({H}, {W}) doesn't match the model's {tuple(self.img_size)}.")
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        elif H % ph or W % pw:
            raise ValueError(f"Input size ({H}, {W}) should be divisible by the patch size {self.patch_size}.")
        x = self.proj(self.stem(x))
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)


def conv_stem_embed_layer(stem_channels: Sequence[int]):
    """The ``embed_layer`` callable for timm's ``VisionTransformer`` (a ``functools.partial`` of the class)."""
    return functools.partial(ConvStemPatchEmbed, stem_channels=tuple(int(c) for c in stem_channels))
