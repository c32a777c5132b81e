"""Fine-tuning a trained zoo model on a new label set (pure PyTorch).

:func:`create_finetune_model` builds the model with the checkpoint's own class count, loads every weight
strictly (only the mechanism's new keys may be missing, see :func:`models.weights.load_weights`), then
calls ``model.reset_classifier(num_classes)`` -- the one way to change the number of classes, the same
for every mechanism (timm's API). ``trainers.ClassificationModule(reset_head=True)`` uses it.
"""
from __future__ import annotations

import os
from typing import Mapping, Union

from torch import Tensor, nn

from .registry import create_model
from .weights import WeightLoadError, clean_state_dict, load_weights, read_state_dict

__all__ = ["create_finetune_model", "checkpoint_num_classes"]


def checkpoint_num_classes(model: nn.Module, state_dict: Mapping[str, Tensor]) -> int:
    """Number of classes of ``state_dict``, read from the rows of ``model``'s classifier weight."""
    key = model.classifier_name() + ".weight"
    if key not in state_dict:
        raise WeightLoadError(
            f"The weights hold no classifier '{key}' for {type(model).__name__}, so they are not a trained zoo "
            "model. For backbone-only weights (timm / torchvision files) use backbone_weights=PATH in model_kwargs "
            "instead of checkpoint_path.")
    return int(state_dict[key].shape[0])


def create_finetune_model(name: str, checkpoint_path: Union[str, os.PathLike, Mapping[str, Tensor]],
                          num_classes: int, verbose: bool = True, **kwargs) -> nn.Module:
    """``create_model(name, **kwargs)`` holding the weights of ``checkpoint_path`` and a fresh classifier
    for ``num_classes`` (also when the count is unchanged: a new head on the same classes).

    ``checkpoint_path``: a zoo checkpoint (Lightning ``.ckpt``, state dict or safetensors) or a state dict.
    """
    sd = clean_state_dict(checkpoint_path) if isinstance(checkpoint_path, Mapping) else read_state_dict(checkpoint_path)
    model = create_model(name, num_classes=num_classes, **kwargs)
    old = checkpoint_num_classes(model, sd)
    if old != num_classes:
        model = create_model(name, num_classes=old, **kwargs)
    load_weights(model, sd, verbose=verbose)
    model.reset_classifier(num_classes)
    if verbose:
        print(f"[weights] {type(model).__name__}: classifier reset {old} -> {num_classes} classes "
              f"('{model.classifier_name()}' and the mechanism's class-dependent parameters start fresh)")
    return model
