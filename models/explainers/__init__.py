"""Post-hoc explainers with one interface (spec explainers_and_metrics §1-3; docs/explainers.md).

>>> from models.explainers import create_explainer, list_explainers
>>> explainer = create_explainer("gradcam", model)                 # default layer: model.cam_target_layer()
>>> saliency = explainer(images, targets)                         # (B, *spatial) in [0, 1]
>>> create_explainer("xrelevancecam", model, target_layers=[-1, -2, -3])   # layer-wise aggregation (taps)
>>> create_explainer("gradcam", model, target_layers="backbone.taps.3")    # a layer by name

``images`` are ``(B, C, H, W)`` or ``(B, C, D, H, W)`` in [0, 1]; ``targets`` ``(B,)`` (default: the
prediction). Explanations run in eval mode with gradients on (also inside ``no_grad`` /
``inference_mode``), leave no hooks behind and do not touch parameter gradients.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn

from .aggregate import HAM, aggregate_maps
from .base import Explainer, explain_mode, postprocess_layer_maps, resolve_layers
from .cam import CAM, PACKAGE_METHODS, AblationCAM, PackageCAM, ScoreCAM
from .gradients import Gradient, GuidedBackprop
from .opticam import OptiCAM
from .relevance import LRP, RelevanceCAM, XRelevanceCAM, layer_relevance, lrp_epsilon, lrp_zplus
from .simple import FakeCAM, Intrinsic, RandomMap
from .controls import ColorContrast, EdgeEnergy, GaussianMap, Untrained, reinitialize

__all__ = ["create_explainer", "list_explainers", "register_explainer", "Explainer", "explain_mode",
           "resolve_layers", "aggregate_maps", "postprocess_layer_maps", "CAM", "PackageCAM", "ScoreCAM",
           "AblationCAM", "OptiCAM", "RelevanceCAM", "XRelevanceCAM", "HAM", "Gradient", "GuidedBackprop",
           "Intrinsic", "RandomMap", "FakeCAM", "LRP", "layer_relevance", "lrp_epsilon", "lrp_zplus",
           "GaussianMap", "ColorContrast", "EdgeEnergy", "Untrained", "reinitialize", "CONTROL_EXPLAINERS",
           "is_control"]

_EXPLAINERS: Dict[str, Callable[..., Explainer]] = {}


def register_explainer(name: str, factory: Callable[..., Explainer]) -> None:
    """Register ``factory(model, target_layers=None, **kwargs) -> Explainer`` under ``name``."""
    if name in _EXPLAINERS:
        raise ValueError(f"explainer {name!r} is registered twice")
    _EXPLAINERS[name] = factory


for _name in PACKAGE_METHODS:
    register_explainer(_name, (lambda n: lambda model, target_layers=None: PackageCAM(n, model, target_layers))(_name))
for _cls in (CAM, ScoreCAM, AblationCAM, OptiCAM, RelevanceCAM, XRelevanceCAM, HAM, Gradient, GuidedBackprop,
             Intrinsic, RandomMap, FakeCAM, GaussianMap, ColorContrast, EdgeEnergy, Untrained):
    register_explainer(_cls.name, _cls)

#: controls (issue 14): sanity baselines a real explanation must beat; ``Explainer.control`` is True for them
CONTROL_EXPLAINERS = ("random", "gaussian", "fakecam", "colorcontrast", "edges", "untrained")

#: names that explain volumes too (the others raise a clear error on 5-D input)
SUPPORTS_3D = ("cam", "gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "scorecam", "ablationcam",
               "opticam", "relevancecam", "xrelevancecam", "ham", "gradient", "guidedbackprop", "intrinsic",
               "random", "fakecam", "gaussian", "colorcontrast", "edges", "untrained")


def is_control(name_or_explainer) -> bool:
    """True for control explainers (a name of :data:`CONTROL_EXPLAINERS` or an explainer with ``control``)."""
    if isinstance(name_or_explainer, str):
        key = name_or_explainer.lower().replace("-", "").replace("_", "")
        return key in CONTROL_EXPLAINERS or key.startswith("untrained")
    return bool(getattr(name_or_explainer, "control", False))


from .rsp import RSP  # noqa: E402  (issue 18: relative sectional propagation)
from .ucag import UCAG  # noqa: E402  (issue 18: UCAG wrapper, ``ucag:<base>``)

register_explainer("rsp", RSP)
register_explainer("ucag", UCAG)


def list_explainers() -> List[str]:
    """Sorted names accepted by :func:`create_explainer`."""
    return sorted(_EXPLAINERS)


def create_explainer(name: str, model: nn.Module, target_layers=None, **kwargs) -> Explainer:
    """Build explainer ``name`` for ``model``.

    Args:
        name: one of :func:`list_explainers` (case-insensitive; ``-``/``_`` ignored, e.g. ``"Grad-CAM++"``
            is not accepted but ``"grad_cam"`` -> ``gradcam``).
        model: a zoo model (any ``nn.Module`` mapping images to logits works if ``target_layers`` is given).
        target_layers: ``None`` (``model.cam_target_layer()``), a module name, a tap index
            (``model.backbone.taps[i]``), a module, or a list of them (layer-wise aggregation).
        reshape_transform (keyword): callable turning the target layer's output into ``(B, C, *spatial)``
            maps, as in pytorch-grad-cam (e.g. ViT tokens ``(B, 1 + h*w, C)`` -> ``(B, C, h, w)``); default
            ``model.reshape_transform`` (None for CNNs and the zoo's models, whose taps are maps already).
        **kwargs: method options (e.g. ``max_iter`` for opticam, ``contrast`` for relevance CAMs).
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if ":" in key:  # wrapper spelling "ucag:gradcam" = create_explainer("ucag", model, base="gradcam")
        key, base = key.split(":", 1)
        if "base" in kwargs:
            raise ValueError(f"explainer {name!r} names its base after ':'; do not also pass base=.")
        kwargs["base"] = base
    if key not in _EXPLAINERS:
        raise ValueError(f"Unknown explainer {name!r}. Available: {', '.join(list_explainers())}.")
    factory = _EXPLAINERS[key]
    reshape = kwargs.pop("reshape_transform", None)
    try:
        explainer = factory(model, target_layers=target_layers, **kwargs)
        if reshape is not None:  # tokens -> maps for user models (e.g. a timm ViT), pytorch-grad-cam's convention
            if not callable(reshape):
                raise TypeError(f"reshape_transform must be a callable (tokens -> (B, C, H, W)), got "
                                f"{type(reshape).__name__}.")
            explainer.reshape_transform = reshape
            inner = getattr(explainer, "inner", None)
            if inner is not None:
                inner.reshape_transform = reshape
        return explainer
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"explainer {key!r}: {e}. See docs/explainers.md for its options.") from None
        raise
