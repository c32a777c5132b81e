"""Report writers: markdown table (like the seeds' tables), JSON of every number, PNG overlay grid."""
from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .runner import METRIC_INFO

__all__ = ["format_markdown_table", "write_markdown_table", "save_json", "save_overlay_grid", "display_name",
           "DISPLAY_NAMES"]


def _is_multi_model(results: Mapping) -> bool:
    """``{model: {explainer: {metric: v}}}`` vs ``{explainer: {metric: v}}``."""
    for v in results.values():
        if isinstance(v, Mapping):
            return any(isinstance(w, Mapping) for w in v.values())
    return False


def format_markdown_table(results: Mapping, model_name: Optional[str] = None,
                          metrics: Optional[Sequence[str]] = None, digits: int = 1,
                          meta: Optional[Mapping] = None) -> str:
    """Markdown table: rows method x model, columns metrics with ↑/↓ (AD↓ AG↑ AI↑ Ins↑ Del↓ PG↑ EPG↑ mIoU↑ T↓).

    ``results`` is ``{explainer: {metric: value}}`` (one model, named ``model_name``) or
    ``{model: {explainer: {metric: value}}}``. Unknown keys (e.g. ``n``) are left out. With the runner's
    ``meta`` (default: ``results.meta``) two columns are added: ``control`` (yes for control maps) and
    ``map`` (native resolution and, for degenerate maps, why numbers are missing: constant map, coarse
    map with localisation refused; :mod:`models.metrics.degenerate`).
    """
    meta = meta if meta is not None else getattr(results, "meta", None)
    info = (meta or {}).get("maps") if isinstance(meta, Mapping) else None
    controls = set((meta or {}).get("controls") or []) if isinstance(meta, Mapping) else set()
    per_model = dict(results) if _is_multi_model(results) else {model_name or "model": results}
    if metrics is None:
        seen = {k for rows in per_model.values() for row in rows.values() for k in row}
        metrics = [k for k in METRIC_INFO if k in seen]
    head = ["Method", "Model"] + [METRIC_INFO[k][0] + ("↑" if METRIC_INFO[k][1] else "↓") for k in metrics]
    if info:
        head += ["control", "map"]
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
            if info:
                from .degenerate import format_resolution

                d = info.get(method) or {}
                note = format_resolution(d.get("native_resolution"))
                if d.get("status") not in (None, "ok"):
                    note += f" ({d['status']})"
                cells += ["yes" if method in controls else "", note]
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
    text += format_markdown_table(results, model_name, metrics, digits, meta=meta)
    if meta:
        proto = ", ".join(f"{k}={v}" for k, v in meta.items()
                          if k not in ("metrics", "explainers", "time_unit", "maps", "controls"))
        text += ("\nAD/AG/AI/Ins/Del/PG/EPG/mIoU ×100; ↑/↓: higher/lower is better; T: explainer time in ms per "
                 f"explanation (ms/img) and per explainer call on a batch (ms/batch). Protocol: {proto}.\n")
        if meta.get("maps"):
            text += (f"\nmap: the explainer's native resolution. A constant (e.g. all-zero) map is not scored "
                     f"(\u2013); pointing game, energy and IoU are refused for maps coarser than "
                     f"{meta.get('min_native_side', 4)}x{meta.get('min_native_side', 4)} (docs/metrics.md).\n")
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


#: code name -> name a person reads (overlay column titles); unknown names are shown as given
DISPLAY_NAMES = {
    "cam": "CAM", "gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "xgradcam": "XGrad-CAM", "layercam": "Layer-CAM",
    "hirescam": "HiResCAM", "scorecam": "Score-CAM", "ablationcam": "Ablation-CAM", "opticam": "Opti-CAM",
    "relevancecam": "Relevance-CAM", "xrelevancecam": "XRelevance-CAM", "ham": "HAM", "gradient": "Gradient",
    "guidedbackprop": "Guided backprop", "intrinsic": "Intrinsic map", "random": "Random map (control)",
    "fakecam": "Fake-CAM (control)", "gaussian": "Centred Gaussian (control)",
    "colorcontrast": "Colour contrast (control)", "edges": "Edge energy (control)",
    "untrained": "Untrained net (control)",
}


def display_name(name: str, names: Optional[Mapping[str, str]] = None) -> str:
    """Readable method name: ``names[name]``, else :data:`DISPLAY_NAMES`, else ``name``."""
    if names and name in names:
        return names[name]
    key = str(name).lower().replace("-", "").replace("_", "")
    if key.startswith("ucag:"):
        return "UCAG (" + display_name(key[5:]) + ")"
    return DISPLAY_NAMES.get(key, str(name))


def _to_display(img: Tensor) -> Tensor:
    """``(C, H, W)`` -> ``(H, W, 3)`` or ``(H, W)`` (grey)."""
    if img.shape[0] == 3:
        return img.permute(1, 2, 0).clamp(0, 1)
    return img.mean(0).clamp(0, 1)


def _map_display(m: Tensor) -> Tensor:
    return m[m.shape[0] // 2] if m.dim() == 3 else m


_AXES_3D = ("axial z", "coronal y", "sagittal x")


def _peak(v: Tensor) -> Tuple[int, ...]:
    """Index of the maximum of a ``(D, H, W)`` volume (its centre if the volume is constant)."""
    if float(v.max() - v.min()) <= 1e-6:
        return tuple(s // 2 for s in v.shape)
    return tuple(int(i) for i in torch.unravel_index(torch.argmax(v), v.shape))


def _slice(v: Tensor, axis: int, idx: int) -> Tensor:
    """Slice ``(..., D, H, W)`` along spatial ``axis`` (0 = depth) at ``idx``."""
    return v.select(v.dim() - 3 + axis, idx)


def save_overlay_grid(images: Tensor, maps: Mapping[str, Tensor], path: str, n: int = 4,
                      titles: Optional[Sequence[str]] = None, masks: Optional[Tensor] = None,
                      alpha: float = 0.5, cmap: str = "jet", title: Optional[str] = None,
                      display_names: Optional[Mapping[str, str]] = None,
                      status: Optional[Mapping[str, str]] = None,
                      native: Optional[Mapping[str, Sequence[int]]] = None, colorbar: bool = True) -> str:
    """Save a readable PNG grid of saliency overlays.

    One row per image (first ``n``): the input, then one overlay per method (columns in ``maps`` order).

    * ``title``: the figure title (e.g. model, checkpoint, split).
    * ``titles``: one label per row, e.g. ``"true: circle / pred: circle (97 %)"``.
    * column titles: :func:`display_name` of each method (``display_names`` overrides), with its native
      map resolution (``native``) and a short ``status`` note (e.g. ``"2x2 < 4x4"``).
    * the ground-truth outline (``masks``, white) is drawn in every column; a constant (blank, all-zero)
      map is hatched and labelled "constant map" instead of being drawn as a colour; a colour bar shows
      the saliency scale (maps are min-max normalised per image to [0, 1]).
    * 3D volumes ``(C, D, H, W)``: three rows per volume, the axial / coronal / sagittal slices through
      the peak of each column's map (the input column: through the ground-truth centroid, else the centre).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from .degenerate import constant_maps, format_resolution

    if not maps:
        raise ValueError("save_overlay_grid needs at least one method's maps.")
    n = min(n, images.shape[0], *(m.shape[0] for m in maps.values()))
    if n < 1:
        raise ValueError("save_overlay_grid needs at least one image.")
    names = list(maps)
    is3d = images.dim() == 5
    per = 3 if is3d else 1
    rows, cols = n * per, 1 + len(names)
    top = 0.45 if title else 0.1  # inches above the column titles
    fig_w, fig_h = 2.1 * cols + (1.1 if colorbar else 0.3) + 0.6, 2.1 * rows + top + 0.45
    fig, axes = plt.subplots(rows, cols, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(left=0.6 / fig_w, right=1 - (1.1 if colorbar else 0.3) / fig_w, top=1 - (top + 0.35) / fig_h,
                        bottom=0.45 / fig_h, wspace=0.06, hspace=0.28 if per == 1 else 0.32)
    for i in range(n):
        img = images[i].detach().float().cpu()
        gt = masks[i].detach().float().cpu() if masks is not None else None
        cell_maps = [maps[name][i].detach().float().cpu() for name in names]
        for a in range(per):
            r = i * per + a
            for j in range(cols):
                ax = axes[r][j]
                ax.set_xticks([])
                ax.set_yticks([])
                m = cell_maps[j - 1] if j else None
                if is3d:  # slice through the peak of this column's map (input: GT centroid or centre)
                    if m is not None:
                        ref = _peak(m)
                    elif gt is not None and gt.sum() > 0:
                        ref = tuple(int(c.float().mean().round()) for c in torch.nonzero(gt > 0.5, as_tuple=True))
                    else:
                        ref = tuple(s // 2 for s in img.shape[1:])
                    im2, m2 = _slice(img, a, ref[a]), (_slice(m, a, ref[a]) if m is not None else None)
                    g2 = _slice(gt, a, ref[a]) if gt is not None else None
                    ax.text(0.02, 0.02, f"{_AXES_3D[a]}={ref[a]}", transform=ax.transAxes, fontsize=6,
                            color="white", va="bottom", bbox=dict(fc="black", alpha=0.5, lw=0, pad=1))
                else:
                    im2, m2, g2 = img, m, gt
                shown = _to_display(im2)
                ax.imshow(shown.numpy(), cmap=None if shown.dim() == 3 else "gray", vmin=0, vmax=1)
                if m2 is not None:
                    if bool(constant_maps(m.unsqueeze(0))[0]):
                        ax.imshow(torch.full_like(m2, 0.5).numpy(), cmap="gray", alpha=0.6, vmin=0, vmax=1)
                        ax.text(0.5, 0.5, f"constant map\n(value {float(m.flatten()[0]):.2g})\nnot scored",
                                transform=ax.transAxes, ha="center", va="center", fontsize=7, color="black",
                                bbox=dict(fc="white", alpha=0.85, lw=0.5, pad=2))
                    else:
                        ax.imshow(m2.numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
                if g2 is not None and float(g2.max()) > 0.5:
                    ax.contour(g2.numpy(), levels=[0.5], colors="white", linewidths=1.0)
                if r == 0:
                    if j == 0:
                        head = "input" + (" + ground truth" if masks is not None else "")
                    else:
                        head = display_name(names[j - 1], display_names)
                        notes = []
                        if native and native.get(names[j - 1]):
                            notes.append(f"native {format_resolution(native[names[j - 1]])}")
                        if status and status.get(names[j - 1]) not in (None, "", "ok"):
                            notes.append(str(status[names[j - 1]]))
                        if notes:
                            head += "\n" + ", ".join(notes)
                    ax.set_title(head, fontsize=7.5)
                if j == 0 and a == 0:
                    ax.set_ylabel(titles[i] if titles is not None else f"image {i}", fontsize=7.5)
    if title:
        fig.suptitle(title, fontsize=10)
    if colorbar:
        cax = fig.add_axes([1 - 0.95 / fig_w, 0.45 / fig_h + 0.1 * (1 - (top + 0.8) / fig_h), 0.15 / fig_w,
                            0.8 * (1 - (top + 0.8) / fig_h)])
        cb = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=cmap), cax=cax)
        cb.set_label("saliency (per-image min-max)", fontsize=7)
        cb.ax.tick_params(labelsize=6)
    if masks is not None:
        fig.text(0.5, 0.12 / fig_h, "white outline: ground-truth object of the explained class", ha="center",
                 fontsize=7)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
