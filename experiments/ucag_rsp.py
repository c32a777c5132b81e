"""UCAG and RSP on the embedded benchmark: the seed-004 tables (spec seed004_ucag_rsp §7) with seeds and intervals.

    python experiments/ucag_rsp.py                      # everything (train 3 seeds, evaluate, sanity, cost), cached
    python experiments/ucag_rsp.py --stage train --seeds 0    # one chunk (each chunk < 5 min on 2 cores)
    python experiments/ucag_rsp.py --stage eval --seeds 1
    python experiments/ucag_rsp.py --stage report       # tables + plot from the cache only

Models: plain ResNet-10t (``baseline``) trained from scratch on synthetic shapes (4 classes, 64 px), one per seed.
Explained layer: the deepest tap >= 7x7 (``harness.explain_layer_for``: ``backbone.taps[2]``, 8x8 at 64 px; UCAG's
up-sampled 91-px patches give 12x12 there). For every seed, on the same test images: Grad-CAM, Grad-CAM++,
Score-CAM plain and UCAG-wrapped (``ucag:<base>``), RSP, and the controls (random, fakecam); metrics deletion /
insertion (UCAG protocol: 28 steps... scaled to 64 px), pointing game, energy pointing game, positive / negative
map density, region insertion. Paired per-image differences UCAG - plain go through
``models.metrics.stats.paired_diff_across_seeds`` and ``verdict``. The sanity check (cascading randomisation)
runs on seed 0 for every explainer; the cost of UCAG is the ratio of explainer times on the same batch.
Writes ``docs/results/ucag_rsp.md`` / ``.json`` and ``docs/results/ucag_rsp_sanity.png``.
"""
from __future__ import annotations

import argparse
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
from models.weights import load_weights, save_weights  # noqa: E402
from trainers.data.synthetic import SyntheticShapes  # noqa: E402

BASES = ("gradcam", "gradcampp", "scorecam")
LABEL = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "scorecam": "Score-CAM", "rsp": "RSP",
         "random": "random (control)", "fakecam": "Fake-CAM (control)"}
CONTROLS = ("random", "fakecam")


def cfg_of(args) -> dict:
    return dict(exp="ucag_rsp", backbone=args.backbone, num_classes=args.num_classes, image_size=args.image_size,
                train_size=args.train_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)


def data_tensors(args, split: str, size: int) -> dict:
    """The split as tensors (generated once, cached as a plain tensor file)."""
    folder = os.path.join(args.cache_dir, "ucag_rsp")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"data_{split}_{size}_{args.num_classes}_{args.image_size}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    ds = SyntheticShapes(split, size=size, num_classes=args.num_classes, image_size=args.image_size)
    items = [ds[i] for i in range(size)]
    out = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("image", "label", "mask", "boxes")}
    tmp = path + ".tmp"
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out


def model_path(args, seed: int) -> str:
    return os.path.join(args.cache_dir, "ucag_rsp", f"model_{H.config_hash(cfg_of(args))}_seed{seed}.safetensors")


def build(args):
    return create_model("baseline", backbone=args.backbone, num_classes=args.num_classes)


def train(args, seed: int) -> dict:
    data = data_tensors(args, "train", args.train_size)
    g = H.seed_everything(seed)
    model = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    n = data["image"].shape[0]
    steps_per_epoch = n // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.15)
    t0 = time.time()
    for ep in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            x, y = data["image"][idx], data["label"][idx]
            if torch.rand(1, generator=g).item() < 0.5:  # horizontal flip (shape classes are flip-invariant)
                x = x.flip(-1)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"  seed {seed} epoch {ep + 1}/{args.epochs} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    save_weights(model.eval(), model_path(args, seed))
    acc = accuracy(model, data_tensors(args, "test", args.test_size))
    print(f"  seed {seed}: test accuracy {acc:.1f} % ({time.time() - t0:.0f}s)", flush=True)
    return {"acc": acc, "train_s": time.time() - t0}


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    pred = torch.cat([model(data["image"][i:i + 200]).argmax(1) for i in range(0, data["image"].shape[0], 200)])
    return 100.0 * float((pred == data["label"]).float().mean())


def load_model(args, seed: int):
    model = build(args)
    load_weights(model, model_path(args, seed))
    return model.eval()


def stage_train(args, cache):
    out = {}
    for seed in args.seeds:
        conf = dict(cfg_of(args), seed=seed, stage="train")
        if os.path.exists(model_path(args, seed)) and cache.get(conf) is not None:
            out[seed] = cache.get(conf)
            continue
        res = train(args, seed)
        cache.put(conf, res, res["train_s"])
        out[seed] = res
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(ap, default_out=os.path.join(ROOT, "docs", "results", "ucag_rsp"))
    ap.add_argument("--stage", default="all", choices=["train", "eval", "sanity", "cost", "report", "all"])
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--num-classes", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--test-size", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    cache = H.RunCache(args.cache_dir, enabled=not args.no_cache)
    if args.stage in ("train", "all"):
        stage_train(args, cache)


if __name__ == "__main__":
    main()
