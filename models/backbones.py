"""Backbones: any timm model in feature-extraction mode, plus a small 3D CNN for volumes.

:class:`Backbone` wraps ``timm.create_model(name, features_only=True)`` so every mechanism attaches to
every timm backbone the same way -- through timm's ``feature_info`` (channels, reductions, stage
names), never through per-model code. It

* takes images in **[0, 1] pixel space** and normalises them inside (timm's ``pretrained_cfg``
  mean/std), so explainers and metrics can mask pixels with "black" = 0 (spec
  explainers_and_metrics §1);
* returns the list of stage feature maps ``(B, C_i, *spatial_i)`` (ViT tokens are reshaped to maps
  by timm);
* passes every stage output through an ``nn.Identity`` *tap* (``backbone.taps[i]``): the stable hook
  point for CAM explainers (``taps[-1]`` is the default target layer of every model);
* loads ``pretrained=True`` from timm's hub, or ``weights=PATH`` (safetensors or state dict, read
  without unpickling) with a strict key check: the classifier keys are dropped (a new head is
  trained), the stem is adapted to ``in_chans`` as timm's ``pretrained_cfg_overlay`` does, and any
  other missing/unexpected key is an error.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from .weights import WeightLoadError, read_state_dict

__all__ = ["Backbone", "create_backbone", "list_backbones", "CNN3D", "SUGGESTED_BACKBONES"]

#: backbones the zoo is tested with (any timm model with ``features_only`` support works).
SUGGESTED_BACKBONES = ("resnet18", "resnet50", "convnext_tiny", "convnext_small", "vgg11_bn", "mobilenetv2_100",
                       "deit_tiny_patch16_224", "deit_small_patch16_224", "vit_small_patch16_224", "cnn3d")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def list_backbones() -> List[str]:
    return list(SUGGESTED_BACKBONES)


class _FeatureInfo:
    """Minimal stand-in for timm's FeatureInfo (channels / reduction / module_name)."""

    def __init__(self, channels, reductions, names):
        self._c, self._r, self._n = list(channels), list(reductions), list(names)

    def channels(self):
        return list(self._c)

    def reduction(self):
        return list(self._r)

    def module_name(self):
        return list(self._n)


class CNN3D(nn.Module):
    """A small residual 3D CNN (stem + 4 stages) with a timm-like ``feature_info`` for volumes."""

    def __init__(self, in_chans: int = 1, widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(
                nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
                nn.Conv3d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))

        self.stem = nn.Sequential(nn.Conv3d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm3d(widths[0]),
                                  nn.ReLU(inplace=True))
        chans = [widths[0]] + list(widths)
        self.stages = nn.ModuleList(block(chans[i], chans[i + 1], 1 if i == 0 else 2) for i in range(len(widths)))
        self.feature_info = _FeatureInfo(widths, [1, 2, 4, 8][: len(widths)],
                                         [f"stages.{i}" for i in range(len(widths))])

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.stem(x)
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return out


_CUSTOM = {"cnn3d": (CNN3D, 3)}


class Backbone(nn.Module):
    """Feature-extraction backbone (see module docstring)."""

    def __init__(self, name: str = "resnet18", pretrained: bool = False, weights: Optional[str] = None,
                 in_chans: int = 3, out_indices: Optional[Sequence[int]] = None, **timm_kwargs) -> None:
        super().__init__()
        self.name = name
        self.in_chans = int(in_chans)
        if name in _CUSTOM:
            cls, self.spatial_dims = _CUSTOM[name]
            if pretrained:
                raise ValueError(f"backbone {name!r} has no pretrained weights; use weights=PATH or train it.")
            self.body = cls(in_chans=in_chans, **timm_kwargs)
            mean, std = (0.5,) * in_chans, (0.25,) * in_chans
            if weights:
                from .weights import load_weights

                load_weights(self.body, weights, verbose=True)
        else:
            self.spatial_dims = 2
            self.body = self._create_timm(name, pretrained, weights, in_chans, out_indices, timm_kwargs)
            cfg = getattr(self.body, "pretrained_cfg", None) or {}
            mean, std = cfg.get("mean", _IMAGENET_MEAN), cfg.get("std", _IMAGENET_STD)
            if len(mean) != in_chans:  # grey-scale / multi-channel: average the RGB statistics
                mean = (sum(mean) / len(mean),) * in_chans
                std = (sum(std) / len(std),) * in_chans
        info = self.body.feature_info
        self.channels: List[int] = list(info.channels())
        self.reductions: List[int] = list(info.reduction())
        self.stage_names: List[str] = list(info.module_name())
        self.num_features = self.channels[-1]
        self.taps = nn.ModuleList(nn.Identity() for _ in self.channels)
        shape = (1, in_chans) + (1,) * self.spatial_dims
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape), persistent=False)

    @staticmethod
    def _create_timm(name, pretrained, weights, in_chans, out_indices, timm_kwargs):
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
            raise ValueError(f"Unknown backbone {name!r}: not a timm model nor one of {list(_CUSTOM)}. "
                             f"Similar timm names: {', '.join(close) or 'none'}. "
                             f"Tested backbones: {', '.join(SUGGESTED_BACKBONES)}.")
        kwargs = dict(features_only=True, in_chans=in_chans, **timm_kwargs)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if weights:
            _check_backbone_file(name, weights, in_chans, timm_kwargs)
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=os.fspath(weights)))
        else:
            kwargs["pretrained"] = bool(pretrained)
        try:
            return timm.create_model(name, **kwargs)
        except Exception as e:
            if pretrained and not weights:
                raise RuntimeError(
                    f"Could not fetch pretrained weights for {name!r} from timm's hub ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}). Without internet, download the weights elsewhere and "
                    f"pass backbone_weights=PATH (a .safetensors or state-dict file).") from None
            raise

    def forward(self, x: Tensor) -> List[Tensor]:
        feats = self.body((x - self.mean) / self.std)
        return [tap(f) for tap, f in zip(self.taps, feats)]


def _check_backbone_file(name: str, path: str, in_chans: int, timm_kwargs: dict) -> None:
    """Strictly compare a weights file against timm's model ``name``; raise on any mismatch.

    Classifier keys (``pretrained_cfg['classifier']``) are dropped on purpose (a new head is trained);
    a first-conv channel mismatch is adapted by timm (``in_chans``). Everything else must match.
    """
    import timm

    sd = read_state_dict(path)
    ref = timm.create_model(name, pretrained=False, **timm_kwargs)
    cfg = ref.pretrained_cfg or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    first = cfg.get("first_conv") or ()
    first = (first,) if isinstance(first, str) else tuple(first)
    own = ref.state_dict()
    is_head = lambda k: any(k == h + ".weight" or k == h + ".bias" or k.startswith(h + ".") for h in heads)  # noqa: E731
    missing = [k for k in own if k not in sd and not is_head(k)]
    unexpected = [k for k in sd if k not in own and not is_head(k)]
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
           if k in own and not is_head(k) and sd[k].shape != own[k].shape
           and not (any(k == f + ".weight" for f in first) and sd[k].shape[0] == own[k].shape[0])]
    if missing or unexpected or bad:
        raise WeightLoadError(
            f"Weights file {path!r} does not fit timm backbone {name!r}: "
            + "; ".join(f"{len(v)} {lab}: {', '.join(v[:8])}" for lab, v in
                        (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad)) if v)
            + ". Check that the file was saved from the same timm architecture.")
    dropped = [k for k in sd if is_head(k)]
    print(f"[weights] backbone {name}: {len(sd) - len(dropped)} tensors match"
          + (f"; classifier dropped ({', '.join(dropped)}): a new head is trained" if dropped else "")
          + (f"; stem adapted to in_chans={in_chans}" if in_chans != 3 else ""))


def create_backbone(name: str = "resnet18", **kwargs) -> Backbone:
    return Backbone(name, **kwargs)
