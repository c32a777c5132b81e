"""Report writers: markdown table (like the seeds' tables), JSON of every number, PNG overlay grid."""
from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from .runner import METRIC_INFO

__all__ = ["format_markdown_table", "write_markdown_table", "save_json", "save_overlay_grid"]


def _is_multi_model(results: Mapping) -> bool:
    """``{model: {explainer: {metric: v}}}`` vs ``{explainer: {metric: v}}``."""
    for v in results.values():
        if isinstance(v, Mapping):
            return any(isinstance(w, Mapping) for w in v.values())
    return False


def format_markdown_table(results: Mapping, model_name: Optional[str] = None,
                          metrics: Optional[Sequence[str]] = None, digits: int = 1) -> str:
    """Markdown table: rows method x model, columns metrics with ↑/↓ (AD↓ AG↑ AI↑ Ins↑ Del↓ PG↑ EPG↑ mIoU↑ T↓).

    ``results`` is ``{explainer: {metric: value}}`` (one model, named ``model_name``) or
    ``{model: {explainer: {metric: value}}}``. Unknown keys (e.g. ``n``) are left out.
    """
    per_model = dict(results) if _is_multi_model(results) else {model_name or "model": results}
    if metrics is None:
        seen = {k for rows in per_model.values() for row in rows.values() for k in row}
        metrics = [k for k in METRIC_INFO if k in seen]
    head = ["Method", "Model"] + [METRIC_INFO[k][0] + ("↑" if METRIC_INFO[k][1] else "↓") for k in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, rows in per_model.items():
        for method, row in rows.items():
            cells = []
            for k in metrics:
                v = row.get(k)
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    cells.append("–")
                else:
                    d = 2 if k.startswith("time") and abs(v) < 10 else digits
                    cells.append(f"{v:.{d}f}")
            lines.append("| " + " | ".join([str(method), str(model)] + cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown_table(results: Mapping, path: str, model_name: Optional[str] = None,
                         metrics: Optional[Sequence[str]] = None, title: Optional[str] = None,
                         meta: Optional[Mapping] = None, digits: int = 1) -> str:
    """Write :func:`format_markdown_table` (with an optional title and protocol notes) to ``path``; return it."""
    meta = meta if meta is not None else getattr(results, "meta", None)
    text = ""
    if title:
        text += f"# {title}\n\n"
    text += format_markdown_table(results, model_name, metrics, digits)
    if meta:
        proto = ", ".join(f"{k}={v}" for k, v in meta.items() if k not in ("metrics", "explainers", "time_unit"))
        text += ("\nAD/AG/AI/Ins/Del/PG/EPG/mIoU ×100; ↑/↓: higher/lower is better; T: explainer time in ms per "
                 f"explanation (ms/img) and per explainer call on a batch (ms/batch). Protocol: {proto}.\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text


def _jsonable(o):
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Mapping):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    return str(o)


def save_json(results: Mapping, path: str, **extra) -> dict:
    """Dump every number: ``{"results": ..., "meta": ..., "curves": ..., **extra}`` (NaN -> null)."""
    obj = {"results": dict(results), "meta": dict(getattr(results, "meta", {}) or {}),
           "curves": dict(getattr(results, "curves", {}) or {})}
    obj.update(extra)
    obj = _jsonable(obj)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    return obj


def _to_display(img: Tensor) -> Tensor:
    """``(C, *spatial)`` -> ``(H, W, 3)`` or ``(H, W)`` (3D: the middle slice along depth)."""
    if img.dim() == 4:  # (C, D, H, W)
        img = img[:, img.shape[1] // 2]
    if img.shape[0] == 3:
        return img.permute(1, 2, 0).clamp(0, 1)
    return img.mean(0)


def _map_display(m: Tensor) -> Tensor:
    return m[m.shape[0] // 2] if m.dim() == 3 else m


def save_overlay_grid(images: Tensor, maps: Mapping[str, Tensor], path: str, n: int = 4,
                      titles: Optional[Sequence[str]] = None, masks: Optional[Tensor] = None,
                      alpha: float = 0.5, cmap: str = "jet") -> str:
    """Save a PNG grid: one row per image (first ``n``), columns = input (GT contour if ``masks``) + one
    saliency overlay per method. 3D volumes show the middle depth slice."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not maps:
        raise ValueError("save_overlay_grid needs at least one method's maps.")
    n = min(n, images.shape[0], *(m.shape[0] for m in maps.values()))
    if n < 1:
        raise ValueError("save_overlay_grid needs at least one image.")
    cols = 1 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(2.0 * cols, 2.0 * n), squeeze=False)
    for i in range(n):
        img = _to_display(images[i].detach().float().cpu())
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(img.numpy(), cmap=None if img.dim() == 3 else "gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                if masks is not None:
                    g = _map_display(masks[i].detach().float().cpu())
                    ax.contour(g.numpy(), levels=[0.5], colors="lime", linewidths=0.8)
                ax.set_title(titles[i] if titles is not None else "input", fontsize=8)
                continue
            name = list(maps)[j - 1]
            m = _map_display(maps[name][i].detach().float().cpu())
            ax.imshow(m.numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
            if i == 0:
                ax.set_title(name, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
