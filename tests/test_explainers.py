"""Tests of models/explainers (spec explainers_and_metrics §3): every check would fail if the code were wrong."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import models
from models.explainers import create_explainer, list_explainers
from models.explainers.aggregate import HAM
from models.explainers.base import postprocess_layer_maps
from models.explainers.relevance import initial_relevance, layer_relevance, lrp_epsilon, lrp_zplus, weight_split

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

ALL = list_explainers()
CHEAP = [n for n in ALL if n not in ("scorecam", "ablationcam")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(backbone="resnet18", **kw):
    torch.manual_seed(0)
    return models.create_model("baseline", backbone=backbone, num_classes=3, **kw).eval()


@pytest.fixture(scope="module")
def r18():
    return _model()


@pytest.fixture(scope="module")
def vit():
    return _model("deit_tiny_patch16_224", backbone_kwargs={"img_size": 32})


@pytest.fixture(scope="module")
def vol():
    """cnn3d with BatchNorm statistics calibrated on random volumes (at init its eval-mode features are dead)."""
    m = _model("cnn3d")
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm3d):
            mod.momentum = None
    m.train()
    with torch.no_grad():
        m(torch.rand(4, 1, 16, 16, 16))
    return m.eval()


@pytest.fixture(scope="module")
def x64():
    torch.manual_seed(1)
    return torch.rand(3, 3, 64, 64), torch.tensor([0, 1, 2])


def _package(cls, model, layers, x, t):
    with cls(model, target_layers=layers) as cam:
        return torch.from_numpy(cam(x, targets=[ClassifierOutputTarget(int(c)) for c in t]))


def _opts(name):
    return {"max_iter": 3} if name == "opticam" else {}


# --------------------------------------------------------------------- CAM family vs the grad-cam package
@pytest.mark.parametrize("name,cls", [("gradcam", "GradCAM"), ("gradcampp", "GradCAMPlusPlus"),
                                      ("xgradcam", "XGradCAM"), ("layercam", "LayerCAM"), ("hirescam", "HiResCAM")])
def test_package_cams_equal_grad_cam_package(r18, x64, name, cls, tap=-2):
    x, t = x64
    layer = r18.backbone.taps[tap]
    ours = create_explainer(name, r18, target_layers=[layer])(x, t)
    ref = _package(getattr(pgc, cls), r18, [layer], x, t)
    assert ours.shape == ref.shape == (3, 64, 64)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)


def test_scorecam_and_ablationcam_equal_package():
    m = _model("test_resnet")
    torch.manual_seed(2)
    x, t = torch.rand(2, 3, 32, 32), torch.tensor([1, 2])
    layer = [m.backbone.taps[1]]  # 32 channels: fast
    ours = create_explainer("scorecam", m, target_layers=layer, batch_size=64)(x, t)
    torch.testing.assert_close(ours, _package(pgc.ScoreCAM, m, layer, x, t), atol=2e-5, rtol=0)
    assert ours.flatten(1).amax(1).gt(0.99).all()
    # inner taps are side outputs: ablation must act on the stage module the classifier reads (body.layer1)
    ours = create_explainer("ablationcam", m, target_layers=layer, batch_size=64)(x, t)
    torch.testing.assert_close(ours, _package(pgc.AblationCAM, m, [m.backbone.body.layer1], x, t), atol=2e-5, rtol=0)
    assert ours.flatten(1).amax(1).gt(0.99).all()


def test_gradcam_batch_equals_single_calls_cnn_and_vit(r18, vit, x64):
    x, t = x64
    for model, xx in ((r18, x), (vit, torch.nn.functional.interpolate(x, size=32))):
        for name in (("gradcam", "xrelevancecam") if model is r18 else ("gradcam",)):
            e = create_explainer(name, model)
            batch = e(xx, t)
            singles = torch.cat([e(xx[i:i + 1], t[i:i + 1]) for i in range(3)])
            torch.testing.assert_close(batch, singles, atol=1e-5, rtol=0)
            assert torch.isfinite(batch).all()
    # ViT: tokens reach the CAM as (B, C, h, w) through the tap; the map is at input resolution
    s = create_explainer("gradcam", vit)(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    assert s.shape == (2, 32, 32) and torch.isfinite(s).all() and s.max() > 0.99


def test_multilayer_aggregation_is_mean_of_normalised_layer_maps(r18, x64):
    """seed 002 §4.4.2: per layer ReLU -> up -> min-max, mean, min-max."""
    x, t = x64
    taps = [r18.backbone.taps[-3], r18.backbone.taps[-2], r18.backbone.taps[-1]]
    agg = create_explainer("gradcam", r18, target_layers=taps)(x, t)
    singles = torch.stack([create_explainer("gradcam", r18, target_layers=[L])(x, t) for L in taps]).mean(0)
    lo, hi = singles.flatten(1).min(1)[0], singles.flatten(1).max(1)[0]
    ref = (singles - lo[:, None, None]) / (hi - lo + 1e-7)[:, None, None]
    torch.testing.assert_close(agg, ref, atol=1e-5, rtol=0)
    # layers by name and by tap index resolve to the same modules
    by_name = create_explainer("gradcam", r18, target_layers=["backbone.taps.2", "backbone.taps.3", 4])(x, t)
    torch.testing.assert_close(by_name, agg)


def test_cam_equals_gradcam_at_gap_linear_layer_and_intrinsic(r18, x64):
    """spec §3.1: at the GAP->Linear layer g^k = W[c,k]/(hw), so Grad-CAM = ReLU'd CAM after normalisation."""
    x, t = x64
    cam_relu = create_explainer("cam", r18, relu=True)(x, t)
    torch.testing.assert_close(cam_relu, create_explainer("gradcam", r18)(x, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(create_explainer("cam", r18)(x, t), r18.explain(x, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(create_explainer("intrinsic", r18)(x, t), r18.explain(x, t))
    with pytest.raises(ValueError, match="GAP"):
        create_explainer("cam", r18, target_layers=-2)(x, t)


# --------------------------------------------------------------------- Opti-CAM
def _masked_logit(model, x, t, s):
    with torch.no_grad():
        return model(x * s.unsqueeze(1)).gather(1, t[:, None]).squeeze(1)


def test_opticam_beats_channel_mean_on_every_image(r18, x64):
    x, t = x64
    e = create_explainer("opticam", r18, max_iter=5)
    s = e(x, t)
    # independent check: masked logit of the returned map vs the plain channel mean (u = 0.5 init)
    with torch.no_grad(), __import__("models.explainers.base", fromlist=["x"]).capture_outputs(
            [r18.backbone.taps[-1]]) as cap:
        r18(x)
    a = cap.last()[0].clamp(min=0).mean(1)
    init = postprocess_layer_maps([a], x.shape[2:], relu=False)
    f_out, f_init = _masked_logit(r18, x, t, s), _masked_logit(r18, x, t, init)
    torch.testing.assert_close(f_init, e.last_info["F_init"], atol=1e-4, rtol=1e-4)
    assert (f_out > f_init + 1e-4).all(), (f_out, f_init)
    torch.testing.assert_close(f_out, e.last_info["F_best"], atol=1e-4, rtol=1e-4)


def test_opticam_stops_per_image_not_per_batch():
    m = _model("test_resnet")
    torch.manual_seed(3)
    x = torch.rand(3, 3, 64, 64)
    x[1] = 0  # a black image: F does not depend on u, it converges at the first check
    t = torch.tensor([0, 1, 2])
    e = create_explainer("opticam", m, max_iter=15, tol=1e-4)
    e(x, t)
    n_iter, u = e.last_info["n_iter"].clone(), e.last_info["u_last"].clone()
    f_best = e.last_info["F_best"].clone()
    assert n_iter[1] == 1 and n_iter[0] != n_iter[2] and (n_iter[[0, 2]] > 1).all(), n_iter
    early, late = (0, 2) if n_iter[0] < n_iter[2] else (2, 0)
    # the early image froze after n_iter[early] steps: the same batch stopped there by max_iter has the same u,
    # although the other image kept optimising (Adam's momentum must not move frozen rows)
    e_short = create_explainer("opticam", m, max_iter=int(n_iter[early]), tol=1e-4)
    e_short(x, t)
    u_short = e_short.last_info["u_last"]
    torch.testing.assert_close(u_short[early], u[early], atol=1e-6, rtol=0)
    assert not torch.allclose(u_short[late], u[late], atol=1e-3)
    assert torch.equal(u[1], torch.full_like(u[1], 0.5))
    # each image stops at the same iteration and reaches the same objective as when optimised alone
    for i in range(3):
        e(x[i:i + 1], t[i:i + 1])
        assert e.last_info["n_iter"].item() == n_iter[i].item()
        torch.testing.assert_close(e.last_info["F_best"][0], f_best[i], atol=1e-4, rtol=0)


def test_opticam_options(r18, x64):
    x, t = x64
    for obj in ("mask", "diff"):
        for norm in ("range", "max", "sigmoid"):
            s = create_explainer("opticam", r18, max_iter=2, objective=obj, normalization=norm)(x[:1], t[:1])
            assert s.shape == (1, 64, 64) and 0 <= s.min() and s.max() <= 1
    with pytest.raises(ValueError, match="objective"):
        create_explainer("opticam", r18, objective="bogus")


# --------------------------------------------------------------------- LRP / Relevance-CAM
def _naive_linear_eps(x, w, b, r, eps):
    z = x @ w.T + b
    out = torch.zeros_like(x)
    for i in range(x.shape[1]):
        for j in range(w.shape[0]):
            out[0, i] += x[0, i] * w[j, i] / (z[0, j] + eps * (1 if z[0, j] >= 0 else -1)) * r[0, j]
    return out


def test_lrp_epsilon_and_zplus_match_naive_rules():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    x, r = torch.randn(1, 5), torch.randn(1, 4)
    torch.testing.assert_close(lrp_epsilon(lin, x, r, eps=1e-2), _naive_linear_eps(x, lin.weight, lin.bias, r, 1e-2))
    # z+ (alpha1 beta0) on a conv with signed inputs: R_i = sum_j (x_i w_ij)+ / sum_i' (x_i' w_i'j)+ R_j
    conv = nn.Conv2d(2, 3, 2, bias=True)
    x, r = torch.randn(1, 2, 3, 3), torch.randn(1, 3, 2, 2)
    got = lrp_zplus(*weight_split(conv), x, r, eps=1e-9)
    ref = torch.zeros_like(x)
    w = conv.weight
    for o in range(3):
        for p in range(2):
            for q in range(2):
                contrib = (x[0, :, p:p + 2, q:q + 2] * w[o]).clamp(min=0)
                ref[0, :, p:p + 2, q:q + 2] += contrib / (contrib.sum() + 1e-9) * r[0, o, p, q]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum(), r.sum(), atol=1e-5, rtol=1e-5)  # conservation of the rule


def _bias_free_resnet():
    m = _model()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.bias.zero_()
                mod.running_mean.zero_()
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
        m.fc.bias.zero_()
    return m


def test_relevance_conserved_layer_to_layer_on_bias_free_net():
    m = _bias_free_resnet()
    torch.manual_seed(4)
    x, t = torch.rand(2, 3, 64, 64), torch.tensor([0, 2])
    for contrast in ("logit", "xrelevance"):
        _, rels, _, r0 = layer_relevance(m, x, t, list(m.backbone.taps), contrast)
        for r in rels:  # every stage: act1, layer1..layer4
            torch.testing.assert_close(r.flatten(1).sum(1), r0.sum(1), atol=1e-5, rtol=1e-4)
    # with biases (BN shifts) z+ ignores the bias terms, so relevance is still conserved, whereas the plain
    # gradient x activation (what the rules replace) is not: the check above can fail
    real = _model()
    _, rels, logits, r0 = layer_relevance(real, x, t, [real.backbone.taps[0]], "logit")
    torch.testing.assert_close(rels[0].flatten(1).sum(1), r0.sum(1), atol=1e-5, rtol=1e-4)
    feats = []
    h = real.backbone.taps[0].register_forward_hook(lambda mod, i, o: feats.append(o))
    y = real(x.clone().requires_grad_(True)).gather(1, t[:, None]).squeeze(1)
    h.remove()
    (g,) = torch.autograd.grad(y.sum(), feats[0])
    assert not torch.allclose((feats[0] * g).flatten(1).sum(1), y.detach(), rtol=1e-2)


def test_xrelevancecam_weights_satisfy_eq_4_2():
    m = _bias_free_resnet()
    x, t = torch.rand(2, 3, 64, 64), torch.tensor([1, 0])
    e = create_explainer("xrelevancecam", m, target_layers=[-1, -2])
    e(x, t)
    info = e.last_info
    r0 = info["initial_relevance"]
    torch.testing.assert_close(r0.sum(1), info["logits"].gather(1, t[:, None]).squeeze(1) / 3)  # -y_t/C contrast
    for a, r, w in zip(info["activations"], info["relevance"], info["weights"]):
        torch.testing.assert_close(w, r.flatten(2).sum(2) / (a.flatten(2).sum(2) + 1e-9))
        torch.testing.assert_close((w * a.flatten(2).sum(2)).sum(1), r0.sum(1), atol=1e-5, rtol=1e-4)  # eq 4.2
    e2 = create_explainer("relevancecam", m)
    e2(x, t)
    r = e2.last_info["relevance"][0]
    torch.testing.assert_close(e2.last_info["weights"][0], r.flatten(2).mean(2))
    torch.testing.assert_close(e2.last_info["initial_relevance"].sum(1), torch.zeros(2), atol=1e-5, rtol=0)  # CLRP


def test_lrp_engine_matches_zennit_on_sequential_cnn():
    zennit = pytest.importorskip("zennit")
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon, Pass, ZPlus
    from zennit.types import Activation, AvgPool, Convolution, Linear

    torch.manual_seed(5)
    net = nn.Sequential(nn.Identity(), nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))
    with torch.no_grad():
        net[2].running_mean.uniform_(-0.2, 0.2)
        net[2].running_var.uniform_(0.5, 2)
        net[2].bias.uniform_(-0.2, 0.2)
    net.eval()
    x = torch.rand(2, 3, 14, 14)
    t = torch.tensor([1, 3])
    with torch.enable_grad():
        _, (ours,), logits, r0 = layer_relevance(net, x, t, [net[0]], "clrp")
    composite = LayerMapComposite(
        layer_map=[(Activation, Pass()), (AvgPool, Epsilon(1e-9)), (Convolution, ZPlus(1e-9, zero_params="bias")),
                   (Linear, ZPlus(1e-9, zero_params="bias"))],
        canonizers=[SequentialMergeBatchNorm()])
    xz = x.clone().requires_grad_(True)
    with composite.context(net) as modified:
        out = modified(xz)
        (ref,) = torch.autograd.grad(out, xz, r0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert ours.abs().sum() > 0


# --------------------------------------------------------------------- HAM
def test_ham_stage_maps_and_max_fusion(r18, x64):
    x, t = x64
    e = create_explainer("ham", r18)
    s = e(x, t)
    maps = e.last_info["stage_maps"]
    assert [tuple(m.shape[1:]) for m in maps] == [(8, 8), (4, 4), (2, 2)]  # layer2..layer4 at 64 px
    # stage map n = n(ReLU(mean_k dS/dF^k * F^k)) recomputed by hand for the deepest stage
    xx = x.clone().requires_grad_(True)
    feats = []
    h = r18.backbone.taps[-1].register_forward_hook(lambda mod, i, o: feats.append(o))
    y = r18(xx).gather(1, t[:, None]).sum()
    h.remove()
    (g,) = torch.autograd.grad(y, feats[0])
    m4 = (g * feats[0]).mean(1).clamp(min=0)
    lo, hi = m4.flatten(1).amin(1)[:, None, None], m4.flatten(1).amax(1)[:, None, None]
    m4 = (m4 - lo) / (hi - lo + 1e-7)
    torch.testing.assert_close(maps[-1], m4, atol=1e-5, rtol=0)
    # fusion eq 3.18: upsample to 8x8, pixel-wise max, upsample to 64, normalise
    up = [torch.nn.functional.interpolate(m[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
          for m in maps]
    fused = torch.stack(up).amax(0)
    ref = postprocess_layer_maps([fused], (64, 64), relu=False)
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(s, HAM.fuse(maps, (64, 64), "sum"), atol=1e-3)  # max != sum (eq 3.1)


# --------------------------------------------------------------------- sanity baselines
def test_fakecam_and_random(r18, vol, x64):
    x, t = x64
    f = create_explainer("fakecam", r18)(x, t)
    assert f.shape == (3, 64, 64) and f[:, 0, 0].eq(0).all() and f.sum() == 3 * (64 * 64 - 1)
    f3 = create_explainer("fakecam", vol)(torch.rand(2, 1, 8, 8, 8))
    assert f3[:, 0, 0, 0].eq(0).all() and f3.sum() == 2 * (8 ** 3 - 1)
    r = create_explainer("random", r18, seed=7)
    a, b = r(x, t), r(x, t)
    assert torch.equal(a, b) and 0 <= a.min() and a.max() <= 1 and a.std() > 0.2
    assert not torch.equal(a, create_explainer("random", r18, seed=8)(x, t))


# --------------------------------------------------------------------- contract: shapes, [0,1], modes, hooks
@pytest.mark.parametrize("kind", ["cnn", "vit", "3d"])
def test_every_explainer_shape_range_and_state(kind, r18, vit, vol):
    model, x = {"cnn": (r18, torch.rand(2, 3, 64, 64)), "vit": (vit, torch.rand(2, 3, 32, 32)),
                "3d": (vol, torch.rand(2, 1, 16, 16, 16))}[kind]
    names = list(CHEAP) + (["scorecam", "ablationcam"] if kind == "3d" else [])
    t = torch.tensor([0, 2])
    model.train()  # explainers must work in eval and hand the model back in train mode
    grads_before = {n: p.grad for n, p in model.named_parameters()}
    for name in names:
        kw = dict(_opts(name))
        if kind == "3d" and name in ("scorecam", "ablationcam"):
            kw["target_layers"] = [model.backbone.taps[0]]  # 16 channels
        if kind == "vit" and name == "guidedbackprop":
            with pytest.raises(ValueError, match="GELU"):
                create_explainer(name, model)(x, t)
            continue
        if name == "rsp" and kind in ("vit", "3d"):  # RSP: CNNs in 2D only, refused clearly (issue 18)
            with pytest.raises((NotImplementedError, ValueError), match="RSP|3D"):
                create_explainer(name, model)(x, t)
            continue
        if kind == "vit" and name == "ham":
            with pytest.raises(ValueError, match="path to the logits"):
                create_explainer(name, model)(x, t)
            continue
        e = create_explainer(name, model, **kw)
        with torch.inference_mode():  # e.g. a Lightning validation loop
            s = e(x, t)
        assert s.shape == (2,) + tuple(x.shape[2:]), name
        assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1, name
        if name not in ("random", "fakecam"):
            assert s.flatten(1).amax(1).gt(0.9).any(), name  # (a ReLU-CAM may be all 0 for an image)
        if name != "opticam":
            torch.testing.assert_close(e(x, t), s, msg=name)  # deterministic: no state left behind
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert {n: p.grad for n, p in model.named_parameters()} == grads_before
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    model.eval()


def test_errors_are_clear(r18, vol):
    with pytest.raises(ValueError, match="Unknown explainer"):
        create_explainer("gradcam++", r18)
    with pytest.raises(ValueError, match="no sub-module"):
        create_explainer("gradcam", r18, target_layers="backbone.nope")
    with pytest.raises(ValueError, match="out of range"):
        create_explainer("gradcam", r18, target_layers=9)
    with pytest.raises(ValueError, match="3D"):
        create_explainer("gradcam", r18)(torch.rand(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="targets"):
        create_explainer("gradcam", r18)(torch.rand(2, 3, 32, 32), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="one layer"):
        create_explainer("opticam", r18, target_layers=[-1, -2])


def test_initial_relevance_totals():
    y = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    t = torch.tensor([0])
    assert torch.allclose(initial_relevance(y, t, "clrp"), torch.tensor([[2.0, -2 / 3, -2 / 3, -2 / 3]]))
    assert torch.allclose(initial_relevance(y, t, "xrelevance"), torch.tensor([[2.0, -0.5, -0.5, -0.5]]))


def test_layernorm_rule_keeps_relevance_in_convnext():
    """LayerNorm is scale-invariant, so the plain gradient would give sum R = 0 below it (ConvNeXt downsampling)."""
    m = _model("test_convnext")
    torch.manual_seed(6)
    x, t = torch.rand(2, 3, 64, 64), torch.tensor([0, 1])
    _, rels, _, r0 = layer_relevance(m, x, t, [m.backbone.taps[-2]], "logit")
    torch.testing.assert_close(rels[0].flatten(1).sum(1), r0.sum(1), atol=1e-4, rtol=2e-2)
