"""Shared machinery of the post-hoc explainers (spec explainers_and_metrics §1).

Every explainer is a callable ``explainer(images, targets=None) -> saliency`` where ``images`` is
``(B, C, *spatial)`` in [0, 1] (2D or 3D), ``targets`` ``(B,)`` class indices (default: the predicted
class) and ``saliency`` is ``(B, *spatial)`` in [0, 1] at input resolution.

Whatever the caller's state, an explanation is computed

* with the model in ``eval()`` mode (every module's ``training`` flag is restored afterwards, so
  trainers that keep frozen modules in eval are not disturbed),
* with gradients enabled, also inside ``torch.no_grad()`` / ``torch.inference_mode()`` (Lightning
  validation loops): inputs are cloned out of inference mode,
* without touching the parameters' ``requires_grad`` flags or ``.grad`` (they are switched off during
  the call and restored), so calling an explainer between ``backward()`` and ``step()`` is safe,
* with every hook removed after the call (also on error), so two calls give the same map.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..base import normalize_saliency, upsample_to

__all__ = ["Explainer", "LayerSpec", "parse_target_layers", "resolve_layers", "explain_mode", "capture_outputs", "postprocess_layer_maps"]

LayerSpec = Union[None, str, int, nn.Module, Sequence[Union[str, int, nn.Module]]]


@contextlib.contextmanager
def explain_mode(model: nn.Module):
    """eval(), grad enabled (even under inference mode), parameters frozen; everything restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            model.eval()
            for p, _, _ in params:
                p.requires_grad_(False)
            yield
    finally:
        for m, t in modes:
            m.training = t
        for p, rg, g in params:
            p.requires_grad_(rg)
            p.grad = g


class capture_outputs:
    """Context manager recording the outputs of ``layers`` (forward hooks, removed on exit).

    ``self.outputs[i]`` is the list of outputs of ``layers[i]`` in call order (normally one).
    """

    def __init__(self, layers: Iterable[nn.Module]):
        self.layers = list(layers)
        self.outputs: List[List[Tensor]] = [[] for _ in self.layers]
        self._handles = []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, i):
        def fn(module, inp, out):
            if not torch.is_tensor(out):
                raise TypeError(f"target layer {type(module).__name__} returns {type(out).__name__}, not a tensor; "
                                "choose a layer whose output is a (B, C, *spatial) feature map "
                                "(e.g. backbone.taps[i]).")
            self.outputs[i].append(out)
        return fn

    def last(self) -> List[Tensor]:
        missing = [i for i, o in enumerate(self.outputs) if not o]
        if missing:
            raise RuntimeError(f"target layer(s) {[type(self.layers[i]).__name__ for i in missing]} were not called in "
                               "the model's forward; pass target_layers that the forward pass uses.")
        return [o[-1] for o in self.outputs]

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def _module_names(model: nn.Module) -> dict:
    return {id(m): n for n, m in model.named_modules()}


def parse_target_layers(text: Optional[str]) -> LayerSpec:
    """Command-line spelling of a ``LayerSpec``: ``"-1"`` -> -1, ``"backbone.taps.2"`` -> the name, ``"-1,-2"`` ->
    [-1, -2] (layer-wise aggregation); empty / None -> None."""
    if text is None or not str(text).strip():
        return None
    items = []
    for t in str(text).replace(" ", "").split(","):
        if not t:
            continue
        try:
            items.append(int(t))
        except ValueError:
            items.append(t)
    return items[0] if len(items) == 1 else items


def resolve_layers(model: nn.Module, target_layers: LayerSpec = None) -> List[nn.Module]:
    """Turn ``target_layers`` into a list of sub-modules of ``model``.

    ``None`` -> ``[model.cam_target_layer()]`` (the last backbone tap for zoo models); a string is a
    module name (``model.get_submodule``, e.g. ``"backbone.taps.2"`` or ``"backbone.body.layer4"``); an
    int ``i`` is ``model.backbone.taps[i]``; a module must belong to ``model``; a list mixes these.
    """
    if target_layers is None:
        if not hasattr(model, "cam_target_layer"):
            raise ValueError(f"{type(model).__name__} has no cam_target_layer(); pass target_layers=<module name or "
                             "module>, e.g. target_layers='layer4'.")
        return [model.cam_target_layer()]
    specs = list(target_layers) if isinstance(target_layers, (list, tuple)) else [target_layers]
    if not specs:
        raise ValueError("target_layers is empty; pass None for the default layer or at least one layer.")
    names = _module_names(model)
    out = []
    for s in specs:
        if isinstance(s, bool):
            raise TypeError("target_layers entries must be module names, tap indices or modules, not bool.")
        if isinstance(s, int):
            taps = getattr(getattr(model, "backbone", None), "taps", None)
            if taps is None:
                raise ValueError(f"integer target layer {s} means model.backbone.taps[{s}], but "
                                 f"{type(model).__name__} has no backbone.taps; pass a module name instead.")
            try:
                out.append(taps[s])
            except IndexError:
                raise ValueError(f"target layer index {s} out of range: the backbone has {len(taps)} taps "
                                 f"(valid: {-len(taps)}..{len(taps) - 1}).") from None
        elif isinstance(s, str):
            try:
                out.append(model.get_submodule(s))
            except AttributeError:
                close = [n for n in names.values() if n and s.split(".")[-1] in n][:8]
                raise ValueError(f"model has no sub-module named {s!r}. Similar names: {close or 'none'} "
                                 "(see [n for n, _ in model.named_modules()]).") from None
        elif isinstance(s, nn.Module):
            if id(s) not in names:
                raise ValueError(f"target layer {type(s).__name__} is not a sub-module of the model being explained.")
            out.append(s)
        else:
            raise TypeError(f"target_layers entries must be str, int or nn.Module, got {type(s).__name__}.")
    return out


def postprocess_layer_maps(maps: Sequence[Tensor], size: Sequence[int], relu: bool = True) -> Tensor:
    """Layer-wise aggregation (seed 002 §4.4.2, spec §3.13), also the single-layer post-processing (1.7).

    Each raw map ``(B, *h_l)`` -> ReLU (optional) -> (bi/tri)linear upsample to ``size`` -> per-image
    min-max; then the mean over layers and a final min-max. With one layer this is ``n(up(ReLU(S)))``,
    the same as pytorch-grad-cam's ``BaseCAM``; with several layers the package min-maxes *before*
    resizing, which differs slightly -- we follow the spec's order (docs/explainers.md, decision 2).
    Each map is first divided by its max ``|.|`` (scale-free: eq 1.7's 1e-7 cannot shrink tiny maps).
    """
    per_layer = []
    for m in maps:
        m = m.float()
        if relu:
            m = m.clamp(min=0)
        # scale-free: divide by max |m| first so the 1e-7 of the min-max does not shrink tiny maps
        scale = m.flatten(1).abs().amax(1).clamp(min=1e-30).view(-1, *([1] * (m.dim() - 1)))
        m = m / scale
        per_layer.append(normalize_saliency(m, size))
    if len(per_layer) == 1:
        return per_layer[0]
    return normalize_saliency(torch.stack(per_layer, 0).mean(0))


class Explainer:
    """Base class: input checks, target resolution, :func:`explain_mode`, output checks.

    Subclasses implement ``explain(x, targets) -> (B, *spatial)`` (already in [0, 1] at input
    resolution) and may set ``supports_3d = False`` / ``uses_layers = False``.
    """

    name: str = "explainer"
    supports_3d: bool = True
    uses_layers: bool = True
    #: only one target layer (no layer-wise aggregation)
    single_layer: bool = False
    #: a control (sanity baseline a real explanation must beat; issue 14), not an explanation method
    control: bool = False

    def __init__(self, model: nn.Module, target_layers: LayerSpec = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.name}: model must be an nn.Module, got {type(model).__name__}.")
        self.model = model
        self.target_layers: List[nn.Module] = resolve_layers(model, target_layers) if self.uses_layers else []
        #: tokens -> (B, C, *spatial) maps for the target layers (ViTs); pytorch-grad-cam's convention. Default:
        #: ``model.reshape_transform``; ``create_explainer(..., reshape_transform=fn)`` sets it per explainer.
        self.reshape_transform: Optional[Callable[[Tensor], Tensor]] = getattr(model, "reshape_transform", None)
        if self.single_layer and len(self.target_layers) > 1:
            raise ValueError(f"{self.name} explains one layer at a time; got {len(self.target_layers)} target layers.")
        self.last_info: dict = {}

    # ------------------------------------------------------------------------------------------
    def _check(self, images: Tensor) -> None:
        if not torch.is_tensor(images):
            raise TypeError(f"{self.name}: images must be a torch.Tensor (B, C, *spatial), "
                            f"got {type(images).__name__}.")
        if images.dim() not in (4, 5):
            raise ValueError(f"{self.name}: images must be (B, C, H, W) or (B, C, D, H, W), got shape "
                             f"{tuple(images.shape)}. Add the batch/channel dimensions.")
        if images.dim() == 5 and not self.supports_3d:
            raise ValueError(f"{self.name} does not support 3D volumes (input {tuple(images.shape)}); use one of the "
                             "methods listed as 3D-capable in docs/explainers.md (e.g. gradcam, scorecam, opticam).")
        if not images.is_floating_point():
            raise TypeError(f"{self.name}: images must be float in [0, 1], got dtype {images.dtype}.")
        check = getattr(self.model, "check_input", None)
        if callable(check):
            check(images)

    def _targets(self, x: Tensor, targets) -> Tensor:
        b = x.shape[0]
        if targets is None:
            with torch.no_grad():
                return self.model(x).argmax(dim=1)
        t = torch.as_tensor(targets, device=x.device).long().reshape(-1)
        if t.numel() == 1 and b > 1:
            t = t.expand(b)
        if t.shape[0] != b:
            raise ValueError(f"{self.name}: got {t.shape[0]} targets for a batch of {b} images.")
        k = getattr(self.model, "num_classes", None)
        if k is not None and ((t < 0).any() or (t >= k).any()):
            raise ValueError(f"{self.name}: target classes must be in [0, {k}), got {t.tolist()}.")
        return t

    def __call__(self, images: Tensor, targets: Optional[Tensor] = None) -> Tensor:
        self._check(images)
        with explain_mode(self.model):
            x = images.detach().clone()
            t = self._targets(x, targets)
            maps = self.explain(x, t)
        want = (images.shape[0],) + tuple(images.shape[2:])
        if tuple(maps.shape) != want:  # pragma: no cover - internal contract
            raise RuntimeError(f"{self.name} produced maps of shape {tuple(maps.shape)}, expected {want}.")
        return maps.detach().clamp_(0, 1).to(images.device)

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _reshape(self, t: Tensor) -> Tensor:
        """Apply :attr:`reshape_transform` to a target-layer output (or its gradient / relevance)."""
        if self.reshape_transform is None:
            return t
        out = self.reshape_transform(t)
        if not torch.is_tensor(out) or out.dim() not in (4, 5):
            raise ValueError(f"{self.name}: reshape_transform must return (B, C, H, W) or (B, C, D, H, W) maps, got "
                             f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__} from "
                             f"{tuple(t.shape)}.")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, layers={len(self.target_layers)})"


def gather_logit(logits: Tensor, targets: Tensor) -> Tensor:
    """``logits[b, targets[b]]`` -> (B,)."""
    return logits.gather(1, targets.view(-1, 1)).squeeze(1)


__all__ += ["gather_logit", "upsample_to", "normalize_saliency"]
