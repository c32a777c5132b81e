"""PICNN paper Table 1 on the embedded benchmark: STD (lambda = 0) vs PICNN (lambda = 2).

    python experiments/picnn.py                       # ResNet-18 + MobileNetV2, ~15 min on 2 quiet cores
    python experiments/picnn.py --backbones resnet18 --epochs 3 --train-size 600   # smoke run
    python experiments/picnn.py --gumbel              # + the Table 4 ablation (Gumbel-softmax, tau 0.01)
    # split over processes, then merge (each run writes docs/results/picnn_run_<backbone>_<model>.json):
    python experiments/picnn.py --backbones resnet18 --runs STD & python experiments/picnn.py --backbones resnet18 --runs PICNN
    python experiments/picnn.py --report-only

For every backbone, two models with the same seed (so the same random initial P) are trained on the
synthetic shapes (``trainers/data/synthetic.py``) with ``trainers.picnn.PICNNModule``; the checkpoint is
selected on the validation split (``val/acc``), then the test split gives

* ACC1 (discrimination pathway), ACC2 (only the *predicted* class's cluster), ACC3 (all filters but that
  cluster): deterministic and label-free, clusters = argmax over classes of P per filter;
* MIS (mean over filters of the max over classes of the kNN mutual information, sklearn, nats);
* diagnostics: ACC2 with the official stochastic pathway (pseudo-label + Bernoulli mask, mean of
  ``--draws`` seeded draws), ACC3 with the *true* class's cluster (label-based, official), and how far
  P moved from uniform (mean over filters of max_k P[k, i]; 1/K = uniform).

Writes ``docs/results/picnn.md`` (+ one ``picnn_run_<backbone>_<model>.json`` per trained model), the cluster CAM grids
``docs/results/picnn_cams_<backbone>.png`` (paper Fig. 7 a/b/c: CAM of all / cluster / complement
filters; for GAP + linear this is exactly Grad-CAM on the target layer) and ``picnn_P_<backbone>.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments import harness as H  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*GPU available.*")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="resnet10t", help="comma-separated timm names (default: the main job's)")
    p.add_argument("--backbone-kwargs", type=json.loads, default={"out_indices": [1, 2, 3], "output_stride": 8},
                   help="JSON timm kwargs for every backbone; default (the main job): an 8x8 last stage at 64 px")
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--object-scale", type=lambda t: [float(v) for v in t.split(",")], default=[0.2, 0.32],
                   help="object size range of the shapes (the main job's)")
    p.add_argument("--distractors", type=int, default=2)
    p.add_argument("--train-size", type=int, default=8000,
                   help="training images (8,000 = the main job's: every arm >= 98 %% test; with 4,000 the paper's Adam "
                        "left STD at 76-84 %% and lambda = 2 at ~60 %%)")
    p.add_argument("--val-size", type=int, default=300)
    p.add_argument("--test-size", type=int, default=600)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam peak lr (paper: 1e-3 for 200 epochs; 3e-3 = the main "
                   "job's peak, for a 3-epoch schedule)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then per-step cosine to lr * 1e-3 "
                   "(the main job's schedule; 0 = per-epoch cosine without warm-up, the old default)")
    p.add_argument("--precision", default="bf16-mixed", help="Lightning precision of training (evaluation is fp32)")
    p.add_argument("--p-lr", type=float, default=0.05,
                   help="separate Adam lr for P (0 = same as --lr, the paper's recipe). Default 0.05: our schedule "
                        "is ~500x shorter than the paper's 200 epochs, and with Adam a logit of P moves at most "
                        "~lr per step, so at 1e-3 P would stay uniform; see docs/picnn.md")
    p.add_argument("--lambda-int", type=float, default=2.0, help="PICNN lambda (paper: 2); STD uses 0")
    p.add_argument("--gumbel", action="store_true", help="also train the Gumbel-softmax ablation (first backbone)")
    p.add_argument("--draws", type=int, default=5, help="seeded draws for the stochastic (official) ACC2")
    p.add_argument("--seed", type=int, default=0, help="data seed and the seed of the legacy single-run mode")
    p.add_argument("--lambdas", default="0.5,10", help="extra PICNN lambdas for the Fig. 6 sweep (first backbone)")
    p.add_argument("--legacy", action="store_true", help="the former single-seed flow (one run per model, "
                   "picnn_run_*.json, checkpoint selection on val); default: seeds + intervals through the harness")
    H.add_common_args(p, out=False)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--runs", default="STD,PICNN", help="which models to train per backbone (STD,PICNN,PICNN-Gumbel)")
    p.add_argument("--workdir", default="checkpoints/picnn_experiment", help="trained weights (for the pictures)")
    p.add_argument("--diagnose", action="store_true",
                   help="only analyse the trained models in --workdir (which class each filter is most informative "
                        "about vs its P cluster, MIS over active filters); writes picnn_diagnostics.md in --out")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild docs/results/picnn.md (+ PNGs) from the picnn_run_*.json files in --out")
    return p.parse_args(argv)


def train_one(args, dm, backbone: str, lambda_int: float, sampler: str = "bernoulli"):
    import pytorch_lightning as pl

    from trainers.callbacks import ZooCheckpoint
    from trainers.classification import read_checkpoint
    from trainers.picnn import PICNNModule

    pl.seed_everything(args.seed, workers=True, verbose=False)
    groups = [{"params": "^p_logits$", "lr": args.p_lr}] if args.p_lr and lambda_int > 0 else None
    sched = {"name": "cosine", "eta_min": args.lr * 1e-3}
    warmup = int(getattr(args, "warmup", 0) or 0)
    if warmup:
        sched.update(interval="step", warmup=warmup)
    module = PICNNModule(model_kwargs=dict(backbone=backbone, pretrained=False, sampler=sampler,
                                           backbone_kwargs=dict(getattr(args, "backbone_kwargs", None) or {})),
                         num_classes=args.num_classes, lambda_int=lambda_int,
                         optimizer={"name": "adam", "lr": args.lr, "weight_decay": 1e-4}, param_groups=groups,
                         scheduler=sched)
    with tempfile.TemporaryDirectory() as d:
        ckpt = ZooCheckpoint(dirpath=d, save_last=False)
        trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                             precision=getattr(args, "precision", "32-true"),
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[ckpt],
                             num_sanity_val_steps=0, default_root_dir=d)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        train_time = time.perf_counter() - t0
        best = ckpt.best_model_path
        sd = read_checkpoint(best)["state_dict"]
        best_epoch = int(read_checkpoint(best).get("epoch", -1))
    module.load_state_dict(sd)
    module.eval()
    return module.model, {"train_s": train_time, "best_epoch": best_epoch,
                          "val_acc": float(ckpt.best_model_score) * 100}


@torch.no_grad()
def sampled_acc2(model, loader, draws: int, seed: int) -> float:
    """Official ACC2: pseudo-label ~ Cat(softmax(y1)), mask ~ Ber(P[y~]) -- mean over seeded draws."""
    accs = []
    for d in range(draws):
        g = torch.Generator().manual_seed(seed + d)
        correct = total = 0
        for batch in loader:
            out = model.forward_train(batch["image"], generator=g)
            correct += (out["logits_int"].argmax(1) == batch["label"]).sum().item()
            total += len(batch["label"])
        accs.append(100.0 * correct / total)
    return sum(accs) / len(accs)


def evaluate(model, dm, args):
    from models.metrics.picnn import evaluate_picnn

    loader = dm.test_dataloader()
    res = evaluate_picnn(model, loader, mis_estimator="knn")
    res["acc2_sampled"] = sampled_acc2(model, loader, args.draws, args.seed)
    P = model.P.detach()
    res["p_max_mean"] = float(P.max(0).values.mean())
    sizes = model.cluster_assignment().sum(1).float()
    res["cluster_size_min"], res["cluster_size_max"] = float(sizes.min()), float(sizes.max())
    return res


def save_pictures(models_by_name, dm, backbone, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.metrics import save_overlay_grid

    ds = dm.test_set
    idx = [next(i for i in range(len(ds)) if int(ds[i]["label"]) == c) for c in range(min(args.num_classes, 6))]
    batch = [ds[i] for i in idx]
    images = torch.stack([b["image"] for b in batch])
    masks = torch.stack([(b["mask"] > 0).float() for b in batch])
    labels = torch.stack([b["label"] for b in batch])
    maps, titles = {}, [f"{dm.class_names[int(y)]}" for y in labels]
    for name, model in models_by_name.items():
        with torch.no_grad():
            cams = model.cluster_cams(images, target=labels)
        for part in ("all", "cluster", "complement"):
            maps[f"{name}: {part}"] = cams[part]
    cam_path = os.path.join(args.out, f"picnn_cams_{backbone}.png")
    save_overlay_grid(images, maps, cam_path, n=len(idx), titles=titles, masks=masks)
    fig, axes = plt.subplots(1, len(models_by_name), figsize=(6 * len(models_by_name), 2.2), squeeze=False)
    for ax, (name, model) in zip(axes[0], models_by_name.items()):
        P = model.P.detach()
        order = torch.argsort(P.argmax(0) * 10 - P.max(0).values)  # group filters by cluster
        im = ax.imshow(P[:, order].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{name}: P (classes x filters, grouped by argmax cluster)", fontsize=8)
        ax.set_yticks(range(args.num_classes))
        ax.set_yticklabels(dm.class_names, fontsize=6)
        fig.colorbar(im, ax=ax)
    p_path = os.path.join(args.out, f"picnn_P_{backbone}.png")
    fig.tight_layout()
    fig.savefig(p_path, dpi=110)
    plt.close(fig)
    return cam_path, p_path


def write_report(rows, pics, args, cmd, wall):
    path = os.path.join(args.out, "picnn.md")
    cols = [("acc1", "ACC1 ↑"), ("acc2", "ACC2 ↑"), ("acc3", "ACC3 ↓"), ("mis", "MIS ↑"),
            ("acc2_sampled", "ACC2 sampled (official)"), ("acc3_label", "ACC3 true-label (diag.)"),
            ("p_max_mean", "mean max_k P"), ("val_acc", "val ACC1 (selection)"), ("best_epoch", "best epoch"),
            ("train_s", "train s")]
    lines = ["# PICNN: paper Table 1 on the embedded benchmark", "",
             f"Command(s): {cmd} (summed wall time of the runs {wall / 60:.1f} min, {args.threads} threads per "
             "process; `python experiments/picnn.py` runs everything in one process).", "",
             f"Synthetic shapes, K = {args.num_classes} classes, {args.image_size} px, train {args.train_size} / "
             f"val {args.val_size} / test {args.test_size} images, {args.epochs} epochs, Adam lr {args.lr} "
             f"(P lr {args.p_lr or args.lr}), wd 1e-4, cosine, batch {args.batch_size}, backbones from scratch "
             f"(no internet for ImageNet weights), target layer = new 3x3 conv with N = round(12.8 K) = "
             f"{round(12.8 * args.num_classes)} filters, seed {args.seed}. STD = same network and same random "
             f"initial P trained with lambda = 0 (P frozen); PICNN lambda = {args.lambda_int}. Checkpoint selected "
             "on validation ACC1; all numbers on the test split, accuracies in %.", "",
             "ACC2/ACC3: deterministic and label-free (cluster of the *predicted* class, clusters = argmax over "
             "classes of P per filter). MIS: sklearn `mutual_info_classif` (kNN, k = 3, random_state 0) between "
             "the spatial sum of each filter map and one-vs-rest ground truth, max over classes, mean over "
             f"filters, nats (upper bound H_b(1/K) = "
             f"{-(1 / args.num_classes) * __import__('math').log(1 / args.num_classes) - (1 - 1 / args.num_classes) * __import__('math').log(1 - 1 / args.num_classes):.3f}).", "",
             "| backbone | model | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for r in rows:
        vals = []
        for k, _ in cols:
            v = r.get(k)
            vals.append("-" if v is None else (f"{v:.0f}" if k in ("train_s", "best_epoch") else
                                               f"{v:.3f}" if k in ("mis", "p_max_mean") else f"{v:.1f}"))
        lines.append(f"| {r['backbone']} | {r['model']} | " + " | ".join(vals) + " |")
    lines += ["", "## Paper expectation vs this run (automatic checks)", ""]
    by = {}
    for r in rows:
        by.setdefault(r["backbone"], {})[r["model"]] = r
    for bb, d in by.items():
        if "STD" not in d or "PICNN" not in d:
            continue
        s, p = d["STD"], d["PICNN"]
        checks = [("models trained (ACC1 >= 1.5 x chance)", min(p["acc1"], s["acc1"]) >= 150.0 / args.num_classes),
                  ("ACC1 kept (|PICNN - STD| <= 3 points)", abs(p["acc1"] - s["acc1"]) <= 3.0),
                  ("ACC2 close to ACC1 (PICNN ACC1 - ACC2 <= 10 points)", p["acc1"] - p["acc2"] <= 10.0),
                  ("ACC2 higher than STD", p["acc2"] > s["acc2"]),
                  ("ACC3 lower than STD", p["acc3"] < s["acc3"]),
                  ("ACC3 low (<= 2 x chance)", p["acc3"] <= 200.0 / args.num_classes),
                  ("MIS higher than STD", p["mis"] > s["mis"])]
        lines.append(f"- **{bb}**: " + "; ".join(f"{t}: {'yes' if ok else '**no**'}" for t, ok in checks)
                     + f" (ACC1 {s['acc1']:.1f} -> {p['acc1']:.1f}, ACC2 {s['acc2']:.1f} -> {p['acc2']:.1f}, "
                       f"ACC3 {s['acc3']:.1f} -> {p['acc3']:.1f}, MIS {s['mis']:.3f} -> {p['mis']:.3f}).")
    lines += ["", "Paper (seed 003, Table 1, ResNet-18 etc. on CIFAR-10 / STL-10 / VOC-Part, ImageNet-pretrained, "
              "200 epochs): ACC1 comparable to STD, ACC2 slightly below ACC1, ACC3 far lower than STD, MIS much "
              "higher than STD (the table's numbers are images in the seed text, so only these signs are "
              "compared). Discussion and the investigation: `docs/picnn.md`.", "", "## Pictures", ""]
    for bb, (cam, pm) in pics.items():
        lines += [f"- {bb}: CAM of the true class from all / cluster / complement filters, STD and PICNN "
                  f"(paper Fig. 7 a/b/c; GT object contour in green): ![]({os.path.basename(cam)})",
                  f"- {bb}: P matrices: ![]({os.path.basename(pm)})"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _dm(args):
    from trainers.data import SyntheticShapesDataModule

    extra = {}
    if getattr(args, "object_scale", None):  # absent in the args of old picnn_run_*.json files
        extra = dict(object_scale=args.object_scale, num_distractors=args.distractors)
    dm = SyntheticShapesDataModule(num_classes=args.num_classes, image_size=args.image_size,
                                   train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                                   batch_size=args.batch_size, seed=args.seed, **extra)
    dm.setup("test")
    return dm


def collect_runs(out_dir):
    """Every ``picnn_run_<backbone>_<model>.json`` in ``out_dir`` (one per trained model; runs can be split
    over processes with ``--backbones``/``--runs`` and merged with ``--report-only``)."""
    import glob

    runs = []
    for f in sorted(glob.glob(os.path.join(out_dir, "picnn_run_*.json"))):
        with open(f) as fh:
            runs.append(json.load(fh))
    order = {"STD": 0, "PICNN": 1, "PICNN-Gumbel": 2}
    runs.sort(key=lambda r: (r["row"]["backbone"], order.get(r["row"]["model"], 9)))
    return runs


@torch.no_grad()
def diagnose(args):
    """Why MIS moves the way it does: per trained model, the MI matrix m[c, i] = MI(h_i; 1[y = c]) and
    - the share of filters whose most informative class is their P cluster's class (chance 1/K);
    - the mean MI of each filter with its own cluster's class;
    - the share of active filters (mean pooled activation > 1 % of the largest) and MIS over those only, to see
      whether near-dead filters drag MIS down."""
    import glob

    import numpy as np

    from models import create_model, load_weights
    from models.metrics.picnn import mutual_information_score

    dm = _dm(args)
    x = torch.cat([b["image"] for b in dm.test_dataloader()])
    y = torch.cat([b["label"] for b in dm.test_dataloader()])
    lines = ["# PICNN: what the filters learned (diagnostics)", "",
             f"Command: `python experiments/picnn.py {' '.join(sys.argv[1:])}`",
             f"(test split, {len(y)} images; models from `{args.workdir}`).", "",
             "| model | MIS | filters most informative about their own cluster's class (chance "
             f"{1 / args.num_classes:.2f}) | mean MI with own cluster's class | active filters | MIS over active filters |",
             "|---|---|---|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(args.workdir, "picnn_*.safetensors"))):
        bb, name = os.path.basename(path)[len("picnn_"):-len(".safetensors")].rsplit("_", 1)
        model = create_model("picnn", backbone=bb, num_classes=args.num_classes)
        load_weights(model, path)
        model.eval()
        pooled = torch.cat([model.evaluate_pathways(x[i:i + 100])["pooled"] for i in range(0, len(x), 100)])
        mis, m = mutual_information_score(pooled, y, args.num_classes, return_matrix=True)
        cluster = model.P.argmax(0).numpy()
        cols = np.arange(m.shape[1])
        active = (pooled.mean(0) > 0.01 * pooled.mean(0).max()).numpy()
        lines.append(f"| {bb} {name} | {mis:.3f} | {(m.argmax(0) == cluster).mean():.2f} | "
                     f"{m[cluster, cols].mean():.3f} | {active.mean():.2f} | {m.max(0)[active].mean():.3f} |")
    out = os.path.join(args.out, "picnn_diagnostics.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\nwrote {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.diagnose:
        return diagnose(args)
    if not (args.legacy or args.report_only):
        return main_seeds(args, argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    from models import create_model, load_weights, save_weights

    backbones = [b for b in args.backbones.split(",") if b]
    wanted = [r for r in args.runs.split(",") if r]
    specs = {"STD": (0.0, "bernoulli"), "PICNN": (args.lambda_int, "bernoulli"),
             "PICNN-Gumbel": (args.lambda_int, "gumbel")}
    if args.gumbel and "PICNN-Gumbel" not in wanted:
        wanted.append("PICNN-Gumbel")
    dm = None
    if not args.report_only:
        dm = _dm(args)
        dm.setup("fit")
        for bb in backbones:
            for name in wanted:
                lam, sampler = specs[name]
                print(f"[picnn] training {bb} {name} (lambda={lam}, sampler={sampler})", flush=True)
                t0 = time.perf_counter()
                model, info = train_one(args, dm, bb, lam, sampler)
                res = evaluate(model, dm, args)
                row = {"backbone": bb, "model": name, **info, **res}
                print("[picnn] " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in row.items()), flush=True)
                wpath = os.path.join(args.workdir, f"picnn_{bb}_{name}.safetensors")
                save_weights(model, wpath)
                cmd = "python experiments/picnn.py " + " ".join(sys.argv[1:] if argv is None else argv)
                with open(os.path.join(args.out, f"picnn_run_{bb}_{name}.json"), "w") as f:
                    json.dump({"row": row, "weights": wpath, "args": vars(args), "wall_s": time.perf_counter() - t0,
                               "command": cmd.strip(), "model_kwargs": {"backbone": bb, "sampler": sampler,
                                                        "backbone_kwargs": dict(args.backbone_kwargs)}},
                              f, indent=1)
    runs = collect_runs(args.out)
    if not runs:
        raise SystemExit(f"no picnn_run_*.json in {args.out}: train first (python experiments/picnn.py).")
    rargs = argparse.Namespace(**{**vars(args), **runs[0]["args"], "out": args.out})
    pics = {}
    by_bb = {}
    for r in runs:
        by_bb.setdefault(r["row"]["backbone"], {})[r["row"]["model"]] = r
    for bb, d in by_bb.items():
        if not ("STD" in d and "PICNN" in d and all(os.path.isfile(d[k]["weights"]) for k in ("STD", "PICNN"))):
            continue
        dm = dm or _dm(rargs)
        models_by_name = {}
        for name in ("STD", "PICNN"):
            m = create_model("picnn", num_classes=rargs.num_classes, **d[name]["model_kwargs"])
            load_weights(m, d[name]["weights"], verbose=False)
            models_by_name[name] = m.eval()
        pics[bb] = save_pictures(models_by_name, dm, bb, rargs)
    cmds = sorted({r["command"] for r in runs})
    wall = sum(r["wall_s"] for r in runs)
    path = write_report([r["row"] for r in runs], pics, rargs, " ; ".join(f"`{c}`" for c in cmds), wall)
    print(f"[picnn] wrote {path}")
    return runs


@torch.no_grad()
def per_image_eval(model, loader, args, seed: int) -> dict:
    """Per-image correctness of ACC1, ACC2 (stochastic official = primary, mean of ``--draws`` seeded draws;
    deterministic = secondary), ACC3 (stochastic official = primary: mask ~ Ber(P[y]) of the true class, its
    complement kept, mean of the same draws; deterministic label-free and with the true label's cluster =
    secondary), and the pooled filter responses for MIS (GT labels = spec; predicted labels = the seed text's
    "prediction on classes" variant). The backbone runs once per batch; each draw re-samples only the masks
    (``interpretation_pathway`` on the same ``H``, as ``forward_train`` does)."""
    from models.metrics.picnn import mutual_information_score
    from models.picnn import bernoulli_straight_through

    model.eval()
    keys = ("acc1", "acc2", "acc3", "acc3_label", "acc2_sampled", "acc3_sampled")
    out = {k: [] for k in keys}
    pooled, labels, preds = [], [], []
    gens = [torch.Generator().manual_seed(seed * 1000 + d) for d in range(args.draws)]
    for b in loader:
        x, y = b["image"], b["label"]
        ev = model.evaluate_pathways(x, y)
        out["acc1"] += (ev["logits"].argmax(1) == y).float().mul(100).tolist()
        out["acc2"] += (ev["logits_cluster"].argmax(1) == y).float().mul(100).tolist()
        out["acc3"] += (ev["logits_complement"].argmax(1) == y).float().mul(100).tolist()
        out["acc3_label"] += (ev["logits_complement_label"].argmax(1) == y).float().mul(100).tolist()
        h, P = model.features(x), model.P
        s2, s3 = [], []
        for g in gens:
            s2.append(model.interpretation_pathway(h, ev["logits"], g)["logits_int"].argmax(1) == y)
            z = bernoulli_straight_through(P[y], g)  # official ACC3: the true class's row, complement kept
            s3.append(model.head(h, 1 - z).argmax(1) == y)
        out["acc2_sampled"] += torch.stack(s2).float().mean(0).mul(100).tolist()
        out["acc3_sampled"] += torch.stack(s3).float().mean(0).mul(100).tolist()
        pooled.append(ev["pooled"])
        labels.append(y)
        preds.append(ev["logits"].argmax(1))
    h, y, yp = torch.cat(pooled), torch.cat(labels), torch.cat(preds)
    out["mis"] = float(mutual_information_score(h, y, args.num_classes))
    out["mis_pred"] = float(mutual_information_score(h, yp, args.num_classes))
    out["p_max_mean"] = float(model.P.detach().max(0).values.mean())
    return out


def main_seeds(args, argv):
    """STD vs PICNN (and the lambda sweep) over ``--seeds``, per-image values, paired intervals and verdicts."""
    from models import save_weights

    if args.quick:
        args.train_size, args.val_size, args.test_size, args.epochs, args.draws = 96, 32, 48, 1, 2
        args.warmup = min(args.warmup, 2)
        args.lambdas = "5" if args.lambdas else ""
    torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    cache = H.RunCache(args.cache_dir, enabled=not args.no_cache)
    backbones = [b for b in args.backbones.split(",") if b]
    sweep = [float(v) for v in args.lambdas.split(",") if v]
    arms = []
    for i, bb in enumerate(backbones):
        arms += [(bb, 0.0), (bb, args.lambda_int)] + ([(bb, lam) for lam in sweep if lam != args.lambda_int]
                                                      if i == 0 else [])
    keys = ("num_classes", "image_size", "train_size", "val_size", "test_size", "epochs", "batch_size", "lr",
            "p_lr", "draws", "seed", "backbone_kwargs", "object_scale", "distractors", "warmup", "precision")
    t0 = time.time()
    runs = {}
    dm = None
    for seed in args.seeds:
        for bb, lam in arms:
            cfg = dict(kind="picnn_run", version=3, backbone=bb, lambda_int=lam, train_seed=seed,
                       **{k: getattr(args, k) for k in keys})

            def fn():
                nonlocal dm
                dm = dm or _dm(args)
                dm.setup("fit")
                a = argparse.Namespace(**{**vars(args), "seed": seed})  # training seed (data stay args.seed)
                print(f"[picnn] {bb} lambda={lam:g} seed {seed}", flush=True)
                model, info = train_one(a, dm, bb, lam)
                t_eval = time.perf_counter()
                res = per_image_eval(model, dm.test_dataloader(), args, seed)
                info["eval_s"] = time.perf_counter() - t_eval
                print(f"[picnn]   ACC1 {np.mean(res['acc1']):.1f}  ACC2 sampled {np.mean(res['acc2_sampled']):.1f} / "
                      f"det. {np.mean(res['acc2']):.1f}  ACC3 sampled {np.mean(res['acc3_sampled']):.1f} / det. "
                      f"{np.mean(res['acc3']):.1f}  MIS {res['mis']:.3f} (pred {res['mis_pred']:.3f})  train "
                      f"{info['train_s']:.0f} s, eval {info['eval_s']:.0f} s", flush=True)
                save_weights(model, os.path.join(args.workdir, f"picnn_{bb}_lam{lam:g}_seed{seed}.safetensors"))
                return {**info, **res}

            runs.setdefault((bb, lam), []).append(cache.get_or_run(cfg, fn))
    name = lambda lam: "STD" if lam == 0 else f"PICNN λ={lam:g}"  # noqa: E731
    per_image = ("acc1", "acc2_sampled", "acc3_sampled", "acc2", "acc3", "acc3_label")
    scalars = ("mis", "mis_pred", "p_max_mean")
    rows, claims = [], []
    for (bb, lam), rs in runs.items():
        for k in per_image:
            rows.append(H.summary_row(name(lam), bb, "-", k, [float(np.mean(r[k])) for r in rs]))
        for k in scalars:
            rows.append(H.summary_row(name(lam), bb, "-", k, [r[k] for r in rs]))
        std = runs.get((bb, 0.0))
        if lam == 0 or not std:
            continue
        n = min(len(rs), len(std))
        main_arm = lam == args.lambda_int
        for k, d, what in (("acc2_sampled", +1, "ACC2 (official stochastic, primary) above STD"),
                           ("acc3_sampled", -1, "ACC3 (official stochastic, primary) below STD"),
                           ("acc1", +1, "ACC1 at least STD's (paper: comparable)"),
                           ("acc2", +1, "ACC2 deterministic (secondary) above STD"),
                           ("acc3", -1, "ACC3 deterministic label-free (secondary) below STD"),
                           ("acc3_label", -1, "ACC3 deterministic with the true label's cluster below STD")):
            claims.append(H.claim_row(f"{name(lam)}: {what} ({bb})", k, [r[k] for r in rs[:n]],
                                      [r[k] for r in std[:n]], d,
                                      primary=main_arm and k in ("acc2_sampled", "acc3_sampled")))
        for k, what in (("mis", "MIS (GT labels) above STD"), ("mis_pred", "MIS (predicted labels) above STD")):
            claims.append(H.claim_row(f"{name(lam)}: {what} ({bb})", k, [[r[k]] for r in rs[:n]],
                                      [[r[k]] for r in std[:n]], +1, primary=main_arm and k == "mis"))
    secs = [(f"{name(lam)} ({bb})", [r.get("train_s", float("nan")) for r in rs], [r.get("eval_s", float("nan"))
                                                                                 for r in rs]) for (bb, lam), rs in runs.items()]
    times_md = ("\n## Wall time per run (s, mean over seeds; training includes per-epoch validation)\n\n| arm | train | "
                "eval (ACC1-3 with draws, MIS) |\n|---|---|---|\n" + "".join(f"| {a} | {np.nanmean(t):.0f} | "
                                                                  f"{np.nanmean(e):.0f} |\n" for a, t, e in secs))
    cmd = "python experiments/picnn.py " + " ".join(argv if argv is not None else sys.argv[1:])
    intro = (f"Command: `{cmd.strip()}` ({(time.time() - t0) / 60:.1f} min in this invocation; cached runs are not "
             f"re-trained). {'**QUICK SMOKE RUN: numbers are meaningless.** ' if args.quick else ''}\n\n"
             f"Synthetic shapes (the main job's data: K = {args.num_classes}, {args.image_size} px, object scale "
             f"{args.object_scale}, {args.distractors} distractors), train {args.train_size} / val "
             f"{args.val_size} / test {args.test_size}; backbone {', '.join(backbones)} with timm kwargs "
             f"`{json.dumps(args.backbone_kwargs)}` from scratch, target layer = a new 3x3 conv with N = "
             f"round(12.8 K) = {round(12.8 * args.num_classes)} filters on its last stage; {args.epochs} epochs, "
             f"batch {args.batch_size}, Adam lr {args.lr} wd 1e-4 (P lr {args.p_lr or args.lr}), "
             + (f"{args.warmup}-step linear warm-up then per-step cosine to lr·1e-3 (the main job's schedule)"
                if args.warmup else "per-epoch cosine to lr·1e-3") +
             f", training precision {args.precision} (evaluation fp32); checkpoint selected on val ACC1; training "
             f"seeds {args.seeds} (data seed {args.seed}). STD = lambda 0 (P frozen at its random init). Accuracies "
             f"in % on the test split. **Primary = the spec's official stochastic ACC2 and ACC3** (mean of "
             f"{args.draws} seeded draws per image; ACC2: pseudo-label ~ Cat(softmax(y1)), mask ~ Ber(P[pseudo-label]); "
             f"ACC3: mask ~ Ber(P[y]) of the true class, prediction from the complementary filters); "
             f"`acc2` = deterministic argmax-partition ACC2 (secondary); "
             f"`acc3` deterministic label-free, `acc3_label` with the true label's cluster. MIS (nats, kNN): GT "
             f"labels (spec) and `mis_pred` with the network's predictions (the seed text's \"prediction on "
             f"classes\"); MIS intervals are over seeds only. λ sweep (paper Fig. 6): {sweep} on {backbones[0]}.")
    H.write_report(os.path.join(args.out, "picnn"), rows, claims, title="PICNN (paper Table 1, Fig. 6) with seeds, "
                   "intervals and verdicts", intro=intro, meta=dict(args=vars(args)),
                   metrics=list(per_image),
                   extra_md="## MIS (nats) and mean max_k P (3 digits; mean over seeds [95 % t-interval over seeds])"
                            "\n\n" + H.rows_markdown([r for r in rows if r["metric"] in scalars], list(scalars),
                                                       digits=3) + times_md)
    print(f"[picnn] wrote {os.path.join(args.out, 'picnn.md')} / .json")
    return runs


if __name__ == "__main__":
    main()
