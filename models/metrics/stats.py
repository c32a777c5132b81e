"""Statistics for every experiment: paired intervals, across-seed intervals and the verdict rule (issue 14).

Pure numpy (+ ``scipy.special`` for the t quantile, already a dependency through scikit-learn); inputs may be
lists, numpy arrays or torch tensors. Every function returns a plain dict (JSON-serialisable floats).

* :func:`paired_bootstrap_ci` -- one model/explainer ``a`` against ``b`` on the *same* images: percentile
  bootstrap of the mean of the per-image differences ``a_i - b_i`` (images resampled, pairs kept).
* :func:`seed_interval` -- Student-t interval of the mean of per-seed values (``n >= 2``; with one seed the
  interval is undefined and reported as NaN, so no verdict can come from it).
* :func:`paired_diff_across_seeds` -- the interval of a paired difference that carries *both* sources of
  variation, training randomness (seeds) and the test-image sample:

  - ``n_seeds >= 3``: t-interval over the per-seed paired mean differences ``d_s = mean_i(a_si - b_si)``
    (``method="t over per-seed paired means"``). Each ``d_s`` already contains its image-sampling noise, and the
    spread of the ``d_s`` contains the training noise, so the t-interval carries both;
  - ``n_seeds in (1, 2)``: a t-interval on 1-2 values is useless (t_{0.975,1} = 12.7), so a two-level
    bootstrap is used: resample seeds with replacement, then images within each drawn seed, average
    (``method="two-level bootstrap"``). With a single seed only the image level exists; the method then says
    ``"image bootstrap (1 seed: training variance not captured)"``. Quantities with one value per seed (MIS, a
    split-level mIoU) have no image level: with fewer than 3 seeds their interval is undefined (NaN), because
    a bootstrap over 2 values would call two same-signed seeds an effect.

  Pooling all images of all seeds as if independent is *not* done: it would shrink the interval as
  ``1/sqrt(n_seeds * n_images)`` whatever the seed-to-seed spread (tests/test_stats.py checks this).
* :func:`verdict` -- the rule applied by code: *supported* when the interval of the paired difference excludes
  0 in the paper's direction, *contradicted* when it excludes 0 the other way, *inconclusive* otherwise
  (also when the interval is undefined).

NaN per-image values (e.g. a localisation metric on an image without ground truth) are dropped pairwise.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np

__all__ = ["paired_bootstrap_ci", "seed_interval", "paired_diff_across_seeds", "verdict", "t_quantile",
           "VERDICTS", "bootstrap_ci", "versus_best_control"]

VERDICTS = ("supported", "contradicted", "inconclusive")


def _arr(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty; pass at least one value.")
    return a


def _pair(a, b, name: str = "a/b"):
    a, b = _arr(a, f"{name}[a]"), _arr(b, f"{name}[b]")
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same images: got {a.size} values for a and {b.size} for b "
                         "(evaluate both on the same image list).")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` of Student's t with ``df`` degrees of freedom (scipy's incomplete-beta inverse)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}.")
    from scipy.special import stdtrit

    return float(stdtrit(df, p))


def _nan_result(mean: float, **extra) -> Dict[str, float]:
    return dict(mean=float(mean), ci95_low=float("nan"), ci95_high=float("nan"), **extra)


def paired_bootstrap_ci(a, b, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> Dict[str, float]:
    """Percentile-bootstrap interval of ``mean(a - b)``; ``a``, ``b`` per-image values on the same images.

    Returns ``dict(mean, ci95_low, ci95_high)`` (the keys keep the ``ci95`` name whatever ``ci`` is).
    """
    a, b = _pair(a, b)
    if a.size == 0:
        return _nan_result(float("nan"))
    d = a - b
    mean = float(d.mean())
    if d.size < 2:
        return _nan_result(mean)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(int(n_boot), d.size))
    boots = d[idx].mean(1)
    lo, hi = np.quantile(boots, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return dict(mean=mean, ci95_low=float(lo), ci95_high=float(hi))


def seed_interval(values, ci: float = 0.95) -> Dict[str, float]:
    """t-interval of the mean of per-seed values: ``mean ± t_{(1+ci)/2, n-1} · sd / sqrt(n)``."""
    v = _arr(values, "values")
    v = v[~np.isnan(v)]
    n = int(v.size)
    if n == 0:
        return _nan_result(float("nan"), n_seeds=0)
    mean = float(v.mean())
    if n < 2:
        return _nan_result(mean, n_seeds=n)
    half = t_quantile((1 + ci) / 2, n - 1) * float(v.std(ddof=1)) / math.sqrt(n)
    return dict(mean=mean, ci95_low=mean - half, ci95_high=mean + half, n_seeds=n)


def paired_diff_across_seeds(a_per_seed: Sequence, b_per_seed: Sequence, ci: float = 0.95, n_boot: int = 2000,
                             seed: int = 0) -> Dict[str, object]:
    """Interval of the paired difference ``a - b`` over seeds *and* images (see the module docstring).

    ``a_per_seed[s]``, ``b_per_seed[s]``: per-image values of seed ``s`` on the same images (the image lists of
    two seeds may differ). Returns ``dict(mean, ci95_low, ci95_high, n_seeds, method)``; ``mean`` is the mean
    over seeds of the per-seed paired mean differences.
    """
    if len(a_per_seed) != len(b_per_seed):
        raise ValueError(f"a has {len(a_per_seed)} seeds and b has {len(b_per_seed)}; pass one per-image array per "
                         "seed for both.")
    if len(a_per_seed) == 0:
        raise ValueError("no seeds given; pass a list with one per-image array per seed.")
    diffs = []
    for s, (a, b) in enumerate(zip(a_per_seed, b_per_seed)):
        a, b = _pair(a, b, f"seed {s}")
        if a.size:
            diffs.append(a - b)
    n = len(diffs)
    if n == 0:
        return _nan_result(float("nan"), n_seeds=0, method="no values")
    means = np.array([d.mean() for d in diffs])
    if n >= 3:
        r = seed_interval(means, ci)
        r["method"] = "t over per-seed paired means"
        return r
    if all(d.size < 2 for d in diffs):  # one value per seed (e.g. MIS, a split-level mIoU): no image level
        return _nan_result(float(means.mean()), n_seeds=n,
                           method="undefined: one value per seed needs >= 3 seeds (t over seeds)")
    rng = np.random.default_rng(seed)
    boots = np.empty(int(n_boot))
    for k in range(int(n_boot)):
        picks = rng.integers(0, n, size=n)
        boots[k] = np.mean([diffs[s][rng.integers(0, diffs[s].size, size=diffs[s].size)].mean() for s in picks])
    lo, hi = np.quantile(boots, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    if n == 1 and diffs[0].size < 2:
        lo = hi = float("nan")
    method = "two-level bootstrap" if n > 1 else "image bootstrap (1 seed: training variance not captured)"
    return dict(mean=float(means.mean()), ci95_low=float(lo), ci95_high=float(hi), n_seeds=n, method=method)


def verdict(ci_low: float, ci_high: float, direction: int = +1) -> str:
    """``"supported"`` / ``"contradicted"`` / ``"inconclusive"`` for an interval of a paired difference.

    ``direction`` is the sign the paper claims for the difference (mechanism - baseline): ``+1`` for
    higher-is-better metrics, ``-1`` when the paper claims a decrease (e.g. AD, deletion). A NaN bound gives
    ``"inconclusive"``.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1 (the claimed sign of the difference), got {direction!r}.")
    lo, hi = float(ci_low), float(ci_high)
    if math.isnan(lo) or math.isnan(hi):
        return "inconclusive"
    if lo > hi:
        raise ValueError(f"ci_low ({lo}) > ci_high ({hi}); pass the interval bounds in order.")
    if lo > 0:
        return "supported" if direction > 0 else "contradicted"
    if hi < 0:
        return "supported" if direction < 0 else "contradicted"
    return "inconclusive"


def bootstrap_ci(values, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> Dict[str, float]:
    """Percentile-bootstrap interval of the mean of per-image ``values`` (NaN dropped; images resampled):
    ``dict(mean, ci95_low, ci95_high, n)``. One model = one training seed: an image-level interval only."""
    v = _arr(values, "values")
    v = v[~np.isnan(v)]
    r = paired_bootstrap_ci(v, np.zeros_like(v), n_boot=n_boot, ci=ci, seed=seed) if v.size else \
        _nan_result(float("nan"))
    r["n"] = int(v.size)
    return r


def versus_best_control(per_item, controls: Sequence[str], higher_is_better, degenerate: Sequence[str] = ("fakecam",),
                        n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> Dict[str, dict]:
    """Per metric: every explainer's mean with its image-bootstrap interval, and each non-control explainer's paired
    difference to the best *non-degenerate* control (issue 14 item 2) on the same images.

    ``per_item``: ``{explainer: {metric: [value per item]}}`` (``run_interpretability(...).per_item``: item order
    shared by all explainers, NaN = not scored); ``controls``: the control explainers; ``higher_is_better``:
    ``{metric: bool}`` (metrics missing from it are skipped). Controls named in ``degenerate`` (Fake-CAM games
    AD/AI by construction) and controls without any scored item on a metric (constant maps, refused localisation)
    are not candidates. The best control is the one with the best mean; the difference ``explainer - control``
    gets :func:`paired_bootstrap_ci` and ``beats`` = ``"yes"`` / ``"no"`` / ``"unclear"`` (the interval excludes 0
    in the better / worse direction, or not). Returns ``{metric: {"best_control": name or None, "explainers":
    {name: dict(mean, ci95_low, ci95_high, n, control, vs_best_control=dict(mean, ci95_low, ci95_high, beats)
    or None)}}}``.
    """
    controls = set(controls or ())
    metrics = [m for m in dict.fromkeys(k for row in per_item.values() for k in row) if m in higher_is_better]
    out: Dict[str, dict] = {}
    for m in metrics:
        hib = bool(higher_is_better[m])
        rows = {e: bootstrap_ci(per_item[e][m], n_boot, ci, seed) for e in per_item if m in per_item[e]}
        cands = [e for e in rows if e in controls and e not in degenerate and rows[e]["n"] > 0]
        best = (max if hib else min)(cands, key=lambda e: rows[e]["mean"]) if cands else None
        for e, r in rows.items():
            r["control"] = e in controls
            r["vs_best_control"] = None
            if best is not None and e not in controls and r["n"] > 0:
                d = paired_bootstrap_ci(per_item[e][m], per_item[best][m], n_boot, ci, seed)
                v = verdict(d["ci95_low"], d["ci95_high"], +1 if hib else -1)
                d["beats"] = {"supported": "yes", "contradicted": "no"}.get(v, "unclear")
                r["vs_best_control"] = d
        out[m] = {"best_control": best, "higher_is_better": hib, "explainers": rows}
    return out
