"""CA-Stream speed, measured in one run against the plain backbone (ratios, not absolute times).

    python benchmarks/ca_stream.py                       # resnet18, 224 px, batch 8
    python benchmarks/ca_stream.py --backbone resnet50 --image-size 224 --batch-size 4

* Inference latency: the CA-Stream model vs the GAP model (same backbone and classifier), timed
  interleaved (GAP, CA, GAP, CA, ...) so that machine load affects both alike; median over repeats.
  Goal: < 5 % overhead (the paper reports +0.2 % FLOPs for ResNet-50).
* Training step (forward + backward + SGD step): stream-only training (paper protocol: backbone and
  classifier frozen, in eval mode) vs full fine-tuning of the same model.
Appends a table to ``docs/results/ca_stream_benchmark.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--train-repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "ca_stream_benchmark.md"))
    return p.parse_args(argv)


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns, repeats, warmup=2):
    """Median seconds of each callable, run round-robin."""
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            times[i].append(_time(f))
    return [statistics.median(t) for t in times]


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from models import Baseline, create_model

    gap = Baseline(num_classes=args.num_classes, backbone=args.backbone).eval()
    ca = create_model("ca_stream", backbone=args.backbone, num_classes=args.num_classes).eval()
    ca.load_state_dict(gap.state_dict(), strict=False)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, args.num_classes, (args.batch_size,))

    # -- inference --------------------------------------------------------------------------------
    def infer(m):
        def f():
            with torch.inference_mode():
                m(x)
        return f

    t_gap, t_ca = interleaved([infer(gap), infer(ca)], args.repeats)

    # -- training steps -------------------------------------------------------------------------------
    def make_step(model, params):
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)

        def f():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return f

    stream_model = create_model("ca_stream", backbone=args.backbone, num_classes=args.num_classes)
    for n, p in stream_model.named_parameters():
        p.requires_grad_(n.startswith("stream."))
    stream_model.train()
    stream_model.backbone.eval()  # frozen BN (paper protocol)
    stream_model.drop.eval()
    full_model = create_model("ca_stream", backbone=args.backbone, num_classes=args.num_classes).train()
    gap_train = Baseline(num_classes=args.num_classes, backbone=args.backbone).train()
    t_stream, t_full, t_gap_full = interleaved(
        [make_step(stream_model, [p for p in stream_model.parameters() if p.requires_grad]),
         make_step(full_model, full_model.parameters()), make_step(gap_train, gap_train.parameters())],
        args.train_repeats, warmup=1)

    n_stream = ca.stream_parameter_count()
    from torch.utils.flop_counter import FlopCounterMode

    flops = []
    for m in (gap, ca):
        with FlopCounterMode(display=False) as fc:
            m(x[:1])
        flops.append(fc.get_total_flops())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [
        ("inference: GAP model (plain backbone)", t_gap, 1.0),
        ("inference: CA-Stream model", t_ca, t_ca / t_gap),
        ("train step: GAP baseline, full fine-tuning", t_gap_full, t_gap_full / t_gap_full),
        ("train step: CA-Stream, full fine-tuning", t_full, t_full / t_gap_full),
        ("train step: CA-Stream, stream only (paper protocol)", t_stream, t_stream / t_gap_full),
    ]
    head = (f"## {args.backbone}, batch {args.batch_size} x {args.image_size}x{args.image_size}, {args.num_classes} "
            f"classes, {args.threads} CPU threads ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    lines = [head, "", f"Command: `python benchmarks/ca_stream.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
             .replace(" `", " `").rstrip(), "",
             f"Stream parameters: {n_stream:,}. FLOPs per image (2 x MACs, torch FlopCounterMode): GAP "
             f"{flops[0] / 1e9:.3f} G, CA {flops[1] / 1e9:.3f} G (ratio {flops[1] / flops[0]:.4f}). Medians of "
             f"{args.repeats} (inference) / {args.train_repeats} (training) interleaved runs; machine load average "
             f"{load:.1f} on {os.cpu_count()} cores during the run (timings are noisy when the load exceeds the cores).",
             "",
             "| Measurement | ms / batch | ratio |", "|---|---|---|"]
    lines += [f"| {name} | {1e3 * t:.1f} | {r:.3f} |" for name, t, r in rows]
    overhead = 100 * (t_ca / t_gap - 1)
    lines += ["", f"Inference overhead of CA-Stream: {overhead:+.1f} % (goal < 5 %); stream-only training step = "
              f"{t_stream / t_full:.2f} x the full fine-tuning step of the same model.", ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    new = not os.path.exists(args.out)
    with open(args.out, "a") as f:
        if new:
            f.write("# CA-Stream benchmark (ratios vs the plain GAP model, measured in the same run)\n\n")
        f.write(text + "\n")


if __name__ == "__main__":
    main()
