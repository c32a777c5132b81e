"""Control explanations (models/explainers/controls.py, issue 14 item 2): formulas against naive references, the
``control`` flag, and that controls run through the same explainer / runner code path as every explainer."""
from __future__ import annotations

import math

import pytest
import torch

import models
from models.explainers import CONTROL_EXPLAINERS, create_explainer, is_control
from models.explainers.base import Explainer
from models.explainers.controls import reinitialize
from models.metrics import run_interpretability


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return models.create_model("baseline", backbone="resnet18", num_classes=3).eval()


def _minmax(m):
    f = m.flatten(1)
    lo, hi = f.min(1, keepdim=True)[0], f.max(1, keepdim=True)[0]
    return ((f - lo) / (hi - lo)).view_as(m)


def test_control_flags():
    for name in CONTROL_EXPLAINERS:
        assert is_control(name)
    for name in ("gradcam", "intrinsic", "scorecam"):
        assert not is_control(name)
    m = models.create_model("baseline", backbone="resnet18", num_classes=3)
    assert create_explainer("gaussian", m).control and not create_explainer("gradcam", m).control
    assert create_explainer("random", m).control and create_explainer("fakecam", m).control


def test_gaussian_is_centred_and_matches_formula(r18):
    x = torch.rand(2, 3, 20, 30)
    g = create_explainer("gaussian", r18, sigma=0.25)(x)
    i, j = torch.meshgrid(torch.arange(20.0), torch.arange(30.0), indexing="ij")
    ref = torch.exp(-0.5 * (((i - 9.5) / 5.0) ** 2 + ((j - 14.5) / 7.5) ** 2))
    torch.testing.assert_close(g[0], _minmax(ref[None])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(g[0], g[1])
    assert g[0, 9:11, 14:16].min() > 0.99 and g[0, 0, 0] < 0.05


def test_colorcontrast_matches_naive_loop(r18):
    x = torch.rand(2, 3, 8, 8)
    c = create_explainer("colorcontrast", r18)(x)
    for b in range(2):
        mean = x[b].mean((1, 2))
        ref = torch.tensor([[math.sqrt(float(((x[b, :, u, v] - mean) ** 2).sum())) for v in range(8)]
                            for u in range(8)])
        torch.testing.assert_close(c[b], _minmax(ref[None])[0], atol=1e-5, rtol=0)


def test_edges_fire_on_an_edge_not_on_flat_regions(r18):
    x = torch.zeros(1, 3, 16, 16)
    x[:, :, :, 8:] = 1.0  # a vertical edge between columns 7 and 8
    e = create_explainer("edges", r18)(x)[0]
    assert e[:, 7:9].min() > 0.6 and e[:, :5].max() == 0 and e[:, 12:].max() == 0
    v = create_explainer("edges", r18)(torch.rand(1, 3, 8, 8, 8)[:, :1].repeat(1, 3, 1, 1, 1)[:, :, 0])
    assert v.shape == (1, 8, 8)


def test_controls_3d():
    m = models.create_model("baseline", backbone="cnn3d", num_classes=3).eval()
    x = torch.rand(2, 1, 8, 8, 8)
    for name in ("gaussian", "colorcontrast", "edges"):
        s = create_explainer(name, m)(x)
        assert s.shape == (2, 8, 8, 8) and s.max() > 0.999 and s.min() < 1e-6, name


def test_reinitialize_changes_weights_keeps_original(r18):
    before = {k: v.clone() for k, v in r18.state_dict().items()}
    u = reinitialize(r18, seed=3)
    assert all(torch.equal(before[k], v) for k, v in r18.state_dict().items())
    w = "backbone.body.conv1.weight"
    assert not torch.equal(u.state_dict()[w], before[w])
    assert torch.equal(reinitialize(r18, seed=3).state_dict()[w], u.state_dict()[w])  # seeded


def test_untrained_is_the_same_explainer_on_a_reinitialised_copy(r18):
    x, t = torch.rand(2, 3, 64, 64), torch.tensor([0, 2])
    e = create_explainer("untrained", r18, base="gradcam", target_layers=-2, seed=1)
    ref = create_explainer("gradcam", reinitialize(r18, seed=1), target_layers=-2)(x, t)
    torch.testing.assert_close(e(x, t), ref)
    assert not torch.allclose(e(x, t), create_explainer("gradcam", r18, target_layers=-2)(x, t))
    i = create_explainer("untrained", r18, base="intrinsic")
    torch.testing.assert_close(i(x, t), reinitialize(r18, 0).forward_explain(x, t)[1])
    with pytest.raises(ValueError, match="real explainer"):
        create_explainer("untrained", r18, base="untrained")


def test_controls_go_through_the_explainer_and_runner_path(r18, monkeypatch):
    """Every control is an Explainer (same checks, same targets); the runner scores it with the same metric code
    (a spy on Explainer.__call__ sees every control) and marks it in meta['controls'] with per-item values."""
    seen = []
    orig = Explainer.__call__

    def spy(self, images, targets=None):
        seen.append(self.name)
        return orig(self, images, targets)

    monkeypatch.setattr(Explainer, "__call__", spy)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 64, 64, generator=g)
    mask = torch.zeros(6, 64, 64, dtype=torch.long)
    mask[:, 8:20, 8:20] = 1 + torch.tensor([0, 1, 2, 0, 1, 2]).view(6, 1, 1)
    batch = {"image": x, "label": torch.tensor([0, 1, 2, 0, 1, 2]), "mask": mask}
    names = ["gradcam", "gaussian", "colorcontrast", "edges", "untrained"]
    res = run_interpretability(r18, [batch], names, metrics="ad,ag,ins,del,pg,miou", progress=False, steps=4,
                               target_layers=-3)  # 8x8 at 64 px
    assert set(CONTROL_EXPLAINERS) <= set(res) and set(CONTROL_EXPLAINERS) <= set(seen)
    assert sorted(res.meta["controls"]) == sorted(CONTROL_EXPLAINERS)
    for name in res:
        for k in ("ad", "ag", "ins", "del", "pg", "miou"):
            vals = torch.tensor(res.per_item[name][k], dtype=torch.float64)
            assert vals.numel() == 6
            if name != "fakecam" and name in CONTROL_EXPLAINERS:
                assert torch.isfinite(vals).all(), (name, k)  # controls are scored, not refused
            if torch.isfinite(vals).any():
                assert float(vals.nanmean()) == pytest.approx(res[name][k], abs=1e-3), (name, k)
    with pytest.raises(ValueError):  # the same input checks as every explainer
        create_explainer("gaussian", r18)(torch.rand(3, 32, 32))
