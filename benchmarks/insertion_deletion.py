"""Benchmark: batched insertion/deletion (models.metrics.perturbation_curves) vs a naive per-image loop.

    python benchmarks/insertion_deletion.py                      # resnet18 baseline, 64 px, 16 images
    python benchmarks/insertion_deletion.py --images 32 --image-size 64 --steps 64 --max-batch 256

Same model, images and maps in one run. The naive reference is the seeds' Algorithms 1-2 written
directly: for each image, for each step, perturb and run one forward pass (batch of 1). Reports
the ratio naive / batched (goal >= 3x) and the largest difference between the two curves, and
writes docs/results/insertion_deletion_benchmark.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from models.metrics import gaussian_blur, perturbation_curves  # noqa: E402


@torch.no_grad()
def naive_curves(model, images, maps, targets, mode, steps):
    """Per image, per step, one forward call (Petsiuk et al. / seed 001 Alg. 1-2 as written)."""
    B = images.shape[0]
    P = maps[0].numel()
    per = math.ceil(P / steps)
    out = torch.zeros(B, steps + 1)
    for b in range(B):
        x = images[b]
        order = torch.argsort(maps[b].flatten(), descending=True, stable=True)
        base = torch.zeros_like(x) if mode == "deletion" else gaussian_blur(x[None])[0]
        src, start = (base, x) if mode == "deletion" else (x, base)
        for k in range(steps + 1):
            idx = order[: min(k * per, P)]
            xk = start.clone().flatten(1)
            xk[:, idx] = src.flatten(1)[:, idx]
            out[b, k] = model(xk.view_as(x)[None]).softmax(1)[0, targets[b]]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="default ceil(sqrt(H*W)) (= H for square images)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 avoids oversubscription)")
    p.add_argument("--out", default="docs/results/insertion_deletion_benchmark.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.create_model("baseline", backbone=args.backbone, num_classes=6).eval()
    x = torch.rand(args.images, 3, args.image_size, args.image_size)
    maps = torch.rand(args.images, args.image_size, args.image_size)
    t = torch.randint(0, 6, (args.images,))
    steps = args.steps or math.ceil(args.image_size)
    with torch.no_grad():
        model(x[:2])  # warm-up
    rows = []
    for mode in ("deletion", "insertion"):
        t0 = time.perf_counter()
        fast = perturbation_curves(model, x, maps, t, mode, steps=steps, max_batch=args.max_batch)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = naive_curves(model, x, maps, t, mode, steps)
        t_slow = time.perf_counter() - t0
        diff = float((fast - slow).abs().max())
        rows.append((mode, t_fast, t_slow, t_slow / t_fast, diff))
        print(f"{mode}: batched {t_fast:.2f}s, naive {t_slow:.2f}s, ratio {t_slow / t_fast:.2f}x, max |diff| {diff:.2e}")
    cmd = "python benchmarks/insertion_deletion.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = ["# Batched insertion/deletion vs a naive per-image loop", "",
            f"Command: `{cmd.strip()}`", "",
            f"Model: baseline {args.backbone} (6 classes, random init: speed does not depend on the weights), "
            f"{args.images} images {args.image_size}x{args.image_size}, {steps} steps "
            f"({steps + 1} forwards per image per curve), max_batch={args.max_batch}, "
            f"{args.threads} thread(s), CPU, measured in the same run.", "",
            "| Curve | batched (s) | naive per-image loop (s) | speed-up (naive / batched) | max abs diff |",
            "|---|---|---|---|---|"]
    text += [f"| {m} | {a:.2f} | {b:.2f} | {r:.2f}x | {d:.1e} |" for m, a, b, r, d in rows]
    text += ["", "The batched version builds the perturbed images of every image for several steps at once "
             "(`max(1, max_batch // B)` steps of the whole batch per forward call); both give the same curves "
             "(last column). The machine is shared by several jobs, so absolute times vary between runs; the "
             "ratio is measured back to back in one process.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
