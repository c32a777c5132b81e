"""Guided-gradient regularisation on the embedded benchmark: the thesis's Tables 4.1-4.2 (seed 001 ch. 4).

    python experiments/guided_gradients.py                                  # full default (~10-15 min, 2 quiet cores)
    python experiments/guided_gradients.py --backbones resnet18 --errors cosine --epochs 3   # quicker

For each backbone: a baseline (lambda = 0) and a regularised model (cosine, lambda = 7.5e-3 for ResNet-18,
1e-3 for MobileNet-V2, Table 4.1), trained with the same seed, data and schedule; for ResNet-18 also the other
error functions (Table 4.2: histogram intersection, MAE, MSE). Every model is evaluated for accuracy and,
with ``models.metrics.run_interpretability`` (ground-truth class, all test images), AD/AG/AI/insertion/deletion
of Grad-CAM, Grad-CAM++, Score-CAM, Ablation-CAM and XGrad-CAM ("Axiom-CAM"); the error-function ablation
uses Grad-CAM only, as in Table 4.2. Gradient pictures (input, dL/dx of the baseline, dL/dx of the regularised
model, guided dL/dx of the baseline) and CAM overlays are saved as PNGs.

Writes ``docs/results/guided_gradients.md`` (+ ``guided_gradients_*.png``, ``guided_gradients.json``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models import create_model  # noqa: E402
from models.guided_gradients import guided_gradient_loss, step_lambda  # noqa: E402
from trainers.data.synthetic import SyntheticShapes  # noqa: E402

CAMS = ("gradcam", "gradcampp", "scorecam", "ablationcam", "xgradcam")
CAM_LABEL = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "scorecam": "Score-CAM", "ablationcam": "Ablation-CAM",
             "xgradcam": "XGrad-CAM (Axiom)"}
DEFAULT_LAM = {"resnet18": 7.5e-3, "mobilenetv2_100": 1e-3}
PAPER_ACC = {"resnet18": {"-": 73.42, "cosine": 72.86, "histogram": 73.88, "mae": 73.41, "mse": 73.86},
             "mobilenetv2_100": {"-": 59.43, "cosine": 62.36}}


def loaders(args):
    kw = dict(num_classes=args.num_classes, image_size=args.image_size)
    train = SyntheticShapes("train", size=args.train_size, **kw)
    test = SyntheticShapes("test", size=args.test_size, **kw)
    tl = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=0,
                                     generator=torch.Generator().manual_seed(args.seed), drop_last=True)
    vl = torch.utils.data.DataLoader(test, batch_size=100, shuffle=False, num_workers=0)
    return tl, vl


def target_tap(model, image_size: int, min_spatial: int) -> str:
    """Deepest backbone tap whose map is at least ``min_spatial`` wide (spec §10.14)."""
    best = 0
    for i, r in enumerate(model.backbone.reductions):
        if math.ceil(image_size / r) >= min_spatial:
            best = i
    return f"backbone.taps.{best}"


def train(backbone, lam, error, args, train_loader):
    torch.manual_seed(args.seed)
    model = create_model("guided_gradients", backbone=backbone, num_classes=args.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    t0, step = time.time(), 0
    for ep in range(args.epochs):
        model.train()
        for b in train_loader:
            x, y = b["image"], b["label"]
            out = guided_gradient_loss(model, x, y, lam=step_lambda(lam, args.every, step), error=error,
                                       fraction=args.fraction)
            step += 1
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sched.step()
        print(f"  [{backbone} {error if lam else '-'} lam={lam:g}] epoch {ep + 1}/{args.epochs} "
              f"L_C={out['loss_c'].item():.3f} L_R={out['loss_r'].item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    return model.eval(), time.time() - t0


@torch.no_grad()
def accuracy(model, loader):
    ok = n = 0
    for b in loader:
        ok += (model(b["image"]).argmax(1) == b["label"]).sum().item()
        n += b["label"].numel()
    return 100.0 * ok / n


def gradient_alignment(model, loader, n_images):
    """Mean cosine between dL/dx and guided dL/dx (of the summed CE, train-objective convention)."""
    from models.guided_gradients import GuidableActivations, error_cosine

    vals, seen = [], 0
    for b in loader:
        x, y = b["image"][: n_images - seen], b["label"][: n_images - seen]
        sw = GuidableActivations()
        xr = x.clone().requires_grad_(True)
        with torch.enable_grad():
            with sw:
                s = F.cross_entropy(model(xr), y, reduction="sum")
            with sw.guided():
                (gg,) = torch.autograd.grad(s, xr, retain_graph=True)
            (gs,) = torch.autograd.grad(s, xr)
        vals.append(-error_cosine(gs, gg))
        seen += x.shape[0]
        if seen >= n_images:
            break
    return float(torch.cat(vals).mean())


def evaluate_cams(model, loader, cams, args, examples=0):
    from models.metrics import run_interpretability

    layer = target_tap(model, args.image_size, args.min_spatial)
    res = run_interpretability(model, loader, list(cams), metrics=("ad", "ag", "ai", "ins", "del"),
                               max_images=args.eval_images, sanity=False, progress=False, target_layers=layer,
                               examples=examples)
    return res, layer


def grad_picture(models_, loader, path, n=6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = next(iter(loader))
    x, y = b["image"][:n], b["label"][:n]
    cols = [("input", None)]
    for name, m in models_:
        cols.append((f"{name}: dL/dx", ("std", m)))
    cols.append((f"{models_[0][0]}: guided dL/dx", ("guided", models_[0][1])))
    fig, axes = plt.subplots(n, len(cols), figsize=(2.1 * len(cols), 2.1 * n), squeeze=False)
    for j, (title, spec) in enumerate(cols):
        if spec is None:
            ims = x.permute(0, 2, 3, 1).numpy()
        else:
            kind, m = spec
            if kind == "std":
                xr = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(F.cross_entropy(m(xr), y, reduction="sum"), xr)
            else:
                from models.guided_gradients import GuidableActivations

                sw = GuidableActivations()
                xr = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    with sw:
                        s = F.cross_entropy(m(xr), y, reduction="sum")
                    with sw.guided():
                        (g,) = torch.autograd.grad(s, xr)
            g = g.abs().amax(1)
            g = g / (g.flatten(1).amax(1).view(-1, 1, 1) + 1e-12)
            ims = g.numpy()
        for i in range(n):
            ax = axes[i][j]
            ax.imshow(ims[i], cmap=None if spec is None else "gray")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(v):
    return f"{v:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="resnet18,mobilenetv2_100")
    ap.add_argument("--errors", default="cosine,histogram,mae,mse", help="error functions for the first backbone")
    ap.add_argument("--lam", type=float, default=None, help="override lambda (default: 7.5e-3 ResNet-18, 1e-3 MobileNet-V2)")
    ap.add_argument("--extra-lams", default="", help="additional cosine lambdas for the first backbone, e.g. '1.0'")
    ap.add_argument("--fraction", type=float, default=1.0, help="share of each batch on which L_R is estimated")
    ap.add_argument("--every", type=int, default=1, help="apply L_R (weight every*lambda) on every k-th step only")
    ap.add_argument("--cams", default=",".join(CAMS), help="CAM methods of Table 4.1 (Table 4.2 uses gradcam)")
    ap.add_argument("--skip-baseline", action="store_true", help="only the regularised runs (to split the work "
                    "over processes; the baseline is identical across them)")
    ap.add_argument("--num-classes", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--min-spatial", type=int, default=4, help="CAM layer: deepest tap with >= this many cells")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--test-size", type=int, default=300)
    ap.add_argument("--eval-images", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/guided_gradients.md")
    args = ap.parse_args(argv)
    t_start = time.time()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.out))[0]
    train_loader, test_loader = loaders(args)
    backbones = [b for b in args.backbones.split(",") if b]
    errors = [e for e in args.errors.split(",") if e]
    # order: Table 4.1 first (baseline + cosine per backbone), then extra lambdas, then Table 4.2's other errors;
    # the report is rewritten after every run, so an interrupted run still leaves a valid partial table
    runs = []  # (backbone, error or '-', lam)
    lam_of = {bb: args.lam if args.lam is not None else DEFAULT_LAM.get(bb, 7.5e-3) for bb in backbones}
    for bb in backbones:
        runs += [(bb, "-", 0.0)] + ([(bb, "cosine", lam_of[bb])] if "cosine" in errors else [])
    runs += [(backbones[0], "cosine", float(v)) for v in args.extra_lams.split(",") if v]
    runs += [(backbones[0], e, lam_of[backbones[0]]) for e in errors if e != "cosine"]
    if args.skip_baseline:
        runs = [r for r in runs if r[1] != "-"]
    results, models_, pngs_cam = {}, {}, []
    for bb, err, lam in runs:
        key = f"{bb}|{err}|{lam:g}"
        print(f"== {key}", flush=True)
        model, secs = train(bb, lam, err if err != "-" else "cosine", args, train_loader)
        models_[key] = model
        acc = accuracy(model, test_loader)
        align = gradient_alignment(model, test_loader, min(args.eval_images, 100))
        full = tuple(c for c in args.cams.split(",") if c)
        cams = full if (err == "-" or (err == "cosine" and lam == lam_of[bb])) else ("gradcam",)
        res, layer = evaluate_cams(model, test_loader, cams, args, examples=6 if len(cams) > 1 else 0)
        results[key] = {"backbone": bb, "error": err, "lam": lam, "acc": acc, "train_s": secs, "cos_align": align,
                        "layer": layer, "cams": {k: {m: float(v[m]) for m in ("ad", "ag", "ai", "ins", "del")}
                                                 for k, v in res.items()}}
        print(f"   acc {acc:.2f}  cos(dL/dx, guided) {align:.3f}  " + "  ".join(
            f"{k}: AD {v['ad']:.1f} AG {v['ag']:.1f} AI {v['ai']:.1f}" for k, v in results[key]["cams"].items()),
            flush=True)
        if res.examples and res.examples.get("images") is not None and len(res.examples.get("images", [])):
            try:
                from models.metrics import save_overlay_grid

                ex = res.examples
                save_overlay_grid(ex["images"], ex["maps"], os.path.join(out_dir, f"{stem}_cams_{bb}_{err}.png"), n=4)
                pngs_cam.append(f"{stem}_cams_{bb}_{err}.png")
            except Exception as e:  # pictures are a bonus; never lose the table
                print(f"   (overlay grid skipped: {type(e).__name__}: {e})")
        write_report(args, argv, results, [], time.time() - t_start)
    # gradient pictures: baseline vs regularised (cosine) per backbone
    pngs = []
    for bb in backbones:
        base = [k for k in models_ if k.startswith(bb + "|-|")]
        reg = [k for k in models_ if k.startswith(bb + "|cosine|")]
        if base and reg:
            p = os.path.join(out_dir, f"{stem}_gradients_{bb}.png")
            grad_picture([("baseline", models_[base[0]]), (f"cosine λ={results[reg[0]]['lam']:g}", models_[reg[0]])],
                         test_loader, p)
            pngs.append(os.path.basename(p))
    pngs += pngs_cam
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as fh:
        json.dump({"args": vars(args), "results": results}, fh, indent=1)
    write_report(args, argv, results, pngs, time.time() - t_start)


def write_report(args, argv, results, pngs, total_s):
    cmd = "python experiments/guided_gradients.py " + " ".join(argv if argv is not None else sys.argv[1:])
    L = [f"# Guided-gradient regularisation on the embedded benchmark (thesis Tables 4.1-4.2)\n",
         f"Command: `{cmd.strip()}` (total {total_s / 60:.1f} min on this machine).\n",
         f"Data: synthetic shapes, {args.num_classes} classes, {args.image_size} px, {args.train_size} train / "
         f"{args.test_size} test images; {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr:g} (one-cycle), "
         f"seed {args.seed}, same data order and initialisation for every run. L_R fraction {args.fraction:g}, "
         f"applied every {args.every} step(s). "
         f"CAMs for the ground-truth class on {args.eval_images} test images (`models.metrics.run_interpretability`, "
         f"AD/AG/AI/Ins/Del ×100); CAM layer = deepest backbone tap with >= {args.min_spatial}x{args.min_spatial} cells "
         f"(spec §10.14).\n"]
    L.append("## Recognition (Table 4.1 / 4.2 accuracy)\n")
    L.append("| backbone | error | λ | acc (%) | paper acc (CIFAR-100) | cos(dL/dx, guided dL/dx) | train time (s) | CAM layer |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        pa = PAPER_ACC.get(r["backbone"], {}).get(r["error"], "")
        L.append(f"| {r['backbone']} | {r['error']} | {r['lam']:g} | {r['acc']:.2f} | {pa} | {r['cos_align']:.3f} | "
                 f"{r['train_s']:.0f} | {r['layer']} |")
    L.append("\n## Interpretability, baseline vs cosine (Table 4.1)\n")
    L.append("| backbone | method | error | λ | AD↓ | AG↑ | AI↑ | Ins↑ | Del↓ |\n|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        if len(r["cams"]) > 1:
            for cam, v in r["cams"].items():
                L.append(f"| {r['backbone']} | {CAM_LABEL.get(cam, cam)} | {r['error']} | {r['lam']:g} | {fmt(v['ad'])} | "
                         f"{fmt(v['ag'])} | {fmt(v['ai'])} | {fmt(v['ins'])} | {fmt(v['del'])} |")
    L.append("\n## Error functions, Grad-CAM only (Table 4.2)\n")
    L.append("| backbone | error | λ | acc | AD↓ | AG↑ | AI↑ | Ins↑ | Del↓ |\n|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        if r["backbone"] == list(results.values())[0]["backbone"] and "gradcam" in r["cams"]:
            v = r["cams"]["gradcam"]
            L.append(f"| {r['backbone']} | {r['error']} | {r['lam']:g} | {r['acc']:.2f} | {fmt(v['ad'])} | {fmt(v['ag'])} | "
                     f"{fmt(v['ai'])} | {fmt(v['ins'])} | {fmt(v['del'])} |")
    if pngs:
        L.append("\n## Gradient pictures\n")
        for p in pngs:
            L.append(f"![{p}]({p})\n")
    L.append("\n(Analysis: see the section below, written after the run.)\n")
    with open(args.out, "w") as fh:
        fh.write("\n".join(L) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
