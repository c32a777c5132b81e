"""Safe, loud weight loading.

* Files are read with :mod:`safetensors` or ``torch.load(weights_only=True)``: no arbitrary
  unpickling, ever.
* Lightning checkpoints (``state_dict`` with a ``model.`` prefix), DDP (``module.``) and
  ``torch.compile`` (``_orig_mod.``) prefixes are unwrapped.
* Every load prints a report of missing and unexpected keys and **fails** unless the missing keys are
  exactly parameters the mechanism adds (``model.mechanism_prefixes``) -- the papers' official code
  silently skips mismatched keys; we never do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["WeightLoadError", "LoadReport", "read_state_dict", "load_weights", "save_weights", "clean_state_dict"]


class WeightLoadError(RuntimeError):
    """Raised when a weights file cannot be read or does not fit the model."""


@dataclass
class LoadReport:
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatch: List[str] = field(default_factory=list)
    new_mechanism_keys: List[str] = field(default_factory=list)
    loaded: int = 0

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors"]
        if self.new_mechanism_keys:
            lines.append(f"{len(self.new_mechanism_keys)} keys added by the mechanism start fresh: "
                         + _short(self.new_mechanism_keys))
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape mismatch", self.shape_mismatch)):
            if keys:
                lines.append(f"{len(keys)} {label}: " + _short(keys))
        return "; ".join(lines)


def _short(keys: Sequence[str], n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, Tensor]:
    """Read tensors from a safetensors file, a state dict or a Lightning checkpoint, safely."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightLoadError(f"Weights file {path!r} does not exist. Check the path (or train a model "
                              "first: python train.py fit --config configs/baseline/synthetic.yaml).")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupted / not a weights file / would need unpickling
        raise WeightLoadError(
            f"Could not read weights from {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "The file is corrupted, truncated, or contains pickled Python objects that are not loaded "
            "for safety (only tensors are read, with weights_only=True). Re-export it as .safetensors "
            "or as a plain state dict."
        ) from None
    return clean_state_dict(obj)


def clean_state_dict(obj) -> Dict[str, Tensor]:
    """Unwrap checkpoint containers and strip ``model.``/``module.``/``_orig_mod.`` prefixes."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise WeightLoadError("The file does not hold a state dict of tensors.")
    out = {}
    is_lightning = all(k.startswith("model.") for k in obj)
    for k, v in obj.items():
        if is_lightning:
            k = k[len("model."):]
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
            k = k.replace("." + prefix, ".")
        out[k] = v
    return out


def load_weights(model: nn.Module, source: Union[str, os.PathLike, Mapping[str, Tensor]],
                 allowed_missing: Iterable[str] = (), allowed_unexpected: Iterable[str] = (),
                 skip: Iterable[str] = (), verbose: bool = True) -> LoadReport:
    """Load ``source`` into ``model`` and report; fail unless the mismatch is allowed.

    Allowed without error: missing keys starting with ``model.mechanism_prefixes`` (the mechanism's
    own new parameters, e.g. loading a baseline into CA-Stream) or with ``allowed_missing``, and
    unexpected keys starting with ``allowed_unexpected``. Keys starting with ``skip`` are not loaded
    (e.g. ``skip=("fc.",)`` to fine-tune on new classes with a fresh head) and are reported as new.
    """
    sd = read_state_dict(source) if not isinstance(source, Mapping) else clean_state_dict(source)
    skip = tuple(skip)
    if skip:
        sd = {k: v for k, v in sd.items() if not k.startswith(skip)}
    own = model.state_dict()
    mech = tuple(getattr(model, "mechanism_prefixes", ())) + tuple(allowed_missing) + skip
    rep = LoadReport()
    for k in own:
        if k not in sd:
            (rep.new_mechanism_keys if mech and k.startswith(mech) else rep.missing).append(k)
    allowed_unexp = tuple(allowed_unexpected)
    rep.unexpected = [k for k in sd if k not in own and not (allowed_unexp and k.startswith(allowed_unexp))]
    rep.shape_mismatch = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                          for k in sd if k in own and sd[k].shape != own[k].shape]
    if rep.missing or rep.unexpected or rep.shape_mismatch:
        hint = ""
        if any(k.split(" ")[0].endswith(("fc.weight", "fc.bias", "head.weight", "head.bias"))
               for k in rep.shape_mismatch):
            hint = (" The classifier has a different number of classes: to fine-tune on new classes, start a "
                    "new head with `reset_head: true` next to `checkpoint_path` in the config (or "
                    "load_weights(model, PATH, skip=('fc.',)) in Python).")
        raise WeightLoadError(f"Weights do not fit {type(model).__name__}: {rep}.{hint}")
    to_load = {k: v for k, v in sd.items() if k in own}
    model.load_state_dict(to_load, strict=False)
    rep.loaded = len(to_load)
    if verbose:
        print(f"[weights] {type(model).__name__}: {rep}")
    return rep


def save_weights(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Save a model's weights as safetensors (or a plain state dict for other suffixes)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save(sd, path)
