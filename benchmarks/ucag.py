"""Benchmark: the cost of UCAG against its base explainer on the same batch (issue 18).

    python benchmarks/ucag.py                                   # resnet10t, 64 px, 4 images, Grad-CAM and Score-CAM
    python benchmarks/ucag.py --bases gradcam --images 8 --image-size 224

For each base: ``t_base`` = the base explainer on the images; ``t_patch`` = the base explainer on one batch of
all ``B n^2`` up-sampled patches (the work UCAG cannot avoid); ``t_ucag`` = UCAG end to end; ``t_loop`` = the
patches explained one image's patches at a time (what an unbatched wrapper would do). Goal (issue 18): UCAG
costs at most ``(n^2 + 1) x`` the base cost of the same pixels x 1.1, i.e. ``t_ucag <= 1.1 (t_patch + t_base)``:
batching loses nothing. The plain ratio ``t_ucag / t_base`` is also reported (it includes the up-sampling:
a patch has ``alpha^2 (crop/size)^2`` times the pixels of the image). Median of ``--repeats`` runs, measured
back to back in one process; writes ``docs/results/ucag_benchmark.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
from experiments.harness import atomic_write_text, explain_layer_for  # noqa: E402
from models.explainers import create_explainer  # noqa: E402
from models.explainers.ucag import patch_geometry  # noqa: E402


def timed(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--bases", default="gradcam,scorecam")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--n-units", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "ucag_benchmark.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.create_model("baseline", backbone=args.backbone, num_classes=4).eval()
    layer = explain_layer_for(model, args.image_size)
    x = torch.rand(args.images, 3, args.image_size, args.image_size)
    t = torch.randint(0, 4, (args.images,))
    (ch, cw), (sh, sw) = patch_geometry((args.image_size,) * 2, args.n_units, 124, 224)
    hu = int(2.6 * ch)
    patches = torch.cat([F.interpolate(x[:, :, i:i + ch, j:j + cw], size=(hu, hu), mode="bicubic",
                                       align_corners=False) for i in sh for j in sw])
    tp = t.repeat(len(sh) * len(sw))
    rows = []
    for base in [b for b in args.bases.split(",") if b]:
        e = create_explainer(base, model, target_layers=layer)
        u = create_explainer(f"ucag:{base}", model, target_layers=layer, n_units=args.n_units)
        e(x, t)  # warm-up
        t_base = timed(lambda: e(x, t), args.repeats)
        t_patch = timed(lambda: e(patches, tp), args.repeats)
        t_ucag = timed(lambda: u(x, t), args.repeats)
        t_loop = timed(lambda: [e(patches[i::args.images], tp[i::args.images]) for i in range(args.images)], 1)
        goal = 1.1 * (t_patch + t_base)
        rows.append((base, t_base, t_patch, t_ucag, t_loop, t_ucag / t_base, t_ucag / (t_patch + t_base),
                     "yes" if t_ucag <= goal else "no", u.last_info["base_calls"]))
        print(f"{base}: base {t_base:.3f}s, patches {t_patch:.3f}s, ucag {t_ucag:.3f}s, per-image loop "
              f"{t_loop:.3f}s, ucag/base {t_ucag / t_base:.1f}x, ucag/(patches+base) "
              f"{t_ucag / (t_patch + t_base):.2f}", flush=True)
    md = ["# UCAG cost vs its base explainer", "",
          f"Command: `python benchmarks/{os.path.basename(__file__)} {' '.join(argv or sys.argv[1:])}`", "",
          f"Model: baseline {args.backbone} (random init; speed does not depend on the weights), {args.images} images "
          f"{args.image_size}x{args.image_size}, explained layer backbone.taps[{layer}], UCAG n = {args.n_units} "
          f"({len(sh) * len(sw)} patches of {ch}x{cw} px up-sampled to {hu}x{hu}), {args.threads} thread(s), CPU, "
          f"median of {args.repeats} runs back to back in one process.", "",
          "| base | t_base (s) | t_patches, one call (s) | t_UCAG (s) | t_patches, per-image calls (s) | "
          "UCAG / base | UCAG / (patches + base) | goal <= 1.1 met | base calls |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.1f}x | {r[6]:.2f} | "
                  f"{r[7]} | {r[8]} |")
    md += ["", "`UCAG / (patches + base)` is the issue's goal ((n^2 + 1) x the base cost of the same pixels, x 1.1): "
           "UCAG's own work (cropping, bicubic up-sampling, confidence weights, stitching, blur) on top of one "
           "batched base call over all patches. The machine is shared, so absolute times vary; ratios are measured "
           "back to back."]
    atomic_write_text(args.out, "\n".join(md) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
