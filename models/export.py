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

__all__ = ["ExplainedModel", "export_onnx", "verify_onnx", "export_program", "verify_program", "export_metadata",
           "read_onnx_metadata", "save_model_card", "load_model_card", "registry_name", "zoo_version"]


class ExplainedModel(nn.Module):
    """``(image, target) -> (logits, saliency)``, the exported interface (reads like ``forward_explain``).

    ``target``: int64 ``(B,)`` or ``(1,)`` class per image; ``-1`` (the default) = the predicted class.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model, "explanation_needs_gradients", False):
            raise ValueError(f"{type(model).__name__}'s intrinsic explanation ({model.explanation_kind}) is defined by "
                             "gradients (autograd inside forward_explain), which an ONNX graph or a torch.export "
                             "program cannot hold. Serve it from PyTorch (safetensors weights + "
                             "models.create_model(..., checkpoint_path=)); see docs/export.md.")
        self.model = model

    def forward(self, x: Tensor, target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self.model.forward_explain(x, target)


def _example_target(model: nn.Module, example: Tensor) -> Tensor:
    return torch.full((example.shape[0],), -1, dtype=torch.long)


def _other_size(model: nn.Module, example: Tensor) -> Tensor:
    """The example at another spatial size (+ the largest stride) to probe dynamic height/width."""
    red = max(getattr(getattr(model, "backbone", None), "reductions", None) or [16])
    return torch.rand(example.shape[0], example.shape[1], *[s + int(red) for s in example.shape[2:]])


def _onnx_export(wrapped: nn.Module, path: str, example: Tensor, target: Tensor, opset: int, dynamic_hw: bool) -> None:
    spatial = {i + 2: n for i, n in enumerate(("depth", "height", "width")[-(example.dim() - 2):])}
    img_axes = {0: "batch", **(spatial if dynamic_hw else {})}
    sal_axes = {0: "batch", **({k - 1: v for k, v in spatial.items()} if dynamic_hw else {})}
    torch.onnx.export(wrapped, (example, target), path, input_names=["image", "target"],
                      output_names=["logits", "saliency"], opset_version=opset, dynamo=False,
                      dynamic_axes={"image": img_axes, "target": {0: "target_len"}, "logits": {0: "batch"},
                                    "saliency": sal_axes})


def _finish_onnx(path: str, metadata: Dict[str, str]) -> None:
    """Make ``target`` optional (an initializer ``[-1]`` = the prediction is its default value, kept as an
    input even when the explanation ignores it) and store ``metadata`` in ``metadata_props``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    m = onnx.load(path)
    g = m.graph
    if not any(i.name == "target" for i in g.input):  # class-agnostic explanation: the traced graph dropped it
        g.input.append(helper.make_tensor_value_info("target", TensorProto.INT64, ["target_len"]))
    g.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), name="target"))
    del m.metadata_props[:]
    for k, v in metadata.items():
        m.metadata_props.add(key=str(k), value=str(v))
    _atomic_bytes(path, m.SerializeToString())


def _atomic_bytes(path: str, data: bytes) -> None:
    from .weights import atomic_write

    with atomic_write(path, "wb") as f:
        f.write(data)


def export_onnx(model: nn.Module, path: str, example: Tensor, opset: int = 17, dynamic_hw: Any = "auto",
                metadata: Optional[Dict[str, Any]] = None) -> str:
    """Export ``ExplainedModel(model)`` to ONNX in eval mode: inputs ``image`` (B, C, *spatial) in [0, 1] and
    optional ``target`` (default ``[-1]`` = predicted class); outputs ``logits`` (B, K), ``saliency`` (B, *spatial).

    ``dynamic_hw``: ``"auto"`` exports height/width (and depth) as dynamic when the model allows it -- checked
    by running the graph at a second size against PyTorch -- and falls back to the example's fixed size
    otherwise (e.g. ViT position embeddings, eX-ViT's token grid); ``True`` raises instead of falling back;
    ``False`` fixes the size. The outcome and the reason are stored in ``metadata_props`` (``dynamic_hw``,
    ``dynamic_hw_reason``) with ``metadata`` (see :func:`export_metadata`). Writes are atomic.
    """
    wrapped = ExplainedModel(model).eval()
    target = _example_target(model, example)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    reason = "fixed at export (dynamic_hw=False)"
    dyn = dynamic_hw in (True, "auto")
    try:
        if dyn:
            reason = _dynamic_ok(model, wrapped, tmp, example, target, opset)
            dyn = reason is None
            if not dyn and dynamic_hw is True:
                raise ValueError(f"{type(model).__name__} cannot be exported with dynamic height/width: {reason}. "
                                 f"Export with a fixed size (dynamic_hw=False / export.py --image-size N).")
        if not dyn:
            _onnx_export(wrapped, tmp, example, target, opset, False)
        meta = dict(metadata or {})
        meta.update(dynamic_hw=json.dumps(dyn), input_size=json.dumps(list(example.shape[1:])))
        meta["dynamic_hw_reason"] = "height and width are dynamic (checked at two sizes)" if dyn else \
            f"fixed input size {list(example.shape[2:])}: {reason}"
        _finish_onnx(tmp, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _dynamic_ok(model: nn.Module, wrapped: nn.Module, tmp: str, example: Tensor, target: Tensor,
                opset: int) -> Optional[str]:
    """Export with dynamic spatial axes into ``tmp``; ``None`` if the graph matches PyTorch at another size,
    else the reason it cannot be dynamic."""
    other = _other_size(model, example)
    try:
        with torch.no_grad():
            ref = wrapped(other, target)
    except Exception as e:
        return f"the model does not run at another size ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    try:
        _onnx_export(wrapped, tmp, example, target, opset, True)
        import onnxruntime as ort

        sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        feed = {"image": other.numpy()}
        if any(i.name == "target" for i in sess.get_inputs()):
            feed["target"] = target.numpy()
        out = sess.run(None, feed)
    except Exception as e:
        return f"the traced graph does not run at another size ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    diffs = [float((torch.from_numpy(o) - r).abs().max()) if o.shape == tuple(r.shape) else float("inf")
             for o, r in zip(out, ref)]
    if max(diffs) > 1e-3:
        return f"the traced graph specialises on the example size (max diff {max(diffs):.3g} at another size)"
    return None


def verify_onnx(path: str, model: nn.Module, example: Tensor, target: Optional[Tensor] = None) -> Dict[str, float]:
    """Max absolute difference between onnxruntime and PyTorch for logits and saliency (``target`` omitted =
    the graph's default, the predicted class)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {"image": example.cpu().numpy()}
    if target is not None:
        feed["target"] = torch.as_tensor(target).long().reshape(-1).numpy()
    logits, sal = sess.run(None, feed)
    with torch.no_grad():
        ref_l, ref_s = ExplainedModel(model).eval()(example, target)
    from .metrics.degenerate import constant_maps

    out = {"logits_max_abs_diff": float((torch.from_numpy(logits) - ref_l).abs().max()),
           "saliency_max_abs_diff": float((torch.from_numpy(sal) - ref_s).abs().max())}
    n_const = int(constant_maps(ref_s).sum())
    if n_const:  # a diff of 0.0 between two blank maps proves nothing (issue 16)
        out["saliency_warning"] = (f"{n_const}/{ref_s.shape[0]} saliency maps are constant (blank): the saliency check "
                                   "compares blank maps; the explained layer is probably too coarse "
                                   "(docs/metrics.md, degenerate maps)")
    return out


def save_model_card(model: nn.Module, out_dir: str, name: str, kwargs: Dict[str, Any],
                    extra: Optional[Dict[str, Any]] = None) -> str:
    """Write ``model.safetensors`` + ``model.json`` (registry name and kwargs) into ``out_dir``."""
    from .weights import atomic_write

    os.makedirs(out_dir, exist_ok=True)
    save_weights(model, os.path.join(out_dir, "model.safetensors"))
    card = {"model": name, "kwargs": kwargs, "explanation_kind": getattr(model, "explanation_kind", None),
            "weights_sha256": state_fingerprint(model), "zoo_version": zoo_version(), **(extra or {})}
    path = os.path.join(out_dir, "model.json")
    with atomic_write(path, "w") as f:
        json.dump(card, f, indent=2)
    return path


def state_fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict (names, shapes, dtypes, values): identifies "the same model"."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{tuple(v.shape)}|{v.dtype}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def load_model_card(path: str) -> nn.Module:
    """Rebuild a model from ``model.json`` (next to ``model.safetensors``) and load its weights."""
    from .registry import create_model

    with open(path) as f:
        card = json.load(f)
    weights = os.path.join(os.path.dirname(os.path.abspath(path)), "model.safetensors")
    return create_model(card["model"], checkpoint_path=weights, **card["kwargs"])


# ---- torch.export program (.pt2) ---------------------------------------------------------------------
def export_program(model: nn.Module, path: str, example: Tensor, dynamic_hw: bool = True) -> str:
    """``torch.export`` program of ``ExplainedModel(model)`` saved to ``path`` (``.pt2``), atomically.

    Call it as ``torch.export.load(path).module()(image, target)`` with ``target`` int64 ``(B,)``
    (``-1`` = predicted class). Batch (and, with ``dynamic_hw``, the spatial sizes) are ``Dim.AUTO``: torch
    decides what stays dynamic; a model that fixes them is exported with fixed sizes.
    """
    from torch.export import Dim

    wrapped = ExplainedModel(model).eval()
    target = _example_target(model, example)
    axes = {0: Dim.AUTO, **({i: Dim.AUTO for i in range(2, example.dim())} if dynamic_hw else {})}
    with torch.no_grad():
        ep = torch.export.export(wrapped, (example, target), dynamic_shapes=({**axes}, {0: Dim.AUTO}))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp.pt2")
    try:
        torch.export.save(ep, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def verify_program(path: str, model: nn.Module, example: Tensor, target: Optional[Tensor] = None) -> Dict[str, float]:
    """Max absolute difference between the saved ``.pt2`` program and PyTorch (logits, saliency)."""
    prog = torch.export.load(path).module()
    t = torch.full((example.shape[0],), -1, dtype=torch.long) if target is None else \
        torch.as_tensor(target).long().reshape(-1).expand(example.shape[0]).clone()
    with torch.no_grad():
        logits, sal = prog(example, t)
        ref_l, ref_s = ExplainedModel(model).eval()(example, t)
    return {"logits_max_abs_diff": float((logits - ref_l).abs().max()),
            "saliency_max_abs_diff": float((sal - ref_s).abs().max())}


# ---- metadata -------------------------------------------------------------------------------------------
def zoo_version() -> str:
    try:
        from importlib.metadata import version

        return version("interpretable-zoo")
    except Exception:  # not installed (source checkout)
        return "unknown"


def registry_name(model: nn.Module) -> Optional[str]:
    """The registry name whose constructor built ``model`` (``None`` if it is not a registered class)."""
    from . import registry

    registry._ensure_loaded()
    return next((n for n, fn in registry._MODELS.items() if fn is type(model)), None)


def export_metadata(model: nn.Module, class_names: Optional[Sequence[str]] = None,
                    name: Optional[str] = None) -> Dict[str, Any]:
    """What a user of the exported file needs, without the zoo: classes, input range / mean / std (models take
    [0, 1] pixels and normalise inside: mean 0, std 1 at the input), mechanism, explanation kind, zoo version,
    the ``target`` convention and the full ``pretrained_cfg``."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    k = int(getattr(model, "num_classes", 0))
    classes = list(class_names) if class_names else [str(i) for i in range(k)]
    return {"mechanism": name or registry_name(model) or type(model).__name__,
            "explanation_kind": getattr(model, "explanation_kind", ""),
            "classes": classes, "num_classes": k,
            "mean": list(cfg.get("mean", ())), "std": list(cfg.get("std", ())),
            "input_range": [0.0, 1.0], "inner_normalization": cfg.get("inner_normalization"),
            "interpolation": cfg.get("interpolation", "bilinear"),
            "target": "optional int64 (B,) or (1,); -1 (default) = the predicted class",
            "outputs": "logits (B, num_classes); saliency (B, *input_spatial) in [0, 1] for the target class",
            "zoo_version": zoo_version(), "pretrained_cfg": cfg}


def read_onnx_metadata(path: str) -> Dict[str, Any]:
    """``metadata_props`` of an exported file, JSON values decoded."""
    import onnx

    out = {}
    for p in onnx.load(path, load_external_data=False).metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except ValueError:
            out[p.key] = p.value
    return out
