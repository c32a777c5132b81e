"""CA-Stream on the embedded benchmark: the analog of seed 001 Tables 3.1 and 3.3.

    python experiments/ca_stream.py                        # train baseline + stream, evaluate, write docs
    python experiments/ca_stream.py --baseline-ckpt checkpoints/baseline_synthetic/checkpoints/best.ckpt

1. Baseline ResNet-18 (GAP + linear) trained on the synthetic shapes (or reused from ``--baseline-ckpt``).
2. CA-Stream attached to it with one line (``checkpoint_path``), backbone + classifier frozen and in eval
   mode, only the stream trained (paper protocol; SGD 0.9, wd 1e-4, lr 0.1, /10 at 2/3 of the run).
3. Test split: accuracy of GAP vs CA (same frozen backbone and classifier), parameter and FLOP counts;
   Grad-CAM, Grad-CAM++, Score-CAM on the last stage (``backbone.taps[-1]``) of both models, explaining
   the ground-truth class, with AD, AG, AI, insertion, deletion (+ pointing game / mIoU, our benchmark
   has masks); raw attention maps of the stream as PNG.
Writes ``docs/results/ca_stream.md`` (+ ``.json``) and ``docs/results/ca_stream_attention.png``,
``docs/results/ca_stream_cams.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments import harness as H  # noqa: E402

PAPER_R18 = {  # seed 001 Table 3.1, ResNet-18 on ImageNet: (AD, AG, AI, I, D)
    "gradcam": {"GAP": (17.64, 12.73, 41.21, 63.13, 10.66), "CA": (16.99, 17.22, 44.95, 65.94, 10.68)},
    "gradcampp": {"GAP": (19.05, 11.16, 37.99, 62.80, 10.75), "CA": (19.02, 14.76, 40.82, 65.53, 10.82)},
    "scorecam": {"GAP": (13.64, 12.98, 44.53, 62.56, 11.37), "CA": (11.53, 18.12, 50.32, 65.33, 11.51)},
}
NAMES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "scorecam": "Score-CAM"}


def _stream_module(args, base_path: str):
    """CA-Stream attached to the baseline at ``base_path``, paper protocol: stream only, SGD 0.9, wd 1e-4,
    lr / 10 at 2/3 of the run."""
    from trainers.ca_stream import CAStreamModule

    step = max(1, round(args.stream_epochs * 2 / 3))
    return CAStreamModule(model_kwargs=dict(backbone=args.backbone, start_stage=args.start_stage,
                                            class_specific=args.class_specific,
                                            backbone_kwargs=dict(getattr(args, "backbone_kwargs", None) or {})),
                          num_classes=args.num_classes, checkpoint_path=base_path, train_mode="stream",
                          optimizer={"name": "sgd", "lr": args.stream_lr, "momentum": 0.9, "weight_decay": 1e-4},
                          scheduler={"name": "step", "step_size": step, "gamma": 0.1})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-ckpt", default=None, help="reuse a trained baseline (zoo checkpoint / state dict)")
    p.add_argument("--backbone", default="resnet10t", help="default: the main job's backbone (configs/baseline/synthetic.yaml)")
    p.add_argument("--backbone-kwargs", type=json.loads, default={"out_indices": [1, 2, 3], "output_stride": 8},
                   help="timm kwargs as JSON; default: the main job's resnet10t cut after stage 3 with output stride 8 "
                        "(explained last stage 8x8 at 64 px, 16x16 at 128 px)")
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=8000, help="split into two halves: baseline on the first, "
                   "stream on the second")
    p.add_argument("--object-scale", type=lambda t: [float(v) for v in t.split(",")], default=[0.2, 0.32],
                   help="object radius range as a fraction of the side (the main job's 0.2,0.32)")
    p.add_argument("--num-distractors", type=int, default=2)
    p.add_argument("--val-size", type=int, default=300)
    p.add_argument("--test-size", type=int, default=600, help="test images for accuracy")
    p.add_argument("--eval-images", type=int, default=50, help="test images explained per model/method")
    p.add_argument("--baseline-epochs", type=int, default=4)
    p.add_argument("--baseline-lr", type=float, default=3e-3, help="AdamW lr of the baseline (main job: 3e-3, "
                   "per-step cosine after --warmup steps)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--precision", default="bf16-mixed", help="Lightning precision of both fits (bf16 autocast is "
                   "~1.8x faster on this CPU; explanations are computed in fp32)")
    p.add_argument("--baseline-only", action="store_true", help="only train (or find) the seeds' baselines, then "
                   "stop: splits a long run into chunks (the full command reuses them)")
    p.add_argument("--compare-to", default=None, help="the JSON of the same experiment at another --image-size: "
                   "adds the resolution claims (effect at this size minus effect there, t over seeds)")
    p.add_argument("--stream-epochs", type=int, default=4, help="stream epochs (lr / 10 after 2/3 of them)")
    p.add_argument("--ca-ckpt", default=None, help="reuse a trained CA-Stream (skips stream training)")
    p.add_argument("--steps", type=int, default=16, help="insertion/deletion steps (None: sqrt(#pixels), the "
                   "paper's; 16 keeps a 128 px run within budget, as the main job's eval.py)")
    p.add_argument("--stream-lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--explainers", default="gradcam,gradcampp", help="Score-CAM (paper Table 3.1) is left out by "
                   "default: one forward per channel per image (256 at the last stage) does not fit the budget at 128 px")
    p.add_argument("--metrics", default="ad,ag,ai,ins,del,pg,miou")
    p.add_argument("--start-stage", type=int, default=0)
    p.add_argument("--class-specific", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="data seed (and the training seed of --legacy)")
    p.add_argument("--legacy", action="store_true", help="the former single-seed flow (baseline and stream on the "
                   "same images); default: seeds, disjoint halves, intervals and verdicts through the harness")
    p.add_argument("--min-explain-size", type=int, default=7, help="post-hoc CAMs are also computed at the deepest "
                   "tap >= this size (harness.explain_layer_for), besides the paper's last stage")
    H.add_common_args(p, out=False)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=os.path.join(ROOT, "checkpoints", "ca_stream_experiment"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "ca_stream.md"))
    p.add_argument("--report-from", default=None, help="only rewrite the markdown from a previous run's JSON")
    p.add_argument("--diagnose", action="store_true",
                   help="only measure where the trained stream attends (attention mass on the object vs its area, "
                        "entropy per block) with <workdir>/ca_stream.safetensors; writes ca_stream_diagnostics.md")
    return p.parse_args(argv)


def _fit(module, dm, epochs, root):
    import pytorch_lightning as pl

    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root,
                         enable_progress_bar=sys.stderr.isatty())
    trainer.fit(module, datamodule=dm)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@torch.no_grad()
def _accuracy(model, loader):
    model.eval()
    hit_ca = hit_gap = n = 0
    for b in loader:
        out = model.forward_stream(b["image"]) if hasattr(model, "forward_stream") else {"logits": model(b["image"])}
        hit_ca += (out["logits"].argmax(1) == b["label"]).sum().item()
        if "gap_logits" in out:
            hit_gap += (out["gap_logits"].argmax(1) == b["label"]).sum().item()
        n += b["label"].numel()
    return 100.0 * hit_ca / n, 100.0 * hit_gap / n


def _flops(model, size):
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with FlopCounterMode(display=False) as fc:  # (its module tracker needs autograd on)
        model(torch.rand(1, 3, size, size))
    return fc.get_total_flops()  # 2 x MACs, as in the thesis


@torch.no_grad()
def attention_diagnostics(model, loader, max_images: int):
    """Per stream block: attention mass on object pixels, the objects' area share at that block's resolution
    (what uniform attention would put there), and the normalised entropy ``H(a) / log p`` (1 = uniform).
    Returns (rows [block][mass, share, entropy] averaged over images, #images, spatial shape per block)."""
    import torch.nn.functional as F

    sums, n, shapes = None, 0, []
    for b in loader:
        x, mask = b["image"], (b["mask"] > 0).float()[:, None]
        out = model.forward_stream(x)
        rows = []
        for a, shape in zip(out["attentions"], out["shapes"]):
            obj = F.adaptive_avg_pool2d(mask, shape).flatten(1)          # object share of each cell
            p = a.shape[1]
            ent = -(a * a.clamp_min(1e-12).log()).sum(1) / math.log(p) if p > 1 else torch.ones(len(a))
            rows.append(torch.stack([(a * obj).sum(1), obj.mean(1), ent], 1).sum(0))
        rows, shapes = torch.stack(rows), out["shapes"]
        sums = rows if sums is None else sums + rows
        n += x.shape[0]
        if n >= max_images:
            break
    return (sums / n).tolist(), n, shapes


def _diagnose(args):
    from models import create_model, load_weights
    from trainers.data.synthetic import SyntheticShapes

    torch.set_num_threads(args.threads)
    ca = create_model("ca_stream", backbone=args.backbone, num_classes=args.num_classes,
                      start_stage=args.start_stage, class_specific=args.class_specific)
    load_weights(ca, args.ca_ckpt or os.path.join(args.workdir, "ca_stream.safetensors"))
    ca.eval()
    test = SyntheticShapes("test", args.test_size, num_classes=args.num_classes, image_size=args.image_size,
                           seed=args.seed)
    rows, n, shapes = attention_diagnostics(ca, torch.utils.data.DataLoader(test, batch_size=100), args.test_size)
    cmd = "python experiments/ca_stream.py " + " ".join(sys.argv[1:])
    lines = ["# CA-Stream: where does the trained stream attend?", "",
             f"Command: `{cmd.strip()}`; {n} test images, the stream of `docs/results/ca_stream.md`.", "",
             "| block | map | attention mass on the object | object area share (= uniform attention) | "
             "mass / share | entropy / log p (1 = uniform) |", "|---|---|---|---|---|---|"]
    for i, (mass, share, ent) in enumerate(rows):
        sh = "x".join(map(str, shapes[i]))
        lines.append(f"| a_{i} | {sh} | {mass:.3f} | {share:.3f} | {mass / max(share, 1e-9):.2f} | {ent:.3f} |")
    out = os.path.join(os.path.dirname(os.path.abspath(args.out)), "ca_stream_diagnostics.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.diagnose:
        return _diagnose(args)
    if not (args.legacy or args.report_from):
        return main_seeds(args, argv)
    if args.report_from:  # rewrite the table from the JSON of a finished run
        with open(args.report_from) as f:
            rec = json.load(f)
        old = argparse.Namespace(**{**vars(parse_args([])), **rec["args"], "report_from": None})
        _write(old, rec["results"], rec["info"], [e for e in old.explainers.split(",") if e], None)
        print(f"rewrote {old.out}")
        return
    torch.set_num_threads(args.threads)
    import pytorch_lightning as pl

    from models import Baseline, create_model, load_weights, save_weights
    from models.metrics import run_interpretability, save_overlay_grid
    from trainers.classification import ClassificationModule
    from trainers.data import SyntheticShapesDataModule

    t0 = time.time()
    os.makedirs(args.workdir, exist_ok=True)
    pl.seed_everything(args.seed, workers=True)
    dm = SyntheticShapesDataModule(num_classes=args.num_classes, image_size=args.image_size,
                                   train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                                   batch_size=args.batch_size, seed=args.seed)
    dm.setup("fit")
    dm.setup("test")
    log = {}

    # 1. baseline (GAP) ----------------------------------------------------------------------------
    base_path = args.baseline_ckpt
    if base_path is None:
        base_path = os.path.join(args.workdir, "baseline.safetensors")
        print(f"[1/4] training the baseline {args.backbone} ({args.baseline_epochs} epochs)")
        mod = ClassificationModule(model="baseline", model_kwargs=dict(backbone=args.backbone),
                                   num_classes=args.num_classes,
                                   optimizer={"name": "adamw", "lr": 0.002, "weight_decay": 0.05},
                                   scheduler={"name": "cosine", "eta_min": 1e-5})
        log["baseline_fit"] = _fit(mod, dm, args.baseline_epochs, args.workdir)
        save_weights(mod.model, base_path)
    else:
        print(f"[1/4] reusing the baseline {base_path}")
    t_base = time.time() - t0

    # 2. CA-Stream on top of it (paper protocol) ----------------------------------------------------
    print(f"[2/4] training CA-Stream (stream only, {args.stream_epochs} epochs)" + f' (t={time.time() - t0:.0f} s)')
    pl.seed_everything(args.seed, workers=True)
    ca_mod = _stream_module(args, base_path)
    if args.ca_ckpt:
        load_weights(ca_mod.model, args.ca_ckpt)
    else:
        log["stream_fit"] = _fit(ca_mod, dm, args.stream_epochs, args.workdir)
    ca = ca_mod.model.eval()
    save_weights(ca, os.path.join(args.workdir, "ca_stream.safetensors"))
    t_stream = time.time() - t0 - t_base
    gap = Baseline(num_classes=args.num_classes, backbone=args.backbone)
    load_weights(gap, base_path)
    gap.eval()
    # the frozen parts must be the baseline, bit for bit
    for k, v in gap.state_dict().items():
        if not torch.equal(v, ca.state_dict()[k]):
            raise RuntimeError(f"frozen tensor {k} changed during stream training")

    # 3. accuracy, params, FLOPs ---------------------------------------------------------------------
    print("[3/4] accuracy / parameters / FLOPs" + f' (t={time.time() - t0:.0f} s)')
    test_loader = dm.test_dataloader()
    acc_ca, acc_gap = _accuracy(ca, test_loader)
    n_gap = sum(p.numel() for p in gap.parameters())
    n_ca = sum(p.numel() for p in ca.parameters())
    with torch.device("meta"):
        ref224 = create_model("ca_stream", backbone=args.backbone, num_classes=1000)
    fl_gap, fl_ca = _flops(gap, args.image_size), _flops(ca, args.image_size)

    # 4. interpretability -----------------------------------------------------------------------------
    print(f"[4/4] {args.explainers} on {args.eval_images} test images, GAP vs CA" + f' (t={time.time() - t0:.0f} s)')
    explainers = [e for e in args.explainers.split(",") if e]
    results = {}
    for tag, model in (("GAP", gap), ("CA", ca)):
        torch.manual_seed(args.seed)
        r = run_interpretability(model, test_loader, explainers, metrics=args.metrics, max_images=args.eval_images,
                                 target="label", sanity=False, steps=args.steps, progress=sys.stderr.isatty(), examples=6)
        results[tag] = r
        print(f"t={time.time() - t0:.0f} s", tag, json.dumps({e: {k: round(v, 2) for k, v in row.items()} for e, row in r.items()}))
    t_total = time.time() - t0

    # PNGs: raw attention of every stream block, and the CAMs of both models ---------------------------
    res_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(res_dir, exist_ok=True)
    batch = next(iter(test_loader))
    imgs, labels, masks = batch["image"][:6], batch["label"][:6], batch["mask"][:6]
    _attention_png(ca, imgs, labels, masks, dm.class_names, os.path.join(res_dir, "ca_stream_attention.png"))
    ex_g, ex_c = results["GAP"].examples, results["CA"].examples
    if ex_g and ex_c:
        maps = {}
        for e in explainers:
            maps[f"{NAMES.get(e, e)} GAP"] = ex_g["maps"][e]
            maps[f"{NAMES.get(e, e)} CA"] = ex_c["maps"][e]
        with torch.no_grad():
            maps["raw attention (CA)"] = ca.explain(ex_c["images"])
        save_overlay_grid(ex_c["images"], maps, os.path.join(res_dir, "ca_stream_cams.png"), n=4,
                          masks=ex_c.get("masks"))

    info = dict(acc_gap=acc_gap, acc_ca=acc_ca, n_gap=n_gap, n_ca=n_ca, fl_gap=fl_gap, fl_ca=fl_ca,
                stream_params_224=ref224.stream_parameter_count(),
                total_224=sum(p.numel() for p in ref224.parameters()), t_base=t_base, t_stream=t_stream,
                t_total=t_total, fit=log, stream_dims=ca.stream.dims, pooled_stem=ca.pooled_stem)
    _write(args, results, info, explainers, argv)
    print(f"done in {t_total / 60:.1f} min -> {args.out}")


CONTROLS = ("random", "gaussian", "fakecam", "colorcontrast", "edges", "untrained")
HIGHER = {"acc": True, "ad": False, "ag": True, "ai": True, "ins": True, "del": False, "pg": True, "miou": True,
          "epg": True}


def _fit_loader(module, loader, epochs, root, precision="32-true"):
    import warnings

    import pytorch_lightning as pl

    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=root, enable_progress_bar=False, precision=precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)


@torch.no_grad()
def stream_signal(model, loader, max_images: int = 1000):
    """The learning signal the stream gets on its training images (issue 14's protocol trap): mean cross-entropy
    and accuracy (x100) of the frozen GAP head and of the CA head on the first ``max_images`` images, under bf16
    autocast. If the GAP head is already ~100 % right with CE ~0, copying GAP minimises the stream's loss and
    nothing moves the attention."""
    import torch.nn.functional as F

    model.eval()
    ce = {"gap": 0.0, "ca": 0.0}
    hit = {"gap": 0, "ca": 0}
    n = 0
    for b in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.forward_stream(b["image"])
        for k, key in (("gap", "gap_logits"), ("ca", "logits")):
            lo = out[key].float()
            ce[k] += F.cross_entropy(lo, b["label"], reduction="sum").item()
            hit[k] += (lo.argmax(1) == b["label"]).sum().item()
        n += b["label"].numel()
        if n >= max_images:
            break
    return {f"{k}_ce": ce[k] / n for k in ce} | {f"{k}_acc": 100.0 * hit[k] / n for k in hit} | {"n": n}


@torch.no_grad()
def _correct(model, loader):
    """Per-image correctness (x100) of the CA head and of the frozen GAP head on the same features."""
    ca, gap = [], []
    for b in loader:
        out = model.forward_stream(b["image"]) if hasattr(model, "forward_stream") else {"logits": model(b["image"])}
        ca += (out["logits"].argmax(1) == b["label"]).float().mul(100).tolist()
        if "gap_logits" in out:
            gap += (out["gap_logits"].argmax(1) == b["label"]).float().mul(100).tolist()
    return ca, gap


def _datasets(args):
    """The training set (split into halves by the caller) and the test set of the run."""
    from trainers.data.synthetic import SyntheticShapes

    kw = dict(num_classes=args.num_classes, image_size=args.image_size, seed=args.seed,
              object_scale=list(args.object_scale), num_distractors=args.num_distractors)
    return SyntheticShapes("train", args.train_size, **kw), SyntheticShapes("test", args.test_size, **kw)


BASELINE_KEYS = ("backbone", "backbone_kwargs", "num_classes", "image_size", "train_size", "object_scale",
                 "num_distractors", "seed", "baseline_epochs", "baseline_lr", "warmup", "batch_size", "precision")


def _baseline(args, seed, part_a, train_loader):
    """Train the seed's baseline on the first half with the main job's recipe (AdamW, per-step cosine after a
    warm-up), or reuse the one saved under a hash of its config (``--baseline-only`` chunks). Returns
    (path, run folder, seconds)."""
    import pytorch_lightning as pl

    from models import save_weights
    from trainers.classification import ClassificationModule

    cfg = dict(kind="ca_stream_baseline", train_seed=seed, **{k: getattr(args, k) for k in BASELINE_KEYS})
    root = os.path.join(args.workdir, f"{args.image_size}px_seed{seed}_{H.config_hash(cfg)}")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "baseline.safetensors")
    if os.path.exists(path):
        print(f"[ca_stream] seed {seed}: reusing the baseline {os.path.relpath(path, ROOT)}", flush=True)
        return path, root, 0.0
    t0 = time.time()
    pl.seed_everything(seed, workers=True, verbose=False)
    mod = ClassificationModule(model="baseline", model_kwargs=dict(backbone=args.backbone,
                                                                   backbone_kwargs=dict(args.backbone_kwargs)),
                               num_classes=args.num_classes,
                               optimizer={"name": "adamw", "lr": args.baseline_lr, "weight_decay": 0.05},
                               scheduler={"name": "cosine", "interval": "step", "warmup": args.warmup,
                                          "eta_min": 1e-5})
    _fit_loader(mod, train_loader, args.baseline_epochs, root, args.precision)
    tmp = path + ".tmp.safetensors"
    save_weights(mod.model, tmp)
    os.replace(tmp, path)
    print(f"[ca_stream] seed {seed}: baseline trained in {time.time() - t0:.0f} s -> {os.path.relpath(path, ROOT)}",
          flush=True)
    return path, root, time.time() - t0


def _one_seed(args, seed):
    """Baseline on the first half of the training images, the stream on the other half (so the frozen baseline
    has not memorised the images the stream learns from); both evaluated on the same test images."""
    import pytorch_lightning as pl

    from models import Baseline, load_weights, save_weights
    from models.explainers import create_explainer
    from models.metrics import run_interpretability

    train, test = _datasets(args)
    half = len(train) // 2
    part_a = torch.utils.data.Subset(train, range(half))
    part_b = torch.utils.data.Subset(train, range(half, len(train)))

    def loader(ds, shuffle):
        return torch.utils.data.DataLoader(ds, batch_size=args.batch_size if shuffle else 100, shuffle=shuffle,
                                           generator=torch.Generator().manual_seed(seed), drop_last=shuffle)

    t0 = time.time()
    base_path, root, t_base = _baseline(args, seed, part_a, loader(part_a, True))
    pl.seed_everything(seed, workers=True, verbose=False)
    ca_mod = _stream_module(args, base_path)
    diag_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test, range(min(300, len(test)))),
                                              batch_size=100)
    # the trap: what is left to learn on the stream's images, before training (GAP head, and the random stream)
    sig_init = stream_signal(ca_mod.model, loader(part_b, False))
    diag_init = attention_diagnostics(ca_mod.model.eval(), diag_loader, 300)[0]
    _fit_loader(ca_mod, loader(part_b, True), args.stream_epochs, root, args.precision)
    ca = ca_mod.model.eval()
    save_weights(ca, os.path.join(root, "ca_stream.safetensors"))
    sig_end = stream_signal(ca, loader(part_b, False))
    diag, _, shapes = attention_diagnostics(ca, diag_loader, 300)
    gap = Baseline(num_classes=args.num_classes, backbone=args.backbone, backbone_kwargs=dict(args.backbone_kwargs))
    load_weights(gap, base_path, verbose=False)
    gap.eval()
    for k, v in gap.state_dict().items():  # the frozen parts must be the baseline, bit for bit
        if not torch.equal(v, ca.state_dict()[k]):
            raise RuntimeError(f"frozen tensor {k} changed during stream training")
    acc_ca, acc_gap = _correct(ca, loader(test, False))
    sig_a = stream_signal(ca, loader(part_a, False))  # the baseline on (1000 images of) its own training half
    layer = H.explain_layer_for(gap, args.image_size, args.min_explain_size)
    last = len(gap.backbone.taps) - 1
    explainers = [e for e in args.explainers.split(",") if e]
    sub = torch.utils.data.Subset(test, range(min(args.eval_images, len(test))))
    res = {}
    for tag, model in (("GAP", gap), ("CA", ca)):
        names = [(e, create_explainer(e, model)) for e in explainers]  # the paper's last stage
        if layer != last:  # the last stage is already >= min size with the main job's backbone
            names += [(f"{e}@tap{layer}", create_explainer(e, model, target_layers=layer)) for e in explainers]
        names += ["intrinsic"] + [c for c in CONTROLS if c != "untrained"]
        names.append(("untrained", create_explainer("untrained", model, base="gradcam", target_layers=layer)))
        r = run_interpretability(model, torch.utils.data.DataLoader(sub, batch_size=50), names,
                                 metrics=args.metrics, target="label", sanity=False, steps=args.steps or None,
                                 progress=False)
        res[tag] = dict(means={k: dict(v) for k, v in r.items()}, per_item=r.per_item,
                        maps=r.meta.get("maps", {}))
    return dict(acc_ca=acc_ca, acc_gap=acc_gap, base_train_acc=sig_a["gap_acc"],
                base_heldout_train_acc=sig_init["gap_acc"], signal_init=sig_init, signal_end=sig_end,
                attention_init=diag_init, attention=diag, attention_shapes=[list(s) for s in shapes], layer=layer,
                layer_size=list(H.tap_sizes(gap, args.image_size)[layer]), t_base=t_base,
                t_total=time.time() - t0, **res)


def main_seeds(args, argv):
    """GAP vs CA over ``--seeds`` with paired intervals, controls and verdicts (issue 14)."""
    torch.set_num_threads(args.threads)
    if args.quick:
        args.train_size, args.test_size, args.eval_images = 128, 32, 8
        args.baseline_epochs, args.stream_epochs, args.steps = 1, 1, 4
    cache = H.RunCache(args.cache_dir, enabled=not args.no_cache)
    keys = BASELINE_KEYS + ("test_size", "eval_images", "stream_epochs", "steps", "stream_lr", "explainers",
                            "metrics", "start_stage", "class_specific", "min_explain_size")
    t0 = time.time()
    if args.baseline_only:
        train, _ = _datasets(args)
        half = len(train) // 2
        for seed in args.seeds:
            part_a = torch.utils.data.Subset(train, range(half))
            _baseline(args, seed, part_a, torch.utils.data.DataLoader(
                part_a, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                drop_last=True))
        print(f"[ca_stream] baselines ready ({time.time() - t0:.0f} s)")
        return []
    runs = []
    for seed in args.seeds:
        cfg = dict(kind="ca_stream_run", version=3, train_seed=seed, **{k: getattr(args, k) for k in keys})
        runs.append(cache.get_or_run(cfg, lambda: _one_seed(args, seed)))
        r = runs[-1]
        print(f"[ca_stream] seed {seed}: test acc CA {np.mean(r['acc_ca']):.1f} %, GAP {np.mean(r['acc_gap']):.1f} %"
              f"; GAP on its own half {r['base_train_acc']:.1f} %, on the stream's half "
              f"{r['signal_init']['gap_acc']:.1f} % (CE {r['signal_init']['gap_ce']:.3f}); stream CE on its half "
              f"{r['signal_init']['ca_ce']:.3f} at init -> {r['signal_end']['ca_ce']:.3f}; last-block attention "
              f"entropy {r['attention'][-1][2]:.3f}, mass/share {r['attention'][-1][0] / r['attention'][-1][1]:.2f}",
              flush=True)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bb = args.backbone
    rows = [H.summary_row("GAP (baseline)", bb, "-", "acc", [np.mean(r["acc_gap"]) for r in runs]),
            H.summary_row("CA-Stream", bb, "-", "acc", [np.mean(r["acc_ca"]) for r in runs]),
            H.summary_row("GAP (baseline)", bb, "-", "train_half_acc", [r["base_train_acc"] for r in runs]),
            H.summary_row("GAP (baseline)", bb, "-", "stream_half_acc", [r["base_heldout_train_acc"] for r in runs]),
            H.summary_row("GAP (baseline)", bb, "-", "stream_half_ce", [r["signal_init"]["gap_ce"] for r in runs]),
            H.summary_row("CA-Stream (untrained stream)", bb, "-", "stream_half_ce",
                          [r["signal_init"]["ca_ce"] for r in runs]),
            H.summary_row("CA-Stream", bb, "-", "stream_half_ce", [r["signal_end"]["ca_ce"] for r in runs]),
            H.summary_row("CA-Stream", bb, "-", "stream_half_acc", [r["signal_end"]["ca_acc"] for r in runs])]
    for tag, label in (("GAP", "GAP (baseline)"), ("CA", "CA-Stream")):
        for e in runs[0][tag]["means"]:
            for m in metrics:
                rows.append(H.summary_row(label, bb, e, m, [r[tag]["means"][e].get(m) for r in runs],
                                          control=e in CONTROLS))
    claims = [H.claim_row(f"CA-Stream keeps accuracy ({bb}, {args.image_size} px)", "acc",
                          [r["acc_ca"] for r in runs], [r["acc_gap"] for r in runs], +1, primary=True)]
    for e in runs[0]["CA"]["per_item"]:
        if e in CONTROLS or e == "intrinsic":
            continue
        for m in metrics:
            a = [[np.nan if v is None else v for v in r["CA"]["per_item"][e].get(m, [])] for r in runs]
            b = [[np.nan if v is None else v for v in r["GAP"]["per_item"][e].get(m, [])] for r in runs]
            if not all(len(x) and len(x) == len(y) for x, y in zip(a, b)):
                continue
            claims.append(H.claim_row(f"CA-Stream improves {NAMES.get(e.split('@')[0], e)}"
                                      f"{' at ' + e.split('@')[1] if '@' in e else ' (last stage)'} {m.upper()} "
                                      f"({args.image_size} px)", m, a, b, +1 if HIGHER[m] else -1,
                                      primary=m in ("ad", "ag") and e in ("gradcam", f"gradcam@tap{runs[0]['layer']}"),
                                      explainer=e, image_size=args.image_size,
                                      per_seed=[float(np.nanmean(np.subtract(x, y))) for x, y in zip(a, b)]))
    if args.compare_to:
        with open(args.compare_to) as f:
            there = json.load(f)
        claims += resolution_claims(claims, there.get("claims", []), args.image_size)
    sizes = [tuple(s) for s in runs[0]["attention_shapes"]]
    low = [s for s, r in zip(args.seeds, runs) if np.mean(r["acc_gap"]) < 80]
    extra = ["## The protocol trap: what the stream can learn from", "",
             "Per seed, on 1,000 images of the stream's training half (bf16): the frozen GAP head's accuracy and "
             "cross-entropy (what copying GAP would give), and the CA head's CE before and after stream training. "
             "If the GAP head already fits these images (CE ~0) nothing pushes the attention away from GAP.", "",
             "| seed | GAP acc, own half | GAP acc, stream's half | GAP CE, stream's half | stream CE at init | "
             "stream CE trained | CA acc, stream's half | test acc GAP / CA |", "|---|---|---|---|---|---|---|---|"]
    for seed, r in zip(args.seeds, runs):
        si, se = r["signal_init"], r["signal_end"]
        extra.append(f"| {seed} | {r['base_train_acc']:.1f} | {si['gap_acc']:.1f} | {si['gap_ce']:.3f} | "
                     f"{si['ca_ce']:.3f} | {se['ca_ce']:.3f} | {se['ca_acc']:.1f} | {np.mean(r['acc_gap']):.1f} / "
                     f"{np.mean(r['acc_ca']):.1f} |")
    extra += ["", "## Did the attention move? (first 300 test images; mean over seeds, untrained stream → trained)", "",
              "| block | map | mass on object / object area share (1 = uniform) | entropy / log p (1 = uniform) |",
              "|---|---|---|---|"]
    for i, sh in enumerate(sizes):
        ratio = [r[k][i][0] / max(r[k][i][1], 1e-9) for r in runs for k in ("attention_init", "attention")]
        ent = [r[k][i][2] for r in runs for k in ("attention_init", "attention")]
        extra.append(f"| a_{args.start_stage + i} | {'x'.join(map(str, sh))} | {np.mean(ratio[0::2]):.2f} → "
                     f"{np.mean(ratio[1::2]):.2f} | {np.mean(ent[0::2]):.3f} → {np.mean(ent[1::2]):.3f} |")
    if low:
        extra += ["", f"**Warning:** the baseline of seed(s) {low} is below 80 % test accuracy (issue 14 asks for "
                  f">= 80 %)."]
    cmd = "python experiments/ca_stream.py " + " ".join(argv if argv is not None else sys.argv[1:])
    intro = (f"Command: `{cmd.strip()}` ({(time.time() - t0) / 60:.1f} min in this invocation; cached seeds are "
             f"not re-trained). {'**QUICK SMOKE RUN: numbers are meaningless.** ' if args.quick else ''}\n\n"
             f"Per seed ({args.seeds}): a baseline {bb} {json.dumps(args.backbone_kwargs)} (GAP + linear; the main "
             f"job's recipe: AdamW lr {args.baseline_lr:g}, wd 0.05, per-step cosine after {args.warmup} warm-up "
             f"steps, {args.precision}) trained on the first half of {args.train_size} training images "
             f"({args.baseline_epochs} epochs, batch {args.batch_size}), then CA-Stream's stream on the *other* half ({args.stream_epochs} "
             f"epochs, the paper's SGD lr {args.stream_lr:g}, momentum 0.9, wd 1e-4, /10 at 2/3; backbone and "
             f"classifier frozen), so the frozen GAP head has not memorised the stream's images and leaves a "
             f"learning signal (section 'The protocol trap'). Shapes benchmark: {args.num_classes} classes, "
             f"{args.image_size} px, object radius {args.object_scale} of the side, {args.num_distractors} "
             f"distractors. Post-hoc CAMs ({args.explainers}) at the paper's last stage "
             f"({'x'.join(map(str, H.tap_sizes(__import__('models').create_model('baseline', backbone=bb, num_classes=2, backbone_kwargs=dict(args.backbone_kwargs)), args.image_size)[-1]))}"
             f"; also at tap {runs[0]['layer']} "
             f"{'x'.join(map(str, runs[0]['layer_size']))} when the last stage is < {args.min_explain_size}x"
             f"{args.min_explain_size}), ground-truth class, first {args.eval_images} test images, insertion/"
             f"deletion with {args.steps or 'sqrt(#pixels)'} steps; controls through the same code. Score-CAM is "
             f"left out by default (one forward per channel per image does not fit the compute budget at 128 px).")
    prefix = os.path.splitext(args.out)[0]
    H.write_report(prefix, rows, claims, title=f"CA-Stream (seed 001 Tables 3.1/3.3) with seeds, disjoint halves, "
                   f"intervals and controls ({args.image_size} px)", intro=intro, meta=dict(args=vars(args)),
                   metrics=["acc", "train_half_acc", "stream_half_acc", "stream_half_ce"] + metrics,
                   extra_md="\n".join(extra) + "\n")
    print(f"[ca_stream] wrote {prefix}.md / .json")
    return runs


def resolution_claims(here, there, size_here: int) -> list:
    """The resolution claim ("CA-Stream's CAM gains need a larger input"): for every CAM claim present at both
    sizes, the per-seed effect (CA − GAP, paired on images) at ``size_here`` minus the per-seed effect at the other
    size, as a t-interval over seeds (seed ``s`` of one size paired with seed ``s`` of the other: independent
    runs, so this is a comparison of two samples of per-seed effects), with the metric's paper direction. Claims
    need ``explainer``, ``metric``, ``image_size`` and ``per_seed``; others are skipped."""
    index = {(c.get("explainer"), c["metric"]): c for c in there if c.get("per_seed") and c.get("explainer")}
    out = []
    for c in here:
        o = index.get((c.get("explainer"), c["metric"]))
        if not c.get("per_seed") or o is None or len(o["per_seed"]) != len(c["per_seed"]) \
                or not np.all(np.isfinite(np.asarray(c["per_seed"] + o["per_seed"], dtype=float))):
            continue
        name = NAMES.get(c["explainer"].split("@")[0], c["explainer"])
        out.append(H.claim_row(f"The CA-Stream effect on {name} {c['metric'].upper()} is larger at "
                               f"{size_here} px than at {o['image_size']} px", c["metric"],
                               [[v] for v in c["per_seed"]], [[v] for v in o["per_seed"]], c["direction"],
                               primary=bool(c.get("primary")), explainer=c["explainer"], resolution=True))
    return out


def _attention_png(model, imgs, labels, masks, class_names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.base import normalize_saliency

    with torch.no_grad():
        atts = model.attention_maps(imgs)
    n, cols = imgs.shape[0], 1 + len(atts)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n), squeeze=False)
    for i in range(n):
        axes[i][0].imshow(imgs[i].permute(1, 2, 0).numpy())
        axes[i][0].contour((masks[i] > 0).float().numpy(), levels=[0.5], colors="lime", linewidths=0.8)
        axes[i][0].set_title(class_names[int(labels[i])], fontsize=8)
        for j, a in enumerate(atts):
            up = normalize_saliency(a[i:i + 1], imgs.shape[2:])[0]
            axes[i][j + 1].imshow(imgs[i].permute(1, 2, 0).numpy())
            axes[i][j + 1].imshow(up.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if i == 0:
                s = model.start_stage + j
                axes[i][j + 1].set_title(f"a_{s} ({a.shape[-2]}x{a.shape[-1]})", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("CA-Stream raw attention per block (last = intrinsic explanation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cmd(args) -> str:
    """The command line that reproduces ``args`` (options that differ from the defaults)."""
    default = vars(parse_args([]))
    parts = ["python experiments/ca_stream.py"]
    for k, v in vars(args).items():
        if k in ("report_from",) or v == default.get(k):
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {os.path.relpath(v, ROOT) if k in ('workdir', 'out') else v}")
    return " ".join(parts)


def _fmt(v):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _write(args, results, info, explainers, argv):
    metrics = [m for m in ("ad", "ag", "ai", "ins", "del", "pg", "miou") if m in args.metrics.split(",")]
    head = {"ad": "AD↓", "ag": "AG↑", "ai": "AI↑", "ins": "I↑", "del": "D↓", "pg": "PG↑", "miou": "mIoU↑"}
    cmd = _cmd(args)
    L = ["# CA-Stream on the embedded benchmark (seed 001, Tables 3.1 / 3.3 analog)", "",
         f"Command: `{cmd}` ({info['t_total'] / 60:.1f} min on this machine: baseline "
         f"{info['t_base'] / 60:.1f} min, stream {info['t_stream'] / 60:.1f} min, the rest evaluation).", "",
         f"Setup: {args.backbone} on SyntheticShapes ({args.num_classes} classes, {args.image_size} px, "
         f"{args.train_size} train images); baseline trained with AdamW ({args.baseline_epochs} epochs) unless "
         f"reused; CA-Stream S{args.start_stage}-S4 (stream widths {info['stream_dims']}, pooled stem: "
         f"{info['pooled_stem']}) trained {args.stream_epochs} epochs with backbone + classifier frozen and in "
         f"eval mode (SGD lr {args.stream_lr}, momentum 0.9, wd 1e-4, /10 at 2/3). Explanations of the "
         f"ground-truth class for the first {args.eval_images} test images; CAMs on the last stage "
         "(`backbone.taps[-1]`) of both models. AD/AG/AI/I/D ×100 (softmax scores; insertion from a blurred "
         "image, deletion to black, sqrt(#pixels) steps).", "",
         "## Table 3.1 analog: GAP vs CA", "",
         "| Method | Pool | " + " | ".join(head[m] for m in metrics) + " | paper (ResNet-18, ImageNet) AD / AG / AI / I / D |",
         "|---|---|" + "---|" * len(metrics) + "---|"]
    for e in explainers:
        for tag in ("GAP", "CA"):
            row = results[tag][e]
            paper = PAPER_R18.get(e, {}).get(tag)
            L.append(f"| {NAMES.get(e, e)} | {tag} | " + " | ".join(_fmt(row.get(m)) for m in metrics)
                     + f" | {' / '.join(f'{v:.2f}' for v in paper) if paper else '–'} |")
    L += ["", "Difference CA − GAP (sign as in the paper: AD ↓, AG ↑, AI ↑, I ↑, D ↓):", "",
          "| Method | " + " | ".join(head[m] for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for e in explainers:
        L.append(f"| {NAMES.get(e, e)} | " + " | ".join(
            f"{results['CA'][e][m] - results['GAP'][e][m]:+.2f}" for m in metrics) + " |")
    better = {"ag": 1, "ai": 1, "ins": 1, "ad": -1, "del": -1}
    wins = {m: sum((results["CA"][e][m] - results["GAP"][e][m]) * better[m] > 0 for e in explainers)
            for m in better if m in metrics}
    L += ["", "Reading (automatic): CA is better than GAP in "
          + ", ".join(f"{head[m]} {wins[m]}/{len(explainers)}" for m in wins)
          + f" methods (paper, ResNet-18: AD 3/3, AG 3/3, AI 3/3, I 3/3, D 0/3); accuracy CA − GAP = "
          f"{info['acc_ca'] - info['acc_gap']:+.2f} pt (paper +0.26). With {args.eval_images} explained images one "
          "image moves AI by " + f"{100 / max(1, args.eval_images):.1f} pt."]
    pct = 100 * (info["n_ca"] - info["n_gap"]) / info["n_gap"]
    s224, t224 = info["stream_params_224"], info["total_224"]
    L += ["", "## Table 3.3 analog: accuracy and cost", "",
          "| Pool | Top-1 (test, %) | #Params | Param % | GFLOPs at "
          f"{args.image_size} px |", "|---|---|---|---|---|",
          f"| GAP | {info['acc_gap']:.2f} | {info['n_gap'] / 1e6:.3f}M | – | {info['fl_gap'] / 1e9:.4f} |",
          f"| CA | {info['acc_ca']:.2f} | {info['n_ca'] / 1e6:.3f}M | {pct:.2f} | {info['fl_ca'] / 1e9:.4f} |", "",
          f"With 1000 classes (ImageNet head) the same model has {s224:,} stream parameters and "
          f"{t224 / 1e6:.2f}M in total (paper Table 3.3: 0.44M / 12.13M for ResNet-18).", "",
          "Figures: `ca_stream_attention.png` (raw attention a_0..a_L of every stream block; the last one is "
          "the model's intrinsic explanation), `ca_stream_cams.png` (Grad-CAM / Grad-CAM++ / Score-CAM of GAP "
          "vs CA and the raw attention; green contour = object mask).", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(L))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"results": {t: {e: dict(r[e]) for e in r} for t, r in results.items()},
                   "info": {k: v for k, v in info.items()}, "args": vars(args)}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
