"""eX-ViT ablation (seed 000 Tables 4.5-4.6) on the embedded multi-label benchmark.

    python experiments/exvit.py                       # ~15 min on 2 CPU cores, writes docs/results/exvit.md + PNG
    python experiments/exvit.py --epochs 2 --train-size 300 --variants a,e   # smoke run

Variants (all the same ViT size, data, augmentation, optimiser and number of steps; trained from scratch):

(a) plain ViT (timm softmax attention) + GeM/linear head, CAM            -- ``attention="softmax", head="plain"``
(b) E-MHA encoder + the same head, CAM (Table 4.5 "E^θ", Table 4.6 row 1) -- ``head="plain"``
(c) + AttE, L_global only                                                 -- ``head="atte", alpha=0, beta=0``
(d) + L_dis (momentum branch)                                             -- ``alpha=0.5, beta=0``
(e) + L_div (full eX-ViT)                                                 -- ``alpha=0.5, beta=1``
(a0, with ``--with-baseline``) the zoo's ``baseline`` (timm ViT through the Backbone wrapper, GAP + linear, CAM).

Metrics on the test split: classification mAP; localisation-map mIoU (§9: confusion accumulated over the split,
background included, IoU_k = TP/(T+P-TP)) of pseudo masks built with the GT image labels and a background
threshold τ chosen on the validation split (sweep 0.05..0.95); FP/FN (SEAM convention).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from experiments import harness as H  # noqa: E402

VARIANTS = {
    "a0": dict(desc="plain ViT, zoo baseline (GAP+linear), CAM", baseline=True),
    "a": dict(desc="plain ViT (softmax attention), CAM", model=dict(attention="softmax", head="plain"), alpha=0.0, beta=0.0),
    "b": dict(desc="E-MHA encoder, CAM", model=dict(head="plain"), alpha=0.0, beta=0.0),
    "c": dict(desc="+ AttE, L_global", model=dict(head="atte"), alpha=0.0, beta=0.0),
    "d": dict(desc="+ L_dis", model=dict(head="atte"), alpha=0.5, beta=0.0),
    "e": dict(desc="+ L_div (full eX-ViT)", model=dict(head="atte"), alpha=0.5, beta=1.0),
    "f": dict(desc="(e) + attribute balance (ours, not in the paper)", model=dict(head="atte"), alpha=0.5, beta=1.0,
              gamma=1.0),
}
PAPER = {"a": "–", "b": "44.72 (T4.6) / 52.31 (T4.5)", "c": "53.71", "d": "55.27", "e": "59.13"}
TAUS = [round(0.05 * i, 2) for i in range(1, 20)]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="a,b,c,d,e")
    p.add_argument("--with-baseline", action="store_true", help="also train the zoo baseline ViT (a0)")
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--num-distractors", type=int, default=1)
    p.add_argument("--max-objects", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=1200)
    p.add_argument("--val-size", type=int, default=100)
    p.add_argument("--test-size", type=int, default=200)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbone", default="deit_tiny_patch16_224")
    p.add_argument("--embed-dim", type=int, default=192, help="default: the ViT recipe (docs/vit_recipe.md)")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--conv-stem", type=int, nargs="*", default=[24, 48, 96],
                   help="conv-stem widths of the ViT (models/vit_stem.py); no value: timm's patchify conv")
    p.add_argument("--backbone-weights", default=None,
                   help="local pretrained ViT weights (safetensors/state dict/zoo checkpoint), e.g. the recipe ViT "
                        "checkpoints/baseline_synthetic_vit/checkpoints/best.ckpt (python train.py fit --config "
                        "configs/baseline/synthetic_vit.yaml): the variants then fine-tune from it")
    p.add_argument("--attributes", type=int, default=8)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--fuse-layers", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3, help="lr of the new parts")
    p.add_argument("--encoder-lr", type=float, default=1e-3,
                   help="encoder lr (paper: 5e-5 for its ImageNet-pretrained encoder)")
    p.add_argument("--momentum", type=float, default=0.99)
    p.add_argument("--aug-scale", type=float, nargs=2, default=(0.75, 1.5))
    p.add_argument("--multiscale", action="store_true", help="class maps at scales 0.5-2.0 + flip (§8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is much faster than 2 on a shared, oversubscribed machine)")
    p.add_argument("--jobs", type=int, default=5, help="train variants in parallel processes")
    p.add_argument("--warmup", type=int, default=30, help="linear lr warm-up steps")
    p.add_argument("--out", default="docs/results/exvit.md")
    p.add_argument("--legacy", action="store_true", help="the former single-seed flow (parallel variants, no "
                   "controls); default: seeds, controls, intervals and verdicts through the harness")
    H.add_common_args(p, out=False)
    return p.parse_args(argv)


def model_kwargs(a):
    return dict(backbone=a.backbone, backbone_weights=a.backbone_weights, drop_path_rate=0.1, num_attributes=a.attributes, attr_channels=a.channels,
                attr_hidden=a.embed_dim * 2, fuse_layers=a.fuse_layers,
                backbone_kwargs=dict(img_size=a.image_size, patch_size=a.patch, embed_dim=a.embed_dim,
                                     num_heads=a.heads, depth=a.depth,
                                     **({"conv_stem": list(a.conv_stem)} if getattr(a, "conv_stem", None) else {})))


def train_variant(key, a, dm):
    import pytorch_lightning as pl

    from trainers.classification import ClassificationModule
    from trainers.exvit import ExViTModule

    pl.seed_everything(a.seed, workers=True, verbose=False)
    v = VARIANTS[key]
    common = dict(num_classes=a.num_classes, multilabel=True)
    if v.get("baseline"):
        mk = model_kwargs(a)
        bk = dict(mk["backbone_kwargs"], drop_path_rate=0.1)
        module = ClassificationModule(model="baseline", model_kwargs=dict(backbone=a.backbone, backbone_kwargs=bk,
                                                                          backbone_weights=a.backbone_weights),
                                      optimizer={"name": "adamw", "lr": a.lr, "weight_decay": 0.01},
                                      scheduler={"name": "poly", "power": 0.9, "interval": "step", "warmup": a.warmup},
                                      **common)
    else:
        module = ExViTModule(model_kwargs={**model_kwargs(a), **v["model"]}, alpha=v["alpha"], beta=v["beta"],
                             gamma=v.get("gamma", 0.0),
                             scheduler={"name": "poly", "power": 0.9, "interval": "step", "warmup": a.warmup},
                             momentum=a.momentum, encoder_lr=a.encoder_lr, aug_scale=a.aug_scale,
                             optimizer={"name": "adamw", "lr": a.lr, "weight_decay": 0.01}, **common)
    trainer = pl.Trainer(max_epochs=a.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    t0 = time.time()
    trainer.fit(module, dm)
    logs = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    return module.model.eval(), time.time() - t0, logs


@torch.no_grad()
def class_maps(model, x, multiscale):
    """(logits, maps (B, C, H, W) in [0, 1]) -- ReLU CAMs divided by their max (§8)."""
    from models.exvit import ExViT

    if isinstance(model, ExViT):
        scales = (0.5, 1.0, 1.5, 2.0) if multiscale else (1.0,)
        return model.class_maps(x, scales=scales, flip=multiscale)
    f = model.features(x)                                   # baseline: CAM = ReLU(w_c . f)
    logits = model.fc(f.flatten(2).mean(2))
    cam = torch.einsum("bdhw,cd->bchw", f, model.fc.weight).relu()
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)
    return logits, cam / (cam.flatten(2).amax(-1)[..., None, None] + 1e-5)


@torch.no_grad()
def evaluate(model, ds, a, bs=50):
    """Logits, labels, class maps and GT masks of a whole split."""
    L, Y, M, G = [], [], [], []
    for i in range(0, len(ds), bs):
        items = [ds[j] for j in range(i, min(i + bs, len(ds)))]
        x = torch.stack([it["image"] for it in items])
        logits, maps = class_maps(model, x, a.multiscale)
        L.append(logits)
        Y.append(torch.stack([it["label"] for it in items]))
        M.append(maps.half())
        G.append(torch.stack([it["mask"] for it in items]))
    return torch.cat(L), torch.cat(Y), torch.cat(M), torch.cat(G)


def confusion(maps, labels, gt, tau, num_classes):
    """Pseudo masks (GT-label-restricted CAMs vs background plane τ, argmax) -> (K+1)x(K+1) confusion."""
    K1 = num_classes + 1
    cm = torch.zeros(K1, K1, dtype=torch.long)
    for i in range(0, len(maps), 100):
        m = maps[i:i + 100].float() * (labels[i:i + 100] > 0)[..., None, None]
        pred = torch.cat([torch.full_like(m[:, :1], tau), m], 1).argmax(1)
        g = gt[i:i + 100]
        cm += torch.bincount((g * K1 + pred).flatten(), minlength=K1 * K1).view(K1, K1)
    return cm


def iou_fp_fn(cm):
    tp = cm.diag().double()
    t, p = cm.sum(1).double(), cm.sum(0).double()
    union = (t + p - tp).clamp_min(1)
    return (100 * tp / union).mean().item(), (100 * (p - tp) / union).mean().item(), (100 * (t - tp) / union).mean().item()


def mean_ap(logits, labels):
    from torchmetrics.functional.classification import multilabel_average_precision

    return 100 * multilabel_average_precision(logits, labels.long(), num_labels=labels.shape[1], average="macro").item()


def save_attribute_png(model, ds, path, class_names, n=4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.stack([ds[i]["image"] for i in range(n)])
    gt = torch.stack([ds[i]["mask"] for i in range(n)])
    r = model.explain_all(x)
    S = r["attributes"].shape[1]
    top = r["logits"].argmax(1)
    cols = 3 + S
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.7 * n), squeeze=False)
    for i in range(n):
        img = x[i].permute(1, 2, 0).numpy()
        cam = r["cams"][i, top[i]]
        contrib = r["contributions"][i, top[i]]
        panels = [(img, "image", None), (gt[i].numpy(), "GT mask", "tab10"),
                  (cam.numpy(), f"CAM {class_names[top[i]]}", "jet")]
        amax = float(r["attributes"][i].max())
        panels += [(r["attributes"][i, s].numpy(), f"attr {s} ({contrib[s]:+.1f})", "viridis") for s in range(S)]
        for j, (im, title, cmap) in enumerate(panels):
            ax = axes[i][j]
            if cmap in ("jet", "viridis"):
                ax.imshow(img)
                ax.imshow(im, cmap=cmap, alpha=0.6, vmin=0, vmax=None if cmap == "jet" else amax)
            else:
                ax.imshow(im, cmap=cmap, vmin=0, vmax=None if cmap is None else 9, interpolation="nearest")
            ax.set_title(title, fontsize=6)
            ax.axis("off")
    fig.suptitle("eX-ViT (e): predicted-class CAM and the S attribute maps m_s "
                 "(in brackets: the attribute's contribution Σ_n E_{c,s}(n) to that class; colour scale shared per row)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    a = parse(argv)
    if not a.legacy:
        return main_seeds(a, argv)
    torch.set_num_threads(a.threads)
    from trainers.data import SyntheticShapesDataModule
    from trainers.data.synthetic import SyntheticShapes

    keys = [k.strip() for k in a.variants.split(",") if k.strip()]
    if a.with_baseline and "a0" not in keys:
        keys = ["a0"] + keys
    for k in keys:
        if k not in VARIANTS:
            raise SystemExit(f"unknown variant {k!r}; choose from {list(VARIANTS)}")
    t_all = time.time()
    dm = SyntheticShapesDataModule(num_classes=a.num_classes, image_size=a.image_size, train_size=a.train_size,
                                   val_size=a.val_size, test_size=a.test_size, multilabel=True, augment=False,
                                   num_distractors=a.num_distractors, max_objects=a.max_objects,
                                   batch_size=a.batch_size, seed=a.seed)
    dm.setup("fit")
    kw = dict(num_classes=a.num_classes, image_size=a.image_size, multilabel=True, seed=a.seed,
              num_distractors=a.num_distractors, max_objects=a.max_objects)
    val, test = SyntheticShapes("val", a.val_size, **kw), SyntheticShapes("test", a.test_size, **kw)
    print(f"data ready in {time.time() - t_all:.0f}s", flush=True)
    global _CTX
    _CTX = (a, dm, val, test)
    if a.jobs > 1:  # variants in parallel worker processes (fork: the generated data are shared)
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(a.jobs, len(keys))) as pool:
            results = pool.map(run_variant, keys)
    else:
        results = [run_variant(k) for k in keys]
    rows = [r for r, _ in results]
    models = {r["variant"]: m for r, m in results}
    write_report(a, rows, models, test, time.time() - t_all)


_CTX = None


def run_variant(k, seed=None):
    a, dm, val, test = _CTX
    torch.set_num_threads(a.threads)
    model, secs, logs = train_variant(k, a if seed is None else argparse.Namespace(**{**vars(a), "seed": seed}), dm)
    lv, yv, mv, gv = evaluate(model, val, a)
    sweep = {t: iou_fp_fn(confusion(mv, yv, gv, t, a.num_classes))[0] for t in TAUS}
    tau = max(sweep, key=sweep.get)
    lt, yt, mt, gt = evaluate(model, test, a)
    miou, fp, fn = iou_fp_fn(confusion(mt, yt, gt, tau, a.num_classes))
    best_test = max(iou_fp_fn(confusion(mt, yt, gt, t, a.num_classes))[0] for t in TAUS)
    row = dict(variant=k, desc=VARIANTS[k]["desc"], mAP=mean_ap(lt, yt), mIoU=miou, tau=tau, FP=fp, FN=fn,
               mIoU_test_best_tau=best_test, train_s=secs, **{k2.replace("train/", "train_"): v for k2, v in logs.items()
                                                              if k2 in ("train/global", "train/dis", "train/div",
                                                                        "train/attr_max_share")})
    print(json.dumps({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items()}), flush=True)
    return row, model


def write_report(a, rows, models, test, total):
    out = a.out
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    png = None
    full = next((k for k in ("e", "d", "c") if k in models), None)
    if full is not None:
        png = os.path.splitext(out)[0] + "_attributes.png"
        save_attribute_png(models[full], test, png, test.class_names)
    cmd = "python experiments/exvit.py " + " ".join(sys.argv[1:])
    lines = [
        "# eX-ViT ablation on the embedded multi-label benchmark (seed 000, Tables 4.5-4.6)", "",
        f"Command: `{cmd.strip()}` ({total / 60:.1f} min on this machine).", "",
        f"Data: SyntheticShapes multi-label, {a.num_classes} classes, 1-{a.max_objects} objects and "
        f"{a.num_distractors} distractor(s) per image, {a.image_size} px, train {a.train_size} / "
        f"val {a.val_size} (τ selection) / test {a.test_size}. Model: timm `{a.backbone}` resized to embed_dim "
        f"{a.embed_dim}, {a.heads} heads, depth {a.depth}, patch {a.patch} ({a.image_size // a.patch}² tokens), "
        f"trained from scratch for {a.epochs} epochs (batch {a.batch_size}, AdamW lr {a.lr} / encoder {a.encoder_lr}, "
        f"poly decay, {a.warmup}-step warm-up), two-view augmentation scale {tuple(a.aug_scale)} + flip + crop, EMA μ = {a.momentum}, "
        f"S = {a.attributes}, c = {a.channels}, K = {a.fuse_layers}. Class maps: "
        f"{'multi-scale 0.5-2.0 + flip' if a.multiscale else 'single scale'}; pseudo masks restricted to the GT "
        "image labels, background plane τ chosen on val.", "",
        "| variant | | test mAP | loc. mIoU (τ from val) | τ | FP | FN | mIoU (best τ on test) | paper loc. mIoU (VOC train) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| ({r['variant']}) | {r['desc']} | {r['mAP']:.1f} | **{r['mIoU']:.1f}** | {r['tau']:.2f} | "
                     f"{r['FP']:.1f} | {r['FN']:.1f} | {r['mIoU_test_best_tau']:.1f} | {PAPER.get(r['variant'], '–')} | "
                     f"{r['train_s']:.0f} |")
    order = [r for r in rows if r["variant"] in "abcde"]
    if len(order) >= 2:
        steps = [f"({p['variant']})→({q['variant']}) {q['mIoU'] - p['mIoU']:+.1f}" for p, q in zip(order, order[1:])]
        mono = all(q["mIoU"] > p["mIoU"] for p, q in zip(order, order[1:]))
        lines += ["", f"Measured steps in loc. mIoU: {', '.join(steps)}. The paper's monotone ordering (a) < ... < (e) "
                  f"is {'reproduced' if mono else 'NOT reproduced'} in this run."]
    extra = [r for r in rows if "train_div" in r or "train_attr_max_share" in r]
    if extra:
        lines += ["", "Last-batch training diagnostics: " + "; ".join(
            f"({r['variant']}) L_global {r.get('train_global', float('nan')):.3f}"
            + (f", L_dis {r['train_dis']:.3f}" if "train_dis" in r else "")
            + (f", L_div {r['train_div']:.3f}" if "train_div" in r else "")
            + (f", largest attribute share {r['train_attr_max_share']:.2f}" if "train_attr_max_share" in r else "")
            for r in extra) + "."]
    if png:
        lines += ["", f"![attribute maps]({os.path.basename(png)})", "",
                  f"Attribute maps of variant ({full}) on the first test images: `{os.path.basename(png)}`."]
    notes = os.path.splitext(out)[0] + "_notes.md"
    if os.path.exists(notes):
        lines += ["", open(notes).read().strip()]
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"args": vars(a), "rows": rows}, f, indent=1, default=str)
    print(f"wrote {out}" + (f" and {png}" if png else ""))


CONTROLS = ("colorcontrast", "edges", "gaussian", "random", "untrained")


def control_row(name, a, val, test, seed):
    """Localisation mIoU of a control map used as every class's map (class-agnostic), through the same pseudo-mask
    protocol (tau chosen on val); ``untrained``: the class maps of a re-initialised (e) model."""
    from models import create_model
    from models.explainers import create_explainer

    torch.manual_seed(seed)
    mk = dict(model_kwargs(a), backbone_weights=None)  # untrained: no pretrained encoder either
    model = create_model("exvit", num_classes=a.num_classes, **mk).eval()
    exp = None if name == "untrained" else create_explainer(name, model)

    def ev(ds):
        L, Y, M, G = [], [], [], []
        for i in range(0, len(ds), 50):
            items = [ds[j] for j in range(i, min(i + 50, len(ds)))]
            x = torch.stack([it["image"] for it in items])
            if exp is None:
                logits, maps = class_maps(model, x, False)
            else:
                logits = torch.zeros(len(items), a.num_classes)
                maps = exp(x, torch.zeros(len(items), dtype=torch.long))[:, None].expand(-1, a.num_classes, -1, -1)
            L.append(logits)
            Y.append(torch.stack([it["label"] for it in items]))
            M.append(maps.half())
            G.append(torch.stack([it["mask"] for it in items]))
        return torch.cat(L), torch.cat(Y), torch.cat(M), torch.cat(G)

    lv, yv, mv, gv = ev(val)
    sweep = {t: iou_fp_fn(confusion(mv, yv, gv, t, a.num_classes))[0] for t in TAUS}
    tau = max(sweep, key=sweep.get)
    lt, yt, mt, gt = ev(test)
    miou, fp, fn = iou_fp_fn(confusion(mt, yt, gt, tau, a.num_classes))
    return dict(variant=name, mIoU=miou, tau=tau, FP=fp, FN=fn, mAP=mean_ap(lt, yt) if exp is None else None)


def main_seeds(a, argv):
    """Variants and controls over ``--seeds`` (cached per variant and seed), intervals over seeds, verdicts."""
    global _CTX
    from trainers.data import SyntheticShapesDataModule
    from trainers.data.synthetic import SyntheticShapes

    torch.set_num_threads(max(a.threads, 1))
    if a.quick:
        a.train_size, a.val_size, a.test_size, a.epochs, a.variants = 32, 16, 16, 1, "a,b"
    keys = [k.strip() for k in a.variants.split(",") if k.strip()]
    if a.with_baseline and "a0" not in keys:
        keys = ["a0"] + keys
    t0 = time.time()
    kw = dict(num_classes=a.num_classes, image_size=a.image_size, multilabel=True, seed=a.seed,
              num_distractors=a.num_distractors, max_objects=a.max_objects)
    cache = H.RunCache(a.cache_dir, enabled=not a.no_cache)
    skip = {"seeds", "quick", "cache_dir", "no_cache", "legacy", "jobs", "threads", "out", "variants",
            "with_baseline"}
    base_cfg = {k: v for k, v in vars(a).items() if k not in skip}
    if a.backbone_weights:  # the cache key follows the weights' content, not only their path
        if not os.path.isfile(a.backbone_weights):
            raise SystemExit(f"--backbone-weights {a.backbone_weights!r} does not exist; train the recipe ViT first: "
                             "python train.py fit --config configs/baseline/synthetic_vit.yaml")
        import hashlib

        with open(a.backbone_weights, "rb") as f:
            base_cfg["backbone_weights_sha256"] = hashlib.sha256(f.read()).hexdigest()
    data = {}

    def ctx():
        if not data:
            dm = SyntheticShapesDataModule(num_classes=a.num_classes, image_size=a.image_size,
                                           train_size=a.train_size, val_size=a.val_size, test_size=a.test_size,
                                           multilabel=True, augment=False, num_distractors=a.num_distractors,
                                           max_objects=a.max_objects, batch_size=a.batch_size, seed=a.seed)
            dm.setup("fit")
            data["v"] = (a, dm, SyntheticShapes("val", a.val_size, **kw), SyntheticShapes("test", a.test_size, **kw))
        return data["v"]

    per = {}  # name -> [row per seed]
    for seed in a.seeds:
        for k in keys + list(CONTROLS):
            cfg = dict(kind="exvit_run", version=2, variant=k, train_seed=seed, **base_cfg)

            def fn(k=k, seed=seed):
                global _CTX
                _CTX = ctx()
                if k in CONTROLS:
                    _, _, val, test = _CTX
                    return control_row(k, a, val, test, seed)
                row, _ = run_variant(k, seed)
                return row

            per.setdefault(k, []).append(cache.get_or_run(cfg, fn))
    rows = []
    for k, rs in per.items():
        for m in ("mIoU", "mAP", "FP", "FN"):
            vals = [r.get(m) for r in rs]
            if any(v is not None for v in vals):
                rows.append(H.summary_row(k if k in CONTROLS else f"({k}) {VARIANTS[k]['desc']}", a.backbone, "class maps",
                                          m, vals, control=k in CONTROLS))
    claims = []
    order = [k for k in ("a", "b", "c", "d", "e") if k in per]
    for p_, q in zip(order, order[1:]):
        claims.append(H.claim_row(f"eX-ViT ({q}) improves localisation mIoU over ({p_})", "mIoU",
                                  [[r["mIoU"]] for r in per[q]], [[r["mIoU"]] for r in per[p_]], +1,
                                  primary=(p_, q) == ("a", "b")))
    best = order[-1] if order else None
    for c in ("colorcontrast", "untrained"):
        if best and c in per:
            claims.append(H.claim_row(f"eX-ViT ({best}) localises better than the {c} control", "mIoU",
                                      [[r["mIoU"]] for r in per[best]], [[r["mIoU"]] for r in per[c]], +1,
                                      primary=c == "colorcontrast"))
    cmd = "python experiments/exvit.py " + " ".join(argv if argv is not None else sys.argv[1:])
    intro = (f"Command: `{cmd.strip()}` ({(time.time() - t0) / 60:.1f} min in this invocation; cached runs are not "
             f"re-trained). {'**QUICK SMOKE RUN: numbers are meaningless.** ' if a.quick else ''}\n\n"
             f"Multi-label shapes, K = {a.num_classes}, {a.image_size} px, {a.train_size} training images, "
             f"{a.epochs} epochs; ViT {a.embed_dim}-d, {a.heads} heads, depth {a.depth}, patch {a.patch}, "
             f"{'conv stem ' + str(list(a.conv_stem)) if a.conv_stem else 'patchify stem'}; encoder "
             f"{'fine-tuned from `' + a.backbone_weights + '` (the same pretrained encoder for every seed, as the paper starts every run from one ImageNet DeiT; seeds vary the fine-tuning)' if a.backbone_weights else 'trained from scratch'}; "
             f"batch {a.batch_size}, lr {a.lr} (encoder {a.encoder_lr}); training "
             f"seeds {a.seeds}. Localisation mIoU of pseudo masks (GT image labels, tau chosen on val; §9). Controls "
             f"(class-agnostic maps through the same pseudo-mask protocol): colour contrast `|x - mean colour|`, edge "
             f"energy, centred Gaussian, random, and the class maps of an untrained (re-initialised) eX-ViT. mIoU is "
             f"a statistic of the whole test split, so intervals are over seeds (t-interval with >= 3 seeds; with "
             f"fewer seeds they are undefined and every verdict is inconclusive).")
    H.write_report(os.path.splitext(a.out)[0], rows, claims, title="eX-ViT ablation (seed 000 Tables 4.5-4.6) with "
                   "seeds, controls and verdicts", intro=intro, meta=dict(args=vars(a)),
                   metrics=["mIoU", "mAP", "FP", "FN"])
    print(f"wrote {os.path.splitext(a.out)[0]}.md / .json")
    return per


if __name__ == "__main__":
    main()
