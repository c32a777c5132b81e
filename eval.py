"""Evaluate a trained model: accuracy (top-1/top-5, multi-label mAP) on a split, as JSON + a table.

    python eval.py --checkpoint checkpoints/baseline_synthetic/checkpoints/best.ckpt
    python eval.py --checkpoint CKPT --split val --out checkpoints/baseline_synthetic/eval
    python eval.py --weights model.safetensors --model baseline --model-kwargs '{"backbone": "resnet18"}' \\
        --data-config configs/baseline/synthetic.yaml

Interpretability (docs/metrics.md): explainers x metrics on the first ``--max-images`` images, written as
``interpretability_<split>.json`` (every number), ``.md`` (table) and ``overlays_<split>.png``:

    python eval.py --checkpoint CKPT --split val --explainers gradcam,gradcampp,scorecam,opticam \\
        --metrics ad,ag,ai,ins,del,pg,miou --max-images 200 --out DIR

A zoo checkpoint is self-describing (model class, hyper-parameters, DataModule). Exported weights
(safetensors / state dict) need ``--model``/``--model-kwargs`` and a ``--data-config`` YAML whose
``data:`` section names the DataModule (as in ``configs/``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
import torchmetrics
from tqdm.auto import tqdm

from models.explainers.base import parse_target_layers  # noqa: F401  (eval.parse_target_layers)

warnings.filterwarnings("ignore", ".*does not have many workers.*")


#: the default run (no --explainers): the model's own map and Grad-CAM, plus the controls of issue 14
DEFAULT_EXPLAINERS = ("intrinsic", "gradcam", "random", "gaussian", "fakecam", "colorcontrast", "edges", "untrained")
#: images of the default run (AD/AG/AI, insertion/deletion, pointing game, IoU in well under a minute on 2 cores)
DEFAULT_MAX_IMAGES = 100
#: insertion/deletion steps of the default run (the full protocol, --steps unset with --explainers, uses ceil(sqrt(P)))
DEFAULT_STEPS = 16


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 or negatives used to mean 'everything' or print an empty table)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {v}; omit the flag for the default")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a Lightning checkpoint written by train.py (best.ckpt / last.ckpt)")
    src.add_argument("--weights", help="exported weights (.safetensors or state dict); needs --model")
    p.add_argument("--model", help="registry name for --weights (see models.list_models())")
    p.add_argument("--model-kwargs", default="{}", help="JSON kwargs for --model, e.g. '{\"backbone\": \"resnet18\"}'")
    p.add_argument("--data-config", help="YAML with a data: section (class_path/init_args) to evaluate on")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--limit-batches", type=_positive_int, default=None, help="evaluate only the first N batches")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None,
                   help="output folder (default: <run>/eval/<checkpoint name>/ for <run>/checkpoints/<name>.ckpt, "
                        "<folder>/eval/<weights name>/ for exported weights)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace results in --out that were written for a different checkpoint or weights file")
    g = p.add_argument_group("interpretability (docs/metrics.md)")
    g.add_argument("--explainers", default=None,
                   help="comma list of models.explainers names, e.g. gradcam,gradcampp,scorecam,opticam,intrinsic, "
                        "rsp, ucag:gradcam (UCAG over a base explainer) "
                        "(random and fakecam are always added as sanity baselines). Default: the intrinsic map and "
                        "Grad-CAM with the controls (" + ",".join(DEFAULT_EXPLAINERS) + ") on --max-images 100 "
                        "images with --steps 16 (under a minute on 2 cores for the main job); 'none' for accuracy "
                        "only")
    g.add_argument("--target-layers", default=None, metavar="LAYERS",
                   help="layer(s) the CAM-family explainers explain: a tap index (-1 = last stage, -2 = the stage "
                        "before), a module name (backbone.taps.2, backbone.body.layer3), or a comma list of them "
                        "for layer-wise aggregation (-1,-2,-3). Default: the model's cam_target_layer()")
    g.add_argument("--explain", default=None, metavar="IMAGE_OR_FOLDER",
                   help="explain your own PNG/JPEG image(s) (a file or a folder): prediction, confidence and an "
                        "overlay per image in OUT/explain/ (explainers: --explainers, default intrinsic,gradcam); "
                        "no accuracy or metrics are computed")
    g.add_argument("--metrics", default="ad,ag,ai,ins,del,pg,miou",
                   help="comma list of ad,ag,ai,ins,del,pg,epg,miou (or all); runtime is always reported")
    g.add_argument("--max-images", type=_positive_int, default=None,
                   help="images explained (first N of the split; default 200 with --explainers, 100 in the default run)")
    g.add_argument("--target", default="label", choices=["label", "pred"], help="class explained: ground truth or predicted")
    g.add_argument("--correct-only", action="store_true", help="count only correctly classified images")
    g.add_argument("--steps", type=_positive_int, default=None,
                   help="insertion/deletion steps (default ceil(sqrt(#pixels)) with --explainers, 16 in the default run)")
    g.add_argument("--max-batch", type=_positive_int, default=64, help="images per forward call in insertion/deletion")
    g.add_argument("--tolerance-px", type=int, default=0, help="pointing-game tolerance (15 in the original protocol)")
    g.add_argument("--iou-threshold", default="mean_std", help="mean_std (seed 002 eq. 5.1), mean, or a number")
    g.add_argument("--grid-images", type=int, default=4, help="images in the overlay PNG")
    g.add_argument("--sanity", action="store_true",
                   help="cascading-randomisation sanity check of the --explainers (Spearman/SSIM per step, flags maps "
                        "that do not change; models/metrics/sanity.py): sanity_<split>.json/.png")
    g.add_argument("--sanity-images", type=int, default=16, help="images for --sanity")
    g.add_argument("--dropout-ranking", default=None, metavar="METRIC",
                   help="layer-dropout ranking check (seed 002 §5.4) of the --explainers on METRIC (e.g. miou)")
    g.add_argument("--dropout-p", type=float, default=0.1, help="dropout rate after every backbone stage")
    g.add_argument("--dropout-repeats", type=int, default=10, help="passes with dropout on")
    g.add_argument("--picnn", action="store_true",
                   help="PICNN filter-cluster metrics ACC1/ACC2/ACC3/MIS (models/metrics/picnn.py, docs/picnn.md)")
    return p


def _datamodule_from_yaml(path: str, **overrides):
    """The DataModule of a config's ``data:`` section: an allow-listed ``ZooDataModule`` with known arguments."""
    import yaml

    from trainers.classification import datamodule_from_spec

    with open(path) as f:
        cfg = yaml.safe_load(f)
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if not isinstance(data, dict) or "class_path" not in data:
        raise SystemExit(f"error: {path} has no data: section with a class_path (see configs/baseline/synthetic.yaml).")
    return datamodule_from_spec(data["class_path"], data.get("init_args") or {}, "data.class_path", "data.init_args",
                                **overrides)


def default_out_dir(src: str) -> str:
    """Results are named after their source and stay in its folder: ``<run>/eval/<stem>/`` for
    ``<run>/checkpoints/<stem>.ckpt`` (``best`` and ``last`` apart), ``<folder>/eval/<stem>/`` for any other
    file (an export ``DIR/model.safetensors`` -> ``DIR/eval/model/``, so sibling exports never collide)."""
    folder, name = os.path.split(os.path.abspath(src))
    stem = os.path.splitext(name)[0] or "model"
    base = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
    return os.path.join(base, "eval", stem)


def check_out_dir(out_dir: str, src: str, split: str, overwrite: bool = False) -> str:
    """Refuse to replace results written for another source (``metrics_<split>.json`` records it)."""
    path = os.path.join(out_dir, f"metrics_{split}.json")
    if os.path.exists(path) and not overwrite:
        try:
            with open(path) as f:
                prev = json.load(f).get("source")
        except Exception:  # unreadable: not ours to replace silently
            prev = None
        if not isinstance(prev, str) or os.path.abspath(prev) != os.path.abspath(src):
            raise SystemExit(f"error: {path} holds results of {prev or 'an unknown source'}; refusing to replace them "
                             f"with results of {src}. Pass another --out (or nothing: the default folder is named "
                             "after the checkpoint), or --overwrite.")
    return path


def load_model_and_data(args) -> tuple:
    """Return ``(model, datamodule, source_path)`` from the CLI arguments, with clear errors."""
    import models
    from models.weights import load_weights
    from trainers.classification import load_datamodule, load_module

    overrides = {"batch_size": args.batch_size} if args.batch_size else {}
    if args.checkpoint:
        module = load_module(args.checkpoint)
        model = module.model
        dm = _datamodule_from_yaml(args.data_config, **overrides) if args.data_config else \
            load_datamodule(args.checkpoint, **overrides)
        if dm is None:
            raise SystemExit("error: the checkpoint does not record its DataModule; pass --data-config CONFIG.yaml.")
        return model, dm, args.checkpoint
    card_path = os.path.join(os.path.dirname(os.path.abspath(args.weights)), "model.json")
    if not args.model and os.path.isfile(card_path):  # written by export.py
        with open(card_path) as f:
            card = json.load(f)
        if not isinstance(card, dict) or not isinstance(card.get("model"), str):
            raise SystemExit(f"error: {card_path} is not a model card written by export.py (no 'model' name).")
        from models.registry import check_model_kwargs

        check_model_kwargs(card.get("kwargs") or {}, f"{card_path}: kwargs")
        args.model, args.model_kwargs = card["model"], json.dumps(card.get("kwargs") or {})
    if not args.model:
        raise SystemExit(f"error: --weights needs --model (one of: {', '.join(models.list_models())}) "
                         "or a model.json next to the weights (export.py writes one).")
    if not args.data_config:
        raise SystemExit("error: --weights needs --data-config CONFIG.yaml (its data: section names the dataset).")
    dm = _datamodule_from_yaml(args.data_config, **overrides)
    kwargs = json.loads(args.model_kwargs)
    kwargs.setdefault("num_classes", dm.num_classes)
    kwargs.setdefault("in_chans", dm.in_chans)
    model = models.create_model(args.model, **kwargs)
    # every parameter must come from the file: a baseline evaluated as a mechanism would have random mechanism weights
    load_weights(model, args.weights, allow_fresh_mechanism=False)
    return model, dm, args.weights


def _loader(dm, split: str):
    dm.setup("test" if split == "test" else "fit")
    return {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, loader, num_classes: int, multilabel: bool, device: str = "cpu",
                      limit_batches: Optional[int] = None, class_names: Optional[List[str]] = None) -> Dict[str, Any]:
    """Top-1/top-5 accuracy and per-class accuracy (single-label) or mAP/F1 (multi-label) with torchmetrics."""
    from torchmetrics import classification as C

    model.eval().to(device)
    if multilabel:
        metrics = {"mAP": C.MultilabelAveragePrecision(num_labels=num_classes, average="macro"),
                   "f1": C.MultilabelF1Score(num_labels=num_classes, average="macro"),
                   "per_class_AP": C.MultilabelAveragePrecision(num_labels=num_classes, average="none")}
    else:
        metrics = {"top1": C.MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro"),
                   "per_class_acc": C.MulticlassAccuracy(num_classes=num_classes, average="none")}
        if num_classes > 5:
            metrics["top5"] = C.MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
    # compute_groups=False: torchmetrics merges metrics whose states are equal after the first batch, which made
    # top-5 report top-1 whenever the first batch was all correct at top-1
    coll = torchmetrics.MetricCollection(metrics, compute_groups=False).to(device)
    n, t0 = 0, time.perf_counter()
    total = min(len(loader), limit_batches) if limit_batches else len(loader)
    for i, batch in enumerate(tqdm(loader, total=total, desc="accuracy", leave=False)):
        if limit_batches and i >= limit_batches:
            break
        x, y = batch["image"].to(device), batch["label"].to(device)
        logits = model(x)
        if not torch.isfinite(logits).all():  # a diverged run: accuracy of NaN logits is meaningless
            bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
            raise ValueError(f"the model produced NaN/inf logits on batch {i} ({bad} non-finite weights): the "
                             "checkpoint is from a diverged run. Retrain with a lower learning rate.")
        coll.update(logits, y.long())
        n += y.shape[0]
    out = {k: (v.tolist() if v.numel() > 1 else float(v)) for k, v in coll.compute().items()}
    out["num_images"] = n
    out["ms_per_image"] = 1000 * (time.perf_counter() - t0) / max(n, 1)
    if class_names:
        out["class_names"] = list(class_names)
    return out


def evaluate_interpretability(model: torch.nn.Module, loader, args, out_dir: str, model_name: str) -> Dict[str, Any]:
    """Explainers x metrics with :func:`models.metrics.run_interpretability`; writes JSON, table and overlays."""
    from models.metrics import run_interpretability, save_json, save_overlay_grid, write_markdown_table

    try:
        thr = float(args.iou_threshold)
    except ValueError:  # a rule name; SaliencyIoU names the valid ones
        thr = args.iou_threshold
    metrics = args.metrics
    first = next(iter(loader), None)
    if isinstance(first, dict) and first.get("mask") is None and first.get("boxes") is None:
        from models.metrics import parse_metrics

        loc = [m for m in parse_metrics(metrics) if m in ("pg", "epg", "miou")]
        if loc:
            print(f"note: the dataset has no ground-truth masks or boxes: {', '.join(loc)} skipped")
            metrics = ",".join(m for m in parse_metrics(metrics) if m not in loc)
    res = run_interpretability(model, loader, args.explainers, metrics, max_images=args.max_images,
                               device=args.device, target=args.target, correct_only=args.correct_only,
                               steps=args.steps, max_batch=args.max_batch, tolerance_px=args.tolerance_px,
                               iou_threshold=thr, examples=args.grid_images,
                               target_layers=parse_target_layers(getattr(args, "target_layers", None)))
    stem = os.path.join(out_dir, f"interpretability_{args.split}")
    intervals = interval_summary(res)
    save_json(res, stem + ".json", model=model_name, split=args.split, intervals=intervals)
    table = write_markdown_table(res, stem + ".md", model_name=model_name,
                                 title=f"Interpretability: {model_name}, {args.split} split")
    iv_table = format_intervals(intervals)
    with open(stem + ".md", "a") as f:
        f.write("\n" + iv_table)
    table += "\n" + iv_table
    files = [stem + ".json", stem + ".md"]
    if args.grid_images > 0 and res.examples.get("maps"):
        names = getattr(loader.dataset, "class_names", None)
        ex_img = res.examples["images"]
        titles = row_titles(model, ex_img, res.examples["targets"], names, args.device,
                            "true" if args.target == "label" else "explained", res.meta.get("score") == "sigmoid")
        maps_info = res.meta.get("maps") or {}
        files.append(save_overlay_grid(
            ex_img, res.examples["maps"], os.path.join(out_dir, f"overlays_{args.split}.png"), n=args.grid_images,
            titles=titles, masks=res.examples.get("masks"), display_names=method_names(model),
            title=f"{_describe(model, model_name, args)}: saliency for the "
                  f"{'true' if args.target == 'label' else 'predicted'} class, {args.split} split",
            native={k: v.get("native_resolution") for k, v in maps_info.items()},
            status={k: _short_status(v) for k, v in maps_info.items()}))
    print("\n" + table)
    for name, info in (res.meta.get("maps") or {}).items():
        if info.get("status") not in (None, "ok"):
            print(f"note: {name}: {info['status']}")
    return {"results": dict(res), "meta": res.meta, "intervals": intervals, "files": files}


#: what the intervals of one evaluated model carry (eval.py evaluates one checkpoint = one training seed)
INTERVAL_NOTE = ("image-level interval only: percentile bootstrap over the evaluated images (2000 resamples) of one "
                 "trained model; training variance (seeds) is not captured -- experiments/ use "
                 "models.metrics.stats.paired_diff_across_seeds for that")


def interval_summary(res) -> Dict[str, Any]:
    """``models.metrics.stats.versus_best_control`` on the runner's per-item values: per metric, each explainer's
    mean with a 95 % image-bootstrap interval and its paired difference to the best non-degenerate control."""
    from models.metrics import METRIC_INFO
    from models.metrics.stats import versus_best_control

    hib = {k: v[1] for k, v in METRIC_INFO.items() if not k.startswith("time")}
    return {"note": INTERVAL_NOTE, "degenerate_controls": ["fakecam"],
            "metrics": versus_best_control(res.per_item, res.meta.get("controls") or [], hib)}


def format_intervals(intervals: Dict[str, Any], digits: int = 1) -> str:
    """Two markdown tables: mean [95 % CI] per explainer x metric, and explainer - best control [95 % CI]."""
    from models.metrics import METRIC_INFO

    per = intervals.get("metrics") or {}
    if not per:
        return ""
    ms = list(per)
    head = [METRIC_INFO[m][0] + ("↑" if METRIC_INFO[m][1] else "↓") for m in ms]
    names = list(dict.fromkeys(e for m in ms for e in per[m]["explainers"]))

    def cell(r):
        if r is None or r.get("n", 1) == 0 or r.get("mean") is None or r["mean"] != r["mean"]:
            return "–"
        lo, hi = r.get("ci95_low"), r.get("ci95_high")
        if lo is None or hi is None or lo != lo or hi != hi:
            return f"{r['mean']:.{digits}f}"
        return f"{r['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    lines = [f"Mean [95 % CI] per metric ({intervals.get('note', INTERVAL_NOTE)}).", "",
             "| Method | " + " | ".join(head) + " |", "|" + "---|" * (len(ms) + 1)]
    for e in names:
        ctrl = any(per[m]["explainers"].get(e, {}).get("control") for m in ms)
        lines.append(f"| {e}{' (control)' if ctrl else ''} | "
                     + " | ".join(cell(per[m]["explainers"].get(e)) for m in ms) + " |")
    lines += ["", "Paired difference explainer − best non-degenerate control (Fake-CAM excluded), same images, "
              "[95 % image-bootstrap CI]; beats: yes / no / unclear = the interval excludes 0 on the better side / "
              "on the worse side / neither.", "",
              "| Method | " + " | ".join(head) + " |", "|" + "---|" * (len(ms) + 1),
              "| *best control* | " + " | ".join(per[m]["best_control"] or "–" for m in ms) + " |"]
    for e in names:
        rows = [per[m]["explainers"].get(e) or {} for m in ms]
        if any(r.get("control") for r in rows):
            continue
        cells = []
        for r in rows:
            d = r.get("vs_best_control")
            cells.append("–" if d is None else f"{cell(d)} {d['beats']}")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _describe(model, model_name: str, args) -> str:
    """``"Baseline (resnet10t, best.ckpt)"`` for picture titles."""
    bb = getattr(getattr(model, "backbone", None), "name", None)
    src = getattr(args, "checkpoint", None) or getattr(args, "weights", None)
    extra = ", ".join(str(v) for v in (bb, os.path.basename(src) if src else None) if v)
    return f"{model_name} ({extra})" if extra else model_name


def method_names(model) -> Dict[str, str]:
    """Display names for the overlay columns; the intrinsic map is named after the model's explanation kind."""
    kind = getattr(model, "explanation_kind", None)
    return {"intrinsic": f"Intrinsic map ({kind})" if kind else "Intrinsic map"}


def _short_status(info: Dict[str, Any]) -> str:
    """Column note for the picture: only the degenerate cases."""
    from models.metrics.degenerate import format_resolution

    notes = []
    if info.get("n_constant"):
        notes.append("constant maps" if "not scored" in info.get("status", "") and "/" not in info["status"]
                     else f"{info['n_constant']} constant")
    if info.get("localisation") == "refused":
        notes.append(f"coarse {format_resolution(info.get('native_resolution'))}: no PG/IoU")
    return ", ".join(notes)


@torch.no_grad()
def row_titles(model, images, targets, class_names, device: str = "cpu", what: str = "true",
               multilabel: bool = False) -> List[str]:
    """``"true: circle\npred: circle (97 %)"`` per image (softmax confidence of the top class; sigmoid for
    multi-label data)."""
    model.eval()
    logits = model(images.to(device)).float().cpu()
    probs = logits.sigmoid() if multilabel else logits.softmax(1)
    conf, pred = probs.max(1)
    name = lambda c: class_names[c] if class_names and 0 <= c < len(class_names) else str(c)  # noqa: E731
    return [f"{what}: {name(int(t))}\npred: {name(int(p))} ({100 * float(c):.0f} %)"
            for t, p, c in zip(targets.tolist(), pred.tolist(), conf.tolist())]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _image_files(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise SystemExit(f"error: --explain {path}: the folder has no PNG/JPEG image.")
        return files
    if not os.path.isfile(path):
        raise SystemExit(f"error: --explain {path}: no such file or folder.")
    if not path.lower().endswith(IMAGE_SUFFIXES):
        raise SystemExit(f"error: --explain {path}: not a PNG/JPEG file (suffix {os.path.splitext(path)[1]!r}).")
    return [path]


def load_image(path: str, in_chans: int, size: Optional[int]) -> torch.Tensor:
    """A PNG/JPEG as ``(in_chans, H, W)`` in [0, 1] (RGB or grey), resized to ``size`` x ``size`` if given."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if in_chans == 3 else "L")
            if size:
                im = im.resize((int(size), int(size)), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise SystemExit(f"error: --explain: cannot read image {path!r} ({e}).") from None
    x = torch.from_numpy(arr.copy())
    x = x.permute(2, 0, 1) if x.dim() == 3 else x.unsqueeze(0)
    if x.shape[0] != in_chans:
        raise SystemExit(f"error: --explain: the model takes {in_chans}-channel images; {path!r} gives {x.shape[0]}.")
    return x


def explain_files(model, dm, args, out_dir: str) -> Dict[str, Any]:
    """``--explain IMAGE_OR_FOLDER``: predict and explain each image (predicted class); one overlay PNG per image."""
    from models.explainers import create_explainer
    from models.metrics import save_overlay_grid
    from models.metrics.degenerate import native_resolution

    if getattr(model, "spatial_dims", 2) != 2:
        raise SystemExit("error: --explain reads 2D PNG/JPEG images; this model takes 3D volumes.")
    size = (getattr(dm, "hparams", None) or {}).get("image_size") if dm is not None else None
    names = getattr(dm, "class_names", None) if dm is not None else None
    layers = parse_target_layers(args.target_layers)
    model.eval().to(args.device)
    explainers = {}
    for e in [e for e in args.explainers.replace(" ", "").split(",") if e]:
        try:
            explainers[e] = create_explainer(e, model, target_layers=layers)
        except (ValueError, TypeError) as err:
            print(f"skip {e}: {err}")
    if not explainers:
        raise SystemExit("error: --explain: no usable explainer (see the messages above).")
    folder = os.path.join(out_dir, "explain")
    os.makedirs(folder, exist_ok=True)
    out = {"source": args.checkpoint or args.weights, "images": []}
    for path in _image_files(args.explain):
        x = load_image(path, model.in_chans, size).unsqueeze(0).to(args.device)
        with torch.no_grad():
            probs = model(x).float().softmax(1)[0]
        conf, pred = probs.max(0)
        maps, native = {}, {}
        for e, fn in explainers.items():
            maps[e] = fn(x, pred.view(1)).detach().cpu()
            native[e] = native_resolution(fn, model, x)
        label = names[int(pred)] if names else str(int(pred))
        png = os.path.join(folder, os.path.splitext(os.path.basename(path))[0] + "_overlay.png")
        save_overlay_grid(x.cpu(), maps, png, n=1, titles=[f"pred: {label}\n({100 * float(conf):.0f} %)"],
                          display_names=method_names(model), native=native,
                          title=f"{os.path.basename(path)}: why '{label}'?")
        top = probs.topk(min(3, probs.numel()))
        row = {"image": path, "overlay": png, "pred": label, "confidence": float(conf),
               "top": [{"class": names[int(i)] if names else int(i), "p": float(p)}
                       for p, i in zip(top.values.tolist(), top.indices.tolist())]}
        out["images"].append(row)
        print(f"{os.path.basename(path)}: {label} ({100 * float(conf):.1f} %) -> {png}")
    path = os.path.join(folder, "predictions.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")
    return out


def format_table(results: Dict[str, Any]) -> str:
    rows = [(k, v) for k, v in results.items() if isinstance(v, (int, float))]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    for k, v in rows:
        lines.append(f"| {k.ljust(width)} | {v:.4f} |" if isinstance(v, float) else f"| {k.ljust(width)} | {v} |")
    return "\n".join(lines)


def check_explainers(model, loader, args) -> Dict[str, str]:
    """Validate ``--metrics`` and ``--explainers`` before the accuracy pass (unknown names: an error). An explainer
    that does not apply to this model (it fails on one image, e.g. ``ham`` on a ViT) is dropped from the run
    and returned as ``{name: reason}`` (reported in the table and JSON by :func:`record_skipped`)."""
    from models.explainers import create_explainer
    from models.metrics import parse_metrics

    try:
        parse_metrics(args.metrics)
    except ValueError as e:
        raise SystemExit(f"error: --metrics: {e}") from None
    names = [e for e in (args.explainers or "").replace(" ", "").split(",") if e]
    if not names:
        return {}
    batch = next(iter(loader))
    x = (batch["image"] if isinstance(batch, dict) else batch[0])[:1].to(args.device)
    model.eval().to(args.device)
    layers = parse_target_layers(getattr(args, "target_layers", None))
    skipped: Dict[str, str] = {}
    for name in names:
        try:
            create_explainer(name, model, target_layers=layers)(x)
        except Exception as e:  # noqa: BLE001 - any failure of one explainer must not end the evaluation
            if isinstance(e, ValueError) and str(e).startswith("Unknown explainer"):
                raise SystemExit(f"error: --explainers: {e}") from None
            skipped[name] = f"does not apply to {type(model).__name__}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"note: explainer {name} skipped ({skipped[name]})")
    args.explainers = ",".join(n for n in names if n not in skipped)
    return skipped


def record_skipped(results: Dict[str, Any], skipped: Dict[str, str], out_dir: str, split: str) -> None:
    """Add the skipped explainers (with reasons) to the results JSON and the interpretability table."""
    from models.weights import atomic_write

    interp = results.setdefault("interpretability", {})
    interp["skipped"] = dict(skipped)
    lines = ["", "Skipped explainers (not applicable to this model):", "", "| explainer | reason |", "|---|---|"]
    lines += [f"| {n} | {r.replace('|', '/')} |" for n, r in skipped.items()]
    md, js = (os.path.join(out_dir, f"interpretability_{split}.{ext}") for ext in ("md", "json"))
    text = open(md).read() if os.path.isfile(md) else f"# Interpretability, {split} split\n"
    with atomic_write(md, "w") as f:
        f.write(text.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
    data = {}
    if os.path.isfile(js):
        with open(js) as f:
            data = json.load(f)
    data["skipped"] = dict(skipped)
    with atomic_write(js, "w") as f:
        json.dump(data, f, indent=2)
    interp.setdefault("files", [md, js])
    print("\n".join(lines))


def _resolve_defaults(args):
    """The default run (no ``--explainers``): :data:`DEFAULT_EXPLAINERS` on :data:`DEFAULT_MAX_IMAGES` images;
    ``--explainers none``: accuracy only; ``--explain``: intrinsic + Grad-CAM unless ``--explainers`` is given."""
    from models.explainers import list_explainers

    explicit = args.explainers is not None and args.explainers.strip().lower() not in ("", "none")
    if args.explainers is not None and not explicit:
        args.explainers = None
    elif not explicit:
        known = set(list_explainers())
        default = ("intrinsic", "gradcam") if getattr(args, "explain", None) else DEFAULT_EXPLAINERS
        args.explainers = ",".join(e for e in default if e in known)
    if args.max_images is None:
        args.max_images = 200 if explicit else DEFAULT_MAX_IMAGES
    if args.steps is None and not explicit:
        args.steps = DEFAULT_STEPS
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = _resolve_defaults(build_parser().parse_args(argv))
    try:
        model, dm, src = load_model_and_data(args)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    out_dir = args.out or default_out_dir(src)
    path = check_out_dir(out_dir, src, args.split, args.overwrite)
    os.makedirs(out_dir, exist_ok=True)
    if args.target_layers is not None:  # a clear error now, not after the accuracy pass
        from models.explainers import resolve_layers

        try:
            resolve_layers(model, parse_target_layers(args.target_layers))
        except (ValueError, TypeError) as e:
            raise SystemExit(f"error: --target-layers {args.target_layers!r}: {e}") from None
    if args.explain:
        return explain_files(model, dm, args, out_dir)
    loader = _loader(dm, args.split)
    skipped = check_explainers(model, loader, args)  # names first: errors now, not after the accuracy pass
    results: Dict[str, Any] = {"source": os.path.abspath(src), "split": args.split, "model": type(model).__name__}
    try:
        results["accuracy"] = evaluate_accuracy(model, loader, dm.num_classes, dm.multilabel, args.device,
                                                args.limit_batches, getattr(dm, "class_names", None))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.explainers:
        results["interpretability"] = evaluate_interpretability(model, loader, args, out_dir, results["model"])
    if skipped:
        record_skipped(results, skipped, out_dir, args.split)
    if args.sanity or args.dropout_ranking:  # issue 18: models/metrics/sanity.py
        from models.metrics.sanity import eval_checks

        results.update(eval_checks(model, loader, args, out_dir))
    if args.picnn:
        from models.metrics.picnn import evaluate_picnn

        if not hasattr(model, "evaluate_pathways"):
            raise SystemExit(f"error: --picnn needs a PICNN model (create_model('picnn', ...)), got {results['model']}.")
        bs = loader.batch_size or 1
        results["picnn"] = evaluate_picnn(model, loader, args.device,
                                          max_images=args.limit_batches * bs if args.limit_batches else None)
        print("PICNN (%): " + ", ".join(f"{k}={v:.4f}" for k, v in results["picnn"].items()))
    from models.weights import atomic_write

    with atomic_write(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{results['model']} on the {args.split} split ({results['accuracy']['num_images']} images)")
    print(format_table(results["accuracy"]))
    print(f"\nwrote {path}" + "".join(f", {f}" for f in results.get("interpretability", {}).get("files", [])))
    return results


if __name__ == "__main__":
    main()
