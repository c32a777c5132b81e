"""MAXNet speed: HAM vs Grad-CAM on the same model, MAXNet training step vs the plain 3D CNN, volumes per second.

    python benchmarks/maxnet.py                       # 4 mm MNI grid (38 x 47 x 40), batch 8
    python benchmarks/maxnet.py --size 64 64 64 --batch-size 4

Models (random weights; speed does not depend on training): ``maxnet`` (full: stream + DAM + MFM + prototype
head) and ``cnn`` (the same 5-stage stream + GAP + linear: a plain 3D CNN of the same depth).

* training step = forward + loss (CE + 0.6 L_cls + 0.06 L_ctr for MAXNet, CE for the CNN) + backward + Adam;
* HAM = ``maxnet.forward_explain`` (one forward + one backward to three stages) vs Grad-CAM at stage 5
  (``create_explainer("gradcam", maxnet)``), per batch; paper: HAM 0.092 s vs Grad-CAM 0.027 s (3.4x);
* inference = ``model(x)`` under ``no_grad``; volumes/s = batch / median time.

Rounds alternate between the timed functions and medians are reported, so load from other processes hits all
alike. Appends its table to ``docs/results/maxnet_benchmark.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=3, default=(38, 47, 40))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/results/maxnet_benchmark.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from models import create_model
    from models.explainers import create_explainer
    from models.maxnet import cluster_contrastive_losses

    torch.manual_seed(0)
    mx = create_model("maxnet", num_classes=2)
    cnn = create_model("baseline", backbone="maxnet3d", in_chans=1, num_classes=2,
                       backbone_kwargs=dict(widths=(15, 25, 50, 50, 50), kernels=(3, 3, 3, 3, 1)))
    opts = {"maxnet": torch.optim.Adam(mx.parameters(), 1e-4), "cnn": torch.optim.Adam(cnn.parameters(), 1e-4)}
    x = torch.rand(args.batch_size, 1, *args.size)
    y = torch.randint(0, 2, (args.batch_size,))
    gradcam = create_explainer("gradcam", mx)

    def step_maxnet():
        mx.train()
        out = mx.run(x)
        cls, ctr = cluster_contrastive_losses(out["dist"], y, mx.proto_class, clamp=float(mx.latent_dim))
        loss = F.cross_entropy(out["logits"], y) + 0.6 * cls + 0.06 * ctr
        opts["maxnet"].zero_grad(set_to_none=True)
        loss.backward()
        opts["maxnet"].step()

    def step_cnn():
        cnn.train()
        loss = F.cross_entropy(cnn(x), y)
        opts["cnn"].zero_grad(set_to_none=True)
        loss.backward()
        opts["cnn"].step()

    def ham():
        mx.eval()
        mx.forward_explain(x)

    def gcam():
        mx.eval()
        gradcam(x)

    def infer(m):
        def f():
            m.eval()
            with torch.no_grad():
                m(x)
        return f

    fns = {"train_maxnet": step_maxnet, "train_cnn": step_cnn, "ham": ham, "gradcam": gcam,
           "infer_maxnet": infer(mx), "infer_cnn": infer(cnn)}
    times = {k: [] for k in fns}
    for r in range(args.warmup + args.steps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if r >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    B = args.batch_size
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} -- input {tuple(args.size)}, batch {B}, "
             f"{args.threads} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}",
             "", "| quantity | value |", "|---|---|",
             f"| HAM / Grad-CAM time (same MAXNet; paper 3.4x, goal <= 1.5x) | {med['ham'] / med['gradcam']:.2f}x |",
             f"| HAM s per volume | {med['ham'] / B:.4f} |", f"| Grad-CAM s per volume | {med['gradcam'] / B:.4f} |",
             f"| training step MAXNet / plain 3D CNN | {med['train_maxnet'] / med['train_cnn']:.2f}x |",
             f"| training volumes/s: MAXNet / CNN | {B / med['train_maxnet']:.1f} / {B / med['train_cnn']:.1f} |",
             f"| inference MAXNet / CNN | {med['infer_maxnet'] / med['infer_cnn']:.2f}x |",
             f"| inference volumes/s: MAXNet / CNN | {B / med['infer_maxnet']:.1f} / {B / med['infer_cnn']:.1f} |",
             f"| parameters MAXNet / CNN | {sum(q.numel() for q in mx.parameters()):,} / "
             f"{sum(q.numel() for q in cnn.parameters()):,} |", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        head = "" if os.path.exists(args.out) else ("# MAXNet speed (benchmarks/maxnet.py; medians of alternating "
                                                    "rounds)\n\n")
        with open(args.out, "a") as f:
            f.write(head + text + "\n")


if __name__ == "__main__":
    main()
