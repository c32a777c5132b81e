"""Export a model *with its explanation*: safetensors + a JSON card, and ONNX with two outputs.

The exported graph is ``ExplainedModel``: ``image -> (logits, saliency)``, i.e. ``forward_explain`` with
the predicted class as target, so a deployed model returns its intrinsic explanation in the same call.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .weights import save_weights

__all__ = ["ExplainedModel", "export_onnx", "verify_onnx", "save_model_card", "load_model_card"]


class ExplainedModel(nn.Module):
    """``x -> (logits, saliency)`` for the predicted class (the exported interface)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.model.forward_explain(x)


def export_onnx(model: nn.Module, path: str, example: Tensor, opset: int = 17) -> str:
    """Export ``ExplainedModel(model)`` to ONNX (dynamic batch) in eval mode."""
    wrapped = ExplainedModel(model).eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.onnx.export(wrapped, (example,), path, input_names=["image"], output_names=["logits", "saliency"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "saliency": {0: "batch"}},
                      opset_version=opset, dynamo=False)
    return path


def verify_onnx(path: str, model: nn.Module, example: Tensor) -> Dict[str, float]:
    """Max absolute difference between onnxruntime and PyTorch for logits and saliency."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits, sal = sess.run(None, {"image": example.cpu().numpy()})
    with torch.no_grad():
        ref_l, ref_s = ExplainedModel(model).eval()(example)
    return {"logits_max_abs_diff": float((torch.from_numpy(logits) - ref_l).abs().max()),
            "saliency_max_abs_diff": float((torch.from_numpy(sal) - ref_s).abs().max())}


def save_model_card(model: nn.Module, out_dir: str, name: str, kwargs: Dict[str, Any],
                    extra: Optional[Dict[str, Any]] = None) -> str:
    """Write ``model.safetensors`` + ``model.json`` (registry name and kwargs) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    save_weights(model, os.path.join(out_dir, "model.safetensors"))
    card = {"model": name, "kwargs": kwargs, "explanation_kind": getattr(model, "explanation_kind", None),
            **(extra or {})}
    path = os.path.join(out_dir, "model.json")
    with open(path, "w") as f:
        json.dump(card, f, indent=2)
    return path


def load_model_card(path: str) -> nn.Module:
    """Rebuild a model from ``model.json`` (next to ``model.safetensors``) and load its weights."""
    from .registry import create_model

    with open(path) as f:
        card = json.load(f)
    weights = os.path.join(os.path.dirname(os.path.abspath(path)), "model.safetensors")
    return create_model(card["model"], checkpoint_path=weights, **card["kwargs"])
