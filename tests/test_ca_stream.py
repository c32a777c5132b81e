"""CA-Stream (seed 001 ch. 3): equations, stage mapping, parameter counts, training protocol, loading."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import create_model, load_weights
from models.ca_stream import CABlock, CAStreamClassifier, CrossAttention
from models.baseline import Baseline

torch.set_num_threads(2)


def _tiny(**kw):
    torch.manual_seed(0)
    kw.setdefault("backbone", "resnet18")
    kw.setdefault("num_classes", 4)
    return create_model("ca_stream", **kw)


# ---- eqs. 3.1-3.4, 3.8 -------------------------------------------------------------------------
def test_eq_3_2_attention_logits_are_class_agnostic_cam():
    torch.manual_seed(0)
    d, h, w = 12, 5, 7
    feat, q = torch.randn(3, d, h, w), torch.randn(3, d)
    attn = CrossAttention(d)
    logits = attn.attention_logits(q, feat)
    # naive CAM: sum_k q_k f^k, with f^k the k-th channel map, scaled by 1/sqrt(d)
    cam = torch.zeros(3, h, w)
    for b in range(3):
        for k in range(d):
            cam[b] += q[b, k] * feat[b, k]
    torch.testing.assert_close(logits, cam.flatten(1) / math.sqrt(d))
    # eq. 3.1: a = softmax over the p positions
    _, a = attn(q, feat)
    torch.testing.assert_close(a, torch.softmax(cam.flatten(1) / math.sqrt(d), dim=1))
    torch.testing.assert_close(a.sum(1), torch.ones(3))


def test_eq_3_3_output_is_attention_weighted_average_and_gap_for_zero_query():
    torch.manual_seed(1)
    d = 6
    feat, q = torch.randn(2, d, 4, 3), torch.randn(2, d)
    z, a = CrossAttention(d)(q, feat)
    ref = torch.stack([sum(a[b, i] * feat[b].flatten(1)[:, i] for i in range(12)) for b in range(2)])  # eq. 3.4
    torch.testing.assert_close(z, ref)
    z0, a0 = CrossAttention(d)(torch.zeros(2, d), feat)  # uniform attention -> GAP
    torch.testing.assert_close(a0, torch.full((2, 12), 1 / 12))
    torch.testing.assert_close(z0, feat.mean(dim=(2, 3)))


def test_eq_3_8_proj_ca_matches_matrix_formula():
    torch.manual_seed(2)
    d, p = 8, 10
    attn = CrossAttention(d, proj_kv=True)
    feat, q = torch.randn(2, d, p), torch.randn(2, d)
    z, a = attn(q, feat)
    for b in range(2):
        Fm = feat[b].T  # (p, d): rows are positions
        K = Fm @ attn.key.weight.T + attn.key.bias
        V = Fm @ attn.value.weight.T + attn.value.bias
        a_ref = torch.softmax(K @ q[b] / math.sqrt(d), dim=0)
        torch.testing.assert_close(a[b], a_ref)
        torch.testing.assert_close(z[b], V.T @ a_ref)


def test_attention_in_fp32_under_autocast():
    block = CABlock(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, a = block(torch.randn(2, 8), torch.randn(2, 8, 5, 5).bfloat16())
    assert a.dtype == torch.float32 and q.shape == (2, 16)


# ---- eq. 3.7 / 3.5: the full model against a naive reference -----------------------------------
def test_stream_matches_naive_reference_and_uses_pooled_stem():
    m = _tiny().eval()
    x = torch.rand(2, 3, 64, 64)
    body = m.backbone.body
    xn = (x - m.backbone.mean) / m.backbone.std
    stem = body.maxpool(body.act1(body.bn1(body.conv1(xn))))  # post-max-pool stem (spec §3.1)
    feats = [stem]
    for layer in (body.layer1, body.layer2, body.layer3, body.layer4):
        feats.append(layer(feats[-1]))
    got = m.stage_features(x)
    assert [tuple(f.shape[1:]) for f in got] == [(64, 16, 16), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    for g, r in zip(got, feats):
        torch.testing.assert_close(g, r)
    q = m.stream.q0.expand(2, -1)
    for blk, f in zip(m.stream.blocks, feats):
        T = f.flatten(2).transpose(1, 2)  # (B, p, d)
        a = torch.softmax(torch.einsum("bpd,bd->bp", T, q) / math.sqrt(f.shape[1]), 1)
        q = F.linear(torch.einsum("bpd,bp->bd", T, a), blk.proj.weight, blk.proj.bias)
    torch.testing.assert_close(m(x), m.fc(q))
    torch.testing.assert_close(m.forward_gap(x), m.fc(feats[-1].mean((2, 3))))


def test_stage_mapping_generic_through_feature_info():
    with torch.device("meta"):
        cnx = create_model("ca_stream", backbone="convnext_tiny", num_classes=3)
        r50 = create_model("ca_stream", backbone="resnet50", num_classes=3)
    assert not cnx.pooled_stem and cnx.stream.dims == [96, 192, 384, 768]  # 4 blocks, no stem block
    assert r50.pooled_stem and r50.stream.dims == [64, 256, 512, 1024, 2048]


# ---- parameter counts (Tables 3.3-3.6) ------------------------------------------------------------
def _count(backbone, **kw):
    with torch.device("meta"):
        m = create_model("ca_stream", backbone=backbone, num_classes=1000, **kw)
    return m.stream_parameter_count(), sum(p.numel() for p in m.parameters())


def test_parameter_overhead_matches_paper():
    s18, t18 = _count("resnet18")
    s50, t50 = _count("resnet50")
    assert s18 == 439_808 and round(s18 / 1e6, 2) == 0.44 and round(t18 / 1e6, 2) == 12.13  # Table 3.3
    assert s50 == 6_969_152 and math.floor(s50 / 1e4) / 100 == 6.96 and round(t50 / 1e6, 2) == 32.53
    assert round(100 * s50 / (t50 - s50), 2) == 27.27
    # Table 3.4 (PROJ->CA 18.13M), Table 3.5 (placement), Table 3.6 (class-specific 32.59M)
    assert round(_count("resnet50", proj_kv=True)[0] / 1e6, 2) == 18.13
    placement = [_count("resnet50", start_stage=s)[0] for s in range(5)]
    assert [math.floor(n / 1e4) / 100 for n in placement] == [6.96, 6.95, 6.82, 6.29, 4.19]
    assert [round(n / 1e6, 2) for n in placement][-1] == 4.20
    assert round(_count("resnet50", class_specific=True)[1] / 1e6, 2) == 32.59


def test_convnext_small_overhead_matches_paper():
    s, t = _count("convnext_small")
    assert round(t / 1e6, 2) == 51.20 and round(100 * s / (t - s), 2) == 1.95


def test_start_stage_and_bad_arguments():
    m = _tiny(start_stage=3)
    assert m.stream.dims == [256, 512] and m.stream.q0.shape == (256,)
    assert len(m.forward_stream(torch.rand(1, 3, 64, 64))["attentions"]) == 2
    with pytest.raises(ValueError, match="start_stage"):
        _tiny(start_stage=5)
    with pytest.raises(ValueError, match="q0_init"):
        _tiny(q0_init="ones")


# ---- class-specific variant -------------------------------------------------------------------
def test_class_specific_uses_label_in_training_and_gap_prediction_at_inference():
    m = _tiny(class_specific=True).eval()
    with torch.no_grad():
        m.stream.q0.copy_(torch.randn_like(m.stream.q0) * 3)
    x = torch.rand(4, 3, 64, 64)
    f0 = m.stage_features(x)[0]

    def first_attention(rows):  # eq. 3.1 with the query row of each image
        return CrossAttention(64)(m.stream.q0[rows], f0)[1]

    out = m.forward_stream(x)  # inference: the row of the GAP model's prediction
    pred = out["gap_logits"].argmax(1)
    assert torch.equal(out["query_class"], pred)
    torch.testing.assert_close(out["attentions"][0], first_attention(pred))
    torch.testing.assert_close(m(x), m(x, labels=pred))
    other = (pred + 1) % 4  # training: the label's row
    out2 = m.forward_stream(x, other)
    assert torch.equal(out2["query_class"], other)
    torch.testing.assert_close(out2["attentions"][0], first_attention(other))
    assert not torch.allclose(out2["attentions"][0], out["attentions"][0])
    with pytest.raises(ValueError, match="integer class labels"):
        m(x, labels=torch.zeros(4, 4))

    from trainers.ca_stream import CAStreamModule

    mod = CAStreamModule(model_kwargs=dict(backbone="resnet18", class_specific=True), num_classes=4)
    seen = []
    orig = mod.model.forward_stream
    mod.model.forward_stream = lambda x, labels=None: (seen.append(labels), orig(x, labels))[1]
    y = torch.tensor([0, 1, 2, 3])
    batch = {"image": x, "label": y}
    mod.compute_loss(batch, "train")
    mod.compute_loss(batch, "val")
    assert torch.equal(seen[0], y) and seen[1] is None


# ---- intrinsic explanation -------------------------------------------------------------------
def test_forward_explain_is_upsampled_last_attention_and_class_agnostic():
    m = _tiny().eval()
    x = torch.rand(2, 3, 64, 64)
    logits, sal = m.forward_explain(x)
    assert m.explanation_kind == "attention" and sal.shape == (2, 64, 64)
    a = m.attention_maps(x)[-1]
    assert a.shape == (2, 2, 2)
    ref = F.interpolate(a[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = ref.amin((1, 2), keepdim=True), ref.amax((1, 2), keepdim=True)
    torch.testing.assert_close(sal, (ref - lo) / (hi - lo + 1e-7), atol=1e-6, rtol=0)  # eq. 1.7
    torch.testing.assert_close(m.forward_explain(x, target=torch.tensor([3, 1]))[1], sal)
    torch.testing.assert_close(logits, m(x))


def test_gradient_reaches_cam_target_layer_through_stream():
    m = _tiny().eval()
    grads = []
    m.cam_target_layer().register_full_backward_hook(lambda mod, gi, go: grads.append(go[0]))
    m(torch.rand(2, 3, 64, 64))[:, 1].sum().backward()
    assert grads and grads[0].abs().sum() > 0


# ---- loading a baseline, training protocol -----------------------------------------------------
def test_baseline_checkpoint_loads_with_only_stream_keys_new(tmp_path):
    torch.manual_seed(0)
    base = Baseline(num_classes=4, backbone="resnet18")
    path = tmp_path / "baseline.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in base.state_dict().items()}}, path)  # Lightning-style
    m = create_model("ca_stream", backbone="resnet18", num_classes=4)
    rep = load_weights(m, str(path))
    stream_keys = sorted(k for k in m.state_dict() if k.startswith("stream."))
    assert sorted(rep.new_mechanism_keys) == stream_keys and not rep.missing and not rep.unexpected
    assert rep.loaded == len(base.state_dict())
    m2 = create_model("ca_stream", backbone="resnet18", num_classes=4, checkpoint_path=str(path)).eval()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(m2.forward_gap(x), base.eval()(x))  # same backbone + classifier
    with pytest.raises(Exception, match="missing"):  # a CA-Stream file missing backbone keys is an error
        load_weights(create_model("ca_stream", backbone="resnet18", num_classes=4),
                     {k: v for k, v in m.state_dict().items() if not k.startswith("backbone.body.layer4")})


def _train_steps(mod, steps=3):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from trainers.data import SyntheticShapes

    ds = SyntheticShapes("train", size=24, num_classes=4, image_size=64)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(mod, DataLoader(ds, batch_size=8, shuffle=True))


def test_stream_protocol_freezes_backbone_classifier_and_bn_statistics():
    from trainers.ca_stream import CAStreamModule

    torch.manual_seed(0)
    mod = CAStreamModule(model_kwargs=dict(backbone="resnet18"), num_classes=4,
                         optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4})
    before = {k: v.clone() for k, v in mod.model.state_dict().items()}
    assert any(k.endswith("running_mean") for k in before)
    _train_steps(mod)
    after = mod.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen = [k for k in before if not k.startswith("stream.")]
    assert all(torch.equal(before[k], after[k]) for k in frozen), sorted(changed)[:5]  # incl. BN stats
    assert {k for k in before if k.startswith("stream.")} == changed  # every stream tensor moved
    assert all(not p.requires_grad for n, p in mod.model.named_parameters() if not n.startswith("stream."))
    mod.train()
    assert not mod.model.backbone.training and not mod.model.fc.training and mod.model.stream.training


def test_full_finetune_mode_updates_backbone():
    from trainers.ca_stream import CAStreamModule

    torch.manual_seed(0)
    mod = CAStreamModule(model_kwargs=dict(backbone="resnet18"), num_classes=4, train_mode="full",
                         optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9})
    w = mod.model.backbone.body.conv1.weight.clone()
    rm = mod.model.backbone.body.bn1.running_mean.clone()
    _train_steps(mod, steps=1)
    assert not torch.equal(w, mod.model.backbone.body.conv1.weight)
    assert not torch.equal(rm, mod.model.backbone.body.bn1.running_mean)
    with pytest.raises(ValueError, match="train_mode"):
        CAStreamModule(model_kwargs=dict(backbone="resnet18"), num_classes=4, train_mode="frozen")
