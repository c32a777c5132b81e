"""Model registry in the spirit of ``timm.create_model`` / ``timm.list_models``.

Mechanisms register a constructor with :func:`register_model`; users build models with
``create_model(name, **kwargs)`` (e.g. ``create_model("ca_stream", backbone="resnet50",
num_classes=200)``) and list them with :func:`list_models`.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List, Mapping, Optional

from torch import nn

from . import weights as _weights
from .weights import load_weights

__all__ = ["register_model", "create_model", "list_models", "is_model", "model_entrypoint", "check_model_kwargs"]

#: timm keyword arguments that make timm read or download a file (refused: ``backbone_weights`` is the safe door).
FILE_KWARGS = ("checkpoint_path", "pretrained_cfg_overlay", "pretrained_cfg", "cache_dir", "weights_only",
               "pretrained_strict")

_MODELS: Dict[str, Callable[..., nn.Module]] = {}
#: tiny kwargs for each model so the registry-wide contract test can build it fast.
_TEST_KWARGS: Dict[str, dict] = {}


def register_model(name: Optional[str] = None, test_kwargs: Optional[dict] = None):
    """Decorator registering a model class or factory under ``name``.

    ``test_kwargs``: keyword arguments that build a tiny instance (used by the contract test
    ``tests/test_registry.py``; every registered model joins it automatically).
    """

    def wrap(fn):
        key = name or fn.__name__
        if key in _MODELS:
            raise ValueError(f"model {key!r} is registered twice")
        _MODELS[key] = fn
        _TEST_KWARGS[key] = dict(test_kwargs or {})
        return fn

    return wrap


def _ensure_loaded() -> None:
    import models  # noqa: F401  (importing the package registers every mechanism)


def _mechanism_prefixes() -> Dict[str, tuple]:
    """``{name: mechanism_prefixes}`` of every registered model (for the weight loader's error hints)."""
    _ensure_loaded()
    return {n: tuple(getattr(e, "mechanism_prefixes", ()) or ()) for n, e in _MODELS.items()}


_weights._registered_prefixes = _mechanism_prefixes


def list_models(pattern: str = "*") -> List[str]:
    """Sorted names of the registered models matching a shell-style ``pattern``."""
    _ensure_loaded()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    _ensure_loaded()
    return name in _MODELS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    _ensure_loaded()
    if name not in _MODELS:
        close = [n for n in _MODELS if name.split("_")[0] in n]
        raise ValueError(
            f"Unknown model {name!r}. Known models: {', '.join(sorted(_MODELS))}"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + ". Backbones are chosen with backbone=<timm name>, e.g. "
            "create_model('baseline', backbone='resnet50')."
        )
    return _MODELS[name]


def test_kwargs(name: str) -> dict:
    _ensure_loaded()
    return dict(_TEST_KWARGS[name])


def check_model_kwargs(kwargs: Mapping, field: str = "model_kwargs") -> None:
    """Refuse keyword arguments that would point timm at a file or URL (``backbone_kwargs.checkpoint_path``,
    ``pretrained_cfg_overlay={file: ...}``...): timm would read it outside the zoo's safe loader. The error
    names the field (e.g. ``hyper_parameters.model_kwargs.backbone_kwargs.checkpoint_path``)."""
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{field} must be a dict of keyword arguments, got {type(kwargs).__name__}.")
    subs = [(field, kwargs)] + [(f"{field}.{k}", v) for k, v in kwargs.items() if k.endswith("_kwargs")]
    for where, sub in subs:
        if sub is None:
            continue
        if not isinstance(sub, Mapping):
            raise ValueError(f"{where} must be a dict of keyword arguments, got {type(sub).__name__}.")
        for k in sub:
            if k in FILE_KWARGS:
                raise ValueError(
                    f"{where}.{k} is refused: it makes timm read or download a file outside the zoo's safe loader. "
                    "Load local weights with backbone_weights=PATH (read with safetensors / weights_only=True and "
                    "checked key by key) or use pretrained=True for timm's hub weights.")


def create_model(name: str, checkpoint_path: Optional[str] = None, **kwargs) -> nn.Module:
    """Build a registered model; optionally load zoo weights from ``checkpoint_path``.

    ``checkpoint_path`` accepts a ``.safetensors`` file, a plain state dict (``.pt``/``.pth``) or a
    Lightning ``.ckpt``; it is loaded with ``weights_only=True`` and every missing/unexpected
    key is reported (see :func:`models.weights.load_weights`). Loading a plain baseline checkpoint
    into a mechanism is allowed: the keys the mechanism adds are reported as new, nothing else may
    be missing.
    """
    check_model_kwargs(kwargs, "kwargs")
    model = model_entrypoint(name)(**kwargs)
    if checkpoint_path:
        load_weights(model, checkpoint_path)
    return model
