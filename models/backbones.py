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
  other missing/unexpected key is an error. ``PATH`` may also be a **zoo checkpoint** (any mechanism,
  Lightning ``.ckpt`` / safetensors / state dict): only its backbone keys are taken and the rest is
  reported (:func:`backbone_state_dict`);
* accepts an ``nn.Module`` instead of a name ("bring your own backbone", :func:`wrap_feature_module`):
  a timm model (full or ``features_only``), or any module torchvision's ``create_feature_extractor``
  can trace (e.g. ``torchvision.models.resnet50()``); its stages are found by a dry run.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .weights import WeightLoadError, read_state_dict

__all__ = ["Backbone", "create_backbone", "list_backbones", "CNN3D", "SUGGESTED_BACKBONES", "backbone_state_dict",
           "wrap_feature_module", "vit_stem_kwargs"]

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

    def __init__(self, name: Union[str, nn.Module] = "resnet18", pretrained: bool = False,
                 weights: Optional[str] = None, in_chans: int = 3, out_indices: Optional[Sequence[int]] = None,
                 **timm_kwargs) -> None:
        super().__init__()
        self.in_chans = int(in_chans)
        if isinstance(name, nn.Module):
            if pretrained or weights:
                raise ValueError("the backbone is a module instance: load its weights before passing it "
                                 "(pretrained / backbone_weights apply to timm names).")
            mean, std = timm_kwargs.pop("mean", None), timm_kwargs.pop("std", None)
            if timm_kwargs:
                raise ValueError(f"backbone_kwargs {sorted(timm_kwargs)} apply to timm names only; build the module "
                                 "with them instead (only 'mean' and 'std' are read for a module instance).")
            cfg = getattr(name, "pretrained_cfg", None) or {}
            mean, std = mean or cfg.get("mean", _IMAGENET_MEAN), std or cfg.get("std", _IMAGENET_STD)
            self.name = type(name).__name__
            self.body, self.spatial_dims = wrap_feature_module(name, in_chans, out_indices)
            if len(mean) != in_chans:
                mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
        elif name in _CUSTOM:
            self.name = name
            cls, self.spatial_dims = _CUSTOM[name]
            if pretrained:
                raise ValueError(f"backbone {name!r} has no pretrained weights; use weights=PATH or train it.")
            self.body = cls(in_chans=in_chans, **timm_kwargs)
            mean, std = (0.5,) * in_chans, (0.25,) * in_chans
            if weights:
                from .weights import load_weights

                load_weights(self.body, backbone_state_dict(weights, verbose=True), verbose=True)
        else:
            if not isinstance(name, str):
                raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(name).__name__}.")
            self.name = name
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
        timm_kwargs = vit_stem_kwargs(name, timm_kwargs)
        kwargs = dict(features_only=True, in_chans=in_chans, **timm_kwargs)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if weights:  # checked (and zoo checkpoints converted) here; timm adapts the stem / resizes pos-embeds
            sd = _check_backbone_file(name, weights, in_chans, timm_kwargs)
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd))
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


_ZOO_PREFIXES = ("backbone.body.", "encoder.")  # Backbone-based models / eX-ViT's encoder


def backbone_state_dict(source, native_keys: Optional[Sequence[str]] = None,
                        verbose: bool = True) -> Dict[str, Tensor]:
    """Backbone tensors of a weights file (or state dict), read safely.

    A timm / hub state dict is returned as is. A **zoo checkpoint** (keys ``backbone.body.*`` of any
    Backbone-based model, or ``encoder.*`` of eX-ViT; Lightning ``model.`` prefixes are already stripped)
    gives only its backbone keys, prefix removed; every other key (classifier, mechanism) is reported as
    not used. With ``native_keys`` (the plain timm model's keys), feature-wrapper names are mapped back
    to timm's (``stem_0.weight`` -> ``stem.0.weight``, ``model.blocks.0...`` -> ``blocks.0...``).
    """
    return _backbone_sd(source, native_keys, verbose)[0]


def _backbone_sd(source, native_keys, verbose) -> Tuple[Dict[str, Tensor], bool]:
    from .weights import clean_state_dict

    sd = clean_state_dict(source) if isinstance(source, dict) else read_state_dict(source)
    prefix = next((p for p in _ZOO_PREFIXES if any(k.startswith(p) for k in sd)), None)
    if prefix is None:
        return sd, False
    body = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.endswith(".attn_bias")}
    rest = sorted(k for k in sd if not k.startswith(prefix) or k.endswith(".attn_bias"))
    if native_keys is not None:
        alias = {}
        for n in native_keys:
            parts = n.split(".")
            alias["model." + n] = n  # timm's FeatureGetterNet (ViTs)
            for j in range(1, len(parts)):
                alias["_".join(parts[:j]) + "." + ".".join(parts[j:])] = n  # FeatureListNet flattening
        native = set(native_keys)
        body = {(k if k in native else alias.get(k, k)): v for k, v in body.items()}
    if verbose:
        groups = sorted({k.split(".")[0] for k in rest})
        print(f"[weights] zoo checkpoint: {len(body)} backbone tensors ({prefix}*) taken"
              + (f"; {len(rest)} other keys not used ({', '.join(g + '.*' for g in groups)})" if rest else ""))
    return body, True


def _check_backbone_file(name: str, path, in_chans: int, timm_kwargs: dict) -> Dict[str, Tensor]:
    """Strictly compare a weights file against timm's model ``name``; raise on any mismatch; return its
    tensors with timm's key names (zoo checkpoints converted, :func:`backbone_state_dict`).

    Classifier keys (``pretrained_cfg['classifier']``) are dropped on purpose (a new head is trained);
    a first-conv channel mismatch is adapted by timm (``in_chans``), a position-embedding size mismatch
    is resampled by timm (ViTs at another ``img_size``). Everything else must match.
    """
    import timm

    ref = timm.create_model(name, pretrained=False, **timm_kwargs)
    sd, from_zoo = _backbone_sd(path, list(ref.state_dict()), True)
    if from_zoo:  # a zoo backbone holds only what timm's feature net keeps (e.g. no ConvNeXt head.norm)
        fnet = timm.create_model(name, pretrained=False, features_only=True, **timm_kwargs)
        feat = backbone_state_dict({"backbone.body." + k: v for k, v in fnet.state_dict().items()},
                                   list(ref.state_dict()), verbose=False)
    cfg = ref.pretrained_cfg or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    first = cfg.get("first_conv") or ()
    first = (first,) if isinstance(first, str) else tuple(first)
    own = ref.state_dict()
    is_head = lambda k: any(k == h + ".weight" or k == h + ".bias" or k.startswith(h + ".") for h in heads)  # noqa: E731
    missing = [k for k in own if k not in sd and not is_head(k) and (not from_zoo or k in feat)]
    unexpected = [k for k in sd if k not in own and not is_head(k)]
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
           if k in own and not is_head(k) and sd[k].shape != own[k].shape
           and not (any(k == f + ".weight" for f in first) and sd[k].shape[0] == own[k].shape[0])
           and not (k == "pos_embed" and sd[k].shape[-1] == own[k].shape[-1])]
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
    return sd


def _default_indices(n: int) -> Tuple[int, ...]:
    return tuple(range(n)) if n <= 5 else tuple(range(n - 3, n))  # timm's defaults (CNN stages / last 3 ViT blocks)


def wrap_feature_module(module: nn.Module, in_chans: int = 3, out_indices: Optional[Sequence[int]] = None
                        ) -> Tuple[nn.Module, int]:
    """Turn a module into a feature net with a timm-like ``feature_info``; returns ``(body, spatial_dims)``.

    * a timm ``features_only`` net (or any module whose ``feature_info`` has ``channels()``): used as is;
    * a timm model: timm's own wrapper, ``FeatureGetterNet`` (``forward_intermediates``: CNNs and ViTs,
      tokens come out as maps) or ``FeatureListNet``;
    * any other module (e.g. a torchvision CNN): a dry run at 224 px (64 px for 3D) records the top-level
      children's outputs; the last child at each resolution is a stage (global pools excluded), then
      torchvision's ``create_feature_extractor`` cuts the graph after the last stage.

    The instance is used, not copied (timm's wrapper may prune its classifier).
    """
    info = getattr(module, "feature_info", None)
    if info is not None and callable(getattr(info, "channels", None)):
        if out_indices is not None:
            raise ValueError("the module is already a feature net: choose out_indices when building it.")
        return module, _spatial_dims_of(module, in_chans)
    if isinstance(info, (list, tuple)) and info and isinstance(info[0], dict):  # a timm model
        from timm.models._features import FeatureGetterNet, FeatureListNet

        idx = tuple(out_indices) if out_indices is not None else _default_indices(len(info))
        try:
            if hasattr(module, "forward_intermediates"):
                body = FeatureGetterNet(module, out_indices=idx)
            else:
                body = FeatureListNet(module, out_indices=idx)
        except Exception as e:
            raise ValueError(f"timm could not wrap {type(module).__name__} for feature extraction "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); pass a features_only model "
                             "(timm.create_model(name, features_only=True)).") from None
        return body, 2
    return _wrap_traced(module, in_chans, out_indices)


def _spatial_dims_of(module: nn.Module, in_chans: int) -> int:
    for dims in (2, 3):
        try:
            with torch.no_grad():
                out = module.eval()(torch.rand((1, in_chans) + (64,) * dims))
            return out[-1].dim() - 2
        except Exception:
            continue
    raise ValueError(f"{type(module).__name__} does not run on (1, {in_chans}, 64, 64) nor 3D input.")


class _TracedFeatures(nn.Module):
    """``create_feature_extractor`` output (dict) as a list + ``feature_info``."""

    def __init__(self, graph: nn.Module, info: _FeatureInfo) -> None:
        super().__init__()
        self.graph, self.feature_info = graph, info

    def forward(self, x: Tensor) -> List[Tensor]:
        return list(self.graph(x).values())


def _wrap_traced(module: nn.Module, in_chans: int, out_indices) -> Tuple[nn.Module, int]:
    name = type(module).__name__
    seen, hooks = [], []
    for child_name, child in module.named_children():
        hooks.append(child.register_forward_hook(
            lambda m, i, o, n=child_name: seen.append((n, tuple(o.shape))) if torch.is_tensor(o) else None))
    dims, was_training = None, module.training
    try:
        for d in (2, 3):
            seen.clear()
            try:
                with torch.no_grad():
                    module.eval()(torch.rand((1, in_chans) + ((224,) * 2 if d == 2 else (64,) * 3)))
                dims = d
                break
            except Exception:
                continue
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)
    if dims is None:
        raise ValueError(f"backbone module {name} does not run on a (1, {in_chans}, 224, 224) image nor a 3D volume.")
    maps = [(n, s) for n, s in seen if len(s) == dims + 2 and any(v > 1 for v in s[2:])]
    stages: Dict[Tuple[int, ...], Tuple[str, Tuple[int, ...]]] = {}
    for n, s in maps:  # the last child at each resolution
        stages.pop(s[2:], None)
        stages[s[2:]] = (n, s)
    chosen = list(stages.values())
    if not chosen:
        raise ValueError(f"backbone module {name}: no top-level child returns (B, C, *spatial) maps, so no stage "
                         "was found. Pass a timm model, or wrap your network so that its children are the stages.")
    if out_indices is not None:
        chosen = [chosen[i] for i in out_indices]
    side = 224 if dims == 2 else 64
    try:
        from torchvision.models.feature_extraction import create_feature_extractor

        graph = create_feature_extractor(module, return_nodes={n: n for n, _ in chosen})
    except Exception as e:
        raise ValueError(f"torchvision's create_feature_extractor could not trace {name} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}). Pass a timm model, or a module with a timm-like "
                         "feature_info and a forward returning the list of stage maps.") from None
    info = _FeatureInfo([s[1] for _, s in chosen], [max(1, round(side / s[2])) for _, s in chosen],
                        [n for n, _ in chosen])
    return _TracedFeatures(graph, info), dims


def create_backbone(name: str = "resnet18", **kwargs) -> Backbone:
    return Backbone(name, **kwargs)


def vit_stem_kwargs(name: str, kw: dict) -> dict:
    """Copy of timm kwargs ``kw`` with the zoo's ViT option ``conv_stem: [w1, w2, ...]`` (JSON-able: stem widths)
    turned into timm's own ``embed_layer`` argument (:class:`models.vit_stem.ConvStemPatchEmbed`, Xiao et al.
    2021): same token grid and blocks, a conv stem instead of the patchify conv. Other kwargs pass through."""
    kw = dict(kw)
    stem = kw.pop("conv_stem", None)
    if stem is None or stem is False:
        return kw
    if "embed_layer" in kw:
        raise ValueError("pass either conv_stem or embed_layer, not both.")
    if not isinstance(stem, (list, tuple)) or not stem or not all(type(c) is int for c in stem):
        raise ValueError(f"conv_stem takes a list of stem widths (ints, one stride-2 3x3 conv each), e.g. "
                         f"[24, 48, 96] for patch 8; got {stem!r}.")
    import timm
    from timm.models import model_entrypoint

    if timm.is_model(name) and model_entrypoint(name).__module__ not in ("timm.models.vision_transformer",
                                                                        "timm.models.deit"):
        raise ValueError(f"conv_stem applies to timm VisionTransformer models (vit_*/deit_*), not {name!r}.")
    from .vit_stem import conv_stem_embed_layer

    kw["embed_layer"] = conv_stem_embed_layer(stem)
    return kw


def create_timm_vit(name: str, pretrained: bool, weights, kw: dict, who: str, examples: str,
                    extra: str = "") -> nn.Module:
    """A timm ``VisionTransformer`` for the ViT mechanisms (eX-ViT, X-Pruner): ``kw`` are timm kwargs;
    ``weights`` a local file (timm state dict, safetensors or zoo checkpoint, converted and checked key by key)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(name):
        raise ValueError(f"Unknown backbone {name!r}. {who} needs a timm VisionTransformer, e.g. {examples}.")
    kw = vit_stem_kwargs(name, kw)
    if weights:
        sd = _check_backbone_file(name, weights, kw.get("in_chans", 3), {k: v for k, v in kw.items() if k != "num_classes"})
        kw.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd))  # zoo checkpoints converted
    else:
        kw["pretrained"] = bool(pretrained)
    try:
        vit = timm.create_model(name, **kw)
    except Exception as e:
        if pretrained and not weights:
            raise RuntimeError(f"Could not fetch pretrained weights for {name!r} ({type(e).__name__}); without "
                               "internet pass backbone_weights=PATH (.safetensors or state dict).") from None
        raise
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"{who} needs a timm VisionTransformer backbone (vit_*/deit_*), got {name!r} "
                        f"({type(vit).__name__}).{extra}")
    return vit

