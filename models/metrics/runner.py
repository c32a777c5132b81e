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
                           check_saliency, class_scores, curve_auc, default_steps, masked_images,
                           perturbation_curves)
from .degenerate import MIN_NATIVE_SIDE, constant_maps, is_coarse, map_status, native_resolution
from .localization import EnergyPointingGame, PointingGame, Runtime, SaliencyIoU, boxes_to_mask, class_masks
from .extra import EXTRA_ALIASES, EXTRA_METRIC_INFO, EXTRA_METRICS, build_extra_metric

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
METRIC_INFO.update(EXTRA_METRIC_INFO)  # issue-18 metrics (models/metrics/extra.py), not part of "all"
_ALIASES.update(EXTRA_ALIASES)
_LOCALIZATION = ("pg", "epg", "miou")
SANITY_EXPLAINERS = ("random", "fakecam")


class InterpretabilityResults(dict):
    """``{explainer: {metric: value}}`` (a plain dict, JSON-serialisable) with extras as attributes:

    ``meta`` (protocol, counts), ``per_item`` (``{explainer: {metric: [value per item, x100]}}`` in item
    order, NaN for localisation items without ground truth; for paired intervals, ``models.metrics.stats``),
    ``curves`` (``{explainer: {"ins"|"del": mean curve}}``) and
    ``examples`` (``{"images", "targets", "masks", "maps": {explainer: maps}}`` for the first items).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meta: dict = {}
        self.per_item: Dict[str, Dict[str, List[float]]] = {}
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


def _align_per_item(pi: Dict[str, List[float]], n0: Dict[str, int], keep: Tensor) -> None:
    """Put NaN in the per-item lists where a map was not scored (constant map, refused metric), so every
    list of ``pi`` stays aligned with the items: entries appended since ``n0`` cover the kept items only."""
    kept = keep.tolist()
    for k, start in n0.items():
        vals = pi.setdefault(k, [])
        new = vals[start:]
        del vals[start:]
        it = iter(new) if len(new) == sum(kept) else iter(())
        vals.extend(next(it, float("nan")) if kk else float("nan") for kk in kept)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gather_ranks(per_item: Dict[str, Dict[str, List[float]]], counts: Tuple[int, ...], degen: Dict[str, dict]):
    """Under DDP (``torch.distributed`` initialised), every rank gets the per-item values of all ranks in rank
    order (rank 0's items first, as torchmetrics' ``cat`` states), the summed counts and constant-map counts.
    The metric values themselves are synced by torchmetrics in ``compute()``. A no-op in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return per_item, counts, degen
    gathered: List[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (per_item, counts, {n: d["n_constant"] for n, d in degen.items()}))
    merged: Dict[str, Dict[str, List[float]]] = {}
    for pi, _, _ in gathered:
        for name, by_metric in pi.items():
            for k, vals in by_metric.items():
                merged.setdefault(name, {}).setdefault(k, []).extend(vals)
    total = tuple(sum(g[1][i] for g in gathered) for i in range(len(counts)))
    for n in degen:
        degen[n]["n_constant"] = sum(g[2].get(n, 0) for g in gathered)
    return merged, total, degen


def _synced_curve(metric) -> List[float]:
    """Mean insertion/deletion curve over all ranks (torchmetrics only syncs inside ``compute``)."""
    with metric.sync_context(should_sync=metric._to_sync if hasattr(metric, "_to_sync") else True):
        return metric.mean_curve().tolist()


def run_interpretability(model: nn.Module, dataloader: Iterable, explainers, metrics=("ad", "ag", "ai", "ins", "del",
                         "pg", "miou"), max_images: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                         progress: bool = True, target: str = "label", correct_only: bool = False,
                         sanity: bool = True, steps: Optional[int] = None, max_batch: int = 64,
                         insertion_baseline="blur", deletion_baseline="black", tolerance_px: int = 0,
                         iou_threshold: Union[str, float] = "mean_std", score: str = "auto",
                         target_layers=None, explainer_kwargs: Optional[Dict[str, dict]] = None,
                         examples: int = 0, min_native_side: int = MIN_NATIVE_SIDE) -> InterpretabilityResults:
    """Evaluate ``explainers`` with ``metrics`` on (at most ``max_images`` images of) ``dataloader``.

    Returns :class:`InterpretabilityResults`: ``{explainer: {metric: value, "time": ms per explanation,
    "n": items}}``, AD/AI/AG/Ins/Del/PG/EPG/mIoU ×100. See the module docstring for the protocol.
    ``steps``: insertion/deletion steps (default ``ceil(sqrt(#pixels))``); ``max_batch``: images per
    forward call of the insertion/deletion curves; ``examples``: keep the maps of the first items for
    :func:`models.metrics.save_overlay_grid`.

    Degenerate maps (:mod:`models.metrics.degenerate`): a constant (e.g. all-zero) map is not scored (its
    per-item values are NaN and ``meta["maps"][explainer]["n_constant"]`` counts them); localisation metrics are refused (NaN)
    for explainers whose native resolution has a side below ``min_native_side`` (default 4; 0 disables).
    ``res.meta["maps"][explainer]`` holds ``native_resolution``, ``n_constant`` and a readable ``status``.
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
        ms.update({k: build_extra_metric(k, max_batch=max_batch) for k in keys if k in EXTRA_METRICS})
        return {k: ms[k].to(device) for k in keys}

    state: Dict[str, Dict[str, object]] = {}
    per_item: Dict[str, Dict[str, List[float]]] = {}  # {explainer: {metric: per-item values x100}}
    degen: Dict[str, dict] = {n: {"n_constant": 0} for n in names}  # native resolution, constant maps
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
                pi = per_item.setdefault(name, {})
                dg = degen[name]
                if "native_resolution" not in dg:
                    dg["native_resolution"] = native_resolution(fn, model, xi)
                coarse = is_coarse(dg["native_resolution"], min_native_side)
                keep = ~constant_maps(maps)  # constant / all-zero maps are not scored
                dg["n_constant"] += int((~keep).sum())
                n0 = {k: len(pi.get(k, [])) for k in keys if not k.startswith("time")}
                if not keep.any():
                    _align_per_item(pi, n0, keep)
                    continue
                xs, ts, ps, gs = xi, ti, p, gt
                if not keep.all():
                    xs, ts, ps, maps = xi[keep], ti[keep], p[keep], maps[keep]
                    gs = gt[keep] if gt is not None else None
                if any(k in keys for k in ("ad", "ai", "ag")):
                    o = class_scores(model, masked_images(xs, maps), ts, resolved_score)
                    for k in ("ad", "ai", "ag"):
                        if k in ms:
                            ms[k].update(ps, o)
                            pi.setdefault(k, []).extend((100.0 * ms[k].per_item(ps.double(), o.double())).tolist())
                for k, mode in (("ins", "insertion"), ("del", "deletion")):
                    if k in ms:
                        curves = perturbation_curves(model, xs, maps, ts, mode, resolved_steps, ms[k].baseline,
                                                     max_batch, resolved_score)
                        ms[k].update(curves)
                        pi.setdefault(k, []).extend((100.0 * curve_auc(curves.double())).tolist())
                for k in _LOCALIZATION:
                    if k in ms and not coarse:  # coarse maps: localisation refused (module degenerate.py)
                        ms[k].update(maps, gs)
                        v = 100.0 * ms[k].per_item(maps, gs.bool()).double()
                        v[~gs.flatten(1).any(1)] = float("nan")  # no ground truth: not scored
                        pi.setdefault(k, []).extend(v.tolist())
                if any(k in EXTRA_METRICS for k in keys):  # issue-18 metrics (models/metrics/extra.py)
                    sub = idx[keep]
                    ctx = dict(model=model, images=xs, maps=maps, targets=ts, p=ps, logits=logits[sub], explainer=fn,
                               score=resolved_score, **{g: batch[g].to(device)[sub] if batch.get(g) is not None
                                                        else None for g in ("mask", "boxes")})
                    for k in (k for k in keys if k in EXTRA_METRICS):
                        n_before = ms[k].per_item().numel()
                        ms[k].update_from_context(ctx)
                        if k != "boxacc":  # BoxAcc's per-item value depends on the dataset's best threshold
                            pi.setdefault(k, []).extend((ms[k].scale * ms[k].per_item()[n_before:]).tolist())
                _align_per_item(pi, n0, keep)
            if bar is not None:
                bar.update(B)
    finally:
        if bar is not None:
            bar.close()

    per_item, (n_images, n_items, skipped), degen = _gather_ranks(per_item, (n_images, n_items, skipped), degen)
    res = InterpretabilityResults()
    res.per_item = per_item
    for name in names:
        row = {}
        for k in keys:
            if name not in state:
                row[k] = float("nan")
                continue
            if k != "time" and getattr(state[name][k], "update_count", 1) == 0:  # refused / nothing scored
                row[k] = float("nan")
                continue
            v = float(state[name][k].compute())
            row[k] = v * 1000.0 if k == "time" else v
        if name in state:
            row["time_batch"] = 1000.0 * float(state[name]["time"].per_call())
        row["n"] = n_items
        res[name] = row
        if name in state:
            res.curves[name] = {k: _synced_curve(state[name][k]) for k in ("ins", "del") if k in keys}
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
        "controls": [n for n in names if getattr(fns[n], "control", False)],
        "min_native_side": min_native_side,
        "maps": {n: {"native_resolution": list(degen[n].get("native_resolution") or []) or None,
                     "n_constant": degen[n]["n_constant"],
                     "localisation": "refused" if is_coarse(degen[n].get("native_resolution"), min_native_side)
                     else "computed",
                     "status": map_status(n_items, degen[n]["n_constant"], degen[n].get("native_resolution"),
                                          min_native_side)} for n in names},
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
