"""models/metrics/stats.py and the shared experiment harness (issue 14): intervals cover known effects, the verdict
rule gives each answer, the two-level interval carries the seed variance, the run cache resumes."""
import json
import math
import os

import numpy as np
import pytest
import torch

from experiments import harness as H
from models.metrics.stats import (paired_bootstrap_ci, paired_diff_across_seeds, seed_interval, t_quantile,
                                  verdict)


def test_t_quantile_matches_tables():
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(0.975, 30) == pytest.approx(2.042, abs=1e-3)


def test_paired_bootstrap_covers_known_difference_at_nominal_rate():
    rng = np.random.default_rng(1)
    true, hits, reps = 0.3, 0, 200
    for r in range(reps):
        shared = rng.normal(0, 1, 60)  # image difficulty, common to both (pairing removes it)
        a = shared + true + rng.normal(0, 0.5, 60)
        b = shared + rng.normal(0, 0.5, 60)
        ci = paired_bootstrap_ci(a, b, n_boot=400, seed=r)
        hits += ci["ci95_low"] <= true <= ci["ci95_high"]
        assert ci["mean"] == pytest.approx(float((a - b).mean()))
    assert 0.90 <= hits / reps <= 0.99


def test_paired_bootstrap_uses_the_pairing():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 5, 100)
    a, b = shared + 0.5 + rng.normal(0, 0.1, 100), shared + rng.normal(0, 0.1, 100)
    ci = paired_bootstrap_ci(a, b)
    assert ci["ci95_low"] > 0.4 and ci["ci95_high"] < 0.6  # unpaired it would span +-1


def test_paired_bootstrap_checks_and_nan():
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap_ci([1, 2, 3], [1, 2])
    ci = paired_bootstrap_ci([1.0, float("nan"), 3.0, 5.0], [0.0, 1.0, 1.0, 1.0])
    assert ci["mean"] == pytest.approx((1 + 2 + 4) / 3)


def test_seed_interval_is_the_t_interval():
    v = [1.0, 2.0, 4.0]
    r = seed_interval(v)
    half = t_quantile(0.975, 2) * np.std(v, ddof=1) / math.sqrt(3)
    assert r["mean"] == pytest.approx(7 / 3) and r["n_seeds"] == 3
    assert r["ci95_high"] - r["mean"] == pytest.approx(half)
    one = seed_interval([5.0])
    assert one["mean"] == 5.0 and math.isnan(one["ci95_low"]) and one["n_seeds"] == 1


def test_seed_interval_coverage():
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(400):
        r = seed_interval(rng.normal(2.0, 1.0, 3))
        hits += r["ci95_low"] <= 2.0 <= r["ci95_high"]
    assert 0.90 <= hits / 400 <= 0.99


def test_verdict_rule_three_answers():
    assert verdict(0.1, 0.5, +1) == "supported"
    assert verdict(-0.5, -0.1, +1) == "contradicted"
    assert verdict(-0.1, 0.5, +1) == "inconclusive"
    assert verdict(-0.5, -0.1, -1) == "supported"  # lower-is-better metric, paper claims a decrease
    assert verdict(0.1, 0.5, -1) == "contradicted"
    assert verdict(float("nan"), float("nan")) == "inconclusive"
    with pytest.raises(ValueError):
        verdict(0, 1, direction=0)


def test_verdict_on_synthetic_known_effects():
    rng = np.random.default_rng(7)

    def seeds(effect, n_seeds=3, n_img=80, seed_sd=0.05):
        a, b = [], []
        for _ in range(n_seeds):
            shift = rng.normal(0, seed_sd)
            base = rng.normal(0, 1, n_img)
            a.append(base + effect + shift + rng.normal(0, 0.3, n_img))
            b.append(base + rng.normal(0, 0.3, n_img))
        return a, b

    for effect, want in ((1.0, "supported"), (-1.0, "contradicted"), (0.0, "inconclusive")):
        row = H.claim_row("x", "m", *seeds(effect), direction=+1)
        assert row["verdict"] == want, (effect, row)
        assert row["method"] == "t over per-seed paired means"


def _seed_draws(seed_sd, n_seeds, rng, n_img=200):
    a, b = [], []
    for _ in range(n_seeds):
        shift = rng.normal(0, seed_sd)  # training randomness: shifts the whole seed's difference
        base = rng.normal(0, 1, n_img)
        a.append(base + shift + rng.normal(0, 0.2, n_img))
        b.append(base + rng.normal(0, 0.2, n_img))
    return a, b


@pytest.mark.parametrize("n_seeds", [2, 4])
def test_two_level_interval_widens_with_seed_variance(n_seeds):
    rng = np.random.default_rng(11)
    widths, pooled = {}, {}
    for sd in (0.0, 1.0):
        a, b = _seed_draws(sd, n_seeds, rng)
        r = paired_diff_across_seeds(a, b, n_boot=500)
        widths[sd] = r["ci95_high"] - r["ci95_low"]
        p = paired_bootstrap_ci(np.concatenate(a), np.concatenate(b), n_boot=500)  # the wrong way: pooled images
        pooled[sd] = p["ci95_high"] - p["ci95_low"]
    assert widths[1.0] > 5 * widths[0.0]
    # pooling images as independent barely notices the seed spread (its width is set by the image noise)
    assert pooled[1.0] < widths[1.0] / 3


def test_two_level_bootstrap_coverage_with_seed_noise():
    """With 2 seeds and real seed noise, the two-level interval must cover the true mean far more often than the
    pooled-image interval does."""
    rng = np.random.default_rng(5)
    cover2 = coverp = 0
    reps = 60
    for _ in range(reps):
        a, b = _seed_draws(0.5, 2, rng, n_img=100)
        r = paired_diff_across_seeds(a, b, n_boot=300, seed=1)
        p = paired_bootstrap_ci(np.concatenate(a), np.concatenate(b), n_boot=300)
        cover2 += r["ci95_low"] <= 0.0 <= r["ci95_high"]
        coverp += p["ci95_low"] <= 0.0 <= p["ci95_high"]
    assert r["method"] == "two-level bootstrap"
    assert cover2 > coverp + 10


def test_one_value_per_seed_needs_three_seeds():
    r = paired_diff_across_seeds([[1.0], [2.0]], [[0.0], [0.5]])
    assert math.isnan(r["ci95_low"]) and "3 seeds" in r["method"]
    assert verdict(r["ci95_low"], r["ci95_high"]) == "inconclusive"
    r = paired_diff_across_seeds([[1.0], [2.0], [1.5]], [[0.0], [0.5], [0.4]])
    assert r["method"] == "t over per-seed paired means" and r["ci95_low"] > 0


def test_single_seed_method_is_labelled():
    r = paired_diff_across_seeds([np.arange(10.0)], [np.zeros(10)])
    assert r["n_seeds"] == 1 and "training variance not captured" in r["method"]
    with pytest.raises(ValueError, match="seeds"):
        paired_diff_across_seeds([np.ones(3)], [np.ones(3), np.ones(3)])


# ---------------------------------------------------------------------------------------------- harness
def test_parse_seeds():
    assert H.parse_seeds("0,1,2") == [0, 1, 2]
    assert H.parse_seeds("4x") == [0, 1, 2, 3]
    with pytest.raises(Exception, match="seeds"):
        H.parse_seeds("a,b")


def test_run_cache_resumes(tmp_path):
    cache = H.RunCache(str(tmp_path))
    calls = []

    def run():
        calls.append(1)
        return {"acc": 0.5, "per_image": np.array([1.0, float("nan")])}

    cfg = {"exp": "t", "seed": 0, "lr": 1e-3}
    r1 = cache.get_or_run(cfg, run)
    r2 = cache.get_or_run(dict(reversed(list(cfg.items()))), run)  # key order does not matter
    assert calls == [1] and r1 == r2 == {"acc": 0.5, "per_image": [1.0, None]}
    cache.get_or_run({**cfg, "seed": 1}, run)
    assert len(calls) == 2 and len(os.listdir(tmp_path)) == 2
    assert not any(n.startswith(".tmp_") for n in os.listdir(tmp_path))
    with open(cache.path(cfg)) as f:
        assert json.load(f)["config"] == cfg


def test_explain_layer_for_picks_deepest_tap_at_least_7():
    from models import create_model

    m = create_model("baseline", backbone="resnet18", num_classes=3)
    assert H.tap_sizes(m, 64) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert H.explain_layer_for(m, 64) == 2  # 8x8; the 4x4 and 2x2 stages are too coarse
    assert H.explain_layer_for(m, 128) == 3  # 8x8 at stride 16
    assert H.explain_layer_for(m, 224) == 4  # the papers' 7x7
    assert H.explain_layer_for(m, 64, min_size=64) == 0  # nothing that large: the finest tap


def test_summary_and_claim_rows_schema(tmp_path):
    rows = [H.summary_row("baseline", "resnet18", "gradcam", "ad", [10.0, 12.0, 11.0]),
            H.summary_row("baseline", "resnet18", "random", "ad", [30.0, 31.0, 29.0], control=True)]
    for r in rows:
        assert set(H.ROW_KEYS) <= set(r)
    assert H.beats_best_control(rows, rows[0], higher_is_better=False) == "yes"
    assert H.beats_best_control(rows, rows[0], higher_is_better=True) == "no"
    claim = H.claim_row("acc kept", "acc", [0.9, 0.91, 0.92], [0.9, 0.9, 0.9], direction=+1)
    assert set(H.CLAIM_KEYS) <= set(claim)
    md = H.write_report(str(tmp_path / "r"), rows, [claim], title="T")
    assert "| baseline | resnet18 | random | yes |" in md and "**" in md
    with open(tmp_path / "r.json") as f:
        data = json.load(f)
    assert data["rows"][1]["control"] is True and data["claims"][0]["verdict"] in ("supported", "inconclusive")
