"""Main-job options: training throughput and explained-layer resolution of each candidate recipe.

    python benchmarks/main_job_options.py                       # every option, 30 timed steps each
    python benchmarks/main_job_options.py --only r18_64,r10t_l3_112 --steps 20

For each option (backbone, input size, timm kwargs such as ``output_stride`` / ``out_indices``,
precision) it builds the zoo's ``baseline`` model, times forward + backward + AdamW step on batches of
the embedded benchmark (after warm-up steps) and reports images/s and the last stage's spatial size
(the default layer that CAM, Grad-CAM and the intrinsic map explain). The README's main-job table was
made with this script plus full training runs of the best candidates.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

#: name -> (backbone, image size, backbone_kwargs)
OPTIONS = {
    "r18_64": ("resnet18", 64, {}),
    "r18_64_os16": ("resnet18", 64, {"output_stride": 16}),
    "r18_112": ("resnet18", 112, {}),
    "r18_l3_112": ("resnet18", 112, {"out_indices": [1, 2, 3]}),
    "r18_l3_os8_56": ("resnet18", 56, {"out_indices": [1, 2, 3], "output_stride": 8}),
    "r10t_64": ("resnet10t", 64, {}),
    "r10t_os8_56": ("resnet10t", 56, {"output_stride": 8}),
    "r10t_os16_112": ("resnet10t", 112, {"output_stride": 16}),
    "r10t_l3_112": ("resnet10t", 112, {"out_indices": [1, 2, 3]}),
    "r10t_l3_96": ("resnet10t", 96, {"out_indices": [1, 2, 3]}),
    "r10t_l3_os8_56": ("resnet10t", 56, {"out_indices": [1, 2, 3], "output_stride": 8}),
    "r10t_l3_os8_64": ("resnet10t", 64, {"out_indices": [1, 2, 3], "output_stride": 8}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma list of option names (default: all)")
    p.add_argument("--precision", default="fp32,bf16", help="fp32, bf16 or both")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="append results as JSON lines to this file")
    return p.parse_args(argv)


def measure(backbone: str, size: int, kwargs: dict, precision: str, batch_size: int, steps: int, warmup: int):
    import models

    torch.manual_seed(0)
    model = models.create_model("baseline", backbone=backbone, num_classes=6, backbone_kwargs=dict(kwargs))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.rand(batch_size, 3, size, size)
    y = torch.randint(0, 6, (batch_size,))
    with torch.no_grad():
        side = tuple(model.features(x[:1]).shape[2:])
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step():
        with ctx():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    return {"img_per_s": batch_size * steps / dt, "last_stage": side, "params_M": params / 1e6}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(OPTIONS)
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"error: unknown option(s) {unknown}; known: {', '.join(OPTIONS)}")
    print(f"| option | backbone | px | kwargs | last stage | params (M) | precision | img/s (batch {args.batch_size}) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        bb, size, kw = OPTIONS[n]
        for prec in args.precision.split(","):
            r = measure(bb, size, kw, prec, args.batch_size, args.steps, args.warmup)
            print(f"| {n} | {bb} | {size} | {json.dumps(kw)} | {'x'.join(map(str, r['last_stage']))} | "
                  f"{r['params_M']:.2f} | {prec} | {r['img_per_s']:.0f} |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"option": n, "backbone": bb, "size": size, "kwargs": kw,
                                        "precision": prec, **r}) + "\n")


if __name__ == "__main__":
    main()
