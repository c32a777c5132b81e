"""Speed of eX-ViT vs a plain ViT of the same size, measured in the same run (ratios).

    python benchmarks/exvit.py                     # DeiT-S (12 layers, 6 heads, d 384) at 128 px, batch 8
    python benchmarks/exvit.py --image-size 224 --batch-size 16 --steps 5

* training step: eX-ViT = online encoder + AttE + classifier forward/backward on view 1, momentum branch forward
  on view 2 (no grad), AdamW step, EMA update (the two-view augmentation itself is excluded: it is the same data
  pipeline cost for any siamese method) vs the zoo's plain ViT (``create_model("baseline", backbone=...)``:
  timm ViT + GAP + linear) forward/backward + AdamW step, same batch;
* inference: online branch forward (logits) vs the plain ViT forward; and eX-ViT ``forward_explain`` (logits +
  class map in one pass).

Measurements alternate between the models (so background load hits both alike); the median is reported.
Appends a table to ``docs/results/exvit_benchmark.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="deit_small_patch16_224")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=20)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is much faster than 2 on a shared, oversubscribed machine)")
    p.add_argument("--out", default="docs/results/exvit_benchmark.md")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from models import create_model
    from models.exvit import discriminability_loss, ema_update_, global_loss, momentum_copy

    bk = dict(img_size=a.image_size)
    plain = create_model("baseline", backbone=a.backbone, backbone_kwargs=bk, num_classes=a.num_classes)
    ex = create_model("exvit", backbone=a.backbone, backbone_kwargs=bk, num_classes=a.num_classes)
    mom = momentum_copy(ex)
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    opt_e = torch.optim.AdamW(ex.parameters(), lr=1e-4)
    x1 = torch.rand(a.batch_size, 3, a.image_size, a.image_size)
    x2 = torch.rand_like(x1)
    y = (torch.rand(a.batch_size, a.num_classes) > 0.8).float()

    def step_plain():
        loss = global_loss(plain(x1), y)
        opt_p.zero_grad(set_to_none=True)
        loss.backward()
        opt_p.step()

    def step_ex():
        out = ex.forward_train(x1)
        loss = global_loss(out["logits"], y) + 0.5 * discriminability_loss(out["u"], mom.attribute_pool(x2)) \
            + 1.0 * out["div"]
        opt_e.zero_grad(set_to_none=True)
        loss.backward()
        opt_e.step()
        ema_update_(mom, ex, 0.996)

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def run(fns, n):
        times = {k: [] for k in fns}
        for k, f in fns.items():  # warm-up
            f()
        for _ in range(n):
            for k, f in fns.items():
                times[k].append(timed(f))
        return {k: statistics.median(v) for k, v in times.items()}

    plain.train(), ex.train()
    tr = run({"plain": step_plain, "exvit": step_ex}, a.steps)
    plain.eval(), ex.eval()
    with torch.no_grad():
        inf = run({"plain": lambda: plain(x1), "exvit": lambda: ex(x1), "explain": lambda: ex.forward_explain(x1)},
                  a.steps)
    n_p = sum(q.numel() for q in plain.parameters())
    n_e = sum(q.numel() for q in ex.parameters())
    rows = [
        ("training step (eX-ViT: both branches + EMA)", tr["plain"], tr["exvit"]),
        ("inference forward (online branch)", inf["plain"], inf["exvit"]),
        ("inference forward_explain (logits + class map)", inf["plain"], inf["explain"]),
    ]
    lines = [f"## eX-ViT speed vs plain ViT ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"Command: `python benchmarks/exvit.py {' '.join(sys.argv[1:])}`".replace(" `", " `").strip(), "",
             f"`{a.backbone}` at {a.image_size} px, batch {a.batch_size}, {a.num_classes} classes, {a.threads} CPU "
             f"threads, median of {a.steps} alternating runs. Parameters: plain {n_p / 1e6:.2f} M, eX-ViT "
             f"{n_e / 1e6:.2f} M (+ momentum copy {sum(q.numel() for q in mom.parameters()) / 1e6:.2f} M during "
             "training).", "",
             "| measurement | plain ViT (s) | eX-ViT (s) | ratio |", "|---|---|---|---|"]
    for name, tp, te in rows:
        lines.append(f"| {name} | {tp:.3f} | {te:.3f} | **{te / tp:.2f}x** |")
    lines.append("")
    lines.append(f"Goal for the training step: <= 1.6x; measured {tr['exvit'] / tr['plain']:.2f}x.")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
