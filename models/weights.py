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

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["WeightLoadError", "LoadReport", "read_state_dict", "load_weights", "save_weights", "clean_state_dict",
           "atomic_write", "describe_error"]


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


def describe_error(e: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"`` (safe for empty messages, e.g. ``EOFError()``)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else f"{type(e).__name__} (no message)"


@contextlib.contextmanager
def atomic_write(path: Union[str, os.PathLike], mode: str = "wb") -> Iterator:
    """Write ``path`` atomically: a temp file **in the same folder** (never ``$TMPDIR``, which may be on
    another filesystem), ``fsync``, then ``os.replace``. A crash or SIGKILL at any point leaves the previous
    file intact (at worst a hidden ``.<name>.<random>.tmp`` next to it)."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename itself (POSIX)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _short(keys: Sequence[str], n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, Tensor]:
    """Read tensors from a safetensors file, a state dict or a Lightning checkpoint, safely."""
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise WeightLoadError(f"Weights file {path!r} is empty (0 bytes): an interrupted copy or save. "
                              "Use another checkpoint (e.g. last.ckpt / best.ckpt) or re-export the model.")
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
            f"Could not read weights from {path!r} ({describe_error(e)}). "
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
                 skip: Iterable[str] = (), verbose: bool = True, allow_fresh_mechanism: bool = True) -> LoadReport:
    """Load ``source`` into ``model`` and report; fail unless the mismatch is allowed.

    Allowed without error: missing keys starting with ``model.mechanism_prefixes`` (the mechanism's
    own new parameters, e.g. loading a baseline into CA-Stream to *train* it; not with
    ``allow_fresh_mechanism=False``, used by evaluation and export) or with ``allowed_missing``, and
    unexpected keys starting with ``allowed_unexpected``. Keys starting with ``skip`` are not loaded
    (e.g. ``skip=("fc.",)`` to fine-tune on new classes with a fresh head) and are reported as new.
    """
    sd = read_state_dict(source) if not isinstance(source, Mapping) else clean_state_dict(source)
    skip = tuple(skip)
    if skip:
        sd = {k: v for k, v in sd.items() if not k.startswith(skip)}
    own = model.state_dict()
    mech_prefixes = tuple(getattr(model, "mechanism_prefixes", ()))
    mech = (mech_prefixes if allow_fresh_mechanism else ()) + tuple(allowed_missing) + skip
    rep = LoadReport()
    for k in own:
        if k not in sd:
            (rep.new_mechanism_keys if mech and k.startswith(mech) else rep.missing).append(k)
    allowed_unexp = tuple(allowed_unexpected)
    rep.unexpected = [k for k in sd if k not in own and not (allowed_unexp and k.startswith(allowed_unexp))]
    rep.shape_mismatch = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                          for k in sd if k in own and sd[k].shape != own[k].shape]
    if rep.missing or rep.unexpected or rep.shape_mismatch:
        fresh = [k for k in rep.missing if mech_prefixes and k.startswith(mech_prefixes)]
        raise WeightLoadError(f"Weights do not fit {type(model).__name__}: {rep}."
                              + _mismatch_hint(model, sd, own, rep, fresh))
    to_load = {k: v for k, v in sd.items() if k in own}
    model.load_state_dict(to_load, strict=False)
    rep.loaded = len(to_load)
    if verbose:
        print(f"[weights] {type(model).__name__}: {rep}")
    return rep


_HEAD_KEYS = ("fc.weight", "fc.bias", "head.weight", "head.bias")


def _top(keys: Iterable[str]) -> List[str]:
    """Top-level names of state-dict keys (``stream.blocks.0.w`` -> ``stream.*``)."""
    return sorted({k.split(".")[0] + ("." if "." in k else "") for k in keys})


#: ``() -> {model name: mechanism_prefixes}`` of the registered models. Installed by ``models.registry``, which
#: imports this module: weights never imports the registry, so the dependency runs one way.
_registered_prefixes: Callable[[], Mapping[str, tuple]] = dict


def _guess_source_model(unexpected: Sequence[str]) -> List[str]:
    """Registered models whose own (mechanism) parameters explain every unexpected key."""
    try:
        table = _registered_prefixes()
    except Exception:  # never let the error message itself fail
        return []
    return [name for name, pre in table.items() if pre and unexpected and all(k.startswith(pre) for k in unexpected)]


def _mismatch_hint(model: nn.Module, sd: Mapping[str, Tensor], own: Mapping[str, Tensor], rep: LoadReport,
                   fresh: Sequence[str]) -> str:
    """Name the real mismatch: class count, classifier input width, another mechanism, missing mechanism."""
    name, hints = type(model).__name__, []
    for k in sd:
        if k in own and k.endswith(_HEAD_KEYS) and sd[k].shape != own[k].shape:
            a, b = tuple(sd[k].shape), tuple(own[k].shape)
            if a[0] != b[0]:
                hints.append(f"The classifier has a different number of classes ({a[0]} in the file, {b[0]} in the "
                             "model): to fine-tune on new classes, start a new head with `reset_head: true` next to "
                             "`checkpoint_path` in the config (or load_weights(model, PATH, skip=('fc.',)) in Python).")
            else:
                hints.append(f"Both classifiers have {a[0]} classes but `{k}` takes a different input ({a} in the "
                             f"file, {b} in the model): the file was saved from another mechanism or backbone.")
            break
    if rep.unexpected:
        guess = _guess_source_model(rep.unexpected)
        hints.append(f"The file holds parameters {name} does not have ({', '.join(_top(rep.unexpected))})"
                     + (f": it looks like a {' / '.join(repr(g) for g in guess)} model" if guess else "")
                     + "; load it into the model it was saved from.")
    if fresh:
        hints.append(f"The file has no weights for the mechanism's own parameters ({', '.join(_top(fresh))}): "
                     "it is probably a plain baseline. Evaluating or exporting it as "
                     f"{name} would use random mechanism weights; use the model the file was saved from (e.g. "
                     "--model baseline), or train the mechanism first (checkpoint_path: FILE in a training config).")
    elif rep.missing and not rep.unexpected:
        hints.append(f"The file lacks {', '.join(_top(rep.missing))}: it was saved from a different model.")
    return (" " + " ".join(hints)) if hints else ""


def save_weights(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Save a model's weights as safetensors (or a plain state dict for other suffixes)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = os.fspath(path)
    with atomic_write(path) as f:  # temp file in the same folder + os.replace
        if path.endswith(".safetensors"):
            from safetensors.torch import save

            f.write(save(sd))
        else:
            torch.save(sd, f)
