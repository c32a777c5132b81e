"""experiments/ca_stream.py pieces that decide the report (issue 14): the resolution claim, the learning-signal
measurement and the attention diagnostics. Each would fail if its arithmetic were wrong (< 5 s together)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments import ca_stream as X
from models import create_model

torch.set_num_threads(2)


def _claim(explainer, metric, direction, per_seed, size):
    return dict(claim=f"{explainer} {metric} {size}", explainer=explainer, metric=metric, direction=direction,
                per_seed=list(per_seed), image_size=size, primary=metric == "ag")


def test_resolution_claims_follow_the_metric_direction_and_the_rule():
    rng = np.random.default_rng(0)
    noise = lambda: rng.normal(0, 0.1, 3).tolist()  # noqa: E731
    here = [_claim("gradcam", "ag", +1, np.array([5.0, 5.5, 6.0]) + noise(), 128),      # larger gain at 128
            _claim("gradcam", "ad", -1, np.array([2.0, 2.4, 2.2]) + noise(), 128),      # AD up: worse at 128
            _claim("gradcam", "ins", +1, [1.0, -1.0, 0.2], 128),                        # noise
            _claim("gradcam", "pg", +1, [1.0, float("nan"), 0.0], 128),                 # refused map: skipped
            _claim("gradcampp", "ag", +1, [1.0, 2.0], 128)]                             # seed count differs
    there = [_claim("gradcam", "ag", +1, [0.1, -0.2, 0.0], 64), _claim("gradcam", "ad", -1, [0.0, 0.1, -0.1], 64),
             _claim("gradcam", "ins", +1, [0.5, -0.4, 0.0], 64), _claim("gradcam", "pg", +1, [0.0, 1.0, 0.0], 64),
             _claim("gradcampp", "ag", +1, [0.0, 1.0, 2.0], 64)]
    out = {c["metric"]: c for c in X.resolution_claims(here, there, 128)}
    assert set(out) == {"ag", "ad", "ins"}
    assert out["ag"]["verdict"] == "supported" and out["ag"]["primary"]
    assert out["ad"]["verdict"] == "contradicted" and out["ad"]["direction"] == -1
    assert out["ins"]["verdict"] == "inconclusive"
    # the interval is over the per-seed differences of effects (here - there)
    d = np.subtract(here[0]["per_seed"], there[0]["per_seed"])
    assert out["ag"]["mean"] == pytest.approx(d.mean())
    assert "128 px" in out["ag"]["claim"] and "64 px" in out["ag"]["claim"]


def _tiny_stream(q0_init="trunc_normal"):
    torch.manual_seed(0)
    return create_model("ca_stream", backbone="resnet10t", num_classes=3, q0_init=q0_init, start_stage=-1,
                        backbone_kwargs={"out_indices": [1, 2, 3], "output_stride": 8}).eval()


def _batches(n=6, size=32):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, size, size, generator=g)
    mask = torch.zeros(n, size, size)
    mask[:, : size // 2, : size // 4] = 1  # object = the top-left eighth
    return [{"image": x[:3], "label": torch.tensor([0, 1, 2]), "mask": mask[:3]},
            {"image": x[3:], "label": torch.tensor([2, 2, 0]), "mask": mask[3:]}]


def test_stream_signal_matches_direct_cross_entropy():
    model, batches = _tiny_stream(), _batches()
    sig = X.stream_signal(model, batches, max_images=100)
    x = torch.cat([b["image"] for b in batches])
    y = torch.cat([b["label"] for b in batches])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_stream(x)
    assert sig["n"] == 6
    for k, key in (("gap", "gap_logits"), ("ca", "logits")):
        lo = out[key].float()
        assert sig[f"{k}_ce"] == pytest.approx(F.cross_entropy(lo, y).item(), rel=2e-2)
        assert sig[f"{k}_acc"] == pytest.approx(100 * (lo.argmax(1) == y).float().mean().item())
    assert X.stream_signal(model, batches, max_images=3)["n"] == 3  # stops after max_images


def test_attention_diagnostics_uniform_attention_is_gap():
    # q0 = 0 and one block: the attention is exactly uniform (eq. 3.4), so the normalised entropy is 1 and the
    # mass on the object equals the object's area share
    rows, n, shapes = X.attention_diagnostics(_tiny_stream("zeros"), _batches(), 100)
    assert n == 6 and len(rows) == 1 and shapes == [(4, 4)]
    mass, share, ent = rows[0]
    assert share == pytest.approx(1 / 8)
    assert mass == pytest.approx(share, abs=1e-6) and ent == pytest.approx(1.0, abs=1e-6)
    # a peaked query: entropy < 1
    m = _tiny_stream("zeros")
    with torch.no_grad():
        m.stream.q0.fill_(50.0)
    rows, _, _ = X.attention_diagnostics(m, _batches(), 100)
    assert rows[0][2] < 0.999 and not math.isnan(rows[0][0])
