"""Guided-gradient regularisation on the embedded benchmark: the thesis's Tables 4.1-4.2 (seed 001 ch. 4).

    python experiments/guided_gradients.py                     # seeds 0,1,2; baseline + cosine lambda sweep
    python experiments/guided_gradients.py --errors cosine,histogram,mae,mse --seeds 0,1,2   # + Table 4.2
    python experiments/guided_gradients.py --quick --out /tmp/gg   # smoke run (seconds)

Seeds, per-image values, paired intervals and verdicts, controls, a run cache: ``experiments/harness.py``
(issue 14). The lambda sweep (default: the paper's lambda, 0.1, 1.0) reports lambda * L_R against L_C, the
gradient alignment cos(dL/dx, guided dL/dx) per arm, and insertion from a blur scaled to the image (spec §10.15).

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

from experiments import harness as H  # noqa: E402
from models import create_model  # noqa: E402
from models.guided_gradients import guided_gradient_loss, step_lambda  # noqa: E402
from trainers.data.synthetic import SyntheticShapes  # noqa: E402

CAMS = ("gradcam", "gradcampp", "scorecam", "ablationcam", "xgradcam")
CONTROLS = ("random", "gaussian", "fakecam", "colorcontrast", "edges", "untrained")
METRICS = ("ad", "ag", "ai", "ins", "del")
HIGHER = {"acc": True, "ad": False, "ag": True, "ai": True, "ins": True, "del": False, "align": True}
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
        last = {"loss_c": [], "lam_loss_r": []}  # last-epoch means: how large lambda * L_R is against L_C
        for b in train_loader:
            x, y = b["image"], b["label"]
            lam_t = step_lambda(lam, args.every, step)
            out = guided_gradient_loss(model, x, y, lam=lam_t, error=error, fraction=args.fraction)
            last["loss_c"].append(float(out["loss_c"]))
            last["lam_loss_r"].append(float(lam_t * out["loss_r"]) if lam_t else 0.0)
            step += 1
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sched.step()
        print(f"  [{backbone} {error if lam else '-'} lam={lam:g}] epoch {ep + 1}/{args.epochs} "
              f"L_C={out['loss_c'].item():.3f} L_R={out['loss_r'].item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    return model.eval(), time.time() - t0, {k: sum(v) / max(1, len(v)) for k, v in last.items()}


@torch.no_grad()
def accuracy(model, loader):
    ok = n = 0
    for b in loader:
        ok += (model(b["image"]).argmax(1) == b["label"]).sum().item()
        n += b["label"].numel()
    return 100.0 * ok / n


def gradient_alignment(model, loader, n_images):
    """Per-image cosine between dL/dx and guided dL/dx (of the summed CE, train-objective convention)."""
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
    return torch.cat(vals).tolist()


def insertion_blur(image_size: int):
    """Insertion start scaled to the image (spec §10.15): sigma = max(1, 5 * S / 224), kernel max(3, 2 floor(sigma)
    + 1) -- RISE's 11x11, sigma 5 at 224 px; 3x3, sigma 1 at 32 px."""
    from models.metrics import gaussian_blur

    sigma = max(1.0, 5.0 * image_size / 224)
    klen = max(3, 2 * int(math.floor(sigma)) + 1)
    return (lambda x: gaussian_blur(x, klen=klen, sigma=sigma)), f"gaussian {klen}x{klen}, sigma {sigma:.2f}"


def evaluate_cams(model, loader, cams, args, examples=0):
    """CAMs + controls (ground-truth class); per-image values kept (``res.per_item``)."""
    from models.explainers import create_explainer
    from models.metrics import run_interpretability

    layer = target_tap(model, args.image_size, args.min_spatial)
    blur, _ = insertion_blur(args.image_size)
    names = list(cams) + [c for c in CONTROLS if c != "untrained"]
    names.append(("untrained", create_explainer("untrained", model, base="gradcam", target_layers=layer)))
    res = run_interpretability(model, loader, names, metrics=("ad", "ag", "ai", "ins", "del"),
                               max_images=args.eval_images, sanity=False, progress=False, target_layers=layer,
                               examples=examples, insertion_baseline=blur, steps=args.steps)
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


@torch.no_grad()
def correct_per_image(model, loader):
    out = []
    for b in loader:
        out += (model(b["image"]).argmax(1) == b["label"]).float().tolist()
    return out


def run_arm(bb, err, lam, seed, cams, args, cache):
    """Train and evaluate one arm (backbone, error, lambda) for one seed; cached by its config."""
    keys = ("num_classes", "image_size", "min_spatial", "train_size", "test_size", "eval_images", "epochs",
            "batch_size", "lr", "fraction", "every", "steps")
    cfg = dict(kind="guided_gradients_run", version=2, backbone=bb, error=err, lam=lam, seed=seed, cams=list(cams),
               **{k: getattr(args, k) for k in keys})

    def fn():
        a = argparse.Namespace(**vars(args))
        a.seed = seed
        train_loader, test_loader = loaders(a)
        print(f"== {bb} {err} lam={lam:g} seed {seed}", flush=True)
        model, secs, loss = train(bb, lam, err if err != "-" else "cosine", a, train_loader)
        correct = correct_per_image(model, test_loader)
        align = gradient_alignment(model, test_loader, args.eval_images)
        res, layer = evaluate_cams(model, test_loader, cams, a)
        print(f"   acc {100 * sum(correct) / len(correct):.2f}  cos(dL/dx, guided) {sum(align) / len(align):.3f}  "
              f"lam*L_R {loss['lam_loss_r']:.4f} vs L_C {loss['loss_c']:.4f}", flush=True)
        return dict(acc=100.0 * sum(correct) / len(correct), correct=correct, align=align, train_s=secs, loss=loss,
                    layer=layer, means={k: {m: float(v[m]) for m in METRICS} for k, v in res.items()},
                    per_item=res.per_item)

    return cache.get_or_run(cfg, fn)


def arm_name(err, lam):
    return "baseline" if err == "-" else f"{err} λ={lam:g}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(ap, default_out=os.path.join(ROOT, "docs", "results", "guided_gradients"))
    ap.add_argument("--backbones", default="resnet18")
    ap.add_argument("--errors", default="cosine", help="error functions (Table 4.2: cosine,histogram,mae,mse); the "
                    "non-cosine ones at the backbone's default lambda")
    ap.add_argument("--lams", default="", help="cosine lambda sweep (default: the paper's lambda, 0.1 and 1.0)")
    ap.add_argument("--fraction", type=float, default=1.0, help="share of each batch on which L_R is estimated")
    ap.add_argument("--every", type=int, default=1, help="apply L_R (weight every*lambda) on every k-th step only")
    ap.add_argument("--cams", default=",".join(CAMS), help="CAM methods of Table 4.1 (the sweep arms use gradcam)")
    ap.add_argument("--num-classes", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--min-spatial", type=int, default=4, help="CAM layer: deepest tap with >= this many cells")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--test-size", type=int, default=300)
    ap.add_argument("--eval-images", type=int, default=200)
    ap.add_argument("--steps", type=int, default=32, help="insertion/deletion steps (spec §10.15: 32 at 32 px)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.eval_images, args.epochs, args.steps = 128, 32, 16, 1, 4
        args.cams, args.lams = "gradcam", args.lams or "7.5e-3"
    args.seed = args.seeds[0]
    t_start = time.time()
    cache = H.RunCache(args.cache_dir, enabled=not args.no_cache)
    backbones = [b for b in args.backbones.split(",") if b]
    errors = [e for e in args.errors.split(",") if e]
    full = tuple(c for c in args.cams.split(",") if c)
    arms = []  # (backbone, error, lam, cams)
    for i, bb in enumerate(backbones):
        lam0 = DEFAULT_LAM.get(bb, 7.5e-3)
        lams = [float(v) for v in args.lams.split(",") if v] if args.lams else [lam0, 0.1, 1.0]
        arms.append((bb, "-", 0.0, full))
        if "cosine" in errors:
            arms += [(bb, "cosine", lam, full if lam == lams[0] else ("gradcam",)) for lam in lams]
        if i == 0:
            arms += [(bb, e, lam0, ("gradcam",)) for e in errors if e != "cosine"]
    runs = {}
    for seed in args.seeds:  # seed-major: an interrupted run still has complete seeds
        for bb, err, lam, cams in arms:
            runs.setdefault((bb, err, lam), []).append(run_arm(bb, err, lam, seed, cams, args, cache))
    rows, claims, loss_lines = [], [], []
    for (bb, err, lam), rs in runs.items():
        name = arm_name(err, lam)
        rows.append(H.summary_row(name, bb, "-", "acc", [r["acc"] for r in rs]))
        rows.append(H.summary_row(name, bb, "-", "align", [sum(r["align"]) / len(r["align"]) for r in rs]))
        for e in rs[0]["means"]:
            for m in METRICS:
                rows.append(H.summary_row(name, bb, e, m, [r["means"][e][m] for r in rs], control=e in CONTROLS))
        lc = H.seed_interval([r["loss"]["loss_c"] for r in rs])
        lr_ = H.seed_interval([r["loss"]["lam_loss_r"] for r in rs])
        loss_lines.append(f"| {bb} | {name} | {H.fmt_interval(lc['mean'], lc['ci95_low'], lc['ci95_high'], 4)} | "
                          f"{H.fmt_interval(lr_['mean'], lr_['ci95_low'], lr_['ci95_high'], 4)} | "
                          f"{100 * abs(lr_['mean']) / max(abs(lc['mean']) + abs(lr_['mean']), 1e-12):.1f} % | "
                          f"{sum(r['train_s'] for r in rs) / len(rs):.0f} |")
        base = runs.get((bb, "-", 0.0))
        if err == "-" or not base:
            continue
        n = min(len(rs), len(base))
        primary = lam == DEFAULT_LAM.get(bb, 7.5e-3) and err == "cosine"
        pair = lambda key, f: ([f(r) for r in rs[:n]], [f(b) for b in base[:n]])  # noqa: E731
        a, b = pair("acc", lambda r: [100 * v for v in r["correct"]])
        claims.append(H.claim_row(f"{name} keeps accuracy ({bb})", "acc", a, b, +1, primary=primary))
        a, b = pair("align", lambda r: r["align"])
        claims.append(H.claim_row(f"{name} aligns dL/dx with guided dL/dx ({bb})", "cos", a, b, +1, primary=primary))
        for cam in rs[0]["per_item"]:
            if cam in CONTROLS or cam not in base[0]["per_item"]:
                continue
            for m in METRICS:
                a, b = pair(m, lambda r: [float("nan") if v is None else v for v in r["per_item"][cam][m]])
                claims.append(H.claim_row(f"{name}: {CAM_LABEL.get(cam, cam)} {m.upper()} ({bb})", m, a, b,
                                          +1 if HIGHER[m] else -1,
                                          primary=primary and cam == "gradcam" and m in ("ad", "ag")))
    _, blur = insertion_blur(args.image_size)
    cmd = "python experiments/guided_gradients.py " + " ".join(argv if argv is not None else sys.argv[1:])
    intro = (f"Command: `{cmd.strip()}` ({(time.time() - t_start) / 60:.1f} min in this invocation; cached runs are "
             f"not re-trained). {'**QUICK SMOKE RUN: numbers are meaningless.** ' if args.quick else ''}\n\n"
             f"Data: synthetic shapes, {args.num_classes} classes, {args.image_size} px, {args.train_size} train / "
             f"{args.test_size} test images; {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr:g} "
             f"(one-cycle); seeds {args.seeds} (each arm of a seed starts from the same initialisation and data "
             f"order). CAMs and controls for the ground-truth class on {args.eval_images} test images (x100); CAM "
             f"layer = deepest tap with >= {args.min_spatial}x{args.min_spatial} cells (spec §10.14); insertion "
             f"from a {blur} blur, {args.steps} steps (spec §10.15). `align` = per-image cosine between dL/dx and "
             f"the guided dL/dx (the quantity L_R pushes up). Verdicts pair each arm with the baseline of the same "
             f"seed on the same images. AD is read only with AG (Fake-CAM has a near-perfect AD).")
    extra = ("## How large is the regulariser? (last-epoch means over seeds)\n\n| backbone | arm | L_C | λ·L_R | "
             "|λ·L_R| / (|L_C| + |λ·L_R|) | train time (s) |\n|---|---|---|---|---|---|\n" + "\n".join(loss_lines) + "\n")
    H.write_report(args.out, rows, claims, title="Guided-gradient regularisation (thesis Tables 4.1-4.2), with "
                   "seeds, intervals and controls", intro=intro, extra_md=extra,
                   meta=dict(args={k: v for k, v in vars(args).items()}, blur=blur),
                   metrics=["acc", "align"] + list(METRICS))
    print(f"wrote {args.out}.md / .json")


if __name__ == "__main__":
    main()
