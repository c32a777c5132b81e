"""Pure-PyTorch models of the zoo: backbones, the interpretability mechanisms, explainers.

>>> import models
>>> models.list_models()
>>> m = models.create_model("baseline", backbone="resnet18", num_classes=6)
>>> logits, saliency = m.forward_explain(images)   # one interface for every model
"""
from .base import InterpretableClassifier, check_input, normalize_saliency, upsample_to
from .registry import create_model, is_model, list_models, model_entrypoint, register_model
from .backbones import Backbone, create_backbone, list_backbones
from .weights import LoadReport, WeightLoadError, load_weights, read_state_dict, save_weights

# importing a mechanism module registers it
from . import baseline  # noqa: F401
from .baseline import Baseline

import importlib as _importlib

for _mod in ("ca_stream", "picnn", "exvit", "guided_gradients", "maxnet", "xpruner"):
    try:
        _importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _e:  # mechanism not written yet
        if _e.name != f"{__name__}.{_mod}":
            raise

__all__ = ["InterpretableClassifier", "check_input", "normalize_saliency", "upsample_to", "create_model", "is_model",
           "list_models", "model_entrypoint", "register_model", "Backbone", "create_backbone", "list_backbones",
           "LoadReport", "WeightLoadError", "load_weights", "read_state_dict", "save_weights", "Baseline"]
