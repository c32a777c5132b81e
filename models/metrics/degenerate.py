"""Degenerate saliency maps: constant / all-zero maps and maps coarser than the localisation minimum.

Two failure modes make interpretability numbers meaningless (issue 14 item 4, issue 16 item 1):

* **Constant maps.** A map whose values are all equal (all zero, e.g. any CAM of a 1x1 feature map after
  the min-max of eq. 1.7, or a blank intrinsic map) ranks no pixel above another. AD/AG/insertion/deletion
  and the localisation metrics of such a map measure the masking baseline, not an explanation. They are
  detected per map (:func:`constant_maps`: ``max - min <= CONSTANT_TOL``), counted and **not scored**.
* **Coarse maps.** A CAM of an ``h x w`` feature map, upsampled to the image, can only point at one of
  ``h x w`` cells; bilinear upsampling of a 2x2 map puts its argmax in an image corner, so an oracle 2x2 map
  scores below a random full-resolution map in the pointing game (issue 14). Localisation metrics (pointing
  game, energy pointing game, IoU) are therefore **refused** for maps whose native resolution has a side
  below :data:`MIN_NATIVE_SIDE` = 4 (coarser than 4x4). Faithfulness metrics (AD/AG/AI, insertion,
  deletion) are still computed; the native resolution is reported next to them.

:func:`native_resolution` finds the resolution an explainer really works at: the spatial shape of its
target layer(s) (the finest one for layer-wise aggregation; ``reshape_transform`` applied for ViT
tokens), the default CAM layer for the model's intrinsic map, the input's for pixel-space methods
(gradients, controls). An explainer may also define ``native_resolution(x) -> tuple`` itself.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["MIN_NATIVE_SIDE", "CONSTANT_TOL", "constant_maps", "native_resolution", "is_coarse", "map_status",
           "format_resolution"]

#: smallest side (in cells) of a map's native grid for which pointing game / energy / IoU are computed
MIN_NATIVE_SIDE = 4
#: a map in [0, 1] whose range ``max - min`` is at most this is constant (all-zero maps included)
CONSTANT_TOL = 1e-6


def constant_maps(maps: Tensor, tol: float = CONSTANT_TOL) -> Tensor:
    """``(B, *spatial)`` maps -> ``(B,)`` bool: True where the map is constant (range <= ``tol``)."""
    flat = maps.detach().flatten(1).float()
    return (flat.amax(1) - flat.amin(1)) <= tol


def format_resolution(res: Optional[Sequence[int]]) -> str:
    """``(7, 7)`` -> ``"7x7"``; ``None`` -> ``"?"``."""
    return "x".join(str(int(s)) for s in res) if res else "?"


def is_coarse(res: Optional[Sequence[int]], min_side: int = MIN_NATIVE_SIDE) -> bool:
    """True if the native grid ``res`` has a side below ``min_side`` (unknown resolutions are not coarse)."""
    return bool(res) and min_side > 0 and min(int(s) for s in res) < min_side


def _layer_shapes(model: nn.Module, layers, x: Tensor, reshape: Optional[Callable]) -> list:
    from models.explainers.base import capture_outputs, explain_mode

    with explain_mode(model), torch.no_grad(), capture_outputs(layers) as cap:
        model(x)
    shapes = []
    for out in cap.last():
        if reshape is not None:
            out = reshape(out)
        shapes.append(tuple(int(s) for s in out.shape[2:]))
    return shapes


def native_resolution(explainer, model: nn.Module, x: Tensor) -> Optional[Tuple[int, ...]]:
    """Spatial grid the explainer's maps really have before upsampling to ``x`` (see module docstring).

    ``x``: one or more inputs ``(B, C, *spatial)``; only the first is used. Returns ``None`` when
    unknown (an arbitrary callable).
    """
    x = x[:1].detach()
    own = getattr(explainer, "native_resolution", None)
    if callable(own):
        r = own(x)
        return tuple(int(s) for s in r) if r is not None else None
    inner = getattr(explainer, "inner", None)
    if inner is not None and inner is not explainer:  # wrappers (e.g. the 'untrained' control)
        return native_resolution(inner, getattr(inner, "model", model), x)
    name = getattr(explainer, "name", None)
    ex_model = getattr(explainer, "model", model)
    layers = list(getattr(explainer, "target_layers", None) or [])
    try:
        if layers:
            shapes = _layer_shapes(ex_model, layers, x, getattr(explainer, "reshape_transform", None))
            return max(shapes, key=lambda s: torch.Size(s).numel())
        if name == "intrinsic" and hasattr(ex_model, "cam_target_layer"):
            hook = getattr(ex_model, "intrinsic_resolution", None)
            if callable(hook):
                return tuple(int(s) for s in hook(x))
            return _layer_shapes(ex_model, [ex_model.cam_target_layer()], x,
                                 getattr(ex_model, "reshape_transform", None))[0]
    except Exception:  # resolution is diagnostic: never fail the evaluation for it
        return None
    if getattr(explainer, "uses_layers", None) is False:  # pixel-space methods and controls
        return tuple(int(s) for s in x.shape[2:])
    return None


def map_status(n_items: int, n_constant: int, res: Optional[Sequence[int]], min_side: int = MIN_NATIVE_SIDE) -> str:
    """One human-readable status: ``ok``, ``constant map (k/n)``, ``coarse 2x2 < 4x4: localisation refused``."""
    parts = []
    if n_items and n_constant == n_items:
        parts.append("constant map: not scored")
    elif n_constant:
        parts.append(f"constant on {n_constant}/{n_items} items (not scored)")
    if is_coarse(res, min_side):
        parts.append(f"native {format_resolution(res)} < {min_side}x{min_side}: localisation refused")
    return "; ".join(parts) or "ok"
