"""The one interface every model of the zoo shares.

Every model is an :class:`InterpretableClassifier`:

* ``model(x)`` returns logits ``(B, num_classes)`` (plain ``nn.Module`` semantics, exportable).
* ``model.forward_explain(x, target=None)`` returns ``(logits, saliency)`` in **one pass**, where
  ``saliency`` is the model's *intrinsic* explanation for class ``target`` (default: the predicted
  class), shaped ``(B, *input_spatial)`` (``(B, H, W)`` or ``(B, D, H, W)``), min-max normalised
  to ``[0, 1]`` per image. Class-agnostic explanations (e.g. CA-Stream's raw attention) ignore
  ``target``.
* ``model.explain(x, target=None)`` is ``forward_explain(...)[1]``.
* ``model.explanation_kind`` names what the map is (``"cam"``, ``"attention"``, ``"cluster_cam"``,
  ``"attribute"``, ...), so reports can label it.
* ``model.cam_target_layer()`` returns the module whose activations post-hoc CAM explainers use by
  default, and ``model.reshape_transform`` turns its output into ``(B, C, *spatial)`` (ViT tokens).
* ``model.mechanism_prefixes`` lists the parameter-name prefixes that the mechanism adds on top of a
  plain backbone. Weight loading (:mod:`models.weights`) accepts exactly those keys as missing
  when a plain backbone/baseline checkpoint is loaded into a mechanism, and trainers freeze or
  give separate learning rates by these names.

Everything here is pure PyTorch (no Lightning).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InterpretableClassifier", "normalize_saliency", "upsample_to", "check_input", "is_capturing",
           "check_values", "NonFiniteError"]


def upsample_to(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Resize ``(B, C, *spatial)`` maps to ``size`` with (tri/bi)linear interpolation."""
    if is_capturing():  # keep traced sizes symbolic (dynamic height/width in exported graphs)
        size = tuple(size)
    else:
        size = tuple(int(s) for s in size)
        if tuple(maps.shape[2:]) == size:
            return maps
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(maps, size=size, mode=mode, align_corners=False)


def normalize_saliency(maps: Tensor, size: Optional[Sequence[int]] = None, eps: float = 1e-7,
                       scale: Optional[Tensor] = None, rtol: float = 1e-4) -> Tensor:
    """Per-image min-max normalisation to [0, 1] (seed 001 eq. 1.7), optionally resized first.

    ``maps``: ``(B, *spatial)``; returns ``(B, *size)``: ``(m - min) / (max - min + eps)`` per image
    (batch-independent). A map whose range is at most ``rtol * scale`` is rounding noise (a constant
    image, a 1x1 map upsampled) and becomes all zeros instead of being stretched to [0, 1].
    ``scale``: per-image magnitude of the terms the map was summed from (``(B,)`` or ``(B, *spatial)``,
    max taken), e.g. ``sum_k |w_k| |A_k|`` for a CAM, whose own values can be small by cancellation
    (convnext on a constant image: CAM -0.0116 +- 4e-7, terms 8.8); default ``max |m|``.
    """
    if size is not None:
        maps = upsample_to(maps.unsqueeze(1), size).squeeze(1)
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    if scale is None:
        mag = torch.maximum(hi.abs(), lo.abs())
    else:
        mag = torch.as_tensor(scale, device=flat.device, dtype=flat.dtype).reshape(flat.shape[0], -1).abs()
        mag = mag.max(dim=1, keepdim=True).values
    rng = hi - lo
    return torch.where(rng > rtol * mag, (flat - lo) / (rng + eps), torch.zeros_like(flat)).view_as(maps)


def check_input(x: Tensor, in_chans: int, spatial_dims: int, name: str = "model") -> None:
    """Raise a clear error when ``x`` does not fit the model (channels / 2D-vs-3D)."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}.")
    want = 2 + spatial_dims
    if x.dim() != want:
        kind = {2: "2D images (B, C, H, W)", 3: "3D volumes (B, C, D, H, W)"}[spatial_dims]
        raise ValueError(
            f"{name} expects {kind} but got a tensor of shape {tuple(x.shape)}. "
            + ("Use a 3D model (e.g. create_model('baseline', backbone='cnn3d')) for volumes."
               if x.dim() == 5 else "Use a 2D model for images." if x.dim() == 4 else
               "Add the batch and channel dimensions.")
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{name} was built for in_chans={in_chans} but the input has {x.shape[1]} channels "
            f"(shape {tuple(x.shape)}). Build the model with in_chans={x.shape[1]} "
            f"(e.g. create_model(..., in_chans={x.shape[1]})) or convert the data."
        )
    check_values(x, name)


class NonFiniteError(ValueError):
    """NaN/inf where finite numbers are required (inputs, loss, logits): stop instead of a silent wrong result."""


def check_values(x: Tensor, name: str = "model") -> None:
    """Refuse integer pixels, NaN/inf and values far outside [0, 1] with the fix (one ``aminmax`` per batch;
    skipped while a graph is captured). Models take float pixels in [0, 1] and normalise inside."""
    if not x.is_floating_point():
        raise TypeError(f"{name} got {x.dtype} pixels; models take float images in [0, 1]: use x.float() / 255 "
                        "(torchvision: transforms.v2.ToDtype(torch.float32, scale=True)).")
    if is_capturing() or x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        n = int((~torch.isfinite(x.detach())).sum())
        raise NonFiniteError(f"{name} input has {n} NaN/inf values (shape {tuple(x.shape)}): the logits and "
                             "saliency would be meaningless. Fix the data (e.g. torch.nan_to_num or drop the file).")
    if hi > 1.5 or lo < -0.5:
        raise ValueError(f"{name} expects pixels in [0, 1] but the input spans [{lo:.3g}, {hi:.3g}]. "
                         + ("0-255 values? Divide by 255. " if hi > 1.5 else "")
                         + "Do not normalise with mean/std: the model does it inside "
                           "(model.pretrained_cfg['inner_normalization']).")


def is_capturing() -> bool:
    """True while a graph is being captured (``torch.jit`` tracing / ONNX export / ``torch.export`` /
    ``torch.compile``): code then skips data-dependent checks that cannot live in a graph."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    comp = getattr(torch, "compiler", None)
    return bool(comp is not None and (getattr(comp, "is_exporting", lambda: False)()
                                      or getattr(comp, "is_compiling", lambda: False)()))


class InterpretableClassifier(nn.Module):
    """Base class of every model in the zoo (see module docstring for the contract)."""

    #: what the intrinsic explanation is; subclasses override.
    explanation_kind: str = "cam"
    #: parameter-name prefixes the mechanism adds on top of a plain backbone.
    mechanism_prefixes: Tuple[str, ...] = ()

    def __init__(self, num_classes: int, in_chans: int = 3, spatial_dims: int = 2) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.spatial_dims = int(spatial_dims)

    # ---- the contract -------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_explain(self, x: Tensor, target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Return ``(logits, saliency)``; saliency ``(B, *x.shape[2:])`` in [0, 1]."""
        raise NotImplementedError(f"{type(self).__name__} has no intrinsic explanation.")

    def explain(self, x: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return self.forward_explain(x, target)[1]

    def cam_target_layer(self) -> nn.Module:
        """Default layer for post-hoc CAM explainers (the last feature stage)."""
        raise NotImplementedError(f"{type(self).__name__} does not define a default CAM layer.")

    #: turns the target layer output into (B, C, *spatial); identity for CNNs.
    reshape_transform: Optional[Callable[[Tensor], Tensor]] = None

    # ---- helpers for subclasses ---------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        check_input(x, self.in_chans, self.spatial_dims, type(self).__name__)

    def resolve_target(self, logits: Tensor, target: Optional[Tensor]) -> Tensor:
        """Target classes ``(B,)``: given ones, else the prediction. An entry ``-1`` also means "the
        predicted class" (the default of the exported graphs' ``target`` input, :mod:`models.export`)."""
        pred = logits.argmax(dim=1)
        if target is None:
            return pred
        target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
        if is_capturing():  # inside a traced/exported graph: no data-dependent checks, (1,) broadcasts
            return torch.where(target < 0, pred, target)
        if target.numel() == 1 and logits.shape[0] > 1:
            target = target.expand(logits.shape[0])
        if target.shape[0] != logits.shape[0]:
            raise ValueError(f"target has {target.shape[0]} entries for a batch of {logits.shape[0]}.")
        if (target < -1).any() or (target >= self.num_classes).any():
            raise ValueError(f"target classes must be in [0, {self.num_classes}) (or -1 = the predicted class), "
                             f"got {target.tolist()}.")
        return torch.where(target < 0, pred, target)

    def mechanism_parameters(self):
        """(name, parameter) pairs added by the mechanism (see ``mechanism_prefixes``)."""
        for name, p in self.named_parameters():
            if name.startswith(self.mechanism_prefixes):
                yield name, p

    # ---- head surgery and self-description (timm's conventions) -------------------------
    def get_classifier(self) -> nn.Module:
        """The module mapping pooled features to the ``num_classes`` logits (timm API): ``fc`` or ``head``."""
        for name in ("fc", "head"):
            m = self.__dict__.get("_modules", {}).get(name)
            if isinstance(m, nn.Module):
                return m
        raise NotImplementedError(f"{type(self).__name__} has no 'fc'/'head' classifier; override get_classifier().")

    def classifier_name(self) -> str:
        """Module name of :meth:`get_classifier` (``"fc"``, ``"head"``...); its ``.weight`` has ``num_classes`` rows."""
        clf = self.get_classifier()
        return next(n for n, m in self.named_modules() if m is clf)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs (timm API).

        Mechanisms with other class-dependent parameters (a query per class, a class-filter matrix...)
        extend this; everything else keeps its weights. ``num_classes=0`` (timm's "no head") is refused:
        every zoo model explains a class.
        """
        num_classes = int(num_classes)
        if num_classes < 1:
            raise ValueError(f"reset_classifier needs num_classes >= 1 (got {num_classes}): the zoo's models explain "
                             "a class, so they keep a classifier. Use model.backbone for features only.")
        old = self.get_classifier()
        if not isinstance(old, nn.Linear):
            raise NotImplementedError(f"{type(self).__name__}.reset_classifier handles a Linear classifier, got "
                                      f"{type(old).__name__}; override reset_classifier().")
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
        parent, _, leaf = self.classifier_name().rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, leaf, new)
        self.num_classes = num_classes
        overlay = self.__dict__.get("_pretrained_cfg_overlay")
        if overlay and "num_classes" in overlay:
            overlay["num_classes"] = num_classes

    def rebuild_kwargs(self) -> Dict[str, Any]:
        """Constructor kwargs (besides ``num_classes``) that rebuild this exact architecture, when a
        :meth:`reset_classifier` made it differ from ``create_model(name, num_classes=K)`` (e.g. PICNN's N)."""
        return {}

    def default_pretrained_cfg(self) -> Dict[str, Any]:
        """timm-style description of the expected input. Models take **[0, 1] pixels** and normalise inside,
        so ``mean``/``std`` at the input are 0/1 and the inner normalisation is ``inner_normalization``."""
        src = self.__dict__.get("_modules", {}).get("backbone")
        src = src if src is not None and torch.is_tensor(getattr(src, "mean", None)) else self
        mean, std = getattr(src, "mean", None), getattr(src, "std", None)
        inner = (dict(mean=[float(v) for v in mean.flatten()], std=[float(v) for v in std.flatten()])
                 if torch.is_tensor(mean) and torch.is_tensor(std) else None)
        body_cfg, spatial, fixed = {}, None, False
        for m in self.modules():
            cfg = m.__dict__.get("pretrained_cfg")
            if isinstance(cfg, dict) and not body_cfg:
                body_cfg = cfg
            pe = m.__dict__.get("_modules", {}).get("patch_embed")
            if pe is not None and getattr(pe, "img_size", None) is not None and spatial is None:
                spatial = tuple(int(v) for v in pe.img_size)  # ViTs: the position-embedding grid
                fixed = not (getattr(m, "dynamic_img_size", False) or getattr(pe, "dynamic_img_pad", False))
        if spatial is None:
            size = body_cfg.get("input_size")
            spatial = tuple(size[1:]) if size and len(size) == 1 + self.spatial_dims else \
                (224, 224) if self.spatial_dims == 2 else (64,) * self.spatial_dims
        c = self.in_chans
        try:
            clf = self.classifier_name()
        except (NotImplementedError, StopIteration):
            clf = None
        return dict(input_size=(c, *spatial), mean=(0.0,) * c, std=(1.0,) * c, input_range=(0.0, 1.0),
                    inner_normalization=inner, interpolation=body_cfg.get("interpolation", "bilinear"),
                    crop_pct=1.0, crop_mode="center", fixed_input_size=bool(fixed), num_classes=self.num_classes,
                    classifier=clf, explanation_kind=self.explanation_kind)

    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        """:meth:`default_pretrained_cfg` updated by whatever was assigned (``model.pretrained_cfg = {...}``),
        so ``timm.data.resolve_data_config({}, model=model)`` gives mean 0 / std 1 (no double normalisation)."""
        cfg = self.default_pretrained_cfg()
        cfg.update(self.__dict__.get("_pretrained_cfg_overlay") or {})
        return cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, value: Dict[str, Any]) -> None:
        self.__dict__["_pretrained_cfg_overlay"] = dict(value)

    default_cfg = pretrained_cfg  # timm's older name
