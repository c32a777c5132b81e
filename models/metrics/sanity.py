"""Model-parameter sanity check (Adebayo et al. 2018; seed 002 §5.3) and the layer-dropout ranking check
(seed 002 §5.4).

**Cascading randomisation.** Starting from the top (the classifier), the weights of one stage after the other
are re-initialised (``reset_parameters()`` of every Conv / Linear in the stage, seeded; BatchNorm kept, as in
seed 002 §5.3.1) down to the stem. After each step the explainer is rebuilt on the randomised copy (same
target layer by name) and its maps are compared with the maps of the trained model: Spearman rank correlation
(ties averaged) and SSIM (``data_range`` 1, Gaussian window 11 or the largest odd size that fits), per image, on
the *absolute* maps (Adebayo et al.'s "rank correlation (ABS)"; the zoo's maps are >= 0 already, a signed map
from a user's callable is compared by magnitude). Step 0 is the trained model itself (a rebuilt explainer on an
untouched copy: similarity 1 by construction unless the explainer is stochastic). A constant map (e.g. an
all-zero CAM of a random net) has Spearman 0 with any other map (1 with an identical one).

**Flag rule** (issue 18 decision). A method is **flagged** when its map survives the randomisation of the *top
layer*: the mean over images of the Spearman rank correlation (absolute maps) between the trained map and the
map after the first cascade step (``FLAG_STEP = 1``: the zoo's classifier head, Adebayo et al.'s "logits"
layer; for other models the topmost weighted child) is >= ``FLAG_THRESHOLD = 0.8``. This is Adebayo et al.'s
finding for guided backprop ("invariant to the randomisation of the higher layers"): once the classifier is
random, the map of a method that explains what the model learned must change; a map that keeps >= 0.8 of its
rank order is class- and head-independent (a very strong rank correlation by the usual convention).
Weight-free controls (edges, colour contrast, a seeded random map) have similarity 1 at every step and are
flagged. Rejected rules, as measured on the ResNet-10t of ``experiments/ucag_rsp.py``: the mean over the whole
cascade (the previous rule, >= 0.5) mixes the top steps with the bottom ones, where every map decorrelates
(it flagged Score-CAM, 0.51, and XRelevance-CAM, 0.53, whose maps change after the head, and it misses a map
that ignores the head but depends on every stage below, ``tests/test_metrics_extra.py``); the fully
randomised end point cannot separate them either (guided backprop 0.25, Grad-CAM++ 0.32, gradient 0.21: with
the BatchNorm statistics kept every map keeps some input structure, and a fully random ResNet-18 keeps guided
backprop at 1.0). ``mean_over_steps`` and the end point are still reported. A method flagged by this rule is
not explaining the classifier's decision, whatever its name: on an 8x8 ResNet-10t layer Grad-CAM++ (head step
0.87-0.95 over 3 seeds) is flagged with guided backprop (0.93-0.95), because its channel weights are non-negative
by construction (``relu`` of the gradients), so after a random head it still sums the same activations; Grad-CAM
(0.10-0.44), RSP, XRelevance-CAM (0.45-0.58) and Score-CAM (0.61-0.74, the closest) are not. The threshold was
set after seeing those curves (docs/metrics.md, docs/results/ucag_rsp.md).

**Layer-dropout ranking** (seed 002 §5.4): the explainers' ranking on a metric with the model as trained vs
the mean over ``repeats`` passes with dropout (rate ``p``) after every backbone stage turned on at evaluation
(:func:`mc_dropout`, forward hooks on the backbone's stage modules); agreement = Kendall's tau of the two rankings
and whether the best method is the same.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["randomization_steps", "randomize_stage", "map_similarity", "spearman_per_item", "ssim_per_item",
           "cascading_randomization", "plot_sanity", "mc_dropout", "kendall_tau", "layer_dropout_ranking",
           "evaluate_sanity", "sanity_flag", "FLAG_STEP", "FLAG_THRESHOLD", "FLAG_RULE"]

#: the flag rule (module docstring): similarity after the first cascade step (the top layer) >= the threshold
FLAG_STEP = 1
FLAG_THRESHOLD = 0.8
FLAG_RULE = ("flagged = mean Spearman rank correlation (absolute maps) between the trained map and the map after "
             "randomising the top layer (cascade step 1: the classifier head) >= 0.8 (Adebayo et al. 2018)")


# ---------------------------------------------------------------------------------------------- similarity
def spearman_per_item(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation (ties averaged) of each pair of flattened maps ``(N, *s)``; if a map is constant:
    1 when both maps are identical, else 0."""
    from torchmetrics.functional.regression.spearman import _rank_data

    a, b = a.flatten(1).double(), b.flatten(1).double()
    out = []
    for x, y in zip(a, b):
        rx, ry = _rank_data(x), _rank_data(y)
        rx, ry = rx - rx.mean(), ry - ry.mean()
        den = rx.norm() * ry.norm()
        if den > 0:
            out.append((rx * ry).sum() / den)
        else:  # a constant map: identical maps are fully similar, otherwise no rank agreement
            out.append(torch.tensor(1.0 if torch.equal(x, y) else 0.0, dtype=torch.float64))
    return torch.stack(out).float()


def ssim_per_item(a: Tensor, b: Tensor) -> Tensor:
    """SSIM of each pair of 2D maps in [0, 1] (``data_range=1``)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    if a.dim() != 3:
        raise ValueError(f"SSIM needs (N, H, W) maps, got {tuple(a.shape)}.")
    k = min(11, min(a.shape[-2:]))
    k = k if k % 2 == 1 else k - 1
    return ssim(a.unsqueeze(1).float(), b.unsqueeze(1).float(), data_range=1.0, kernel_size=k,
                reduction="none").float()


def map_similarity(a: Tensor, b: Tensor) -> Dict[str, Tensor]:
    """``{"spearman": (N,), "ssim": (N,)}`` (SSIM only for 2D maps)."""
    out = {"spearman": spearman_per_item(a, b)}
    if a.dim() == 3:
        out["ssim"] = ssim_per_item(a, b)
    return out


# ---------------------------------------------------------------------------------------------- randomisation
def _has_weights(m: nn.Module) -> bool:
    return any(isinstance(s, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) for s in m.modules())


def randomization_steps(model: nn.Module) -> List[Tuple[str, List[str]]]:
    """Stages from the top: ``[(label, [module names])]``: the head (modules outside the backbone), then each
    weighted child of the backbone body in reverse (ResNet: layer4 .. layer1, then the stem conv)."""
    bb = getattr(model, "backbone", None)
    body = getattr(bb, "body", None) if bb is not None else None
    steps: List[Tuple[str, List[str]]] = []
    if body is None:
        kids = [(n, m) for n, m in model.named_children() if _has_weights(m)]
        return [(n, [n]) for n, _ in reversed(kids)]
    head = [n for n, m in model.named_children() if n != "backbone" and _has_weights(m)]
    if head:
        steps.append(("head", head))
    kids = [f"backbone.body.{n}" for n, m in body.named_children() if _has_weights(m)]
    for i, n in reversed(list(enumerate(kids))):  # one step per weighted child of the body, top first
        steps.append(("stem" if i == 0 else n.rsplit(".", 1)[-1], [n]))
    return steps


def randomize_stage(model: nn.Module, names: Sequence[str], seed: int = 0) -> int:
    """Re-initialise (in place) every Conv / Linear under the named modules; returns how many. RNG restored."""
    state = torch.random.get_rng_state()
    n = 0
    try:
        torch.manual_seed(int(seed))
        for name in names:
            for m in model.get_submodule(name).modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                    m.reset_parameters()
                    n += 1
    finally:
        torch.random.set_rng_state(state)
    return n


def _layer_names(model: nn.Module, explainer) -> Optional[list]:
    names = {id(m): n for n, m in model.named_modules()}
    layers = getattr(explainer, "target_layers", None)
    if not layers:
        return None
    return [names[id(m)] for m in layers]


def sanity_flag(spearman: Tensor, flag_step: int = FLAG_STEP, flag_threshold: float = FLAG_THRESHOLD) -> dict:
    """The flag rule on a ``(n_steps + 1, N)`` per-image Spearman array (row 0 = trained): ``{"flag_similarity":
    mean over images at ``flag_step``, "flag_ci95": image-bootstrap 95 % interval, "flagged": bool, ...}``."""
    from .stats import paired_bootstrap_ci

    spearman = torch.as_tensor(spearman, dtype=torch.float64)
    if not 1 <= int(flag_step) < spearman.shape[0]:
        raise ValueError(f"flag_step must name a randomisation step (1..{spearman.shape[0] - 1}), got {flag_step}.")
    v = spearman[int(flag_step)]
    ci = paired_bootstrap_ci(v, torch.zeros_like(v))
    sim = float(v.mean())
    return {"flag_step": int(flag_step), "flag_similarity": sim, "flag_ci95": [ci["ci95_low"], ci["ci95_high"]],
            "flag_threshold": float(flag_threshold), "flagged": bool(sim >= float(flag_threshold)),
            "flag_rule": FLAG_RULE if (flag_step, flag_threshold) == (FLAG_STEP, FLAG_THRESHOLD) else
            f"flagged = mean Spearman (absolute maps) at cascade step {flag_step} >= {flag_threshold}"}


def cascading_randomization(model: nn.Module, explainer: Union[str, Callable[[nn.Module], Callable]],
                            images: Tensor, targets: Tensor, steps: Optional[List[Tuple[str, List[str]]]] = None,
                            seed: int = 0, target_layers=None, flag_threshold: float = FLAG_THRESHOLD,
                            flag_step: int = FLAG_STEP, **explainer_kwargs) -> dict:
    """Run the cascade for one explainer on ``images`` (explained for ``targets``).

    ``explainer``: a registered name (built with ``create_explainer(name, model_copy, target_layers, ...)``) or a
    factory ``model -> callable``. Returns ``{"steps": [labels], "spearman": (n_steps + 1, N), "ssim": ...,
    "mean_spearman": [...], "mean_ssim": [...], "mean_over_steps": float, "flagged": bool, "flag_similarity",
    "flag_ci95", ...}``; row 0 is the trained model. Maps are compared by magnitude (``abs``); the flag rule is
    :func:`sanity_flag` (module docstring).
    """
    from ..explainers import create_explainer

    def build(m, layers):
        if callable(explainer) and not isinstance(explainer, str):
            return explainer(m)
        return create_explainer(explainer, m, target_layers=layers, **explainer_kwargs)

    model = model.eval()
    ref_ex = build(model, target_layers)
    layers = target_layers
    if layers is None and not callable(explainer):
        layers = _layer_names(model, ref_ex) if getattr(ref_ex, "uses_layers", False) else None
    ref = ref_ex(images, targets).detach().abs()
    steps = randomization_steps(model) if steps is None else steps
    work = copy.deepcopy(model)
    sims = {"spearman": [], "ssim": []}
    labels = ["trained"]
    maps_per_step = [ref]
    for k in range(len(steps) + 1):
        if k > 0:
            label, names = steps[k - 1]
            randomize_stage(work, names, seed + k)
            labels.append(label)
        cur = build(work, layers)(images, targets).detach().abs()
        if k > 0:
            maps_per_step.append(cur)
        s = map_similarity(ref, cur)
        for key in sims:
            if key in s:
                sims[key].append(s[key])
    out = {"steps": labels}
    for key, v in sims.items():
        if v:
            t = torch.stack(v)
            out[key] = t
            out[f"mean_{key}"] = [float(x) for x in t.mean(1)]
    out["mean_over_steps"] = float(sum(out["mean_spearman"][1:]) / max(1, len(out["mean_spearman"]) - 1))
    out.update(sanity_flag(out["spearman"], flag_step, flag_threshold))
    out["maps"] = maps_per_step
    return out


def plot_sanity(results: Dict[str, dict], path: str, title: str = "Cascading randomisation") -> str:
    """Curves of mean Spearman and SSIM per step, one line per explainer; returns ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("mean_spearman", "mean_ssim") if any(k in r for r in results.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (name, r) in enumerate(results.items()):
            if key in r:  # tab10 repeats after 10 lines: later ones dashed
                ax.plot(range(len(r[key])), r[key], marker="o", ls="-" if i < 10 else "--",
                        label=name + (" (flagged)" if r.get("flagged") else ""))
        if key == "mean_spearman":
            ax.axhline(FLAG_THRESHOLD, color="grey", lw=0.8, ls=":")
        first = next(iter(results.values()))
        ax.set_xticks(range(len(first["steps"])))
        ax.set_xticklabels(first["steps"], rotation=30, ha="right")
        ax.set_ylim(-0.2, 1.05)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_ylabel(key.replace("mean_", "mean ").replace("spearman", "Spearman").replace("ssim", "SSIM"))
        ax.set_xlabel("randomised down to")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".tmp_" + os.path.basename(path))
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- layer dropout
@contextlib.contextmanager
def mc_dropout(model: nn.Module, p: float = 0.1, layers: Optional[Sequence[nn.Module]] = None):
    """Dropout with rate ``p`` on the outputs of ``layers``, on even in eval. Default: every backbone stage module
    (``model.backbone.body`` by ``stage_names``: the taps of earlier stages are side outputs, dropping them would
    not reach the classifier)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout rate must be in [0, 1), got {p}.")
    if layers is None:
        bb = getattr(model, "backbone", None)
        names = getattr(bb, "stage_names", None)
        if bb is None or names is None:
            raise ValueError("mc_dropout needs a zoo model (model.backbone.stage_names) or explicit layers.")
        layers = [bb.body.get_submodule(n) for n in names]
    handles = [m.register_forward_hook(lambda mod, i, o: F.dropout(o, p, training=True)) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of two score lists (NaN if fewer than 2 items)."""
    n = len(a)
    if n < 2:
        return float("nan")
    conc = disc = ta = tb = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ta += 1
            elif db == 0:
                tb += 1
            elif (da > 0) == (db > 0):
                conc += 1
            else:
                disc += 1
    den = math.sqrt((conc + disc + ta) * (conc + disc + tb))
    return (conc - disc) / den if den > 0 else float("nan")


def layer_dropout_ranking(model: nn.Module, dataloader, explainers: Sequence[str], metric: str = "miou",
                          p: float = 0.1, repeats: int = 10, seed: int = 0, **run_kwargs) -> dict:
    """Seed 002 §5.4: explainer ranking on ``metric`` without vs with test-time dropout (mean of ``repeats``)."""
    from .runner import METRIC_INFO, run_interpretability

    if metric not in METRIC_INFO:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRIC_INFO)}.")
    higher = METRIC_INFO[metric][1]
    run_kwargs = dict(run_kwargs, sanity=False, progress=False)
    det = run_interpretability(model, dataloader, list(explainers), metrics=(metric,), **run_kwargs)
    mc = {e: [] for e in explainers}
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        with mc_dropout(model, p):
            for _ in range(int(repeats)):
                r = run_interpretability(model, dataloader, list(explainers), metrics=(metric,), **run_kwargs)
                for e in explainers:
                    mc[e].append(float(r[e][metric]))
    finally:
        torch.random.set_rng_state(state)
    a = [float(det[e][metric]) for e in explainers]
    b = [sum(v) / len(v) for v in (mc[e] for e in explainers)]
    best = (max if higher else min)
    return {"metric": metric, "higher_is_better": higher, "p": p, "repeats": int(repeats),
            "dropout": "added at evaluation after every backbone stage (forward hooks); seed 002 retrains with it",
            "deterministic": dict(zip(explainers, a)), "dropout_mean": dict(zip(explainers, b)),
            "dropout_runs": mc, "kendall_tau": kendall_tau(a, b),
            "same_best": explainers[a.index(best(a))] == explainers[b.index(best(b))]}


# ---------------------------------------------------------------------------------------------- eval.py entry
def evaluate_sanity(model: nn.Module, loader, explainers: Sequence[str], out_dir: str, max_images: int = 16,
                    device: Union[str, torch.device] = "cpu", target: str = "label", split: str = "test",
                    target_layers=None) -> dict:
    """``eval.py --sanity``: the cascade for every explainer on the first ``max_images`` images; writes
    ``sanity_<split>.json`` and ``sanity_<split>.png`` in ``out_dir``; returns the summary."""
    import json

    device = torch.device(device)
    model = model.to(device).eval()
    xs, ys, seen = [], [], 0
    for batch in loader:
        x = batch["image"] if isinstance(batch, dict) else batch[0]
        y = batch["label"] if isinstance(batch, dict) else batch[1]
        xs.append(x[: max_images - seen])
        ys.append(y[: max_images - seen])
        seen += xs[-1].shape[0]
        if seen >= max_images:
            break
    x, y = torch.cat(xs).to(device).float(), torch.cat(ys).to(device)
    if y.dim() == 2 or target == "pred":  # multi-label data or predicted class: explain the top class
        with torch.no_grad():
            y = model(x).argmax(1)
    results, summary = {}, {}
    for name in explainers:
        r = cascading_randomization(model, name, x, y.long(), target_layers=target_layers)
        results[name] = r
        summary[name] = {"steps": r["steps"], "mean_spearman": r["mean_spearman"],
                         "mean_ssim": r.get("mean_ssim"), "mean_over_steps": r["mean_over_steps"],
                         "flag_similarity": r["flag_similarity"], "flag_ci95": r["flag_ci95"],
                         "flagged": r["flagged"]}
    path_json = os.path.join(out_dir, f"sanity_{split}.json")
    tmp = path_json + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"n_images": int(x.shape[0]), "flag_rule": FLAG_RULE, "flag_step": FLAG_STEP,
                   "flag_threshold": FLAG_THRESHOLD, "explainers": summary}, f, indent=2)
    os.replace(tmp, path_json)
    png = plot_sanity(results, os.path.join(out_dir, f"sanity_{split}.png"))
    for name, s in summary.items():
        lo, hi = s["flag_ci95"]
        print(f"sanity {name}: Spearman per step {[round(v, 3) for v in s['mean_spearman']]}; after the top layer "
              f"{s['flag_similarity']:.2f} [{lo:.2f}, {hi:.2f}]"
              + ("  FLAGGED (the map survives the randomisation of the classifier)" if s["flagged"] else ""))
    print(f"sanity rule: {FLAG_RULE}")
    return {"explainers": summary, "files": [path_json, png]}


def eval_checks(model: nn.Module, loader, args, out_dir: str) -> dict:
    """``eval.py --sanity`` / ``--dropout-ranking METRIC`` (needs ``--explainers``); returns result entries."""
    import json

    names = [e for e in (args.explainers or "").replace(" ", "").split(",") if e]
    if not names:
        raise SystemExit("error: --sanity / --dropout-ranking need --explainers (e.g. gradcam,guidedbackprop).")
    out = {}
    layers = None
    if getattr(args, "target_layers", None) is not None:  # eval.py --target-layers
        from ..explainers.base import parse_target_layers

        layers = parse_target_layers(args.target_layers)
    if args.sanity:
        out["sanity"] = evaluate_sanity(model, loader, names, out_dir, max_images=args.sanity_images,
                                        device=args.device, target=args.target, split=args.split,
                                        target_layers=layers)
        print("wrote " + ", ".join(out["sanity"]["files"]))
    if args.dropout_ranking:
        r = layer_dropout_ranking(model, loader, names, metric=args.dropout_ranking, p=args.dropout_p,
                                  repeats=args.dropout_repeats, max_images=args.max_images, device=args.device,
                                  target=args.target, max_batch=args.max_batch, target_layers=layers)
        path = os.path.join(out_dir, f"dropout_ranking_{args.split}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(r, f, indent=2)
        os.replace(path + ".tmp", path)
        print(f"layer-dropout ranking ({r['metric']}, p={r['p']}, {r['repeats']} passes): Kendall tau "
              f"{r['kendall_tau']:.3f}, same best method: {r['same_best']} -> {path}")
        out["dropout_ranking"] = r
    return out
