"""One leaderboard (issue 14 item 6): every mechanism trained and evaluated under one protocol.

    python experiments/leaderboard.py                                   # default protocol, seeds 0,1,2
    python experiments/leaderboard.py --mechanisms baseline,picnn --seeds 0,1 --epochs 3
    python experiments/leaderboard.py --quick --out /tmp/lb            # CI smoke test (< 1 min, meaningless numbers)

Protocol (same for every mechanism): the embedded shapes benchmark (data seed 0, the same train / test images for
every mechanism and seed), the same optimiser (AdamW, lr 2e-3, wd 0.05, cosine), epochs and batch size; training
seeds ``--seeds`` (init, order, noise). Each mechanism is trained with its own LightningModule (its own loss and
hooks) and its own hyper-parameters from ``configs/<mechanism>/synthetic.yaml`` (``SPECS`` below). CA-Stream trains
its stream on top of the baseline of the same seed (backbone and classifier frozen, as in the paper).

Evaluated on the same first ``--eval-images`` test images: accuracy (all test images), AD/AG/AI,
insertion/deletion, pointing game, energy pointing game and IoU (``models.metrics.run_interpretability``, ground-
truth class) of the intrinsic map and of Grad-CAM at the deepest tap that is >= 7x7
(``harness.explain_layer_for``), and of the controls (random, centred Gaussian, Fake-CAM, colour contrast, edge
energy, Grad-CAM and the intrinsic map of a re-initialised copy); training-step (forward + backward of the
mechanism's training loss) and inference time as ratios to the plain backbone, measured in the same process.

Every finished (mechanism, seed) run is cached as JSON (``--cache-dir``; trained baseline weights as safetensors for
CA-Stream), so the command resumes and accumulates seeds. Writes ``docs/leaderboard.md`` (+ ``leaderboard.png``) and
``docs/results/leaderboard.json``: rows ``mechanism, backbone, explainer, metric, mean, ci95_low, ci95_high,
n_seeds, control`` and paired claims (mechanism - baseline on the same images, ``models.metrics.stats``).

A new mechanism joins with an entry in ``SPECS`` (trainer class path, its kwargs); registered models without one
are listed in the report as "not in the protocol yet".
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments import harness as H  # noqa: E402

VIT = "deit_tiny_patch16_224"
#: mechanism -> how to train it under the protocol (trainer class path, trainer kwargs, model kwargs, backbone)
SPECS = {
    "baseline": dict(trainer="trainers.classification.ClassificationModule"),
    "picnn": dict(trainer="trainers.picnn.PICNNModule", init=dict(lambda_int=2.0, int_loss_samples="matched"),
                  model_kwargs=dict(target_layer="new", p_param="softmax", sampler="bernoulli")),
    "guided_gradients": dict(trainer="trainers.guided_gradients.GuidedGradientsModule",
                             init=dict(lam=7.5e-3, error="cosine")),
    "ca_stream": dict(trainer="trainers.ca_stream.CAStreamModule", init=dict(train_mode="stream"), from_baseline=True,
                      model_kwargs=dict(start_stage=0, class_specific=False, proj_kv=False)),
    # eX-ViT: an E-MHA + AttE head on the trained ViT baseline of the same seed (issue 14: "an eX-ViT head on a
    # trained ViT"; the paper also starts from a trained DeiT): its encoder starts from the baseline's, the
    # attribute branch and classifier fresh, then ``recipe`` epochs of fine-tuning (encoder lr 5e-4). 10 epochs = the
    # ViT baseline's own budget (session 7; 4 epochs left eX-ViT at 69.9 %, below the 80 % bar: E-MHA replaces the
    # trained softmax attention in every block, docs/leaderboard_notes.md)
    "exvit": dict(trainer="trainers.exvit.ExViTModule", backbone=VIT, from_baseline="encoder", recipe=dict(epochs=10),
                  init=dict(alpha=0.5, beta=1.0, gamma=0.0, momentum=0.99, encoder_lr=5e-4),
                  model_kwargs=dict(num_attributes=8, attr_channels=64, attr_hidden=192, fuse_layers=3,
                                    drop_path_rate=0.1)),
}
#: mechanisms measured on their own benchmark by their own experiment (same harness statistics: seeds, t-intervals,
#: paired claims, verdicts by code): the leaderboard imports their accuracy rows and claims instead of retraining them
#: (MAXNet is 3D: the MNI atrophy benchmark; X-Pruner prunes a trained ViT at FLOPs budgets)
IMPORTED = {"maxnet": os.path.join(ROOT, "docs", "results", "maxnet.json"),
            "xpruner": os.path.join(ROOT, "docs", "results", "xpruner.json")}
#: mechanisms with an entry in SPECS whose own experiment's results are shown instead when this invocation trained
#: none of their runs (e.g. ``--mechanisms baseline,picnn,guided_gradients,ca_stream`` on a tight compute budget)
FALLBACK = {"exvit": os.path.join(ROOT, "docs", "results", "exvit.json")}
#: trainer classes the leaderboard may build (an allow-list: never a class path read from a file)
TRAINERS = {s["trainer"] for s in SPECS.values()}
METRICS = ("ad", "ag", "ai", "ins", "del", "pg", "epg", "miou")
HIGHER = {"acc": True, "ad": False, "ag": True, "ai": True, "ins": True, "del": False, "pg": True, "epg": True,
          "miou": True}
LABELS = {"acc": "Acc", "ad": "AD↓", "ag": "AG↑", "ai": "AI↑", "ins": "Ins↑", "del": "Del↓", "pg": "PG↑",
          "epg": "EPG↑", "miou": "IoU↑", "train_step_ratio": "train step ×", "inference_ratio": "inference ×"}
CONTROLS = ("random", "gaussian", "fakecam", "colorcontrast", "edges", "untrained", "untrained_intrinsic")
EXPLAINED = ("intrinsic", "gradcam")
#: post-hoc explainers of issue 18 evaluated on one mechanism only (their claim: better than the explainer they wrap,
#: paired on the same model and images). RSP supports plain CNNs only (no ViT / attention blocks).
EXTRA_EXPLAINERS = {"baseline": ("ucag:gradcam", "rsp")}
EXTRA_CLAIMS = {"ucag:gradcam": "gradcam", "rsp": "gradcam"}


def extra_explainers(mech: str, backbone: str) -> tuple:
    """``EXTRA_EXPLAINERS`` of a mechanism on a backbone: none on the ViT (RSP needs a CNN; UCAG is compared on the
    CNN baseline, where issue 18 measured it)."""
    return () if backbone == VIT else tuple(EXTRA_EXPLAINERS.get(mech, ()))


#: the ViT's own recipe (configs/baseline/synthetic_vit.yaml): a ViT stalls at chance with the CNNs' lr 3e-3 and needs
#: more epochs (6 epochs: 79.7 % mean test over 3 seeds, validation still rising; 10 epochs keep every seed above the
#: 80 % bar); every mechanism on the ViT trains with it, unless its spec's ``recipe`` overrides a value
VIT_RECIPE = dict(lr=1e-3, epochs=10)


def backbone_kwargs_for(backbone: str, args) -> dict:
    if backbone == VIT:  # DeiT-tiny-shaped, 8x8 tokens at 64 px, convolutional stem (models/vit_stem.py)
        return dict(img_size=args.image_size, patch_size=args.vit_patch, embed_dim=192, num_heads=3, depth=4,
                    conv_stem=[24, 48, 96])
    return dict(args.backbone_kwargs)


def recipe_for(backbone: str, args, mech: str = "baseline") -> dict:
    """lr and epochs of a run (``VIT_RECIPE`` for the ViT, else the command line's; then the mechanism's
    ``recipe`` overrides, outside ``--quick``)."""
    if args.quick:
        return dict(lr=args.lr, epochs=args.epochs)
    rec = dict(VIT_RECIPE) if backbone == VIT else dict(lr=args.lr, epochs=args.epochs)
    rec.update(SPECS.get(mech, {}).get("recipe", {}))
    return rec


def data_kwargs(args) -> dict:
    return dict(num_classes=args.num_classes, image_size=args.image_size, object_scale=[0.2, 0.32],
                num_distractors=2, seed=0)


def run_config(mech: str, seed: int, backbone: str, args) -> dict:
    """Everything that defines one run (its cache key)."""
    spec = SPECS[mech]
    cfg = dict(kind="leaderboard_run", version=2, precision=args.precision, mechanism=mech, seed=int(seed), backbone=backbone,
                backbone_kwargs=backbone_kwargs_for(backbone, args), spec=spec, data=data_kwargs(args),
                train_size=args.train_size, test_size=args.test_size, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, eval_images=args.eval_images, steps=args.steps,
                min_explain_size=args.min_explain_size, timing_reps=args.timing_reps)
    if backbone == VIT or spec.get("recipe"):
        cfg.update(recipe_for(backbone, args, mech))
    return cfg


def _trainer_class(path: str):
    if path not in TRAINERS:
        raise ValueError(f"trainer {path!r} is not in the leaderboard's allow-list {sorted(TRAINERS)}.")
    mod, _, name = path.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def build_module(mech: str, backbone: str, args, checkpoint_path=None):
    spec = SPECS[mech]
    mk = dict(backbone=backbone, pretrained=False, backbone_kwargs=backbone_kwargs_for(backbone, args))
    mk.update(spec.get("model_kwargs", {}))
    kw = dict(model=mech, model_kwargs=mk, num_classes=args.num_classes, multilabel=False,
              optimizer={"name": "adamw", "lr": recipe_for(backbone, args, mech)["lr"], "weight_decay": 0.05},
              scheduler={"name": "cosine", "interval": "step", "warmup": args.warmup, "eta_min": 1e-5})
    kw.update(spec.get("init", {}))
    if checkpoint_path and spec.get("from_baseline") == "encoder":  # backbone keys only (strictly checked)
        mk["backbone_weights"] = checkpoint_path
    elif checkpoint_path:
        kw["checkpoint_path"] = checkpoint_path
    return _trainer_class(spec["trainer"])(**kw)


def datasets(args):
    from trainers.data.synthetic import SyntheticShapes

    kw = data_kwargs(args)
    return SyntheticShapes("train", size=args.train_size, **kw), SyntheticShapes("test", size=args.test_size, **kw)


def fit(module, train_set, seed: int, args, epochs: int) -> float:
    import pytorch_lightning as pl

    gen = H.seed_everything(seed)
    pl.seed_everything(seed, workers=False, verbose=False)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen,
                                         drop_last=True, num_workers=0)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, precision=args.precision,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, inference_mode=False,
                         default_root_dir=os.path.join(args.cache_dir, "lightning"))
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    return time.time() - t0


def accuracy(model, test_set) -> list:
    model.eval()
    loader = torch.utils.data.DataLoader(test_set, batch_size=100, shuffle=False)
    out = []
    with torch.no_grad():
        for b in loader:
            out += (model(b["image"]).argmax(1) == b["label"]).float().tolist()
    return out


def _median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def costs(module, mech: str, backbone: str, batch: dict, args) -> dict:
    """Median ms of a training step (forward + backward of the mechanism's training loss) and of inference, for the
    mechanism and for a plain ``baseline`` on the same backbone, interleaved in this process."""
    plain = build_module("baseline", backbone, args)
    plain.train()
    module.train()

    def train_step(m):
        def fn():
            out = m.compute_loss(batch, "train")
            out["loss"].backward()
            m.zero_grad(set_to_none=True)
        return fn

    def infer(m):
        def fn():
            with torch.no_grad():
                m.model(batch["image"])
        return fn

    res = {}
    for name, m in (("mech", module), ("plain", plain)):
        train_step(m)()  # warm-up
    res["train_ms"] = 1000 * _median_time(train_step(module), args.timing_reps)
    res["plain_train_ms"] = 1000 * _median_time(train_step(plain), args.timing_reps)
    module.eval()
    plain.eval()
    infer(module)()
    infer(plain)()
    res["infer_ms"] = 1000 * _median_time(infer(module), args.timing_reps)
    res["plain_infer_ms"] = 1000 * _median_time(infer(plain), args.timing_reps)
    res["train_step_ratio"] = res["train_ms"] / res["plain_train_ms"]
    res["inference_ratio"] = res["infer_ms"] / res["plain_infer_ms"]
    return res


def evaluate(model, test_set, args, mech: str = "", backbone: str = "") -> dict:
    from models.explainers import create_explainer
    from models.metrics import run_interpretability

    layer = H.explain_layer_for(model, args.image_size, args.min_explain_size)
    size = H.tap_sizes(model, args.image_size)[layer] if layer is not None else []  # None: cam_target_layer()
    sub = torch.utils.data.Subset(test_set, list(range(min(args.eval_images, len(test_set)))))
    loader = torch.utils.data.DataLoader(sub, batch_size=args.eval_batch, shuffle=False)
    explainers = ["intrinsic", "gradcam", "random", "gaussian", "fakecam", "colorcontrast", "edges",
                  ("untrained", create_explainer("untrained", model, base="gradcam", target_layers=layer)),
                  ("untrained_intrinsic", create_explainer("untrained", model, base="intrinsic"))]
    explainers += list(extra_explainers(mech, backbone))
    res = run_interpretability(model, loader, explainers, metrics=METRICS, progress=False, sanity=False,
                               steps=args.steps, target_layers=layer, target="label")
    return dict(explain_layer=layer, explain_layer_size=list(size), means={k: dict(v) for k, v in res.items()},
                per_item=res.per_item, maps=res.meta.get("maps", {}), meta={k: res.meta[k] for k in
                                                                             ("n_images", "steps", "controls")})


def baseline_weights_path(seed: int, backbone: str, args) -> str:
    return os.path.join(args.cache_dir, f"{H.config_hash(run_config('baseline', seed, backbone, args))}.safetensors")


def train_and_eval(mech: str, seed: int, backbone: str, args, cache: H.RunCache) -> dict:
    from models.weights import save_weights

    train_set, test_set = datasets(args)
    ckpt = None
    if SPECS[mech].get("from_baseline"):
        ckpt = baseline_weights_path(seed, backbone, args)
        if not os.path.exists(ckpt):  # the baseline of this seed must exist with its weights
            if cache.enabled and cache.get(run_config("baseline", seed, backbone, args)) is not None:
                os.remove(cache.path(run_config("baseline", seed, backbone, args)))
            get_run("baseline", seed, backbone, args, cache)
    H.seed_everything(seed)
    module = build_module(mech, backbone, args, checkpoint_path=ckpt)
    own = baseline_weights_path(seed, backbone, args)
    if mech == "baseline" and cache.enabled and os.path.exists(own):
        # a baseline whose training finished but whose evaluation did not (killed, or an explainer failed): its
        # weights were saved right after training (same config hash), so it is evaluated, not retrained
        from models.weights import load_weights

        load_weights(module.model, own, verbose=False)
        train_s = None
        print(f"[leaderboard]   baseline ({backbone}) seed {seed}: trained weights found ({own}), evaluating them",
              flush=True)
    else:
        train_s = fit(module, train_set, seed, args, recipe_for(backbone, args, mech)["epochs"])
    model = module.model.eval()
    if mech == "baseline" and train_s is not None:
        os.makedirs(args.cache_dir, exist_ok=True)
        save_weights(model, baseline_weights_path(seed, backbone, args))
    correct = accuracy(model, test_set)
    ev = evaluate(model, test_set, args, mech, backbone)
    batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=False)))
    cost = costs(module, mech, backbone, batch, args)
    return dict(mechanism=mech, seed=seed, backbone=backbone, acc=100.0 * float(np.mean(correct)), correct=correct,
                train_seconds=train_s, costs=cost, **ev)


def get_run(mech: str, seed: int, backbone: str, args, cache: H.RunCache) -> dict:
    cfg = run_config(mech, seed, backbone, args)
    hit = cache.get(cfg)
    if hit is not None:
        return hit
    print(f"[leaderboard] training {mech} ({backbone}) seed {seed} ...", flush=True)
    t0 = time.time()
    res = train_and_eval(mech, seed, backbone, args, cache)
    cache.put(cfg, res, time.time() - t0)
    print(f"[leaderboard]   {mech} seed {seed}: acc {res['acc']:.1f} % in {time.time() - t0:.0f} s", flush=True)
    return json.loads(json.dumps(H._jsonable(res)))


# ---------------------------------------------------------------------------------------------- aggregation
def _vals(v):
    return np.array([np.nan if x is None else x for x in v], dtype=np.float64)


def aggregate(runs: dict) -> tuple:
    """``runs[(mech, backbone)] = [run per seed]`` -> (rows, claims)."""
    rows, claims = [], []
    for (mech, bb), rs in runs.items():
        rows.append(H.summary_row(mech, bb, "-", "acc", [r["acc"] for r in rs]))
        for k in ("train_step_ratio", "inference_ratio"):
            rows.append(H.summary_row(mech, bb, "-", k, [r["costs"][k] for r in rs]))
        for e in EXPLAINED + CONTROLS + extra_explainers(mech, bb):
            for m in METRICS:
                vals = [r["means"].get(e, {}).get(m) for r in rs]
                nat = rs[0].get("maps", {}).get(e, {}).get("native_resolution") if rs[0].get("maps") else None
                rows.append(H.summary_row(mech, bb, e, m, vals, control=e in CONTROLS,
                                          native_resolution=nat))
        for e in extra_explainers(mech, bb):  # issue 18: the wrapper against the explainer it wraps
            ref = EXTRA_CLAIMS[e]
            for m in METRICS:
                a = [_vals(r["per_item"].get(e, {}).get(m, [])) for r in rs]
                b = [_vals(r["per_item"].get(ref, {}).get(m, [])) for r in rs]
                if all(len(x) and len(x) == len(y) for x, y in zip(a, b)):
                    claims.append(H.claim_row(f"{e} better on {LABELS[m]} than {ref} ({mech}, {bb})", m, a, b,
                                              +1 if HIGHER[m] else -1, mechanism=mech, backbone=bb, explainer=e,
                                              primary=m in ("ag", "del")))
        base = runs.get(("baseline", bb))
        if mech == "baseline" or not base:
            continue
        n = min(len(rs), len(base))
        claims.append(H.claim_row(f"{mech} keeps or improves accuracy ({bb})", "acc",
                                  [100 * _vals(r["correct"]) for r in rs[:n]],
                                  [100 * _vals(b["correct"]) for b in base[:n]], +1, mechanism=mech, backbone=bb,
                                  explainer="-", primary=True))
        for e in EXPLAINED:
            for m in METRICS:
                a = [_vals(r["per_item"].get(e, {}).get(m, [])) for r in rs[:n]]
                b = [_vals(x["per_item"].get(e, {}).get(m, [])) for x in base[:n]]
                if not all(len(x) and len(x) == len(y) for x, y in zip(a, b)):
                    continue
                claims.append(H.claim_row(f"{mech} {e} map better on {LABELS[m]} than baseline {e} ({bb})", m, a, b,
                                          +1 if HIGHER[m] else -1, mechanism=mech, backbone=bb, explainer=e,
                                          primary=e == "intrinsic" and m in ("ag", "del")))
    return rows, claims


def control_verdicts(rows) -> list:
    out = []
    for r in rows:
        if r["explainer"] in EXPLAINED and r["metric"] in METRICS:
            out.append(dict(mechanism=r["mechanism"], backbone=r["backbone"], explainer=r["explainer"],
                            metric=r["metric"], beats_best_control=H.beats_best_control(rows, r, HIGHER[r["metric"]])))
    return out


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    get = {(r["mechanism"], r["backbone"], r["explainer"], r["metric"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("ag", "del")):
        for (mech, bb, e, m), r in get.items():
            if m != "acc":
                continue
            for expl, marker in (("intrinsic", "o"), ("gradcam", "s")):
                f = get.get((mech, bb, expl, metric))
                if f is None or f["mean"] is None or (isinstance(f["mean"], float) and math.isnan(f["mean"])):
                    continue
                xerr = None if f["ci95_low"] is None or math.isnan(r["ci95_low"]) else \
                    [[r["mean"] - r["ci95_low"]], [r["ci95_high"] - r["mean"]]]
                yerr = None if f["ci95_low"] is None or math.isnan(f["ci95_low"]) else \
                    [[f["mean"] - f["ci95_low"]], [f["ci95_high"] - f["mean"]]]
                ax.errorbar(r["mean"], f["mean"], xerr=xerr, yerr=yerr, fmt=marker, capsize=3,
                            label=f"{mech} / {expl}")
        for c in ("random", "gaussian", "colorcontrast"):
            f = get.get(("baseline", next(iter({k[1] for k in get})), c, metric))
            if f is not None and f["mean"] is not None and not math.isnan(f["mean"]):
                ax.axhline(f["mean"], ls=":", lw=1, color="grey")
                ax.text(ax.get_xlim()[0], f["mean"], f" {c} (baseline)", fontsize=6, color="grey", va="bottom")
        ax.set_xlabel("test accuracy (%)")
        ax.set_ylabel(LABELS[metric] + " (×100)")
        ax.set_title(f"accuracy vs {LABELS[metric]}; bars: 95 % CI over seeds")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=6, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def imported_results(trained=()) -> dict:
    """``{mechanism: {"source", "rows", "claims"}}`` from each ``IMPORTED`` experiment JSON that exists (accuracy-like
    rows and every claim, tagged with their source file), and from ``FALLBACK`` for mechanisms not in ``trained``."""
    out = {}
    sources = dict(IMPORTED, **{m: p for m, p in FALLBACK.items() if m not in set(trained)})
    for mech, path in sources.items():
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        src = os.path.relpath(path, ROOT)
        rows = [dict(r, source=src) for r in data.get("rows", []) if str(r.get("metric", "")).startswith("acc")
                or r.get("metric") == "FLOPs %"]
        claims = [dict(c, mechanism=c.get("mechanism", mech), source=src) for c in data.get("claims", [])]
        out[mech] = dict(source=src, rows=rows, claims=claims)
    return out


def write_outputs(rows, claims, ctrl, runs, args, skipped, wall) -> None:
    imported = {} if args.quick else imported_results({m for m, _ in runs})
    meta = dict(protocol=dict(image_size=args.image_size, num_classes=args.num_classes, train_size=args.train_size,
                              test_size=args.test_size, eval_images=args.eval_images, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, optimizer=f"adamw wd 0.05, {args.warmup}-step warm-up, per-step cosine",
                              precision=args.precision,
                              steps=args.steps, min_explain_size=args.min_explain_size, backbone=args.backbone,
                              backbone_kwargs=args.backbone_kwargs),
                seeds=args.seeds, quick=args.quick, not_in_protocol=skipped, wall_seconds=round(wall, 1),
                failed=getattr(args, "extra_md", ""),
                explain_layers={f"{m}/{b}": [r["explain_layer"] for r in rs] for (m, b), rs in runs.items()},
                command=" ".join(["python", "experiments/leaderboard.py"] + sys.argv[1:]),
                schema="rows: mechanism, backbone, explainer, metric, mean, ci95_low, ci95_high, n_seeds, control; "
                       "mean over seeds, t-interval over seeds (NaN with one seed); claims: paired mechanism - "
                       "baseline on the same images (models.metrics.stats.paired_diff_across_seeds)")
    H.atomic_write_json(args.json, dict(meta=meta, rows=rows, claims=claims, beats_best_control=ctrl,
                                        imported={m: dict(source=v["source"]) for m, v in imported.items()},
                                        imported_rows=[r for v in imported.values() for r in v["rows"]],
                                        imported_claims=[c for v in imported.values() for c in v["claims"]]))
    png = os.path.splitext(args.md)[0] + ".png"
    plot(rows, png)
    main = [r for r in rows if r["explainer"] == "-"]
    md = ["# Leaderboard: every mechanism under one protocol", "",
          "Generated by `experiments/leaderboard.py` (do not edit by hand). " +
          ("**QUICK SMOKE RUN: numbers are meaningless.** " if args.quick else "") +
          f"Command: `{meta['command']}`; wall time of this invocation {wall / 60:.1f} min (cached runs are "
          "not re-trained).", "",
          f"Protocol: shapes benchmark, {args.num_classes} classes, {args.image_size} px, {args.train_size} training "
          f"images, {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr:g} ({args.warmup}-step warm-up, per-step cosine, {args.precision}), seeds "
          f"{args.seeds}; interpretability on the first {args.eval_images} test images (ground-truth class, "
          f"insertion/deletion with {args.steps} steps); Grad-CAM at the deepest tap >= {args.min_explain_size}x"
          f"{args.min_explain_size}. " + ("" if args.quick else
          f"ViT rows ({VIT}): AdamW lr {VIT_RECIPE['lr']:g}, {VIT_RECIPE['epochs']} epochs; "
          "mechanisms with a `from_baseline` start from the same seed's trained baseline (eX-ViT: its encoder, "
          f"then {recipe_for(VIT, args, 'exvit')['epochs']} epochs at encoder lr "
          f"{SPECS['exvit']['init']['encoder_lr']:g}; CA-Stream: the frozen CNN baseline). ") +
          "Mean over seeds [95 % t-interval over seeds; '(no CI)' with one seed].", "",
          f"![accuracy vs faithfulness]({os.path.basename(png)})", "",
          "## Accuracy and cost (ratios to the plain backbone, same process)", "",
          H.rows_markdown(main, ["acc", "train_step_ratio", "inference_ratio"], metric_labels=LABELS, digits=2), "",
          "## Interpretability (x100; `control` rows are sanity baselines a real explanation must beat)", "",
          "AD is read only together with AG (Fake-CAM, a useless constant map, has a near-perfect AD); "
          "deletion/insertion beside them. Localisation metrics of maps whose native resolution is below 4x4 are "
          "refused (empty cells).", "",
          H.rows_markdown([r for r in rows if r["explainer"] != "-"], list(METRICS), metric_labels=LABELS), "",
          "## Does the map beat the best non-degenerate control? (Fake-CAM excluded)", "",
          "| mechanism | backbone | explainer | " + " | ".join(LABELS[m] for m in METRICS) + " |",
          "|---|---|---|" + "---|" * len(METRICS)]
    keyed = {}
    for c in ctrl:
        keyed.setdefault((c["mechanism"], c["backbone"], c["explainer"]), {})[c["metric"]] = c["beats_best_control"]
    for (m, b, e), v in keyed.items():
        md.append(f"| {m} | {b} | {e} | " + " | ".join(str(v.get(k) or "–") for k in METRICS) + " |")
    md += ["", "## Paired verdicts: mechanism − baseline on the same images", "",
           H.claims_markdown(claims) if claims else "(no mechanism with a baseline on the same backbone)", ""]
    for mech, v in imported.items():
        md += [f"## {mech}: on its own benchmark (imported from `{v['source']}`)", "",
               "Trained and evaluated by its own experiment with the same harness statistics (seeds, t-intervals over "
               "seeds, paired claims, verdicts by code); see that report for its controls and interpretability.", "",
               H.rows_markdown(v["rows"], sorted({r["metric"] for r in v["rows"]}), digits=2), "",
               H.claims_markdown(v["claims"]) if v["claims"] else "(no claims)", ""]
    skipped = [m for m in skipped if m not in imported and m.split("_")[0] not in imported]  # xpruner_pruned too
    if skipped:
        md += ["Registered but not in the protocol yet (no entry in `SPECS`): " + ", ".join(skipped), ""]
    extra = getattr(args, "extra_md", "")
    if extra:
        md += [extra, ""]
    notes = os.path.splitext(args.md)[0] + "_notes.md"  # hand-written run log (commands, wall times), if any
    if os.path.exists(notes) and not args.quick:
        md += [open(notes).read().strip(), ""]
    H.atomic_write_text(args.md, "\n".join(md) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    H.add_common_args(p)
    p.add_argument("--mechanisms", default="all", help="comma list or 'all' (every registered model with a spec)")
    p.add_argument("--backbone", default="resnet10t", help="default: the main job's backbone (configs/baseline)")
    p.add_argument("--backbone-kwargs", type=json.loads, default={"out_indices": [1, 2, 3], "output_stride": 8},
                   help='JSON timm kwargs; default (the main job): \'{"out_indices": [1, 2, 3], "output_stride": 8}\' '
                        '-- an 8x8 last stage at 64 px')
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--test-size", type=int, default=600)
    p.add_argument("--eval-images", type=int, default=200)
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak lr (the main job's)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before the per-step cosine")
    p.add_argument("--precision", default="32-true", help="Lightning precision of training (fp32 by default: "
                   "guided gradients differentiate a gradient, and every mechanism trains alike)")
    p.add_argument("--steps", type=int, default=16, help="insertion/deletion steps")
    p.add_argument("--min-explain-size", type=int, default=7)
    p.add_argument("--vit-patch", type=int, default=8)
    p.add_argument("--timing-reps", type=int, default=5)
    p.add_argument("--md", default=os.path.join(ROOT, "docs", "leaderboard.md"))
    p.add_argument("--json", default=os.path.join(ROOT, "docs", "results", "leaderboard.json"))
    p.add_argument("--max-minutes", type=float, default=0,
                   help="stop starting new runs after this many minutes (0: no limit); finished runs stay cached")
    args = p.parse_args(argv)
    if args.out:
        args.md, args.json = args.out + ".md", args.out + ".json"
    if args.quick:
        args.image_size, args.train_size, args.test_size, args.eval_images = 32, 64, 16, 8
        args.epochs, args.batch_size, args.steps, args.timing_reps, args.eval_batch = 1, 32, 4, 1, 8
        args.seeds = args.seeds[:2] if len(args.seeds) > 1 else args.seeds
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    import models

    registered = models.list_models()
    want = [m for m in registered if m in SPECS] if args.mechanisms == "all" else \
        [m.strip() for m in args.mechanisms.split(",") if m.strip()]
    unknown = [m for m in want if m not in SPECS]
    if unknown:
        raise SystemExit(f"no leaderboard spec for {unknown}; known: {sorted(SPECS)} (add an entry to SPECS).")
    skipped = [m for m in registered if m not in SPECS]
    cache = H.RunCache(args.cache_dir, enabled=not args.no_cache)
    t0 = time.time()
    runs = {}
    failed = {}
    stopped = False
    order = (["baseline"] if "baseline" in want else []) + [m for m in want if m != "baseline"]
    for seed in args.seeds:
        for mech in order:
            bb = SPECS[mech].get("backbone", args.backbone)
            todo = [("baseline", bb)] if (bb != args.backbone and "baseline" in want) else []
            for m, b in todo + [(mech, bb)]:
                if any(r["seed"] == seed for r in runs.get((m, b), [])):
                    continue
                cfg = run_config(m, seed, b, args)
                if args.max_minutes and (time.time() - t0) / 60 > args.max_minutes and cache.get(cfg) is None:
                    stopped = True
                    continue
                try:
                    runs.setdefault((m, b), []).append(get_run(m, seed, b, args, cache))
                except Exception as e:  # one broken mechanism must not stop the others; reported below
                    if os.environ.get("LEADERBOARD_STRICT"):  # tests: fail loudly
                        raise
                    failed[f"{m}/{b} seed {seed}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    print(f"[leaderboard] FAILED {m} ({b}) seed {seed}: {failed[f'{m}/{b} seed {seed}']}",
                          file=sys.stderr, flush=True)
    runs = {k: sorted(v, key=lambda r: r["seed"]) for k, v in runs.items() if v}
    rows, claims = aggregate(runs)
    ctrl = control_verdicts(rows)
    args.extra_md = ("Failed runs (not in the tables): " + "; ".join(f"{k}: {v}" for k, v in failed.items())
                     if failed else "")
    write_outputs(rows, claims, ctrl, runs, args, skipped, time.time() - t0)
    print(f"[leaderboard] wrote {args.md} and {args.json} ({len(rows)} rows, {len(claims)} claims) in "
          f"{time.time() - t0:.0f} s" + (" -- stopped early (--max-minutes); re-run to continue" if stopped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
