"""``run_interpretability``: every explainer x every metric over a dataloader, batched, with a progress bar.

Protocol (spec ``explainers_and_metrics.md`` §1, §4, §6.15):

* **Items.** Single-label data: one item per image, explained for its ground-truth class
  (``target="label"``, default, seed 001 §1.3.3) or the predicted class (``target="pred"``).
  Multi-label data (multi-hot ``label``): one item per (image, GT class) pair (``"label"``), or per
  (image, predicted-positive class) pair (``"pred"``: sigmoid > 0.5, else the top class); every metric
  is averaged over items.
* **Counted items.** All items by default; ``correct_only=True`` keeps items whose class is predicted
  (single-label: argmax = label; multi-label: sigmoid > 0.5). Localisation metrics additionally skip
  items whose class has no ground-truth region (counted in ``meta["skipped_no_gt"]``).
* **Scores.** ``score="auto"``: softmax for single-label data (seed 001), sigmoid per class for
  multi-label data (a softmax over several present classes is not a class probability).
* **Masking** in pixel space (images in [0, 1], the models normalise inside).
* **Runtime** is the explainer call only (per explanation = per image for single-label data), measured
  with ``torch.cuda.synchronize`` on GPUs.
* Sanity baselines ``random`` and ``fakecam`` are appended unless ``sanity=False``.

Explainers are names for :func:`models.explainers.create_explainer` or ``(name, callable)`` pairs / a
``{name: callable}`` dict, each callable ``(images, targets) -> (B, *spatial)`` maps in [0, 1].
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .faithfulness import (AverageDrop, AverageGain, AverageIncrease, DeletionAUC, InsertionAUC, _score,
                           check_saliency, class_scores, default_steps, masked_images, perturbation_curves)
from .localization import EnergyPointingGame, PointingGame, Runtime, SaliencyIoU, boxes_to_mask, class_masks

__all__ = ["run_interpretability", "InterpretabilityResults", "METRICS", "METRIC_INFO", "parse_metrics",
           "SANITY_EXPLAINERS"]

#: metric key -> (table header, higher is better)
METRIC_INFO: Dict[str, Tuple[str, bool]] = {
    "ad": ("AD", False), "ag": ("AG", True), "ai": ("AI", True), "ins": ("Ins", True), "del": ("Del", False),
    "pg": ("PG", True), "epg": ("EPG", True), "miou": ("mIoU", True), "time": ("T (ms/img)", False),
    "time_batch": ("T (ms/batch)", False),
}
METRICS = tuple(k for k in METRIC_INFO if not k.startswith("time"))
_ALIASES = {"insertion": "ins", "deletion": "del", "pointing": "pg", "pointing_game": "pg", "energy": "epg",
            "iou": "miou", "runtime": "time", "t": "time", "time_batch": "time", "average_drop": "ad", "average_gain": "ag",
            "average_increase": "ai"}
_LOCALIZATION = ("pg", "epg", "miou")
SANITY_EXPLAINERS = ("random", "fakecam")


class InterpretabilityResults(dict):
    """``{explainer: {metric: value}}`` (a plain dict, JSON-serialisable) with extras as attributes:

    ``meta`` (protocol, counts), ``curves`` (``{explainer: {"ins"|"del": mean curve}}``) and
    ``examples`` (``{"images", "targets", "masks", "maps": {explainer: maps}}`` for the first items).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meta: dict = {}
        self.curves: Dict[str, Dict[str, List[float]]] = {}
        self.examples: dict = {}


def parse_metrics(metrics: Union[str, Iterable[str]]) -> List[str]:
    """Normalise ``"ad,ag,ins"`` / a list into known metric keys (clear error on unknown names)."""
    if isinstance(metrics, str):
        metrics = [m for m in metrics.replace(" ", "").split(",") if m]
    out = []
    for m in metrics:
        k = _ALIASES.get(m.lower(), m.lower())
        if k == "all":
            out.extend(METRICS)
            continue
        if k not in METRIC_INFO:
            raise ValueError(f"Unknown metric {m!r}. Known metrics: {', '.join(METRIC_INFO)} (or 'all').")
        out.append(k)
    return list(dict.fromkeys(out))


def _explainer_list(explainers, sanity: bool) -> List[Tuple[str, Optional[Callable]]]:
    if isinstance(explainers, str):
        explainers = [e for e in explainers.replace(" ", "").split(",") if e]
    if isinstance(explainers, Mapping):
        items = list(explainers.items())
    else:
        items = [(e, None) if isinstance(e, str) else tuple(e) for e in explainers]
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"explainer names must be unique, got {names}.")
    if sanity:
        items += [(n, None) for n in SANITY_EXPLAINERS if n not in names]
    return items


def _build_explainers(items, model, target_layers, explainer_kwargs) -> Dict[str, Callable]:
    out = {}
    for name, fn in items:
        if fn is None:
            try:
                from models.explainers import create_explainer
            except ImportError as e:  # pragma: no cover - depends on the explainers package
                raise ImportError(f"Explainer {name!r} is given by name but models.explainers is not available "
                                  f"({e}). Pass (name, callable) pairs instead.") from e
            fn = create_explainer(name, model, target_layers=target_layers, **(explainer_kwargs or {}).get(name, {}))
        out[name] = fn
    return out


def _unpack(batch) -> dict:
    if isinstance(batch, Mapping):
        if "image" not in batch or "label" not in batch:
            raise ValueError(f"batches must hold 'image' and 'label' (got keys {sorted(batch)}).")
        return dict(batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return {"image": batch[0], "label": batch[1]}
    raise TypeError("batches must be dicts with 'image', 'label' (and 'mask'/'boxes' for localisation) "
                    "or (image, label) tuples.")


def _items(logits: Tensor, label: Tensor, target: str, correct_only: bool) -> Tuple[Tensor, Tensor, bool]:
    """Return ``(image index, class)`` of every item, and whether the data is multi-label."""
    B = logits.shape[0]
    multilabel = label.dim() == 2
    if not multilabel:
        label = label.long().view(-1)
        pred = logits.argmax(1)
        cls = label if target == "label" else pred
        keep = pred == label if correct_only else torch.ones(B, dtype=torch.bool, device=logits.device)
        idx = torch.arange(B, device=logits.device)[keep]
        return idx, cls[keep], False
    pos = logits.sigmoid() > 0.5
    if target == "label":
        sel = label > 0.5
    else:
        sel = pos.clone()
        none = ~sel.any(1)
        sel[none, logits[none].argmax(1)] = True
    if correct_only:
        sel = sel & pos & (label > 0.5)
    idx, cls = sel.nonzero(as_tuple=True)
    return idx, cls, True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_interpretability(model: nn.Module, dataloader: Iterable, explainers, metrics=("ad", "ag", "ai", "ins", "del",
                         "pg", "miou"), max_images: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                         progress: bool = True, target: str = "label", correct_only: bool = False,
                         sanity: bool = True, steps: Optional[int] = None, max_batch: int = 64,
                         insertion_baseline="blur", deletion_baseline="black", tolerance_px: int = 0,
                         iou_threshold: Union[str, float] = "mean_std", score: str = "auto",
                         target_layers=None, explainer_kwargs: Optional[Dict[str, dict]] = None,
                         examples: int = 0) -> InterpretabilityResults:
    """Evaluate ``explainers`` with ``metrics`` on (at most ``max_images`` images of) ``dataloader``.

    Returns :class:`InterpretabilityResults`: ``{explainer: {metric: value, "time": ms per explanation,
    "n": items}}``, AD/AI/AG/Ins/Del/PG/EPG/mIoU ×100. See the module docstring for the protocol.
    ``steps``: insertion/deletion steps (default ``ceil(sqrt(#pixels))``); ``max_batch``: images per
    forward call of the insertion/deletion curves; ``examples``: keep the maps of the first items for
    :func:`models.metrics.save_overlay_grid`.
    """
    if target not in ("label", "pred"):
        raise ValueError(f"target must be 'label' (ground truth) or 'pred' (predicted class), got {target!r}.")
    keys = parse_metrics(metrics)
    if "time" not in keys:
        keys.append("time")
    device = torch.device(device)
    model = model.to(device).eval()
    items = _explainer_list(explainers, sanity)
    fns = _build_explainers(items, model, target_layers, explainer_kwargs)
    names = list(fns)

    def new_metrics(step_count: int) -> Dict[str, object]:
        ms = {"ad": AverageDrop(), "ai": AverageIncrease(), "ag": AverageGain(),
              "ins": InsertionAUC(steps=step_count, baseline=insertion_baseline, max_batch=max_batch),
              "del": DeletionAUC(steps=step_count, baseline=deletion_baseline, max_batch=max_batch),
              "pg": PointingGame(tolerance_px=tolerance_px), "epg": EnergyPointingGame(),
              "miou": SaliencyIoU(threshold=iou_threshold), "time": Runtime()}
        return {k: ms[k].to(device) for k in keys}

    state: Dict[str, Dict[str, object]] = {}
    n_images = n_items = skipped = 0
    resolved_steps = resolved_score = spatial = None
    ex = {"images": [], "targets": [], "masks": [], "maps": {n: [] for n in names}}
    total = max_images
    if total is None:
        try:
            total = len(dataloader.dataset)
        except (AttributeError, TypeError):
            total = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="interpretability", unit="img")
    try:
        for raw in dataloader:
            if max_images is not None and n_images >= max_images:
                break
            batch = _unpack(raw)
            x = batch["image"].to(device).float()
            label = torch.as_tensor(batch["label"]).to(device)
            if max_images is not None and n_images + x.shape[0] > max_images:
                cut = max_images - n_images
                x, label = x[:cut], label[:cut]
                batch = {k: (v[:cut] if torch.is_tensor(v) else v) for k, v in batch.items()}
            B = x.shape[0]
            with torch.no_grad():
                logits = model(x)
            idx, cls, multilabel = _items(logits, label, target, correct_only)
            if resolved_steps is None:
                spatial = tuple(x.shape[2:])
                resolved_steps = int(steps) if steps is not None else default_steps(spatial)
                resolved_score = score if score != "auto" else ("sigmoid" if multilabel else "softmax")
                state = {n: new_metrics(resolved_steps) for n in names}
            n_images += B
            if idx.numel() == 0:
                if bar is not None:
                    bar.update(B)
                continue
            xi, ti = x[idx], cls
            n_items += xi.shape[0]
            p = _score(logits[idx], ti, resolved_score)
            gt = None
            if any(k in keys for k in _LOCALIZATION):
                if batch.get("mask") is not None:
                    gt = class_masks(batch["mask"].to(device)[idx], ti)
                elif batch.get("boxes") is not None:
                    gt = boxes_to_mask(batch["boxes"].to(device)[idx], ti, x.shape[2:])
                else:
                    raise ValueError("localisation metrics (pg, epg, miou) need a 'mask' or 'boxes' entry in the "
                                     "batches; drop them from --metrics or use a dataset with ground truth.")
                skipped += int((~gt.flatten(1).any(1)).sum())
            keep_ex = max(0, min(examples - sum(t.shape[0] for t in ex["images"]), xi.shape[0]))
            if keep_ex:
                ex["images"].append(xi[:keep_ex].cpu())
                ex["targets"].append(ti[:keep_ex].cpu())
                if gt is not None:
                    ex["masks"].append(gt[:keep_ex].cpu())
            for name, fn in fns.items():
                ms = state[name]
                _sync(device)
                t0 = time.perf_counter()
                with torch.enable_grad():
                    maps = fn(xi, ti)
                _sync(device)
                ms["time"].update(time.perf_counter() - t0, xi.shape[0])
                maps = check_saliency(maps.detach(), xi, f"explainer {name!r} output")
                if keep_ex:
                    ex["maps"][name].append(maps[:keep_ex].cpu())
                if any(k in keys for k in ("ad", "ai", "ag")):
                    o = class_scores(model, masked_images(xi, maps), ti, resolved_score)
                    for k in ("ad", "ai", "ag"):
                        if k in ms:
                            ms[k].update(p, o)
                for k, mode in (("ins", "insertion"), ("del", "deletion")):
                    if k in ms:
                        ms[k].update(perturbation_curves(model, xi, maps, ti, mode, resolved_steps,
                                                         ms[k].baseline, max_batch, resolved_score))
                for k in _LOCALIZATION:
                    if k in ms:
                        ms[k].update(maps, gt)
            if bar is not None:
                bar.update(B)
    finally:
        if bar is not None:
            bar.close()

    res = InterpretabilityResults()
    for name in names:
        row = {}
        for k in keys:
            if name not in state:
                row[k] = float("nan")
                continue
            v = float(state[name][k].compute())
            row[k] = v * 1000.0 if k == "time" else v
        if name in state:
            row["time_batch"] = 1000.0 * float(state[name]["time"].per_call())
        row["n"] = n_items
        res[name] = row
        if name in state:
            res.curves[name] = {k: state[name][k].mean_curve().tolist() for k in ("ins", "del") if k in keys}
    num_classes = getattr(model, "num_classes", None)
    res.meta = {
        "n_images": n_images, "n_items": n_items, "skipped_no_gt": skipped,
        "target": "ground truth" if target == "label" else "predicted",
        "counted": "correctly classified items only" if correct_only else "all items",
        "score": resolved_score, "mask_space": "pixel", "steps": resolved_steps,
        "pixels_per_step": math.ceil(math.prod(spatial) / resolved_steps) if resolved_steps else None,
        "insertion_baseline": str(insertion_baseline), "deletion_baseline": str(deletion_baseline),
        "tolerance_px": tolerance_px, "iou_threshold": iou_threshold, "max_batch": max_batch,
        "metrics": keys, "explainers": names, "device": str(device), "num_classes": num_classes,
        "batch_size": getattr(dataloader, "batch_size", None),
        "time_unit": "time: ms per explanation (per image for single-label data); time_batch: ms per explainer "
                     "call on a batch", "scale": "x100 except time",
    }
    if examples:
        res.examples = {"images": torch.cat(ex["images"]) if ex["images"] else None,
                        "targets": torch.cat(ex["targets"]) if ex["targets"] else None,
                        "masks": torch.cat(ex["masks"]) if ex["masks"] else None,
                        "maps": {n: torch.cat(v) for n, v in ex["maps"].items() if v}}
    return res
