"""The small harness every experiment shares (issue 14): arguments, seeds, a run cache, the explained layer,
interval rows, verdict tables and report writing. Each ``experiments/<mechanism>.py`` keeps only what is
specific to its paper.

>>> from experiments import harness as H
>>> p = argparse.ArgumentParser(); H.add_common_args(p); args = p.parse_args()
>>> cache = H.RunCache(args.cache_dir)
>>> res = cache.get_or_run({"exp": "x", "seed": 0, ...}, lambda: train_and_eval(...))   # resumes / accumulates
>>> row = H.summary_row("ca_stream", "resnet18", "intrinsic", "ad", [v_seed0, v_seed1, v_seed2], control=False)
>>> claim = H.claim_row("CA-Stream lowers AD", "ad", a_per_seed, b_per_seed, direction=-1)
>>> H.write_report("docs/results/x", rows, claims, title="...")                # x.md + x.json

JSON rows (``docs/results/*.json``) share one schema: ``mechanism, backbone, explainer, metric, mean, ci95_low,
ci95_high, n_seeds, control`` (+ free extras). ``mean`` is the mean over seeds of the per-seed values; the
interval is :func:`models.metrics.stats.seed_interval` (t over seeds; NaN with one seed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models.metrics.stats import paired_diff_across_seeds, seed_interval, verdict  # noqa: E402

__all__ = ["add_common_args", "parse_seeds", "seed_everything", "RunCache", "config_hash", "atomic_write_text",
           "atomic_write_json", "tap_sizes", "explain_layer_for", "summary_row", "claim_row", "rows_markdown",
           "claims_markdown", "write_report", "ROW_KEYS", "CLAIM_KEYS", "fmt_interval", "beats_best_control",
           "DEFAULT_SEEDS"]

DEFAULT_SEEDS = (0, 1, 2)
ROW_KEYS = ("mechanism", "backbone", "explainer", "metric", "mean", "ci95_low", "ci95_high", "n_seeds", "control")
CLAIM_KEYS = ("claim", "metric", "direction", "mean", "ci95_low", "ci95_high", "n_seeds", "method", "verdict")


# ---------------------------------------------------------------------------------------------- arguments / seeds
def parse_seeds(text) -> List[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ``"3x"`` -> ``[0, 1, 2]`` (the first 3 seeds); a list passes through."""
    if isinstance(text, (list, tuple)):
        return [int(s) for s in text]
    text = str(text).strip()
    try:
        if text.endswith("x"):
            return list(range(int(text[:-1])))
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a comma list of integers ('0,1,2') or a count ('3x'), "
                                         f"got {text!r}.") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs at least one seed and no repeats, got {text!r}.")
    return seeds


def add_common_args(parser: argparse.ArgumentParser, default_out: Optional[str] = None,
                    default_seeds: Sequence[int] = DEFAULT_SEEDS, out: bool = True) -> argparse.ArgumentParser:
    """Add ``--seeds --out --quick --cache-dir --no-cache`` to ``parser`` (``out=False``: the script has its own
    ``--out``)."""
    parser.add_argument("--seeds", type=parse_seeds, default=list(default_seeds),
                        help="training seeds: comma list ('0,1,2') or a count ('3x'); default %(default)s")
    if out:
        parser.add_argument("--out", default=default_out, help="report path prefix (writes <out>.md and <out>.json)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run (seconds): tiny data, 1 step budget; numbers are meaningless")
    parser.add_argument("--cache-dir", default=os.path.join(ROOT, "checkpoints", "experiment_cache"),
                        help="one JSON per finished run, keyed by a hash of its config (resume / accumulate)")
    parser.add_argument("--no-cache", action="store_true", help="ignore and do not write the run cache")
    return parser


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a ``torch.Generator`` seeded the same (for DataLoaders)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- atomic writes / cache
def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder + ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _jsonable(o):
    if isinstance(o, Mapping):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if torch.is_tensor(o):
        return _jsonable(o.detach().cpu().tolist())
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, (np.floating, float)):
        o = float(o)
        return None if math.isnan(o) or math.isinf(o) else o
    if isinstance(o, np.integer):
        return int(o)
    return o


def atomic_write_json(path: str, obj) -> None:
    """JSON with NaN/inf written as ``null`` (strict JSON), atomically."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=1, sort_keys=False, allow_nan=False) + "\n")


def config_hash(config: Mapping) -> str:
    """Stable 16-hex key of a JSON-serialisable config (key order does not matter)."""
    blob = json.dumps(_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RunCache:
    """One JSON file per finished run under ``folder``, named by :func:`config_hash` of the run's config.

    ``get_or_run(config, fn)`` returns the cached result or runs ``fn()`` (a JSON-serialisable dict) and stores
    it with the config and the wall time. ``enabled=False`` turns it into a pass-through.
    """

    def __init__(self, folder: str, enabled: bool = True) -> None:
        self.folder, self.enabled = folder, bool(enabled)

    def path(self, config: Mapping) -> str:
        return os.path.join(self.folder, f"{config_hash(config)}.json")

    def get(self, config: Mapping) -> Optional[dict]:
        if not self.enabled:
            return None
        p = self.path(config)
        if not os.path.exists(p):
            return None
        try:
            with open(p) as f:
                return json.load(f)["result"]
        except (OSError, ValueError, KeyError) as e:
            print(f"[cache] ignoring unreadable cache file {p} ({e}); the run is repeated.", file=sys.stderr)
            return None

    def put(self, config: Mapping, result: Mapping, seconds: Optional[float] = None) -> None:
        if self.enabled:
            atomic_write_json(self.path(config), {"config": config, "result": result, "seconds": seconds,
                                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def get_or_run(self, config: Mapping, fn: Callable[[], dict]) -> dict:
        hit = self.get(config)
        if hit is not None:
            return hit
        t0 = time.time()
        result = fn()
        self.put(config, result, time.time() - t0)
        return json.loads(json.dumps(_jsonable(result)))  # same types as a cache hit


# ---------------------------------------------------------------------------------------------- explained layer
def tap_sizes(model: torch.nn.Module, image_size, in_chans: Optional[int] = None) -> List[tuple]:
    """Spatial sizes of ``model.backbone.taps`` for one input of ``image_size`` (int or tuple; dry forward)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "taps"):
        raise ValueError(f"{type(model).__name__} has no backbone.taps; explain_layer_for needs a zoo model "
                         "built on models.backbones.Backbone.")
    if isinstance(image_size, (int, np.integer)):
        spatial = (int(image_size),) * int(getattr(model, "spatial_dims", 2))
    else:
        spatial = tuple(int(s) for s in image_size)
    if in_chans is None:
        in_chans = int(getattr(backbone, "in_chans", 0) or getattr(model, "in_chans", 0) or 3)
    x = torch.zeros((1, in_chans) + spatial)
    sizes: List[tuple] = []
    handles = [t.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[2:]))) for t in backbone.taps]
    was = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(x)
    finally:
        backbone.train(was)
        for h in handles:
            h.remove()
    return sizes


def explain_layer_for(model: torch.nn.Module, image_size, min_size: int = 7,
                      in_chans: Optional[int] = None) -> Optional[int]:
    """Index ``i`` of the deepest tap ``model.backbone.taps[i]`` whose map is at least ``min_size`` in every
    spatial dimension at ``image_size`` (issue 14 item 3: an explained layer that can be right). If no tap is
    that large, the tap with the largest map (the deepest of equals, so ViT taps that are side outputs are not
    chosen) is returned and a warning printed.
    Pass the index as ``target_layers`` to :func:`models.explainers.create_explainer`. Models without
    ``backbone.taps`` (e.g. eX-ViT, whose encoder is its own ViT) give ``None``: their ``cam_target_layer()``.
    """
    if not hasattr(getattr(model, "backbone", None), "taps"):
        return None
    sizes = tap_sizes(model, image_size, in_chans)
    ok = [i for i, s in enumerate(sizes) if min(s) >= int(min_size)]
    if ok:
        return ok[-1]
    best = max(range(len(sizes)), key=lambda i: (min(sizes[i]), i))  # ties (ViT tokens): the deepest
    print(f"[harness] no backbone tap is >= {min_size} px at input {image_size} (tap sizes {sizes}); explaining "
          f"tap {best} {sizes[best]}.", file=sys.stderr)
    return best


# ---------------------------------------------------------------------------------------------- rows and verdicts
def summary_row(mechanism: str, backbone: str, explainer: str, metric: str, per_seed_values: Iterable[float],
                control: bool = False, ci: float = 0.95, **extra) -> dict:
    """One JSON row: across-seed mean and t-interval (``seed_interval``) of one metric."""
    vals = [float("nan") if v is None else float(v) for v in per_seed_values]
    r = seed_interval(vals, ci) if vals else dict(mean=float("nan"), ci95_low=float("nan"), ci95_high=float("nan"),
                                                  n_seeds=0)
    row = dict(mechanism=mechanism, backbone=backbone, explainer=explainer, metric=metric, mean=r["mean"],
               ci95_low=r["ci95_low"], ci95_high=r["ci95_high"], n_seeds=int(r["n_seeds"]), control=bool(control))
    row["per_seed"] = vals
    row.update(extra)
    return row


def claim_row(claim: str, metric: str, a_per_seed: Sequence, b_per_seed: Sequence, direction: int = +1,
              ci: float = 0.95, n_boot: int = 2000, **extra) -> dict:
    """A paper claim as a paired difference ``a - b`` (mechanism minus its baseline) with its verdict.

    ``a_per_seed[s]`` / ``b_per_seed[s]``: per-image values of seed ``s`` on the same images (scalars are
    accepted for per-seed quantities such as accuracy: the interval is then over seeds only). ``direction``: the
    paper's claimed sign of ``a - b``.
    """
    a = [np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in a_per_seed]
    b = [np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in b_per_seed]
    r = paired_diff_across_seeds(a, b, ci=ci, n_boot=n_boot)
    row = dict(claim=claim, metric=metric, direction=int(direction), mean=r["mean"], ci95_low=r["ci95_low"],
               ci95_high=r["ci95_high"], n_seeds=int(r["n_seeds"]), method=r["method"],
               verdict=claim_verdict(r["ci95_low"], r["ci95_high"], direction, r["n_seeds"]))
    row.update(extra)
    return row


def claim_verdict(ci_low, ci_high, direction: int, n_seeds: int) -> str:
    """:func:`models.metrics.stats.verdict`, but ``inconclusive`` with fewer than 2 seeds: one seed carries no
    training variance, so its (image-only) interval cannot decide a claim about a training method."""
    return verdict(ci_low, ci_high, direction) if int(n_seeds) >= 2 else "inconclusive"


def beats_best_control(rows: Sequence[Mapping], mechanism_row: Mapping, higher_is_better: bool,
                       degenerate: Sequence[str] = ("fakecam",)) -> Optional[str]:
    """Does ``mechanism_row`` beat the best non-degenerate control of the same (mechanism, backbone, metric)?

    Returns ``"yes"`` (its interval is entirely better than the best control's mean), ``"no"`` (its interval is
    entirely worse), ``"unclear"``, or ``None`` when there is no control row. Fake-CAM (a constant map) is
    degenerate: it games AD/AI by construction, so it is left out of this comparison.
    """
    key = (mechanism_row.get("mechanism"), mechanism_row.get("backbone"), mechanism_row.get("metric"))
    ctrl = [r for r in rows if r.get("control") and r.get("explainer") not in degenerate
            and (r.get("mechanism"), r.get("backbone"), r.get("metric")) == key
            and r.get("mean") is not None and not math.isnan(float(r["mean"]))]
    if not ctrl:
        return None
    best = (max if higher_is_better else min)(float(r["mean"]) for r in ctrl)
    lo, hi = mechanism_row.get("ci95_low"), mechanism_row.get("ci95_high")
    if lo is None or hi is None or math.isnan(float(lo)) or math.isnan(float(hi)):
        lo = hi = float(mechanism_row["mean"])  # one seed: compare the point estimate, say so in the report
    lo, hi = float(lo), float(hi)
    if higher_is_better:
        return "yes" if lo > best else ("no" if hi < best else "unclear")
    return "yes" if hi < best else ("no" if lo > best else "unclear")


def fmt_interval(mean, lo, hi, digits: int = 1) -> str:
    """``"12.3 [10.1, 14.5]"``; ``"12.3 (1 seed)"`` when the interval is undefined; ``"–"`` for NaN."""
    def bad(v):
        return v is None or (isinstance(v, float) and math.isnan(v))
    if bad(mean):
        return "–"
    if bad(lo) or bad(hi):
        return f"{mean:.{digits}f} (no CI)"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def rows_markdown(rows: Sequence[Mapping], metrics: Optional[Sequence[str]] = None, digits: int = 1,
                  metric_labels: Optional[Mapping[str, str]] = None) -> str:
    """Markdown table: one line per (mechanism, backbone, explainer), one column per metric with
    ``mean [ci95_low, ci95_high]``, and a ``control`` column."""
    if metrics is None:
        metrics = list(dict.fromkeys(r["metric"] for r in rows))
    labels = dict(metric_labels or {})
    keys = list(dict.fromkeys((r["mechanism"], r["backbone"], r["explainer"]) for r in rows))
    cell = {(r["mechanism"], r["backbone"], r["explainer"], r["metric"]): r for r in rows}
    ctrl = {(r["mechanism"], r["backbone"], r["explainer"]): bool(r.get("control")) for r in rows}
    head = ["mechanism", "backbone", "explainer", "control"] + [labels.get(m, m) for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        cells = []
        for m in metrics:
            r = cell.get(k + (m,))
            cells.append("–" if r is None else fmt_interval(r["mean"], r["ci95_low"], r["ci95_high"], digits))
        lines.append("| " + " | ".join(list(k) + ["yes" if ctrl[k] else ""] + cells) + " |")
    return "\n".join(lines) + "\n"


def claims_markdown(claims: Sequence[Mapping], digits: int = 2) -> str:
    """Verdict table: claim, metric, claimed sign, paired difference with its interval, seeds, method, verdict."""
    lines = ["| claim | metric | claimed sign | difference (mechanism − baseline) [95 % CI] | seeds | interval | "
             "verdict |", "|---|---|---|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c['claim']} | {c['metric']} | {'+' if c['direction'] > 0 else '−'} | "
                     f"{fmt_interval(c['mean'], c['ci95_low'], c['ci95_high'], digits)} | {c['n_seeds']} | "
                     f"{c['method']} | **{c['verdict']}** |")
    return "\n".join(lines) + "\n"


def write_report(prefix: str, rows: Sequence[Mapping], claims: Sequence[Mapping] = (), title: str = "",
                 intro: str = "", extra_md: str = "", meta: Optional[Mapping] = None,
                 metrics: Optional[Sequence[str]] = None, metric_labels: Optional[Mapping[str, str]] = None,
                 digits: int = 1) -> str:
    """Write ``<prefix>.md`` (title, intro, verdicts, table with ``digits`` decimals, extra) and ``<prefix>.json``
    (``{"meta", "rows", "claims"}``) atomically; return the markdown."""
    md = f"# {title}\n\n" if title else ""
    if intro:
        md += intro.rstrip() + "\n\n"
    dropped = [c for c in claims if not c.get("n_seeds")]
    claims = [c for c in claims if c.get("n_seeds")]
    if dropped:
        extra_md = (f"{len(dropped)} claim(s) had no values (localisation refused on maps coarser than 4x4, or only "
                    f"constant maps): {'; '.join(c['claim'] for c in dropped)}.\n\n") + extra_md
    if claims:
        md += ("## Verdicts (rule: supported = the 95 % interval of the paired difference excludes 0 in the paper's "
               "direction; contradicted = excludes 0 the other way; inconclusive = otherwise)\n\n")
        md += claims_markdown(claims) + "\n"
    if rows:
        md += "## Results (mean over seeds [95 % t-interval over seeds]; `control` rows are sanity baselines)\n\n"
        md += rows_markdown(rows, metrics, digits=digits, metric_labels=metric_labels) + "\n"
    if extra_md:
        md += extra_md.rstrip() + "\n"
    atomic_write_text(prefix + ".md", md)
    atomic_write_json(prefix + ".json", {"meta": dict(meta or {}), "rows": list(rows), "claims": list(claims)})
    return md
