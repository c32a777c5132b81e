"""Tests of models/metrics: hand-built cases with known answers, naive references, DDP-style merging."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from models.metrics import (AverageDrop, AverageGain, AverageIncrease, DeletionAUC, EnergyPointingGame,
                            InsertionAUC, PointingGame, Runtime, SaliencyIoU, binarize_saliency, boxes_to_mask,
                            check_saliency, class_masks, confidence_change, curve_auc, format_markdown_table,
                            gaussian_blur, parse_metrics, perturbation_curves, pointing_hits, run_interpretability,
                            save_json, save_overlay_grid, write_markdown_table)

LN3 = math.log(3.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """2 shared cores: intra-op threads oversubscribe and make small convs ~30x slower; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sig(z):
    return 1.0 / (1.0 + math.exp(-z))


class RegionModel(nn.Module):
    """Two logits: ``[a · (mean_R(x) − contrast · mean_bg(x)), 0]``, channel-averaged; R a fixed region.

    Class-0 softmax probability = sigmoid(logit 0): hand-computable for any masking.
    """

    def __init__(self, region: torch.Tensor, a: float = LN3, contrast: float = 0.0):
        super().__init__()
        self.register_buffer("r", region.float())
        self.a, self.contrast = a, contrast
        self.num_classes = 2

    def forward(self, x):
        m = x.mean(1).flatten(1)
        r = self.r.flatten()
        mr = (m * r).sum(1) / r.sum()
        mb = (m * (1 - r)).sum(1) / (1 - r).sum()
        l0 = self.a * (mr - self.contrast * mb)
        return torch.stack([l0, torch.zeros_like(l0)], 1)


def region_8():
    r = torch.zeros(8, 8, dtype=torch.bool)
    r[2:6, 2:6] = True
    return r


def image_for(region, channels=3, inside=1.0, outside=0.5, batch=1):
    x = torch.full((batch, channels) + tuple(region.shape), outside)
    x[:, :, region] = inside
    return x


# ------------------------------------------------------------------------------------------ AD / AI / AG
def _ad_ai_ag(model, x, s, t):
    p, o = confidence_change(model, x, s, t)
    out = []
    for M in (AverageDrop, AverageIncrease, AverageGain):
        m = M()
        m.update(p, o)
        out.append(float(m.compute()))
    return out


def test_ad_ai_ag_exact_values_on_hand_built_cases():
    R = region_8()
    model = RegionModel(R, contrast=1.0)  # logit = ln3 (mean_R - mean_bg)
    x, t = image_for(R), torch.tensor([0])
    p = sig(LN3 * 0.5)
    # (a) saliency = the object: background zeroed -> logit ln3 -> o = 3/4, a gain
    ad, ai, ag = _ad_ai_ag(model, x, R.float()[None], t)
    assert ad == pytest.approx(0.0, abs=1e-5)
    assert ai == pytest.approx(100.0)
    assert ag == pytest.approx(100 * (0.75 - p) / (1 - p), rel=1e-5)
    # (b) constant 0.5 map: logit halves -> drop, no gain
    ad, ai, ag = _ad_ai_ag(model, x, torch.full((1, 8, 8), 0.5), t)
    o = sig(LN3 * 0.25)
    assert ad == pytest.approx(100 * (p - o) / p, rel=1e-5)
    assert (ai, ag) == (0.0, 0.0)
    # (c) background-only map: object removed -> logit -ln3/2
    ad, ai, ag = _ad_ai_ag(model, x, (~R).float()[None], t)
    o = sig(-LN3 * 0.5)
    assert ad == pytest.approx(100 * (p - o) / p, rel=1e-5)
    assert (ai, ag) == (0.0, 0.0)


def test_ad_ai_ag_are_means_over_items_and_ag_zero_over_zero():
    p = torch.tensor([0.5, 0.8, 1.0, 0.2])
    o = torch.tensor([0.25, 0.9, 1.0, 0.2])
    ad, ai, ag = AverageDrop(), AverageIncrease(), AverageGain()
    for m in (ad, ai, ag):
        m.update(p, o)
    assert float(ad.compute()) == pytest.approx(100 * (0.5 + 0 + 0 + 0) / 4)
    assert float(ai.compute()) == pytest.approx(100 * 1 / 4)  # strict: equal scores are no increase
    assert float(ag.compute()) == pytest.approx(100 * (0.1 / 0.2) / 4)  # p = 1: 0/0 := 0, not NaN


def test_fakecam_near_zero_ad_but_near_zero_ag():
    """Seed 001 §2.4: Fake-CAM (1 everywhere but one pixel) scores ~0 AD yet ~0 AG; the object map gains."""
    R = region_8()
    model = RegionModel(R, contrast=1.0)
    x, t = image_for(R), torch.tensor([0])
    fake = torch.ones(1, 8, 8)
    fake[0, 0, 0] = 0
    ad, ai, ag = _ad_ai_ag(model, x, fake, t)
    p = sig(LN3 * 0.5)
    o = sig(LN3 * (1 - 0.5 * 47 / 48))
    assert ad == pytest.approx(0.0, abs=1e-5)
    assert ag == pytest.approx(100 * (o - p) / (1 - p), rel=1e-3)
    assert ag < 1.0
    _, _, ag_object = _ad_ai_ag(model, x, R.float()[None], t)
    assert ag_object > 30 * ag


# ------------------------------------------------------------------------------------------ insertion / deletion
def region_4():
    r = torch.zeros(4, 4, dtype=torch.bool)
    r[1:3, 1:3] = True
    return r


def test_curve_auc_trapezoid():
    assert float(curve_auc(torch.linspace(0, 1, 5)[None])) == pytest.approx(0.5)
    assert float(curve_auc(torch.full((1, 7), 0.3))) == pytest.approx(0.3)
    c = torch.rand(3, 9, dtype=torch.float64)
    ref = torch.trapezoid(c, dx=1 / 8, dim=1)
    assert torch.allclose(curve_auc(c), ref)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_insertion_deletion_known_curves(mode):
    R = region_4()
    model = RegionModel(R)  # logit = ln3 * mean_R
    x = image_for(R, channels=1).repeat(3, 1, 1, 1)
    maps = torch.stack([R.float(), (~R).float(), torch.full((4, 4), 0.5)])
    t = torch.zeros(3, dtype=torch.long)
    # 16 pixels, 4 steps of 4 pixels, black baseline for both modes
    curves = perturbation_curves(model, x, maps, t, mode, steps=4, baseline="black")
    q = sig(LN3 * 0.5)
    if mode == "deletion":
        want = [[0.75, 0.5, 0.5, 0.5, 0.5],   # object first: drops at once
                [0.75, 0.75, 0.75, 0.75, 0.5],  # background first: stays up
                [0.75, 0.75, q, 0.5, 0.5]]  # constant map: raster order (stable sort)
    else:
        want = [[0.5, 0.75, 0.75, 0.75, 0.75], [0.5, 0.5, 0.5, 0.5, 0.75], [0.5, 0.5, q, 0.75, 0.75]]
    assert torch.allclose(curves, torch.tensor(want), atol=1e-6)
    auc = curve_auc(curves)
    if mode == "deletion":
        assert auc.tolist() == pytest.approx([(2.75 - 0.625) / 4, (3.5 - 0.625) / 4, (2.5 + q - 0.625) / 4])
        assert auc[0] < auc[2] < auc[1]  # object map deletes best
    else:
        assert auc[0] > auc[2] > auc[1]
    M = DeletionAUC(steps=4, baseline="black") if mode == "deletion" else InsertionAUC(steps=4, baseline="black")
    M.update_from_model(model, x, maps, t)
    assert float(M.compute()) == pytest.approx(100 * float(auc.mean()), rel=1e-5)
    assert torch.allclose(M.mean_curve(), curves.mean(0), atol=1e-6)


def test_default_baselines_blur_for_insertion_black_for_deletion():
    torch.manual_seed(0)
    R = region_8()
    model = RegionModel(R)
    x = torch.rand(2, 3, 8, 8)
    maps = torch.rand(2, 8, 8)
    t = torch.zeros(2, dtype=torch.long)
    ins = perturbation_curves(model, x, maps, t, "insertion", steps=8)
    dele = perturbation_curves(model, x, maps, t, "deletion", steps=8)
    s = lambda z: model(z).softmax(1)[:, 0]  # noqa: E731
    assert torch.allclose(ins[:, 0], s(gaussian_blur(x)), atol=1e-6)
    assert torch.allclose(ins[:, -1], s(x), atol=1e-6)
    assert torch.allclose(dele[:, 0], s(x), atol=1e-6)
    assert torch.allclose(dele[:, -1], s(torch.zeros_like(x)), atol=1e-6)


def test_gaussian_blur_matches_full_kernel_2d_and_3d():
    torch.manual_seed(0)
    r = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-r ** 2 / (2 * 25.0))
    g = g / g.sum()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    k2 = (g[:, None] * g[None, :])[None, None].repeat(3, 1, 1, 1)
    ref = torch.nn.functional.conv2d(x, k2, padding=5, groups=3)  # zero padding, per channel
    assert torch.allclose(gaussian_blur(x), ref, atol=1e-12)
    v = torch.rand(1, 1, 12, 12, 12, dtype=torch.float64)
    k3 = (g[:, None, None] * g[None, :, None] * g[None, None, :])[None, None]
    assert torch.allclose(gaussian_blur(v), torch.nn.functional.conv3d(v, k3, padding=5), atol=1e-12)


def _naive_curves(model, images, maps, targets, mode, steps, baseline):
    """Per image, per step reference (Python stable sort, one forward per perturbed image)."""
    B = images.shape[0]
    P = maps[0].numel()
    per = math.ceil(P / steps)
    out = torch.zeros(B, steps + 1)
    for b in range(B):
        x = images[b]
        s = maps[b].flatten().tolist()
        order = sorted(range(P), key=lambda i: -s[i])
        base = gaussian_blur(x[None])[0] if baseline == "blur" else torch.zeros_like(x)
        src, start = (base, x) if mode == "deletion" else (x, base)
        for k in range(steps + 1):
            cnt = min(k * per, P)
            xk = start.clone().flatten(1)
            idx = torch.tensor(order[:cnt], dtype=torch.long)
            xk[:, idx] = src.flatten(1)[:, idx]
            with torch.no_grad():
                out[b, k] = model(xk.view_as(x)[None]).softmax(1)[0, targets[b]]
    return out


@pytest.mark.parametrize("max_batch", [2, 7, 1000])
def test_batched_curves_equal_naive_loop_2d(max_batch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.rand(3, 3, 8, 8)
    maps = (torch.rand(3, 8, 8) * 4).floor() / 3  # many ties: the stable order matters
    t = torch.tensor([0, 2, 1])
    for mode, base in (("deletion", "black"), ("insertion", "blur"), ("deletion", "blur")):
        got = perturbation_curves(model, x, maps, t, mode, steps=5, baseline=base, max_batch=max_batch)
        ref = _naive_curves(model, x, maps, t, mode, 5, base)
        assert torch.allclose(got, ref, atol=1e-5), (mode, base)


def test_batched_curves_with_a_model_that_views_its_input():
    """channels-last batching falls back to the default layout for models that .view() their input."""
    torch.manual_seed(0)

    class ViewNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(x.view(x.shape[0], -1))

    model = ViewNet().eval()
    x, maps, t = torch.rand(2, 3, 6, 6), torch.rand(2, 6, 6), torch.tensor([0, 1])
    got = perturbation_curves(model, x, maps, t, "deletion", steps=4, baseline="black")
    assert torch.allclose(got, _naive_curves(model, x, maps, t, "deletion", 4, "black"), atol=1e-6)


def test_batched_curves_equal_naive_loop_3d_volumes():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                          nn.Linear(3, 2)).eval()
    x = torch.rand(2, 1, 5, 6, 6)
    maps = torch.rand(2, 5, 6, 6)
    t = torch.tensor([1, 0])
    for mode, base in (("deletion", "black"), ("insertion", "blur")):
        got = perturbation_curves(model, x, maps, t, mode, steps=7, baseline=base, max_batch=5)
        assert torch.allclose(got, _naive_curves(model, x, maps, t, mode, 7, base), atol=1e-5)


# ------------------------------------------------------------------------------------------ localisation
def test_pointing_game_hits_misses_and_tolerance():
    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    gt[0, 3:6, 3:6] = True

    def peak(i, j):
        m = torch.zeros(1, 8, 8)
        m[0, i, j] = 1
        return m

    assert bool(pointing_hits(peak(4, 4), gt))
    assert not bool(pointing_hits(peak(0, 7), gt))
    # 2 px left of the region: hit only from tolerance 2
    assert [bool(pointing_hits(peak(4, 1), gt, tol)) for tol in (0, 1, 2)] == [False, False, True]
    # diagonal distance sqrt(8) ~ 2.83 from (3,3): Euclidean ball, not a square
    assert [bool(pointing_hits(peak(1, 1), gt, tol)) for tol in (2, 3)] == [False, True]
    # ties: first maximum in raster order (a constant map points at the top-left pixel)
    assert not bool(pointing_hits(torch.ones(1, 8, 8), gt))
    pg = PointingGame()
    maps = torch.cat([peak(4, 4), peak(0, 0), peak(5, 5), peak(1, 1)])
    gts = gt.repeat(4, 1, 1)
    gts[3] = False  # no ground truth: not counted
    pg.update(maps, gts)
    assert float(pg.compute()) == pytest.approx(200 / 3)
    assert int(pg.skipped) == 1


def test_pointing_game_macro_average_over_classes():
    gt = torch.zeros(3, 4, 4, dtype=torch.bool)
    gt[:, 0, 0] = True
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0] = maps[1, 3, 3] = maps[2, 0, 0] = 1  # hit, miss, hit
    classes = torch.tensor([0, 0, 1])
    micro, macro = PointingGame(), PointingGame(num_classes=2, average="macro")
    micro.update(maps, gt)
    macro.update(maps, gt, classes)
    assert float(micro.compute()) == pytest.approx(200 / 3)
    assert float(macro.compute()) == pytest.approx(100 * (0.5 + 1.0) / 2)


def test_energy_pointing_game():
    gt = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt[:, :2] = True
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, :] = 1.0  # all energy inside
    maps[0, 3, :] = 1.0  # ... and as much outside -> 0.5
    # second map all zero: 0/0 := 0
    m = EnergyPointingGame()
    m.update(maps, gt)
    assert float(m.compute()) == pytest.approx(100 * 0.5 / 2)


def test_iou_threshold_rules_on_known_masks():
    ramp = (torch.arange(16, dtype=torch.float32) / 15).view(1, 4, 4)
    gt = (torch.arange(16) >= 12).view(1, 4, 4)
    # mean 0.5, population std 0.307 -> S > 0.807 keeps k = 13, 14, 15
    assert binarize_saliency(ramp, "mean_std").sum() == 3
    assert binarize_saliency(ramp, "mean").sum() == 8
    assert binarize_saliency(ramp, 0.7).sum() == 5  # k/15 > 0.7 -> k >= 11
    for thr, want in (("mean_std", 3 / 4), ("mean", 4 / 8), (0.7, 4 / 5)):
        m = SaliencyIoU(threshold=thr)
        m.update(ramp, gt)
        assert float(m.compute()) == pytest.approx(100 * want)
    # binary map equal to the object: IoU 1; disjoint: 0
    obj = gt.float()
    m = SaliencyIoU()
    m.update(torch.cat([obj, 1 - obj]), gt.repeat(2, 1, 1))
    assert float(m.compute()) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="threshold"):
        SaliencyIoU(threshold="median")


def test_boxes_and_label_masks_to_class_regions():
    boxes = torch.tensor([[[1, 2, 1, 5, 3], [0, 0, 0, 1, 1], [-1, -1, -1, -1, -1]]], dtype=torch.float32)
    m = boxes_to_mask(boxes, torch.tensor([1]), (4, 6))
    want = torch.zeros(1, 4, 6, dtype=torch.bool)
    want[0, 1:3, 2:5] = True  # rows y0:y1, cols x0:x1
    assert torch.equal(m, want)
    assert boxes_to_mask(boxes, torch.tensor([2]), (4, 6)).sum() == 0
    b3 = torch.tensor([[[0, 1, 2, 3, 2, 4, 5]]], dtype=torch.float32)  # [c, z0, y0, x0, z1, y1, x1]
    m3 = boxes_to_mask(b3, torch.tensor([0]), (3, 5, 6))
    want3 = torch.zeros(1, 3, 5, 6, dtype=torch.bool)
    want3[0, 1:2, 2:4, 3:5] = True
    assert torch.equal(m3, want3)
    lab = torch.tensor([[[0, 1], [2, 1]]])
    assert torch.equal(class_masks(lab, torch.tensor([0])), lab == 1)


# ------------------------------------------------------------------------------------------ DDP-style sync
def test_metric_states_merge_like_one_instance():
    torch.manual_seed(0)
    p, o = torch.rand(10), torch.rand(10)
    curves = torch.rand(10, 6)
    maps = torch.rand(10, 5, 5)
    gt = torch.rand(10, 5, 5) > 0.6
    cls = torch.randint(0, 3, (10,))
    makers = [
        (AverageDrop, lambda m, s: m.update(p[s], o[s])),
        (AverageIncrease, lambda m, s: m.update(p[s], o[s])),
        (AverageGain, lambda m, s: m.update(p[s], o[s])),
        (lambda: DeletionAUC(steps=5), lambda m, s: m.update(curves[s])),
        (lambda: PointingGame(num_classes=3, average="macro"), lambda m, s: m.update(maps[s], gt[s], cls[s])),
        (EnergyPointingGame, lambda m, s: m.update(maps[s], gt[s])),
        (SaliencyIoU, lambda m, s: m.update(maps[s], gt[s])),
    ]
    for make, upd in makers:
        whole, a, b = make(), make(), make()
        upd(whole, slice(None))
        upd(a, slice(0, 4))
        upd(b, slice(4, None))
        a.merge_state(b)
        assert torch.allclose(a.compute(), whole.compute(), atol=1e-5), make
        assert all(fx is not None for fx in whole._reductions.values())  # every state reduces under DDP
    d1, d2, d = DeletionAUC(steps=5), DeletionAUC(steps=5), DeletionAUC(steps=5)
    d1.update(curves[:3])
    d2.update(curves[3:])
    d.update(curves)
    d1.merge_state(d2)
    assert torch.allclose(d1.mean_curve(), d.mean_curve(), atol=1e-6)
    r1, r2 = Runtime(), Runtime()
    r1.update(2.0, 4)
    r2.update(1.0, 6)
    r1.merge_state(r2)
    assert float(r1.compute()) == pytest.approx(0.3)
    assert float(r1.per_call()) == pytest.approx(1.5)


# ------------------------------------------------------------------------------------------ input checks
def test_bad_saliency_gives_clear_errors():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="normalize_saliency"):
        check_saliency(torch.rand(2, 4, 4), x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_saliency(torch.rand(2, 8, 8) * 3, x)
    assert check_saliency(torch.rand(2, 1, 8, 8), x).shape == (2, 8, 8)
    with pytest.raises(ValueError, match="Unknown metric"):
        parse_metrics("ad,foo")
    assert parse_metrics("insertion,deletion,iou") == ["ins", "del", "miou"]


# ------------------------------------------------------------------------------------------ runner + reports
def _hand_loader(n_batches=2, bs=3):
    R = region_8()
    batches = []
    for _ in range(n_batches):
        x = image_for(R, batch=bs)
        batches.append({"image": x, "label": torch.zeros(bs, dtype=torch.long),
                        "mask": R.long().expand(bs, 8, 8).clone()})  # class 0 -> mask value 1
    return batches


def test_runner_on_hand_built_model_and_oracle_maps(tmp_path):
    model = RegionModel(region_8())  # logit = ln3 * mean_R
    oracle = lambda x, t: (x[:, 0] > 0.75).float()  # noqa: E731  (the object)
    background = lambda x, t: (x[:, 0] <= 0.75).float()  # noqa: E731
    fake = lambda x, t: torch.ones(x.shape[0], *x.shape[2:]).index_put_(  # noqa: E731
        (torch.arange(x.shape[0]), torch.tensor(0), torch.tensor(0)), torch.tensor(0.0))
    res = run_interpretability(model, _hand_loader(), [("oracle", oracle), ("background", background),
                                                      ("fakecam", fake)],
                               metrics="ad,ag,ai,ins,del,pg,epg,miou", max_images=5, progress=False,
                               sanity=False, steps=8, examples=4)
    assert set(res) == {"oracle", "background", "fakecam"}
    o, b, f = res["oracle"], res["background"], res["fakecam"]
    assert o["n"] == 5 and res.meta["n_images"] == 5  # max_images cuts the second batch
    assert o["ad"] == pytest.approx(0.0, abs=1e-4) and o["pg"] == 100 and o["miou"] == pytest.approx(100)
    assert o["epg"] == pytest.approx(100)
    p, ob = 0.75, sig(0.0)
    assert b["ad"] == pytest.approx(100 * (p - ob) / p, rel=1e-4) and b["pg"] == 0 and b["miou"] == 0
    assert o["del"] < b["del"] and o["ins"] > b["ins"]
    assert f["ad"] == pytest.approx(0.0, abs=1e-4) and f["ag"] == pytest.approx(0.0, abs=1e-4)
    assert o["time"] >= 0 and res.meta["steps"] == 8 and res.meta["pixels_per_step"] == 8
    assert len(res.curves["oracle"]["del"]) == 9
    assert res.examples["images"].shape == (4, 3, 8, 8) and res.examples["maps"]["oracle"].shape == (4, 8, 8)

    md = write_markdown_table(res, str(tmp_path / "t.md"), model_name="toy")
    assert "| oracle | toy |" in md and "AD↓" in md and "AG↑" in md and "Del↓" in md and "mIoU↑" in md
    js = save_json(res, str(tmp_path / "r.json"))
    assert json.load(open(tmp_path / "r.json"))["results"]["oracle"]["pg"] == 100
    assert js["meta"]["target"] == "ground truth"
    png = save_overlay_grid(res.examples["images"], res.examples["maps"], str(tmp_path / "g.png"),
                            masks=res.examples["masks"])
    assert (tmp_path / "g.png").stat().st_size > 1000 and png.endswith("g.png")
    two = format_markdown_table({"m1": {"oracle": o}, "m2": {"oracle": b}})
    assert "| oracle | m1 |" in two and "| oracle | m2 |" in two


def test_runner_multilabel_items_and_correct_only():
    class Fixed(nn.Module):
        num_classes = 3

        def forward(self, x):  # class 0 and 2 predicted positive, 1 negative, whatever the image
            return torch.tensor([[2.0, -2.0, 1.0]]).expand(x.shape[0], 3)

    x = torch.rand(2, 3, 8, 8)
    label = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    mask = torch.zeros(2, 8, 8, dtype=torch.long)
    mask[0, :2] = 1
    mask[0, 4:] = 2
    mask[1, 2:5] = 3
    seen = []

    def spy(images, targets):
        seen.append(targets.tolist())
        return torch.rand(images.shape[0], 8, 8)

    loader = [{"image": x, "label": label, "mask": mask}]
    res = run_interpretability(Fixed(), loader, [("spy", spy)], metrics="ad,pg", progress=False, sanity=False)
    assert seen[-1] == [0, 1, 2] and res["spy"]["n"] == 3 and res.meta["score"] == "sigmoid"
    run_interpretability(Fixed(), loader, [("spy", spy)], metrics="pg", progress=False, sanity=False,
                         correct_only=True)
    assert seen[-1] == [0, 2]  # class 1 is not predicted
    run_interpretability(Fixed(), loader, [("spy", spy)], metrics="pg", progress=False, sanity=False, target="pred")
    assert seen[-1] == [0, 2, 0, 2]


def test_runner_requires_ground_truth_for_localisation():
    loader = [(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))]
    model = RegionModel(region_8())
    with pytest.raises(ValueError, match="mask"):
        run_interpretability(model, loader, [("r", lambda x, t: torch.rand(2, 8, 8))], metrics="pg",
                             progress=False, sanity=False)
    res = run_interpretability(model, loader, [("r", lambda x, t: torch.rand(2, 8, 8))], metrics="ad,del",
                               progress=False, sanity=False)
    assert res["r"]["n"] == 2


# ------------------------------------------------------------------------------------------ with the zoo
@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_runner_with_zoo_explainers_on_synthetic_benchmark(kind, tmp_path):
    """Real explainers (models.explainers) on a tiny baseline; sanity baselines are appended."""
    pytest.importorskip("models.explainers")
    from torch.utils.data import DataLoader

    import models
    from trainers.data import SyntheticShapes, SyntheticVolumes

    torch.manual_seed(0)
    if kind == "2d":
        ds = SyntheticShapes("val", size=6, num_classes=3, image_size=32)  # output stride 8: a 4x4 last stage
        model = models.create_model("baseline", backbone="resnet18", num_classes=3,
                                    backbone_kwargs={"output_stride": 8})
    else:
        ds = SyntheticVolumes("val", size=4, num_classes=2, image_size=16)  # 2x2x2 last stage: guard off below
        model = models.create_model("baseline", backbone="cnn3d", num_classes=2)
    res = run_interpretability(model, DataLoader(ds, batch_size=3), ["gradcam", "intrinsic"], metrics="all",
                               progress=False, steps=6, examples=2, min_native_side=0 if kind == "3d" else 4)
    assert list(res) == ["gradcam", "intrinsic", "random", "fakecam"]
    for name, row in res.items():
        assert set(row) == {"ad", "ag", "ai", "ins", "del", "pg", "epg", "miou", "time", "time_batch", "n"}, name
        assert all(math.isfinite(v) for v in row.values()), (name, row)
        assert 0 <= row["pg"] <= 100 and 0 <= row["miou"] <= 100 and row["n"] == len(ds)
    # Fake-CAM: masking one pixel barely moves the score -> AD and AG both ~0 (seed 001 §2.4)
    assert res["fakecam"]["ad"] < 2 and res["fakecam"]["ag"] < 2
    assert res.meta["n_images"] == len(ds) and res.meta["score"] == "softmax"
    save_overlay_grid(res.examples["images"], res.examples["maps"], str(tmp_path / "g.png"),
                      masks=res.examples["masks"])
    assert (tmp_path / "g.png").exists()


def test_eval_py_end_to_end_writes_json_table_and_png(tmp_path):
    """eval.py --explainers ... on a tiny saved baseline and a tiny synthetic data config."""
    pytest.importorskip("models.explainers")
    import eval as eval_script

    import models

    torch.manual_seed(0)
    w = tmp_path / "tiny.safetensors"
    models.save_weights(models.create_model("baseline", backbone="resnet18", num_classes=3), w)
    cfg = tmp_path / "data.yaml"
    cfg.write_text("data:\n  class_path: trainers.data.SyntheticShapesDataModule\n  init_args:\n"
                   "    num_classes: 3\n    image_size: 64\n    train_size: 4\n    val_size: 6\n    test_size: 4\n"
                   "    batch_size: 4\n")  # 64 px: a 2x2 last stage (at 32 px it is 1x1 and every CAM is constant)
    out = tmp_path / "eval"
    res = eval_script.main(["--weights", str(w), "--model", "baseline", "--model-kwargs", '{"backbone": "resnet18"}',
                            "--data-config", str(cfg), "--split", "val", "--device", "cpu", "--out", str(out),
                            "--explainers", "gradcam,intrinsic", "--metrics", "ad,ag,ai,ins,del,pg,miou",
                            "--max-images", "5", "--steps", "4", "--grid-images", "3"])
    js = json.loads((out / "interpretability_val.json").read_text())
    assert set(js["results"]) == {"gradcam", "intrinsic", "random", "fakecam"}
    assert js["results"]["gradcam"]["n"] == 5 and js["meta"]["n_images"] == 5 and js["meta"]["steps"] == 4
    assert set(js["results"]["gradcam"]) >= {"ad", "ag", "ai", "ins", "del", "pg", "miou", "time"}
    md = (out / "interpretability_val.md").read_text()
    assert "| gradcam | Baseline |" in md and "| fakecam | Baseline |" in md and "AD↓" in md
    assert (out / "overlays_val.png").stat().st_size > 1000
    assert res["interpretability"]["results"]["gradcam"]["ad"] == js["results"]["gradcam"]["ad"]
    assert json.loads((out / "metrics_val.json").read_text())["accuracy"]["num_images"] == 6
