"""UCAG wrapper and RSP explainer (spec seed004_ucag_rsp §2-4): identities that fail if the code is wrong."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models.explainers import Explainer, create_explainer
from models.explainers.rsp import (RSP, maxpool_z, relative_start_relevance, residual_split, sectional_conv,
                                   zb_conv)
from models.explainers.ucag import UCAG, coverage_counts, patch_geometry, patch_starts


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.create_model("baseline", backbone="resnet10t", num_classes=5).eval()


@pytest.fixture(scope="module")
def x32():
    torch.manual_seed(1)
    return torch.rand(3, 3, 32, 32), torch.tensor([0, 3, 4])


class _ConstBase(Explainer):
    """A base explainer whose raw patch map is 1 everywhere and whose logits are equal (all weights 1)."""

    name = "const"
    uses_layers = False

    def explain_raw(self, x, t):
        return torch.ones((x.shape[0],) + (3,) * (x.dim() - 2)), torch.zeros(x.shape[0], 5)

    def explain(self, x, t):
        return torch.ones((x.shape[0],) + tuple(x.shape[2:]))


# ---------------------------------------------------------------------------------------------- UCAG
def test_geometry_matches_spec_at_224():
    crops, starts = patch_geometry((224, 224), 6, 124, 224)
    assert crops == [124, 124] and starts[0] == [0, 20, 40, 60, 80, 100]
    n = coverage_counts((224, 224), crops, starts)
    assert n[0, 0] == 1 and n[100:124, 100:124].eq(36).all() and n.max() == 36
    assert patch_starts(50, 27, 4) == [0, 8, 15, 23] and patch_starts(10, 10, 1) == [0]


def test_ucag_1x1_grid_factor_1_equals_base(net, x32):
    x, t = x32
    base = create_explainer("gradcam", net, target_layers=2)
    same = dict(n_units=1, crop=32, ref_size=32, alpha=1.0, blur=None)
    u = create_explainer("ucag", net, base="gradcam", target_layers=2, patch_maps="normalized", **same)
    torch.testing.assert_close(u(x, t), base(x, t), atol=1e-6, rtol=0)
    # raw path: M = bilinear(raw) (weight 1, count 1), S = n(ReLU(M)) / max
    raw, _ = base.explain_raw(x, t)
    m = F.interpolate(raw.unsqueeze(1), size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    ref = models.normalize_saliency(m.clamp(min=0))
    ref = ref / ref.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    ur = create_explainer("ucag", net, base="gradcam", target_layers=2, **same)
    torch.testing.assert_close(ur(x, t), ref, atol=1e-6, rtol=0)
    assert ur.last_info["patch_maps"] == "raw"


@pytest.mark.parametrize("size,n", [(64, 6), (50, 4), (37, 3)])
def test_overlaps_are_averaged_by_exact_counts(net, size, n):
    x = torch.rand(2, 3, size, size)
    u = UCAG(net, base=_ConstBase(net), n_units=n)
    u(x, torch.tensor([0, 1]))
    agg, counts = u.last_info["aggregate"], u.last_info["counts"]
    torch.testing.assert_close(agg, torch.ones_like(agg), atol=1e-6, rtol=0)  # constant map and weights -> constant
    crops, starts = patch_geometry((size, size), n, 124, 224)
    brute = torch.zeros(size, size)
    for i in starts[0]:
        for j in starts[1]:
            for yy in range(i, i + crops[0]):
                for xx in range(j, j + crops[1]):
                    brute[yy, xx] += 1
    assert torch.equal(counts, brute) and counts.min() >= 1
    u1 = UCAG(net, base=_ConstBase(net), n_units=n, count_offset=1)  # the official code's count + 1
    u1(x, torch.tensor([0, 1]))
    torch.testing.assert_close(u1.last_info["aggregate"][0], brute / (brute + 1))


def test_ucag_batched_equals_one_at_a_time_and_chunks(net, x32):
    x, t = x32
    u = create_explainer("ucag:gradcam", net, target_layers=2, n_units=3)
    full = u(x, t)
    assert u.last_info["base_calls"] == 1  # all 27 patches of the 3 images in one base call
    single = torch.cat([u(x[i:i + 1], t[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(full, single, atol=1e-5, rtol=0)
    uc = create_explainer("ucag:gradcam", net, target_layers=2, n_units=3, max_patches=7)
    torch.testing.assert_close(uc(x, t), full, atol=1e-5, rtol=0)
    assert uc.last_info["base_calls"] == math.ceil(27 / 7)


def test_ucag_confidence_weights_are_exp_softmax_of_patch_logits(net, x32):
    x, t = x32[0][:1], x32[1][:1]
    u = create_explainer("ucag:gradcam", net, target_layers=2, n_units=2)
    u(x, t)
    (c, _), (st, _) = patch_geometry((32, 32), 2, 124, 224)[0], patch_geometry((32, 32), 2, 124, 224)[1]
    ps = []
    for i in st:
        for j in st:
            p = F.interpolate(x[:, :, i:i + c, j:j + c], size=(int(2.6 * c),) * 2, mode="bicubic", align_corners=False)
            with torch.no_grad():
                ps.append(net(p).softmax(1)[0, t[0]])
    p = torch.stack(ps)
    torch.testing.assert_close(u.last_info["weights"].flatten(), torch.exp(p) / torch.exp(p).max(), atol=1e-5,
                               rtol=0)


def test_ucag_3d_and_spelling_and_errors(net):
    torch.manual_seed(0)
    vol = models.create_model("baseline", backbone="cnn3d", num_classes=3).eval()
    u = create_explainer("ucag", vol, base=_ConstBase(vol))
    u(torch.rand(1, 1, 16, 16, 16), torch.tensor([0]))
    assert u.last_info["aggregate"].shape == (1, 16, 16, 16)
    torch.testing.assert_close(u.last_info["aggregate"], torch.ones(1, 16, 16, 16), atol=1e-6, rtol=0)
    s = create_explainer("ucag:gradcam", vol)(torch.rand(1, 1, 16, 16, 16), torch.tensor([1]))
    assert s.shape == (1, 16, 16, 16) and 0 <= s.min() and s.max() <= 1
    assert create_explainer("ucag:scorecam", net).name == "ucag:scorecam"
    with pytest.raises(ValueError, match="not 'ucag'"):
        create_explainer("ucag", net, base="ucag")
    with pytest.raises(ValueError, match="after ':'"):
        create_explainer("ucag:gradcam", net, base="gradcam")
    with pytest.raises(ValueError, match="weighting"):
        create_explainer("ucag", net, weighting="max")


# ---------------------------------------------------------------------------------------------- RSP rules
def _naive_sectional(w_shape, x, r, stride, pad, shift):
    """Sectional propagation with explicit loops (spec §4), one image."""
    C_out, C_in, k, _ = w_shape
    xp = F.pad(x.clamp(min=0), (pad, pad, pad, pad))
    _, H, W = x.shape
    h, w = r.shape[1:]
    total = torch.zeros(C_in, H, W, dtype=torch.float64)
    for sign in (1, -1):
        rs = (sign * r).clamp(min=0)
        K = torch.zeros(C_out, C_in, k, k, dtype=torch.float64)
        for o in range(C_out):
            for i in range(h):
                for j in range(w):
                    K[o] += rs[o, i, j] * xp[:, i * stride:i * stride + k, j * stride:j * stride + k]
        back = torch.zeros_like(xp)
        for o in range(C_out):
            for i in range(h):
                for j in range(w):
                    if rs[o, i, j] > 0:
                        g = (K[o] * xp[:, i * stride:i * stride + k, j * stride:j * stride + k]).sum()
                        if g != 0:
                            back[:, i * stride:i * stride + k, j * stride:j * stride + k] += K[o] * rs[o, i, j] / g
        c = x.clamp(min=0) * back[:, pad:pad + H, pad:pad + W]
        total += sign * c
    if not shift:
        return total
    d = 2 * total
    nz = (d != 0).double()
    return d - r.sum() / nz.sum() * nz


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 2, 0)])
def test_sectional_propagation_matches_loops_and_conserves(k, stride, pad):
    torch.manual_seed(k + stride)
    conv = nn.Conv2d(3, 4, k, stride, pad, bias=False).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    h = (6 + 2 * pad - k) // stride + 1
    r = torch.randn(2, 4, h, h, dtype=torch.float64)
    out = sectional_conv(conv, x, r)
    for b in range(2):
        ref = _naive_sectional(conv.weight.shape, x[b], r[b], stride, pad, shift=k > 1)
        torch.testing.assert_close(out[b], ref)
    xp = torch.rand(2, 3, 6, 6, dtype=torch.float64)  # post-ReLU input: every window has mass, so sum R_in = sum R
    torch.testing.assert_close(sectional_conv(conv, xp, r).flatten(1).sum(1), r.flatten(1).sum(1))


def test_zb_maxpool_residual_rules_conserve():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, 1, 1, bias=True).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    r = torch.rand(2, 5, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(zb_conv(conv, x, r).flatten(1).sum(1), r.flatten(1).sum(1))
    a = torch.rand(2, 4, 8, 8, dtype=torch.float64)
    pool = nn.MaxPool2d(2)
    rp = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    rin = maxpool_z(pool, a, rp)
    torch.testing.assert_close(rin.flatten(1).sum(1), rp.flatten(1).sum(1))
    winners = F.max_unpool2d(*F.max_pool2d(a, 2, return_indices=True), 2) != 0
    assert (rin[~winners] == 0).all()  # winner-take-all
    ra, rb = residual_split(r[:, :4], a[:, :, :7, :7], -a[:, :, :7, :7])
    torch.testing.assert_close(ra + rb, r[:, :4])
    assert rb.abs().max() < 1e-6  # a negative branch gets (almost) nothing


def test_relative_start_relevance_identities():
    torch.manual_seed(0)
    A = torch.rand(2, 6, 4, 4)
    gt, gh = torch.randn(2, 6, 4, 4), torch.randn(2, 3, 6, 4, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    R = relative_start_relevance(A, gt, gh, mask)
    torch.testing.assert_close(R.flatten(1).sum(1), torch.ones(2))  # 2 - 1 = 1
    assert torch.equal(R, R[:, :1].expand_as(R))  # every channel unit of a location carries r / K
    # the same by hand for image 0: RG = |H| G^t - sum_h G^h, bipolar balance, purge
    def ghat(g):
        G = A[0] * g.mean((-2, -1), keepdim=True)
        return G / (G.max() + 1e-9)
    rg = 2 * ghat(gt[0]) - ghat(gh[0, 0]) - ghat(gh[0, 1])
    P = rg.clamp(min=0) / rg.clamp(min=0).sum()
    Q = rg.clamp(max=0) / rg.clamp(max=0).min()
    Q = Q * P.sum() / Q.sum()
    s = (P - Q).sum(0)
    ref = 2 * s.clamp(min=0) / s.clamp(min=0).sum() - s.clamp(max=0).abs() / s.clamp(max=0).abs().sum()
    torch.testing.assert_close(R[0, 0], ref / 6)
    plain = relative_start_relevance(A, gt, gh, mask, relative=False)
    g1 = A[1] * gt[1].mean((-2, -1), keepdim=True)
    torch.testing.assert_close(plain[1], g1 / (g1.max() + 1e-9))  # relative=False: the normalised Grad-CAM map


def test_rsp_conserves_per_layer_batch_independent(net, x32):
    x, t = x32
    e = create_explainer("rsp", net, target_layers=2)  # 4x4 at 32 px
    s = e(x, t)
    assert s.shape == (3, 32, 32) and s.max() <= 1 and s.flatten(1).amax(1).gt(0.99).all()
    sums = torch.stack([v for _, v in e.last_info["layer_sums"]])  # (units + 1, B), first row = sum R_L
    assert len(sums) > 10
    torch.testing.assert_close(sums, sums[:1].expand_as(sums), atol=1e-4, rtol=0)  # conserved down to the input
    torch.testing.assert_close(e.last_info["raw"].flatten(1).sum(1), sums[0], atol=1e-4, rtol=0)
    single = torch.cat([e(x[i:i + 1], t[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(s, single, atol=1e-5, rtol=0)
    # plain (non-relative) variant, a VGG and UCAG over RSP (signed base: no blur)
    e0 = create_explainer("rsp", net, target_layers=2, relative=False)
    assert not torch.allclose(e0(x, t), s)
    torch.manual_seed(0)
    vgg = models.create_model("baseline", backbone="vgg11", num_classes=3).eval()
    ev = create_explainer("rsp", vgg)
    ev(torch.rand(1, 3, 32, 32), torch.tensor([2]))
    v0 = float(ev.last_info["layer_sums"][0][1])
    assert all(abs(float(v) - v0) < 1e-4 for _, v in ev.last_info["layer_sums"])
    u = create_explainer("ucag:rsp", net, target_layers=2, n_units=2)
    su = u(x[:1], t[:1])
    assert u.signed and u.last_info["patch_maps"] == "raw" and su.max() == 1


def test_rsp_refuses_what_it_cannot_do(net):
    with pytest.raises(ValueError, match="3D"):
        create_explainer("rsp", models.create_model("baseline", backbone="cnn3d", num_classes=3))(
            torch.rand(1, 1, 16, 16, 16))
    vit = models.create_model("baseline", backbone="deit_tiny_patch16_224", num_classes=3,
                              backbone_kwargs={"img_size": 32}).eval()
    with pytest.raises(NotImplementedError, match="RSP"):
        create_explainer("rsp", vit)(torch.rand(1, 3, 32, 32), torch.tensor([0]))
    with pytest.raises(ValueError, match="hostile"):
        RSP(net, hostile="all")


def test_plain_timm_model_ucag_and_rsp():
    """A user's timm model (no zoo wrapper, no cam_target_layer): pass target_layers by name."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("resnet10t", num_classes=3).eval()
    x, t = torch.rand(2, 3, 32, 32), torch.tensor([0, 2])
    s = create_explainer("ucag:gradcam", m, target_layers="layer2", n_units=2)(x, t)
    assert s.shape == (2, 32, 32) and s.max() == 1
    e = create_explainer("rsp", m, target_layers="layer2")
    assert e(x, t).shape == (2, 32, 32)
    v0 = e.last_info["layer_sums"][0][1]
    assert all(torch.allclose(v, v0, atol=1e-4) for _, v in e.last_info["layer_sums"])
