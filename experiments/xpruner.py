"""X-Pruner on the embedded benchmark (seed 000 Tables 5.1 / 5.4 analog): accuracy vs FLOPs remained.

    python experiments/xpruner.py                      # ~8 min on 2 CPU cores; resumable (run cache)
    python experiments/xpruner.py --time-budget 270    # stop after ~270 s (exit code 3), rerun to continue
    python experiments/xpruner.py --quick              # smoke run (seconds), numbers meaningless

Protocol (all at one FLOPs budget per row; FLOPs = analytic MACs, cross-checked with FlopCounterMode):
1. A DeiT-tiny-shaped ViT (timm ``deit_tiny_patch16_224`` narrowed: embed 96, 3 heads of 32, depth 4, MLP 384,
   32 px, patch 8, average pooling) trained from scratch on SyntheticShapes (one base model, seed 0; no pretrained weights offline).
2. Per seed: stage 1 masks (weights frozen); per budget: stage 2 (θ, β/γ ascent, W, M) -> calibrate -> prune.
3. Baselines pruned from the same base model to the same budget: uniform (same rate per block, units by stage-1
   mask score), magnitude (same rate per block, units by weight norm), random (random units).
4. Every pruned model is fine-tuned with the same recipe and number of steps; test accuracy, and Grad-CAM
   (on the token map entering the last block) AD / AG / insertion vs the unpruned model.
Intervals: t over seeds (``seed_interval``); paired differences X-Pruner − baseline over seeds and images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments import harness as H  # noqa: E402

warnings.filterwarnings("ignore")
BUDGETS = (0.7, 0.5, 0.3)          # FLOPs remained
METHODS = ("xpruner", "uniform", "magnitude", "random")
OUT = os.path.join(H.ROOT, "docs", "results", "xpruner")


class _TimeUp(Exception):
    pass


def methods_at(args, budget):
    """The methods run at ``budget``: the four of Table 5.4, plus the literal oracle-gate X-Pruner ablation."""
    return tuple(args.methods) + (("xpruner_oracle",) if any(abs(budget - b) < 1e-9 for b in args.ablation_budgets)
                                  else ())


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(p, default_out=OUT)
    p.add_argument("--time-budget", type=float, default=0.0, help="stop (exit 3) once this many seconds passed")
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--num-distractors", type=int, default=1)
    p.add_argument("--object-scale", type=float, nargs=2, default=(0.2, 0.32))
    p.add_argument("--test-size", type=int, default=400)
    p.add_argument("--xai-images", type=int, default=120)
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--base-epochs", type=int, default=40)
    p.add_argument("--mask-epochs", type=int, default=2)
    p.add_argument("--prune-epochs", type=int, default=2)
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mask-lr", type=float, default=0.02, help="stage-1 mask lr (Adam; the paper's SGD 0.01 hardly "
                   "moves the masks in a few hundred steps)")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="FLOPs remained to prune to")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods to run (xpruner first; the verdicts compare it with the others)")
    p.add_argument("--conv-stem", type=int, nargs="*", default=None,
                   help="conv-stem widths of the ViT (models/vit_stem.py; e.g. 24 48 96), default: patchify stem")
    p.add_argument("--base-weights", default=None,
                   help="start from this trained ViT (zoo checkpoint / safetensors, backbone keys; e.g. the recipe in "
                   "configs/baseline/synthetic_vit.yaml) and train only the final norm + head for --head-epochs, "
                   "instead of --base-epochs from scratch")
    p.add_argument("--head-epochs", type=int, default=2)
    p.add_argument("--prune-gate", default="mean", choices=("mean", "oracle", "both"),
                   help="gate of stage 2's CE (trainers.xpruner.XPrunerModule prune_gate): 'mean' = the deployed "
                   "label-free network [ours, default]; 'oracle' = the ground-truth row (the paper, literal)")
    p.add_argument("--ablation-budgets", type=float, nargs="*", default=[0.5],
                   help="budgets at which X-Pruner is also run with the paper's literal oracle gate in stage 2 "
                   "(row 'xpruner_oracle')")
    # fine-tuning recipe [ours; the paper gives none for this setting]. Every pruned model (X-Pruner and baselines)
    # gets the same recipe; baselines get the stage-2 steps on top (equal weight-update steps after the base model).
    p.add_argument("--ft-train-size", type=int, default=None,
                   help="training images for fine-tuning (default: --train-size). The same generator / split as the "
                   "base ViT's training data (configs/baseline/synthetic_vit.yaml trains on 8000), so no new data")
    p.add_argument("--ft-lr", type=float, default=5e-4, help="fine-tuning AdamW lr (per-step cosine to 0)")
    p.add_argument("--ft-warmup", type=int, default=0, help="linear warm-up steps of the fine-tuning cosine")
    p.add_argument("--kd", type=float, default=0.0,
                   help="knowledge distillation from the unpruned model during fine-tuning [ours, not the paper]: "
                   "loss = (1 - kd)·CE + kd·T²·KL(p_T(teacher) || p_T(student)); teacher logits precomputed")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--val-size", type=int, default=0,
                   help="also score every fine-tuned model on this many validation images (split 'val', never the "
                   "test split): the split on which the fine-tuning recipe was chosen")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for fine-tuning (Lightning bf16-mixed)")
    p.add_argument("--unpruned-ft", action="store_true",
                   help="control: also fine-tune the unpruned model with the baselines' recipe and steps (row "
                   "'unpruned + FT'), so the drop is not flattered by fine-tuning the pruned model longer than the base")
    args = p.parse_args()
    if not args.methods or args.methods[0] != "xpruner" or len(set(args.methods)) != len(args.methods):
        p.error(f"--methods must start with xpruner and list each method once, got {args.methods}.")
    return args


# ------------------------------------------------------------------------------------------------ data / training
class DictData(torch.utils.data.Dataset):
    """Pre-rendered tensors as zoo batches; ``flip``: random horizontal flips (training)."""

    def __init__(self, x, y, flip=False, teacher=None):
        self.x, self.y, self.flip, self.teacher = x, y, flip, teacher  # teacher: (N, 2, C) logits (plain, flipped)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        img, f = self.x[i], int(self.flip and torch.rand(()) < 0.5)
        if f:
            img = img.flip(-1)
        item = {"image": img, "label": self.y[i]}
        if self.teacher is not None:
            item["teacher"] = self.teacher[i, f]
        return item


def render(args, split, size):
    from trainers.data.synthetic import SyntheticShapes

    path = os.path.join(args.cache_dir, "xpruner_data", f"{split}_{size}_{args.image_size}_{args.num_classes}_"
                        f"{args.num_distractors}_{args.object_scale[0]}_{args.object_scale[1]}.pt")
    if os.path.exists(path):
        d = torch.load(path, weights_only=True)
        return d["x"], d["y"]
    ds = SyntheticShapes(split=split, size=size, num_classes=args.num_classes, image_size=args.image_size,
                         num_distractors=args.num_distractors, object_scale=args.object_scale)
    items = [ds[i] for i in range(size)]
    x = torch.stack([it["image"] for it in items]).float()
    y = torch.stack([torch.as_tensor(it["label"]) for it in items]).long()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"x": x, "y": y}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return x, y


def loader(x, y, bs, shuffle, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(DictData(x, y, flip=shuffle), batch_size=bs, shuffle=shuffle, generator=g)


class _StepSampler(torch.utils.data.Sampler):
    """Exactly ``steps·bs`` indices: concatenated random permutations of ``range(n)`` (one 'epoch' of ``steps``
    batches, so a per-step cosine spans the whole fine-tuning and step counts need not be whole epochs)."""

    def __init__(self, n, steps, bs, seed):
        self.n, self.total, self.seed = n, steps * bs, seed

    def __len__(self):
        return self.total

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.cat([torch.randperm(self.n, generator=g) for _ in range(-(-self.total // self.n))])
        return iter(idx[:self.total].tolist())


def step_loader(x, y, bs, steps, seed, teacher=None):
    return torch.utils.data.DataLoader(DictData(x, y, flip=True, teacher=teacher), batch_size=bs,
                                       sampler=_StepSampler(len(y), steps, bs, seed), drop_last=True)


def fit(module, dl, epochs):
    import pytorch_lightning as pl

    tr = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0)
    tr.fit(module, train_dataloaders=dl)
    return module


def model_kwargs(args):
    return dict(backbone="deit_tiny_patch16_224", backbone_kwargs=dict(
        img_size=args.image_size, patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads,
        global_pool="avg", **({"conv_stem": list(args.conv_stem)} if args.conv_stem else {})))


def arch_label(args):
    return f"vit-{args.embed_dim}x{args.depth}" + ("-convstem" if args.conv_stem else "")


@torch.no_grad()
def predict(model, x, bs=200):
    model.eval()
    return torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])


def xai_metrics(model, x, y):
    """Grad-CAM on the tap (token map entering the last block): per-image AD, AG, insertion AUC (label target)."""
    from models.explainers import create_explainer
    from models.metrics.faithfulness import AverageDrop, AverageGain, confidence_change, curve_auc, \
        perturbation_curves

    model.eval()
    expl = create_explainer("gradcam", model)
    maps = torch.cat([expl(x[i:i + 40], y[i:i + 40]) for i in range(0, len(x), 40)])
    p, o = confidence_change(model, x, maps, y)
    ad = AverageDrop.per_item(p, o) * 100
    ag = AverageGain.per_item(p, o) * 100
    curves = perturbation_curves(model, x, maps, y, "insertion", 16)
    ins = curve_auc(curves) * 100
    return {"ad": ad.tolist(), "ag": ag.tolist(), "ins": ins.tolist()}


def evaluate(model, data, args):
    xt, yt = data["test"]
    pred = predict(model, xt).argmax(1)
    n = args.xai_images
    return {"correct": (pred == yt).float().tolist(), "acc": float((pred == yt).float().mean() * 100),
            **xai_metrics(model, xt[:n], yt[:n])}


# ------------------------------------------------------------------------------------------------ runs
def run_base(args, data, path):
    from trainers.classification import ClassificationModule
    import models

    H.seed_everything(0)
    t0 = time.time()
    if args.base_weights:  # a trained ViT (backbone keys): fresh final norm + head trained on frozen blocks
        mod = ClassificationModule(model="xpruner", model_kwargs=dict(model_kwargs(args), backbone_weights=args.base_weights),
                                   num_classes=args.num_classes, freeze=["^xp\\.", "^vit\\.(?!norm|fc_norm|head)"],
                                   optimizer={"name": "adamw", "lr": 2e-3, "weight_decay": 0.0},
                                   scheduler={"name": "cosine"})
        fit(mod, loader(*data["train"], args.batch_size, True, 0), args.head_epochs)
    else:
        mod = ClassificationModule(model="xpruner", model_kwargs=model_kwargs(args), num_classes=args.num_classes,
                                   freeze=["^xp\\."], optimizer={"name": "adamw", "lr": 2e-3, "weight_decay": 0.05},
                                   scheduler={"name": "cosine", "warmup": 2 if args.base_epochs > 4 else 0})
        fit(mod, loader(*data["train"], args.batch_size, True, 0), args.base_epochs)
    models.save_weights(mod.model, path)
    res = evaluate(mod.model, data, args)
    res["train_seconds"] = time.time() - t0
    return res


def run_masks(args, data, base_path, seed, path):
    import models
    from trainers.xpruner import XPrunerModule

    H.seed_everything(seed)
    mod = XPrunerModule(model_kwargs=model_kwargs(args), num_classes=args.num_classes, stage="masks",
                        checkpoint_path=base_path, lambda_sparse=0.1, lambda_smooth=0.1,
                        optimizer={"name": "adam", "lr": args.mask_lr}, scheduler={"name": "cosine"})
    fit(mod, loader(*data["train"], args.batch_size, True, seed), args.mask_epochs)
    models.save_weights(mod.model, path)
    m = mod.model.eval()
    xt, yt = data["test"]
    with torch.no_grad():
        acc = {mode: float((torch.cat([m(xt[i:i + 200], mode=mode) for i in range(0, len(xt), 200)]).argmax(1)
                            == yt).float().mean() * 100) for mode in ("mean", "two_pass_soft")}
        acc["oracle"] = float((m(xt, labels=yt).argmax(1) == yt).float().mean() * 100)
    return {"acc": acc, "scores": [s.tolist() for s in _scores(m)]}


def _scores(m):
    from models.xpruner import unit_scores

    with torch.no_grad():
        return [unit_scores(M) for M in m.masks]


class _KDModule:  # built lazily (ClassificationModule imports Lightning)
    cls = None

    @classmethod
    def get(cls):
        if cls.cls is None:
            import torch.nn.functional as F
            from trainers.classification import ClassificationModule

            class KDFinetune(ClassificationModule):
                """CE, or with ``kd > 0`` (1 − kd)·CE + kd·T²·KL(softmax(t/T) || softmax(s/T)) against precomputed
                logits of the unpruned model (``batch["teacher"]``; Hinton et al. 2015) [ours, not the paper]."""

                def __init__(self, *a, kd=0.0, kd_temperature=1.0, **k):
                    super().__init__(*a, **k)
                    self.kd, self.kd_t = float(kd), float(kd_temperature)

                def compute_loss(self, batch, stage):
                    logits = self.model(batch["image"])
                    ce = self.classification_loss(logits, batch["label"])
                    if self.kd <= 0 or "teacher" not in batch:
                        return {"loss": ce, "logits": logits}
                    t = self.kd_t
                    kl = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(batch["teacher"].float() / t, 1),
                                  reduction="batchmean", log_target=True) * t * t
                    return {"loss": (1 - self.kd) * ce + self.kd * kl, "logits": logits, "ce": ce.detach(),
                            "kd": kl.detach()}

            cls.cls = KDFinetune
        return cls.cls


def ft_steps(args, method):
    """Fine-tuning steps: ``ft_epochs`` over the fine-tuning set; methods whose pruning does not train W (all but
    X-Pruner, whose stage 2 trains W for ``prune_epochs`` over the training set) get those steps on top."""
    bs = args.batch_size
    steps = args.ft_epochs * (-(-args.ft_train_size // bs))
    if not method.startswith("xpruner"):
        steps += args.prune_epochs * (-(-args.train_size // bs))
    return steps


def finetune_eval(args, data, pruned, seed, save_path=None, steps=1, model_name="xpruner_pruned"):
    import pytorch_lightning as pl
    from models.xpruner import analytic_macs, measure_flops

    H.seed_everything(seed)
    res = {"acc_before_ft": float((predict(pruned, data["test"][0]).argmax(1) == data["test"][1]).float().mean() * 100)}
    kw = dict(model_kwargs(args), widths=pruned.arch()) if model_name == "xpruner_pruned" else model_kwargs(args)
    mod = _KDModule.get()(model=model_name, model_kwargs=kw, num_classes=args.num_classes,
                          freeze=["^xp\\."] if model_name == "xpruner" else None,
                          optimizer={"name": "adamw", "lr": args.ft_lr, "weight_decay": 0.05},
                          scheduler={"name": "cosine", "interval": "step", "warmup": args.ft_warmup},
                          kd=args.kd, kd_temperature=args.kd_temperature)
    mod.model.load_state_dict(pruned.state_dict())
    t0 = time.time()
    tr = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0, precision="bf16-mixed" if args.bf16 else "32-true")
    tr.fit(mod, train_dataloaders=step_loader(*data["ft"], args.batch_size, steps, seed,
                                              teacher=data.get("teacher") if args.kd > 0 else None))
    res["ft_steps"], res["ft_seconds"] = steps, time.time() - t0
    res.update(evaluate(mod.model, data, args))
    if "val" in data:
        res["acc_val"] = float((predict(mod.model, data["val"][0]).argmax(1) == data["val"][1]).float().mean() * 100)
    size = (3, args.image_size, args.image_size)
    res["macs"] = analytic_macs(mod.model)["total"]
    res["flops_counted"] = measure_flops(mod.model, size)
    if model_name == "xpruner_pruned":
        res["arch"] = mod.model.arch()
    if save_path:
        from models.xpruner import save_pruned

        save_pruned(mod.model, save_path)
    return res


def run_prune(args, data, masks_path, seed, budget, method):
    """Prune the base model to ``budget`` FLOPs remained with ``method`` (X-Pruner: stage 2 first); the pruned,
    folded model before fine-tuning and the method's extras."""
    import models
    from models.xpruner import (alpha_for_flops, magnitude_keep, prune_model, random_keep, uniform_keep)
    from trainers.xpruner import XPrunerModule

    H.seed_everything(seed)
    if method in ("xpruner", "xpruner_oracle"):
        probe = models.create_model("xpruner", num_classes=args.num_classes, **model_kwargs(args))
        alpha = alpha_for_flops(probe, budget)
        mod = XPrunerModule(model_kwargs=model_kwargs(args), num_classes=args.num_classes, stage="prune", alpha=alpha,
                            checkpoint_path=masks_path, rate_weighting="flops", mask_lr=0.05,
                            prune_gate="oracle" if method == "xpruner_oracle" else args.prune_gate,
                            optimizer={"name": "adamw", "lr": 5e-4, "weight_decay": 0.05},
                            scheduler={"name": "cosine"})
        hist = []

        class Track(__import__("pytorch_lightning").Callback):
            def on_train_batch_end(self, trainer, pl_module, *a):
                r = pl_module.rates()
                hist.append([float(r["R"]), float(r["R_hard"]), float(pl_module.model.xp.lagrange_beta),
                             float(pl_module.model.xp.lagrange_gamma)])

        import pytorch_lightning as pl

        tr = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.prune_epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Track()])
        tr.fit(mod, train_dataloaders=loader(*data["train"], args.batch_size, True, seed))
        keep = mod.keep
        m = mod.model
        extra = {"alpha": alpha, "history": hist[:: max(1, len(hist) // 50)],
                 "rates_learned": [1.0 - float(k.float().mean()) for k in keep],
                 "theta_rates": [float(v) for v in mod.rates()["r_hard"]]}
    else:
        m = models.create_model("xpruner", num_classes=args.num_classes, checkpoint_path=masks_path,
                                **model_kwargs(args))
        alpha = alpha_for_flops(m, budget)
        keep = {"uniform": lambda: uniform_keep(m, alpha), "magnitude": lambda: magnitude_keep(m, alpha),
                "random": lambda: random_keep(m, alpha, seed=seed)}[method]()
        extra = {"alpha": alpha, "rates_learned": [1.0 - float(k.float().mean()) for k in keep]}
    return prune_model(m, keep, fold=method != "magnitude").eval(), extra  # magnitude: masks play no part


def run_method(args, data, masks_path, seed, budget, method, cache, skey, cache_dir, tag):
    """Pruning (cached on its own under ``skey``: the pruned model before fine-tuning, so fine-tuning recipes can
    be compared without repeating stage 2), then fine-tuning and evaluation."""
    from models.xpruner import load_pruned, save_pruned

    ppath = os.path.join(cache_dir, f"preft_{H.config_hash(skey)}.safetensors")
    extra = cache.get(skey) if os.path.exists(ppath) else None
    if extra is None:
        pruned, extra = run_prune(args, data, masks_path, seed, budget, method)
        save_pruned(pruned, ppath)
        cache.put(skey, extra)
    pruned = load_pruned(ppath).eval()
    path = os.path.join(cache_dir, f"pruned_{method}_s{seed}_{int(budget * 100)}_{tag}.safetensors")
    res = finetune_eval(args, data, pruned, seed, path, steps=ft_steps(args, method))
    res.update(extra, pruned_path=path)
    return res


def teacher_logits(args, base_path, x):
    """Logits of the unpruned base model on ``x`` and on its horizontal flip: (N, 2, C), cached on disk."""
    import models

    path = os.path.join(args.cache_dir, "xpruner_data", f"teacher_{os.path.basename(base_path)}_{len(x)}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    m = models.create_model("xpruner", num_classes=args.num_classes, checkpoint_path=base_path, **model_kwargs(args))
    t = torch.stack([predict(m, x), predict(m, x.flip(-1))], 1)
    torch.save(t, path + ".tmp")
    os.replace(path + ".tmp", path)
    return t


# ------------------------------------------------------------------------------------------------ report
def plot_rates(results, seeds, path, depth):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = results["__budgets__"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(4 * len(budgets), 3.2), sharey=True, squeeze=False)
    x = np.arange(depth)
    for ax, b in zip(axes.ravel(), budgets):
        rs = np.array([results[(s, b, "xpruner")]["rates_learned"] for s in seeds])
        ax.bar(x - 0.2, rs[:, 0::2].mean(0), 0.4, yerr=rs[:, 0::2].std(0), label="heads")
        ax.bar(x + 0.2, rs[:, 1::2].mean(0), 0.4, yerr=rs[:, 1::2].std(0), label="MLP units")
        ax.axhline(results[(seeds[0], b, "xpruner")]["alpha"], color="k", ls="--", lw=1, label="α (uniform)")
        ax.set_title(f"{int(b * 100)} % FLOPs remained")
        ax.set_xlabel("block")
        ax.set_xticks(x)
    axes.ravel()[0].set_ylabel("share of units pruned")
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args, base, masks, results, seeds, full_macs, unpruned_ft=None, partial=False):
    args = argparse.Namespace(**dict(vars(args), budgets=sorted(args.budgets, reverse=True)))  # 70, 50, 30 %
    rows, claims = [], []
    n = args.xai_images
    uft = [unpruned_ft[s] for s in seeds] if unpruned_ft and all(s in unpruned_ft for s in seeds) else None
    for metric, key in (("acc", "acc"), ("AD", "ad"), ("AG", "ag"), ("insertion", "ins")):
        v = base[key] if key == "acc" else float(np.mean(base[key]))
        rows.append(H.summary_row("unpruned (100 %)", arch_label(args), "gradcam", metric, [v]))
        if uft:  # control: the unpruned model fine-tuned with the baselines' recipe and steps
            rows.append(H.summary_row("unpruned + FT (100 %)", arch_label(args), "gradcam", metric,
                                      [r[key] if key == "acc" else float(np.mean(r[key])) for r in uft],
                                      control=True))
    for b in args.budgets:
        for meth in methods_at(args, b):
            rs = [results[(s, b, meth)] for s in seeds]
            tag = f"{meth} @{int(b * 100)}%"
            rows.append(H.summary_row(tag, arch_label(args), "gradcam", "acc", [r["acc"] for r in rs]))
            rows.append(H.summary_row(tag, arch_label(args), "gradcam", "acc before FT", [r["acc_before_ft"] for r in rs]))
            rows.append(H.summary_row(tag, arch_label(args), "gradcam", "FLOPs %",
                                      [100 * r["macs"] / full_macs for r in rs]))
            for metric, key in (("AD", "ad"), ("AG", "ag"), ("insertion", "ins")):
                rows.append(H.summary_row(tag, arch_label(args), "gradcam", metric, [float(np.mean(r[key])) for r in rs]))
        xp = [results[(s, b, "xpruner")] for s in seeds]
        # the goal (drop <= 1 point after fine-tuning) as a non-inferiority claim: X-Pruner > reference - 1
        refs = [("unpruned", [np.array(base["correct"]) * 100 - 1.0 for _ in xp])]
        if uft:
            refs.append(("unpruned + same FT", [np.array(r["correct"]) * 100 - 1.0 for r in uft]))
        for name, ref in refs:
            claims.append(H.claim_row(f"X-Pruner @{int(b * 100)}% FLOPs within 1 pt of {name} (acc − ref + 1 > 0)",
                                      "acc", [np.array(r["correct"]) * 100 for r in xp], ref, +1))
        for meth in methods_at(args, b)[1:]:
            bl = [results[(s, b, meth)] for s in seeds]
            name = "X-Pruner (oracle gate in stage 2, literal)" if meth == "xpruner_oracle" else meth
            claims.append(H.claim_row(f"X-Pruner > {name} @{int(b * 100)}% FLOPs", "acc",
                                      [np.array(r["correct"]) * 100 for r in xp],
                                      [np.array(r["correct"]) * 100 for r in bl], +1))
        for metric, key, d in (("AD", "ad", -1), ("AG", "ag", +1), ("insertion", "ins", +1)):
            claims.append(H.claim_row(f"Grad-CAM {metric}: X-Pruner @{int(b * 100)}% better than unpruned", metric,
                                      [np.array(r[key]) for r in xp], [np.array(base[key][:n]) for _ in xp], d))
    intro = (
        (f"**PARTIAL: only the FLOPs budgets {[int(100 * b) for b in args.budgets]} % and the seeds {seeds} listed "
         f"here finished; rerun the command to complete.** " if partial else "") +
        f"`python experiments/xpruner.py` (seeds {seeds}). Base: timm `deit_tiny_patch16_224` narrowed to embed "
        f"{args.embed_dim}, {args.heads} heads, depth {args.depth}, {args.image_size} px, patch {args.patch_size}, average pooling"
        + (f", conv stem {args.conv_stem}" if args.conv_stem else "")
        + (f", blocks from `{os.path.relpath(args.base_weights, H.ROOT)}` (the ViT recipe of configs/baseline/"
           f"synthetic_vit.yaml) with a fresh final norm + head trained for {args.head_epochs} epochs on the frozen blocks"
           if args.base_weights else f", trained from scratch for {args.base_epochs} epochs")
        + f" ({args.train_size} SyntheticShapes images for every stage below, {args.num_classes} classes; one base "
        f"model shared by all seeds, so the intervals cover pruning / fine-tuning randomness, not base training). "
        f"Unpruned test accuracy {base['acc']:.1f} % (chance {100 / args.num_classes:.1f} %). Per seed: stage 1 "
        f"{args.mask_epochs} epochs, stage 2 {args.prune_epochs} epochs per budget (it trains W too; CE under the "
        f"'{args.prune_gate}' gate; `xpruner_oracle` rows at {[int(100 * b) for b in args.ablation_budgets]} % use "
        f"the paper's ground-truth-row gate). Fine-tuning [ours], the same recipe for every pruned model: AdamW lr "
        f"{args.ft_lr:g} (wd 0.05, per-step cosine{f', {args.ft_warmup} warm-up steps' if args.ft_warmup else ''}), "
        f"batch {args.batch_size}, flips, {ft_steps(args, 'xpruner')} steps ({args.ft_epochs} epoch(s) over "
        f"{args.ft_train_size} training images of the same generator and split as the base ViT's)"
        + (f", knowledge distillation from the unpruned model (weight {args.kd:g}, T = {args.kd_temperature:g}; "
           f"not in the paper)" if args.kd > 0 else "") + (", bf16 autocast" if args.bf16 else "")
        + f"; baselines (and the `unpruned + FT` control, if present) get {ft_steps(args, 'uniform')} steps: stage 2's "
        f"{ft_steps(args, 'uniform') - ft_steps(args, 'xpruner')} weight-update steps on top (equal weight-update steps "
        f"after the base model). Test split {args.test_size} images (accuracy), first "
        f"{n} for Grad-CAM AD/AG/insertion (target = label). FLOPs % = analytic MACs of the pruned model / unpruned.")
    mk = "\n## Stage 1 label-free accuracy (masks applied, weights frozen)\n\n| seed | mean | two_pass_soft | oracle |\n|---|---|---|---|\n"
    for s in seeds:
        a = masks[s]["acc"]
        mk += f"| {s} | {a['mean']:.1f} | {a['two_pass_soft']:.1f} | {a['oracle']:.1f} |\n"
    mk += (f"\n## Learned per-layer pruning rates (X-Pruner, mean over seeds)\n\n"
           f"![rates]({os.path.basename(args.out)}_rates.png)\n\n")
    mk += "| FLOPs remained | " + " | ".join(f"attn{i} / mlp{i}" for i in range(args.depth)) + " |\n"
    mk += "|---|" + "---|" * args.depth + "\n"
    for b in args.budgets:
        r = np.mean([results[(s, b, "xpruner")]["rates_learned"] for s in seeds], 0)
        mk += f"| {int(b * 100)} % | " + " | ".join(f"{r[2 * i]:.2f} / {r[2 * i + 1]:.2f}" for i in range(args.depth)) + " |\n"
    mk += "\n## Stage 2 dynamics (seed 0): soft R, hard R, β, γ at the first and last recorded step\n\n"
    mk += "| FLOPs remained | α | start (R, R_hard, β, γ) | end (R, R_hard, β, γ) |\n|---|---|---|---|\n"
    for b in args.budgets:
        r = results[(seeds[0], b, "xpruner")]
        h = r["history"]
        mk += (f"| {int(b * 100)} % | {r['alpha']:.3f} | {', '.join(f'{v:.3f}' for v in h[0])} | "
               f"{', '.join(f'{v:.3f}' for v in h[-1])} |\n")
    H.write_report(args.out, rows, claims, title="X-Pruner on the embedded benchmark (Tables 5.1 / 5.4 analog)",
                   intro=intro, extra_md=mk, meta=vars(args) | {"seeds": seeds})
    plot_rates(dict(results, __budgets__=args.budgets), seeds, args.out + "_rates.png", args.depth)


def write_latest(args, wdir, base_path, results):
    """benchmarks/xpruner.py pairs these weights with docs/results/xpruner.json (main report only)."""
    if os.path.abspath(args.out) == os.path.abspath(OUT) and (args.seeds[0], 0.5, "xpruner") in results:
        H.atomic_write_json(os.path.join(wdir, "latest.json"), {
            "base": base_path, "pruned_xpruner_50": results[(args.seeds[0], 0.5, "xpruner")]["pruned_path"]})


def main():
    args = parse()
    if args.quick:
        args.train_size, args.test_size, args.xai_images = 128, 64, 16
        args.base_epochs = args.mask_epochs = args.prune_epochs = args.ft_epochs = 1
        args.embed_dim, args.depth, args.seeds = 48, 2, args.seeds[:2]
        args.out = os.path.join(args.cache_dir, "xpruner_quick")
        args.cache_dir = os.path.join(args.cache_dir, "quick")
    if args.ft_train_size is None:
        args.ft_train_size = args.train_size
    t0 = time.time()
    cache = H.RunCache(args.cache_dir, enabled=not args.no_cache)
    wdir = os.path.join(args.cache_dir, "xpruner_weights")
    os.makedirs(wdir, exist_ok=True)
    common = {k: getattr(args, k) for k in ("num_classes", "image_size", "train_size", "test_size", "xai_images",
                                            "num_distractors", "object_scale", "patch_size",
                                            "embed_dim", "depth", "heads", "base_epochs", "batch_size")}
    if args.conv_stem or args.base_weights:  # absent for the patchify from-scratch base (older cache entries hold)
        common.update(conv_stem=args.conv_stem, base_weights=args.base_weights, head_epochs=args.head_epochs)

    def check_time():
        if args.time_budget and time.time() - t0 > args.time_budget:
            raise _TimeUp

    data = {"train": render(args, "train", args.train_size), "test": render(args, "test", args.test_size)}
    key = dict(common, exp="xpruner", run="base")
    base_path = os.path.join(wdir, f"base_{H.config_hash(key)}.safetensors")
    base = cache.get(key) if os.path.exists(base_path) else None
    if base is None:
        base = run_base(args, data, base_path)
        cache.put(key, base)
    print(f"[base] test acc {base['acc']:.1f} %", flush=True)
    data["ft"] = data["train"] if args.ft_train_size == args.train_size else render(args, "train", args.ft_train_size)
    if args.kd > 0:
        data["teacher"] = teacher_logits(args, base_path, data["ft"][0])
    if args.val_size:
        data["val"] = render(args, "val", args.val_size)
    ft_cfg = dict(ft_epochs=args.ft_epochs, ft_train_size=args.ft_train_size, ft_lr=args.ft_lr,
                  ft_warmup=args.ft_warmup, kd=args.kd, kd_temperature=args.kd_temperature, bf16=args.bf16, val_size=args.val_size, v=3)
    masks, results, unpruned_ft = {}, {}, {}
    import models
    from models.xpruner import analytic_macs

    full_macs = analytic_macs(models.create_model("xpruner", num_classes=args.num_classes, **model_kwargs(args)))["total"]
    mkeys, mpaths = {}, {}
    try:
        for seed in args.seeds:  # stage 1 per seed (cached)
            check_time()
            mkeys[seed] = mkey = dict(common, exp="xpruner", run="masks", seed=seed, mask_epochs=args.mask_epochs,
                                      mask_lr=args.mask_lr)
            mpaths[seed] = mpath = os.path.join(wdir, f"masks_{H.config_hash(mkey)}.safetensors")
            res = cache.get(mkey) if os.path.exists(mpath) else None
            if res is None:
                res = run_masks(args, data, base_path, seed, mpath)
                cache.put(mkey, res)
            masks[seed] = res
            print(f"[masks seed {seed}] {res['acc']}", flush=True)
        for bi, b in enumerate(args.budgets):  # budget-major: the first budget finishes for every seed first
            for seed in args.seeds:
                for meth in methods_at(args, b):
                    check_time()
                    skey = dict(mkeys[seed], run="pruned_model", budget=b, method=meth, prune_epochs=args.prune_epochs,
                                **({"prune_gate": args.prune_gate} if meth == "xpruner" else {}))
                    rkey = dict(skey, run="prune", **ft_cfg)
                    res = cache.get_or_run(rkey, lambda: run_method(args, data, mpaths[seed], seed, b, meth, cache,
                                                                    skey, wdir, H.config_hash(rkey)))
                    results[(seed, b, meth)] = res
                    print(f"[seed {seed} {int(b * 100)}% {meth}] acc {res['acc']:.1f} (before FT "
                          f"{res['acc_before_ft']:.1f}; val {res.get('acc_val', float('nan')):.1f}; FT "
                          f"{res.get('ft_seconds', float('nan')):.0f} s) FLOPs {100 * res['macs'] / full_macs:.1f} % "
                          f"({time.time() - t0:.0f} s)", flush=True)
                if args.unpruned_ft and bi == 0:  # control: the unpruned model fine-tuned like the baselines
                    check_time()
                    ukey = dict(key, run="unpruned_ft", seed=seed, prune_epochs=args.prune_epochs, **ft_cfg)

                    def run_unpruned():
                        m = models.create_model("xpruner", num_classes=args.num_classes, checkpoint_path=base_path,
                                                **model_kwargs(args))
                        return finetune_eval(args, data, m.eval(), seed, steps=ft_steps(args, "unpruned"),
                                             model_name="xpruner")

                    unpruned_ft[seed] = res = cache.get_or_run(ukey, run_unpruned)
                    print(f"[seed {seed} unpruned + FT] acc {res['acc']:.1f} (val "
                          f"{res.get('acc_val', float('nan')):.1f}) ({time.time() - t0:.0f} s)", flush=True)
    except _TimeUp:
        def complete(b, s):
            return all((s, b, m) in results for m in methods_at(args, b)) and (s in unpruned_ft or not args.unpruned_ft
                                                                               or b != args.budgets[0])
        full = [b for b in args.budgets if all(complete(b, s) for s in args.seeds)]
        if full:  # a partial report over the budgets finished for every seed (marked as such)
            report(argparse.Namespace(**dict(vars(args), budgets=full)), base, masks, results, args.seeds, full_macs,
                   unpruned_ft, partial=True)
            write_latest(args, wdir, base_path, results)
        elif [s for s in args.seeds if complete(args.budgets[0], s)]:  # the first budget, over its finished seeds
            done = [s for s in args.seeds if complete(args.budgets[0], s)]
            report(argparse.Namespace(**dict(vars(args), budgets=[args.budgets[0]], seeds=done)), base, masks, results,
                   done, full_macs, unpruned_ft, partial=True)
            write_latest(argparse.Namespace(**dict(vars(args), seeds=done)), wdir, base_path, results)
        print(f"[time budget] stopping after {time.time() - t0:.0f} s; rerun to continue (finished runs are cached)")
        sys.exit(3)
    report(args, base, masks, results, args.seeds, full_macs, unpruned_ft)
    write_latest(args, wdir, base_path, results)
    print(f"wrote {args.out}.md ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
