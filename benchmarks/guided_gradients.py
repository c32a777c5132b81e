"""Training-step cost of guided-gradient regularisation, as ratios to a plain step measured in the same run.

    python benchmarks/guided_gradients.py                       # ResNet-18, 32 px, batch 64
    python benchmarks/guided_gradients.py --backbone mobilenetv2_100 --batch 32 --steps 8

Modes (all: forward + loss + backward + SGD step on the same model, batch and images):

* ``plain``            lambda = 0 (the baseline step);
* ``paper (separate)`` the thesis's scheme: a separate guided teacher forward + backward, then a forward with
  the create_graph backward and the double backward (``strategy="separate"``);
* ``shared``           one forward for teacher and student (``strategy="shared"``, the default);
* ``shared, fraction`` L_R estimated on a random ``fraction`` of the batch (sub-batch forward);
* ``shared, every=k``  L_R on every k-th step with weight k*lambda (``step_lambda``); the time of a round of
  k consecutive steps divided by k (the average step cost during training).

The modes are interleaved round-robin (the machine is shared) and the median step time is reported.
Writes/updates ``docs/results/guided_gradients_benchmark.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import create_model  # noqa: E402
from models.guided_gradients import guided_gradient_loss, step_lambda  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode (after 2 warm-up steps)")
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument("--every", default="2,4", help="k of the every-k-th-step option")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--out", default="docs/results/guided_gradients_benchmark.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("guided_gradients", backbone=args.backbone, num_classes=args.classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, args.classes, (args.batch,))
    fractions = [float(f) for f in args.fractions.split(",") if f]
    modes = {"plain (lambda=0)": dict(lam=0.0),
             "paper scheme (separate teacher forward)": dict(lam=7.5e-3, strategy="separate"),
             "shared forward (ours, full batch)": dict(lam=7.5e-3)}
    for f in fractions:
        modes[f"shared, fraction={f:g}"] = dict(lam=7.5e-3, fraction=f)
    for k in (int(e) for e in args.every.split(",") if e):
        modes[f"shared, every={k} steps"] = dict(lam=7.5e-3, every=k)

    def step(kw):
        kw = dict(kw)
        every = kw.pop("every", 1)
        t0 = time.perf_counter()
        for s in range(every):  # one round of `every` steps (the first one regularised), mean time per step
            opt.zero_grad(set_to_none=True)
            out = guided_gradient_loss(model, x, y, **{**kw, "lam": step_lambda(kw["lam"], every, s)})
            out["loss"].backward()
            opt.step()
        return (time.perf_counter() - t0) / every

    times = {m: [] for m in modes}
    for m, kw in modes.items():  # warm-up
        for _ in range(2):
            step(kw)
    for i in range(args.steps):
        for m, kw in modes.items():
            times[m].append(step(kw))
        print(f"round {i + 1}/{args.steps}: " + ", ".join(f"{m.split(' (')[0]} {t[-1] * 1e3:.0f} ms"
                                                            for m, t in times.items()), flush=True)
    base = statistics.median(times["plain (lambda=0)"])
    rows = []
    for m in modes:
        med = statistics.median(times[m])
        rows.append(f"| {m} | {med * 1e3:.0f} | {min(times[m]) * 1e3:.0f} | {med / base:.2f}x |")
    cmd = "python benchmarks/guided_gradients.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"## Guided-gradient training step: cost vs a plain step\n\n"
            f"`{cmd.strip()}` -- {args.backbone}, {args.image_size} px, batch {args.batch}, {args.classes} classes, "
            f"CPU ({torch.get_num_threads()} threads, torch {torch.__version__}), median of {args.steps} interleaved "
            f"steps (forward + loss + backward + SGD step).\n\n"
            "| mode | median ms/step | min ms/step | ratio to plain (median) |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    print("\n" + text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
