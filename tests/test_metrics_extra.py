"""Issue-18 metrics against naive per-image loops on hand-made maps; axiom errors; sanity check; runner keys."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models.explainers import create_explainer
from models.metrics.axioms import axiom_errors
from models.metrics.boxes import (BoxAccuracy, LocalizationError, OfficialMetric, PixelF1, SaliencyMetric,
                                  connected_components, largest_component_box)
from models.metrics.region import (ADCC, ConfidenceDrop, NegativeDensity, PositiveDensity, RegionInsertion,
                                   normalized_zero)
from models.metrics.sanity import cascading_randomization, kendall_tau, mc_dropout, spearman_per_item


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def tiny():
    return Tiny().eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(5, 3, 12, 12, generator=g)
    maps = torch.rand(5, 12, 12, generator=g)
    maps[1] = 0.3  # a constant map (ties everywhere)
    maps[2, :6] = 0.0  # ties in a block
    t = torch.tensor([0, 1, 2, 3, 1])
    mask = torch.zeros(5, 12, 12, dtype=torch.long)
    mask[0, 2:6, 3:8] = 1          # class 0 region
    mask[1, 0:12, 0:12] = 2        # class 1 everywhere -> density undefined
    mask[2, 5:9, 5:9] = 3
    mask[2, 0:2, 0:2] = 3          # two components of class 2
    mask[3, 8:12, 0:5] = 4
    mask[4, 1:4, 1:4] = 1          # class 0 present, but target 1 absent -> no GT
    boxes = torch.full((5, 2, 5), -1.0)
    boxes[0, 0] = torch.tensor([0, 3, 2, 8, 6])
    boxes[1, 0] = torch.tensor([1, 0, 0, 12, 12])
    boxes[2, 0] = torch.tensor([2, 5, 5, 9, 9])
    boxes[2, 1] = torch.tensor([2, 0, 0, 2, 2])
    boxes[3, 0] = torch.tensor([3, 0, 8, 5, 12])
    boxes[4, 0] = torch.tensor([0, 1, 1, 4, 4])
    return x, maps, t, mask, boxes


# ---------------------------------------------------------------------------------------------- naive references
def _naive_region_insertion(model, x, s, t, base):
    P = s.numel()
    order = sorted(range(P), key=lambda i: (-float(s.flatten()[i]), i))  # stable descending
    acc = []
    for k in range(1, 21):
        n = int(round(k * P / 100))
        img = base.clone().view(3, -1)
        for i in order[:n]:
            img[:, i] = x.view(3, -1)[:, i]
        with torch.no_grad():
            acc.append(float(model(img.view(1, *x.shape)).argmax(1) == t))
    return sum((acc[k] + acc[k + 1]) / 2 for k in range(19))


def test_region_insertion_matches_loop(tiny, batch):
    x, maps, t, _, _ = batch
    m = RegionInsertion(max_batch=7)
    m.update(tiny, x, maps, t)
    ref = [_naive_region_insertion(tiny, x[i], maps[i], int(t[i]), torch.zeros(3, 12, 12)) for i in range(5)]
    torch.testing.assert_close(m.per_item(), torch.tensor(ref, dtype=torch.float64))
    assert abs(float(m.compute()) - np.mean(ref)) < 1e-5 and 0 <= float(m.compute()) <= 19
    zoo = models.create_model("baseline", backbone="resnet10t", num_classes=3)
    z = normalized_zero(zoo, torch.rand(2, 3, 8, 8))
    torch.testing.assert_close(z[:, :, 0, 0], zoo.backbone.mean.view(1, 3).expand(2, 3))


def test_density_matches_loop_and_identity(batch):
    x, maps, t, mask, _ = batch
    gt = mask == (t.view(-1, 1, 1) + 1)
    dp, dn = PositiveDensity(), NegativeDensity()
    dp.update(maps, gt)
    dn.update(maps, gt)
    for i in range(5):
        s, u = maps[i].double(), gt[i]
        if u.sum() in (0, u.numel()):
            assert math.isnan(dp.per_item()[i]) and math.isnan(dn.per_item()[i])
            continue
        mean_all = s.mean()
        assert abs(float(dp.per_item()[i]) - float(s[u].mean() / mean_all)) < 1e-9
        assert abs(float(dn.per_item()[i]) - float(s[~u].mean() / mean_all)) < 1e-9
        f = float(u.double().mean())
        assert abs(f * float(dp.per_item()[i]) + (1 - f) * float(dn.per_item()[i]) - 1) < 1e-9
    assert dp.skipped() == 2 and float(dp.compute()) > 0


def test_confidence_drop_matches_loop(tiny, batch):
    x, maps, t, _, _ = batch
    m = ConfidenceDrop(mean=0.4)
    m.update(tiny, x, maps, t)
    ref = []
    for i in range(5):
        with torch.no_grad():
            p = tiny(x[i:i + 1]).softmax(1)[0, t[i]]
            xp = x[i] * (1 - maps[i]) + 0.4 * maps[i]
            q = tiny(xp[None]).softmax(1)[0, t[i]]
        ref.append(float((p - q) / p))
    torch.testing.assert_close(m.per_item(), torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=0)
    assert abs(float(m.compute()) - 100 * np.mean(ref)) < 1e-3


def test_adcc_matches_loop(tiny, batch):
    x, maps, t, _, _ = batch

    def explainer(xx, tt):  # a deterministic "CAM": normalised channel mean
        return models.normalize_saliency(xx.mean(1))

    m = ADCC()
    m.update(tiny, explainer, x, maps, t)
    for i in range(5):
        s = maps[i].double()
        with torch.no_grad():
            p = tiny(x[i:i + 1]).softmax(1)[0, t[i]].double()
            o = tiny((x[i] * maps[i])[None]).softmax(1)[0, t[i]].double()
        s2 = explainer((x[i] * maps[i])[None], t[i:i + 1])[0].double()
        a, b = s2.flatten() - s2.mean(), s.flatten() - s.mean()
        rho = float((a * b).sum() / (a.norm() * b.norm())) if a.norm() * b.norm() > 0 else 0.0
        coh, compl, ad = (rho + 1) / 2, float(s.mean()), float(max(p - o, 0) / p)
        ref = 3 / (1 / coh + 1 / (1 - compl) + 1 / (1 - ad))
        assert abs(float(m.per_item()[i]) - ref) < 1e-6, i
    comp = m.components()
    assert set(comp) == {"coherency", "complexity", "drop"} and 0 <= comp["complexity"] <= 100


# ---------------------------------------------------------------------------------------------- localisation family
def test_connected_components_match_scipy():
    from scipy import ndimage

    g = torch.Generator().manual_seed(2)
    masks = torch.rand(6, 15, 17, generator=g) > 0.55
    lab = connected_components(masks)
    for i in range(6):
        ref, n = ndimage.label(masks[i].numpy(), structure=np.ones((3, 3)))
        assert len(torch.unique(lab[i][lab[i] > 0])) == n
        for c in range(1, n + 1):  # same partition
            assert len(torch.unique(lab[i][torch.from_numpy(ref == c)])) == 1
    box, ok = largest_component_box(masks)
    for i in range(6):
        assert ok[i] and box[i].tolist() == _naive_box(masks[i].numpy())


def _iou(a, b):
    ih = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _naive_box(mask):
    from scipy import ndimage

    ref, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return [0, 0, 0, 0]
    sizes = np.bincount(ref.ravel())[1:]
    tied = np.flatnonzero(sizes == sizes.max()) + 1  # ties: the component reaching furthest in raster order
    best = max(tied, key=lambda c: np.flatnonzero(ref.ravel() == c).max())
    ys, xs = np.nonzero(ref == best)
    return [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]


def test_localisation_family_matches_loops(batch):
    x, maps, t, mask, boxes = batch
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(9))
    logits[0, 0] = 10  # image 0 correctly classified, the others mostly not
    ctx = dict(images=x, maps=maps, targets=t, logits=logits, mask=mask, boxes=boxes)
    ms = {"om": OfficialMetric(), "le": LocalizationError(), "f1": PixelF1(), "sm": SaliencyMetric(),
          "ba": BoxAccuracy(etas=(0.2, 0.5, 0.8), deltas=(0.3, 0.5))}
    for m in ms.values():
        m.update_from_context(ctx)
    pc = logits.softmax(1)
    hits = np.full((5, 3, 2), np.nan)
    for i in range(5):
        s = maps[i].numpy().astype(np.float64)
        gtb = [[b[2], b[1], b[4], b[3]] for b in boxes[i].tolist() if int(b[0]) == int(t[i])]
        u = (mask[i] == t[i] + 1).numpy()
        bp = _naive_box(s > s.mean())
        if not gtb:
            for k in ("om", "le", "f1"):
                assert math.isnan(ms[k].per_item()[i])
            continue
        best = max(_iou(bp, g) for g in gtb)
        assert abs(float(ms["le"].per_item()[i]) - (1 - best)) < 1e-6
        correct = int(logits[i].argmax()) == int(t[i])
        assert abs(float(ms["om"].per_item()[i]) - (1 - best * correct)) < 1e-6
        P = s[u].sum() / s.sum()
        R = s[u].sum() / u.sum()
        assert abs(float(ms["f1"].per_item()[i]) - (2 * P * R / (P + R) if P + R > 0 else 0)) < 1e-6
        size = (bp[2] - bp[0]) * (bp[3] - bp[1])
        sm = math.log(max(0.05, size / s.size)) - math.log(float(pc[i, t[i]]))
        assert abs(float(ms["sm"].per_item()[i]) - sm) < 1e-5
        for a, eta in enumerate((0.2, 0.5, 0.8)):
            b_eta = _naive_box(s > eta)
            for d, delta in enumerate((0.3, 0.5)):
                hits[i, a, d] = float(max(_iou(b_eta, g) for g in gtb) >= delta)
    h = hits[~np.isnan(hits[:, 0, 0])]
    assert abs(float(ms["ba"].compute()) - 100 * h.mean(0).max(0).mean()) < 1e-4
    assert abs(float(ms["ba"].per_item().mean()) - h.mean(0).max(0).mean()) < 1e-9
    assert ms["om"].skipped() == 1 and abs(float(ms["le"].compute()) - 100 * np.nanmean(
        ms["le"].per_item().numpy())) < 1e-4


def test_per_item_states_merge_like_ddp(batch):
    x, maps, t, mask, _ = batch
    gt = mask == (t.view(-1, 1, 1) + 1)
    a, b, whole = PositiveDensity(), PositiveDensity(), PositiveDensity()
    a.update(maps[:2], gt[:2])
    b.update(maps[2:], gt[2:])
    whole.update(maps, gt)
    b.merge_state(a)  # torchmetrics puts the incoming state first (as rank 0's items come first under DDP)
    torch.testing.assert_close(b.per_item(), whole.per_item(), equal_nan=True)
    assert abs(float(b.compute()) - float(whole.compute())) < 1e-9


# ---------------------------------------------------------------------------------------------- axioms, sanity
@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.create_model("baseline", backbone="resnet10t", num_classes=5).eval()


def test_axiom_errors_xrelevance_vs_gradcampp(net):
    x, t = torch.rand(2, 3, 32, 32), torch.tensor([1, 4])
    _, cons_x = axiom_errors(create_explainer("xrelevancecam", net), x, t, batch_size=512)
    _, cons_pp = axiom_errors(create_explainer("gradcampp", net), x, t, batch_size=512)
    sens_g, cons_g = axiom_errors(create_explainer("gradcam", net), x, t, batch_size=512)
    assert cons_x.max() < 1e-4  # XRelevance-CAM conserves at the last layer (thesis Table 5.9)
    assert cons_pp.min() > 0.1 and cons_pp.min() > 1000 * cons_x.max()
    # Grad-CAM at the GAP -> linear layer: Delta_k = w_k sum A^k exactly (sensitivity 0), conservation = |b|/|y|
    assert sens_g.max() < 1e-3
    with torch.no_grad():
        y = net(x).gather(1, t.view(-1, 1)).squeeze(1).double()
    torch.testing.assert_close(cons_g, (net.fc.bias[t].double() / y).abs(), atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="channel weights"):
        axiom_errors(create_explainer("scorecam", net), x, t)


def test_sanity_cascade_gradcam_falls_guided_backprop_flagged(net):
    x, t = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    g = cascading_randomization(net, "gradcam", x, t, target_layers=2)
    assert g["steps"][0] == "trained" and g["steps"][-1] == "stem" and len(g["steps"]) == 7
    assert abs(g["mean_spearman"][0] - 1) < 1e-4 and abs(g["mean_ssim"][0] - 1) < 1e-4
    assert min(g["mean_spearman"][1:]) < 0.5 and not g["flagged"]
    gb = cascading_randomization(net, "guidedbackprop", x, t)
    assert gb["flagged"]  # the known failure (Adebayo et al.): the map ignores the weights


def test_similarity_and_ranking_helpers():
    a = torch.tensor([[0.0, 0.0, 1.0, 2.0]])
    assert abs(float(spearman_per_item(a, a)) - 1) < 1e-6
    assert abs(float(spearman_per_item(a, -a)) + 1) < 1e-6
    assert float(spearman_per_item(torch.zeros(1, 4), a)) == 0
    assert float(spearman_per_item(torch.zeros(1, 4), torch.zeros(1, 4))) == 1
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1 and kendall_tau([1, 2, 3], [3, 2, 1]) == -1
    net = models.create_model("baseline", backbone="resnet10t", num_classes=3).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        y0 = net(x)
        with mc_dropout(net, 0.5):
            y1 = net(x)
        y2 = net(x)
    assert not torch.allclose(y0, y1) and torch.equal(y0, y2)  # dropout on inside, hooks removed after


def test_runner_knows_the_new_metrics(net):
    from models.metrics import run_interpretability

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    mask = torch.zeros(4, 32, 32, dtype=torch.long)
    mask[:, 8:20, 8:20] = torch.tensor([1, 2, 3, 1]).view(4, 1, 1)
    boxes = torch.full((4, 1, 5), -1.0)
    boxes[:, 0] = torch.tensor([[0, 8, 8, 20, 20], [1, 8, 8, 20, 20], [2, 8, 8, 20, 20], [0, 8, 8, 20, 20]])
    loader = [{"image": x, "label": torch.tensor([0, 1, 2, 0]), "mask": mask, "boxes": boxes}]
    keys = "rins,dpos,dneg,cd,adcc,om,le,f1,boxacc,sm,axsens,axcons"
    res = run_interpretability(net, loader, ["gradcam", "ucag:gradcam"], keys, progress=False, sanity=False,
                               target_layers=2, explainer_kwargs={"ucag:gradcam": {"n_units": 2}})
    for k in keys.split(","):
        assert math.isfinite(res["gradcam"][k]), k
    assert math.isnan(res["ucag:gradcam"]["axcons"])  # no channel weights: not defined, reported as NaN
    assert 0 <= res["gradcam"]["rins"] <= 19


def test_eval_entry_points_sanity_and_dropout_ranking(net, tmp_path):
    import json
    import os

    from models.metrics import run_interpretability
    from models.metrics.sanity import evaluate_sanity, layer_dropout_ranking

    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(4, 32, 32, dtype=torch.long)
    mask[:, 4:20, 6:22] = torch.tensor([1, 2, 3, 1]).view(4, 1, 1)
    loader = [{"image": torch.rand(4, 3, 32, 32, generator=g), "label": torch.tensor([0, 1, 2, 0]), "mask": mask}]
    out = evaluate_sanity(net, loader, ["gradcam"], str(tmp_path), max_images=2, target_layers=2)
    assert all(os.path.exists(f) for f in out["files"])
    with open(out["files"][0]) as f:
        assert json.load(f)["explainers"]["gradcam"]["mean_spearman"][0] == pytest.approx(1, abs=1e-4)
    r = layer_dropout_ranking(net, loader, ["gradcam", "random"], metric="epg", p=0.2, repeats=2, target_layers=2)
    det = run_interpretability(net, loader, ["gradcam", "random"], ("epg",), progress=False, sanity=False,
                               target_layers=2)
    assert r["deterministic"]["gradcam"] == pytest.approx(det["gradcam"]["epg"])
    assert len(r["dropout_runs"]["gradcam"]) == 2 and -1 <= r["kendall_tau"] <= 1
    assert r["dropout_mean"]["gradcam"] != pytest.approx(r["deterministic"]["gradcam"])  # dropout acted
