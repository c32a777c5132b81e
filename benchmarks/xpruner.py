"""X-Pruner benchmark: CPU inference speed-up of physically pruned ViTs at ~50 % FLOPs, and the accuracy drop.

    python benchmarks/xpruner.py            # ~2 min on 2 cores; writes docs/results/xpruner_benchmark.md

Measured in one run, same process, same threads, interleaved repeats (median of per-repeat times):
1. DeiT-tiny (timm ``deit_tiny_patch16_224``: 192 wide, 3 heads, 12 blocks, 224 px) unpruned vs pruned to ~50 % FLOPs
   with (a) variable per-block widths (X-Pruner calibration on random class-wise masks: widths differ per block) and
   (b) the uniform rule (same rate in every block). Speed depends on the widths only, so no trained weights are needed.
2. The experiment's ViT (``experiments/xpruner.py``): unpruned vs the fine-tuned X-Pruner model at 50 % FLOPs
   (seed 0), with the accuracy drop taken from the experiment (if its cache exists).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import models  # noqa: E402
from models.xpruner import (alpha_for_flops, analytic_macs, load_pruned, prune_model, uniform_keep,  # noqa: E402
                            xpruner_keep)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def latency(nets, x, repeats, inner):
    """Median seconds per forward for each net, repeats interleaved so load changes hit all nets alike."""
    times = {k: [] for k in nets}
    with torch.inference_mode():
        for net in nets.values():
            net.eval()
            net(x)
        for _ in range(repeats):
            for k, net in nets.items():
                t = time.perf_counter()
                for _ in range(inner):
                    net(x)
                times[k].append((time.perf_counter() - t) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def deit_tiny(args):
    kw = dict(backbone="deit_tiny_patch16_224", num_classes=1000)
    full = models.create_model("xpruner", **kw).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, M in enumerate(full.masks):  # per-block importance levels so calibrated widths vary across blocks
            M.copy_(torch.rand(M.shape, generator=g) * (0.3 + (i // 2) / full.depth))
        full.xp.pruning_active.fill_(True)
        for gi in range(len(full.masks)):
            full.xp.theta[gi] = 0.5
    alpha = alpha_for_flops(full, args.flops)
    var = prune_model(full, xpruner_keep(full, alpha)).eval()
    uni = prune_model(full, uniform_keep(full, alpha)).eval()
    plain = models.create_model("xpruner", **kw).eval()
    full_macs = analytic_macs(plain)["total"]
    x = torch.rand(args.batch, 3, 224, 224)
    lat = latency({"unpruned": plain, "variable": var, "uniform": uni}, x, args.repeats, 1)
    rows = []
    for k, net in (("unpruned", plain), ("variable", var), ("uniform", uni)):
        rows.append(dict(model=f"DeiT-tiny 224 px ({k})", macs=analytic_macs(net)["total"] / 1e9,
                         flops_pct=100 * analytic_macs(net)["total"] / full_macs,
                         params=sum(p.numel() for p in net.vit.parameters()) / 1e6,
                         ms=1000 * lat[k], speedup=lat["unpruned"] / lat[k],
                         arch=None if k == "unpruned" else net.arch()))
    return rows


def experiment_model(args):
    latest = os.path.join(ROOT, "checkpoints", "experiment_cache", "xpruner_weights", "latest.json")
    if not os.path.exists(latest):
        print("[benchmark] experiment weights not found: run python experiments/xpruner.py first; skipping part 2")
        return [], None
    with open(latest) as f:
        paths = json.load(f)
    path = paths["pruned_xpruner_50"]
    pruned = load_pruned(path).eval()
    meta = models.xpruner.read_widths(path)
    base = models.create_model("xpruner", num_classes=meta["num_classes"], backbone=meta["backbone"],
                               backbone_kwargs=meta["backbone_kwargs"], checkpoint_path=paths["base"]).eval()
    size = meta["backbone_kwargs"]["img_size"]
    x = torch.rand(args.batch_small, 3, size, size)
    lat = latency({"unpruned": base, "pruned": pruned}, x, args.repeats, 3)
    full = analytic_macs(base)["total"]
    rows = [dict(model=f"experiment ViT {size} px (unpruned)", macs=full / 1e9, flops_pct=100.0,
                 params=sum(p.numel() for p in base.vit.parameters()) / 1e6, ms=1000 * lat["unpruned"], speedup=1.0,
                 arch=None),
            dict(model=f"experiment ViT {size} px (X-Pruner 50 %, seed 0)", macs=analytic_macs(pruned)["total"] / 1e9,
                 flops_pct=100 * analytic_macs(pruned)["total"] / full,
                 params=sum(p.numel() for p in pruned.vit.parameters()) / 1e6, ms=1000 * lat["pruned"],
                 speedup=lat["unpruned"] / lat["pruned"], arch=pruned.arch())]
    acc = None
    res_json = os.path.join(ROOT, "docs", "results", "xpruner.json")
    if os.path.exists(res_json):
        with open(res_json) as f:
            rs = json.load(f)["rows"]
        get = {(r["mechanism"], r["metric"]): r for r in rs}
        u, p = get.get(("unpruned (100 %)", "acc")), get.get(("xpruner @50%", "acc"))
        if u and p:
            acc = dict(unpruned=u["mean"], pruned=p["mean"], lo=p["ci95_low"], hi=p["ci95_high"])
    return rows, acc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flops", type=float, default=0.5, help="FLOPs remained target")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batch-small", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "xpruner_benchmark.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    rows = deit_tiny(args)
    rows2, acc = experiment_model(args)
    md = ["# X-Pruner benchmark (CPU inference, this machine)", "",
          f"`python benchmarks/xpruner.py` ({torch.get_num_threads()} threads, torch {torch.__version__}; median of "
          f"{args.repeats} interleaved repeats; DeiT-tiny batch {args.batch}, experiment ViT batch {args.batch_small}; "
          f"FLOPs = analytic MACs).", "",
          "| model | GMACs | FLOPs % | params (M) | ms / batch | speed-up |", "|---|---|---|---|---|---|"]
    for r in rows + rows2:
        md.append(f"| {r['model']} | {r['macs']:.3f} | {r['flops_pct']:.1f} | {r['params']:.2f} | {r['ms']:.1f} | "
                  f"{r['speedup']:.2f}x |")
    md += ["", "Per-block widths (heads / MLP units):", ""]
    for r in rows + rows2:
        if r["arch"]:
            md.append(f"- {r['model']}: heads {r['arch']['heads']}, MLP {r['arch']['mlp_hidden']}")
    if acc:
        ci = f" [{acc['lo']:.1f}, {acc['hi']:.1f}]" if acc["lo"] is not None and acc["hi"] is not None else " (1 seed)"
        md += ["", f"Accuracy (experiment, mean over seeds): unpruned {acc['unpruned']:.1f} %, X-Pruner at 50 % FLOPs "
               f"after fine-tuning {acc['pruned']:.1f} %{ci} -> drop "
               f"{acc['unpruned'] - acc['pruned']:.1f} points (goal <= 1)."]
    print(f"benchmark time {time.time() - t0:.0f} s")
    text = "\n".join(md) + "\n"
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(text)


if __name__ == "__main__":
    main()
