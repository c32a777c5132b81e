"""PICNN overhead: training step and inference time vs the plain backbone, measured in the same run.

    python benchmarks/picnn.py                        # resnet18, 64 px, batch 64, K = 6
    python benchmarks/picnn.py --backbone mobilenetv2_100 --image-size 96

Three models with the same backbone:

* ``baseline``: timm backbone + GAP + linear (the zoo's plain classifier);
* ``STD``: PICNN's network trained without the pathway (lambda = 0): backbone + the new target conv +
  GAP + linear -- the paper's "backbone" for the overhead claim (<= 5 %);
* ``PICNN``: the same network with the interpretation pathway (lambda = 2): pseudo-label sampling,
  Bernoulli mask, second pass of the shared classifier, L = L_dis + 2 L_int.

Training step = forward + loss + backward + Adam step. Inference = ``model(x)`` under ``no_grad``
(PICNN's inference is the discrimination pathway alone, so its ratio to STD should be 1).
Timings alternate between the models (round robin) and report medians, so load from other processes
hits all of them alike. Appends its table to ``docs/results/picnn_benchmark.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=12, help="timed rounds per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/results/picnn_benchmark.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from models import create_model
    from trainers.picnn import picnn_loss

    torch.manual_seed(0)
    K = args.num_classes
    models = {"baseline": create_model("baseline", backbone=args.backbone, num_classes=K),
              "STD": create_model("picnn", backbone=args.backbone, num_classes=K),
              "PICNN": create_model("picnn", backbone=args.backbone, num_classes=K)}
    opts = {k: torch.optim.Adam([q for q in m.parameters() if q.requires_grad], lr=1e-3) for k, m in models.items()}
    models["STD"].p_logits.requires_grad_(False)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, K, (args.batch_size,))

    def train_step(name):
        m, opt = models[name], opts[name]
        m.train()
        opt.zero_grad(set_to_none=True)
        if name == "PICNN":
            loss = picnn_loss(m.forward_train(x), y, lambda_int=2.0)["loss"]
        else:
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer(name):
        models[name].eval()
        models[name](x)

    def timed(fn, name):
        t0 = time.perf_counter()
        fn(name)
        return time.perf_counter() - t0

    results = {}
    for label, fn in (("train step", train_step), ("inference", infer)):
        for _ in range(args.warmup):
            for name in models:
                fn(name)
        times = {name: [] for name in models}
        for _ in range(args.steps):
            for name in models:
                times[name].append(timed(fn, name))
        results[label] = {name: statistics.median(t) for name, t in times.items()}

    tr, inf = results["train step"], results["inference"]
    rows = [("train step", tr), ("inference", inf)]
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: `python benchmarks/picnn.py"
             + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip() + "`", "",
             f"{args.backbone}, {args.image_size} px, batch {args.batch_size}, K = {K} (N = {models['PICNN'].num_filters} "
             f"filters), {args.threads} threads, median of {args.steps} round-robin rounds (CPU, shared machine).", "",
             "| measurement | baseline (s) | STD (s) | PICNN (s) | PICNN / STD | PICNN / baseline |",
             "|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r['baseline']:.4f} | {r['STD']:.4f} | {r['PICNN']:.4f} | "
                     f"{r['PICNN'] / r['STD']:.3f} | {r['PICNN'] / r['baseline']:.3f} |")
    ratio = tr["PICNN"] / tr["STD"]
    lines += ["", f"Training overhead of the pathway: {100 * (ratio - 1):+.1f} % (goal <= +10 %, paper <= +5 %): "
              f"{'met' if ratio <= 1.10 else 'NOT met'}. Inference runs the same code as STD (discrimination "
              "pathway only), so its ratio differs from 1 only by timing noise; the ratio to the baseline shows "
              "the cost of the added target conv.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        new = not os.path.exists(args.out)
        with open(args.out, "a") as f:
            if new:
                f.write("# PICNN benchmark (appended by `python benchmarks/picnn.py`)\n\n")
            f.write(text + "\n")
    return results


if __name__ == "__main__":
    main()
