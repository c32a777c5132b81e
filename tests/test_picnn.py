"""PICNN (seed 003): every equation gets a test that fails if the code is wrong."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import create_model
from models.metrics.picnn import PICNNMetrics, evaluate_picnn, mutual_information_score
from models.picnn import (PICNN, bernoulli_straight_through, categorical_straight_through,
                          gumbel_filter_mask)

K = 3


def tiny(**kw):
    torch.manual_seed(0)
    kw.setdefault("backbone", "resnet18")
    return create_model("picnn", num_classes=K, **kw)


@pytest.fixture(scope="module")
def model():
    return tiny().eval()


@pytest.fixture(scope="module")
def x():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---- eqs. 5-7: straight-through Bernoulli ----------------------------------------------------------
def test_bernoulli_binary_unbiased_and_identity_gradient():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 0.03, 0.1, 0.37, 0.5, 0.81, 0.999, 1.0], dtype=torch.float32)
    draws = 40000
    pp = p.expand(draws, -1).clone().requires_grad_(True)
    z = bernoulli_straight_through(pp, g)
    # exactly binary in the forward pass (not 0.99999994)
    assert set(torch.unique(z.detach()).tolist()) <= {0.0, 1.0}
    # mean p over many draws (Theorem 1): 5 sigma binomial tolerance
    sigma = torch.sqrt(p * (1 - p) / draws)
    assert torch.all((z.detach().mean(0) - p).abs() <= 5 * sigma + 1e-6)
    assert z[:, 0].sum() == 0 and z[:, -1].sum() == draws  # p = 0 never, p = 1 always
    # dz/dp = 1 (straight-through)
    w = torch.randn(draws, p.numel())
    (z * w).sum().backward()
    assert torch.equal(pp.grad, w)


def test_bernoulli_is_inverse_of_uniform_draw():
    """z_i = 1[p_i >= eps_i] with eps from the same generator (eq. 7, naive reference)."""
    p = torch.rand(5, 7)
    z = bernoulli_straight_through(p, torch.Generator().manual_seed(3))
    eps = torch.rand(5, 7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z, (p >= eps).float())


def test_bernoulli_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bernoulli_straight_through(torch.tensor([1.5]))


# ---- eqs. 8-10: pseudo-label sampler ---------------------------------------------------------------
def test_categorical_frequencies_match_probs_and_identity_gradient():
    probs = torch.tensor([[0.05, 0.6, 0.15, 0.2]]).expand(60000, -1).clone().requires_grad_(True)
    y_vec, idx = categorical_straight_through(probs, torch.Generator().manual_seed(0))
    assert torch.equal(y_vec.detach(), F.one_hot(idx, 4).float())  # value is exactly the one-hot
    freq = torch.bincount(idx, minlength=4).float() / len(idx)
    p = probs[0].detach()
    assert torch.all((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / len(idx)))
    w = torch.randn_like(probs)
    (y_vec * w).sum().backward()
    assert torch.equal(probs.grad, w)


def test_categorical_inverse_cdf_reference():
    """c_{k-1} < xi <= c_k (eq. 10) with a naive loop."""
    probs = torch.softmax(torch.randn(50, 5), 1)
    _, idx = categorical_straight_through(probs, torch.Generator().manual_seed(4))
    xi = torch.rand(50, 1, generator=torch.Generator().manual_seed(4))
    for b in range(50):
        c = 0.0
        for k in range(5):
            lo, c = c, c + probs[b, k].item()
            if lo < xi[b].item() <= c or k == 4:
                assert idx[b].item() == k
                break


# ---- Gumbel-softmax ablation ------------------------------------------------------------------------
def test_gumbel_mask_is_one_class_per_filter_and_matches_P():
    torch.manual_seed(0)
    P = torch.softmax(torch.randn(3, 6) * 2, 0)
    B = 20000
    y_vec = F.one_hot(torch.zeros(B, dtype=torch.long), 3).float()
    logp = torch.log(P).requires_grad_(True)
    z = gumbel_filter_mask(logp, y_vec, tau=0.01, generator=torch.Generator().manual_seed(0))
    assert set(torch.unique(z.detach()).tolist()) <= {0.0, 1.0}
    # Gumbel-max: filter i goes to class 0 with probability P[0, i]
    sigma = torch.sqrt(P[0] * (1 - P[0]) / B)
    assert torch.all((z.detach().mean(0) - P[0]).abs() <= 5 * sigma)
    z.sum().backward()
    assert logp.grad.abs().sum() > 0


# ---- the model ---------------------------------------------------------------------------------------
def test_defaults_ratio_names_and_P_range(model):
    assert isinstance(model, PICNN)
    assert model.num_filters == round(12.8 * K)
    assert model.fc.in_features == model.num_filters
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("backbone.", "fc.", "target_conv.", "p_logits")) for n in names)
    assert sorted(n for n, _ in model.mechanism_parameters()) == ["p_logits", "target_conv.0.bias",
                                                                   "target_conv.0.weight"]
    P = model.P
    assert P.shape == (K, model.num_filters) and P.min() >= 0 and P.max() <= 1
    assert torch.allclose(P.sum(0), torch.ones(model.num_filters))  # softmax over classes per filter
    for param in ("sigmoid", "clamp"):
        m = tiny(p_param=param)
        m.p_logits.data.mul_(50)
        assert m.P.min() >= 0 and m.P.max() <= 1
    m = tiny(p_param="clamp")
    m.p_logits.data[0, 0] = 3.0
    m.project_parameters_()
    assert m.p_logits[0, 0] == 1.0


def test_inference_is_plain_and_draws_no_random_numbers(model, x):
    state = torch.get_rng_state()
    a = model(x)
    assert torch.equal(torch.get_rng_state(), state)
    h = model.features(x)
    assert torch.allclose(a, model.fc(h.mean((2, 3))), atol=1e-6)
    assert torch.equal(a, model(x))


def test_masked_head_is_eq4(model, x):
    h = model.features(x)
    z = (torch.rand(4, model.num_filters) > 0.5).float()
    ref = model.fc((h * z[:, :, None, None]).mean((2, 3)))  # eq. 4 then GAP + fc
    assert torch.allclose(model.head(h, z), ref, atol=1e-5)


def test_train_forward_consistency(x):
    m = tiny().train()
    out = m.forward_train(x, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out["p"], m.P[out["pseudo_label"]])  # row y~ of P
    assert set(torch.unique(out["z"].detach()).tolist()) <= {0.0, 1.0}
    h = m.features(x)  # BN in train mode: same batch, same statistics
    assert torch.allclose(out["logits_int"], m.head(h, out["z"]), atol=1e-4)


def test_pathway_is_label_free_scrambled_labels_same_output(x):
    """The interpretation pathway output is identical whatever the true labels are."""
    from trainers.picnn import picnn_loss

    m = tiny().train()
    y = torch.tensor([0, 1, 2, 0])
    outs = []
    for labels in (y, y[torch.randperm(4)], (y + 1) % K):
        torch.manual_seed(5)
        out = m.forward_train(x)
        outs.append(out)
        picnn_loss(out, labels)  # the loss reads labels; the pathway must not
    for o in outs[1:]:
        assert torch.equal(o["logits_int"], outs[0]["logits_int"]) and torch.equal(o["z"], outs[0]["z"])


def test_gradients_from_L_int_reach_P_and_backbone_and_not_with_lambda0(x):
    from trainers.picnn import picnn_loss

    m = tiny().train()
    y = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)
    out = m.forward_train(x)
    res = picnn_loss(out, out["pseudo_label"], lambda_int=2.0)  # all matched
    ce = F.cross_entropy(out["logits_int"], out["pseudo_label"])
    ce.backward()  # L_int alone
    assert m.p_logits.grad is not None and m.p_logits.grad.abs().sum() > 0
    assert m.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert m.target_conv[0].weight.grad.abs().sum() > 0
    assert torch.allclose(res["loss"], F.cross_entropy(out["logits"], out["pseudo_label"]) + 2 * ce.detach())
    # lambda = 0: STD baseline, P gets no gradient
    from trainers.picnn import PICNNModule

    mod = PICNNModule(model_kwargs=dict(backbone="resnet18"), num_classes=K, lambda_int=0.0)
    loss = mod.compute_loss({"image": x, "label": y}, "train")["loss"]
    loss.backward()
    assert mod.model.p_logits.grad is None
    assert mod.model.backbone.body.conv1.weight.grad.abs().sum() > 0
    opt = mod.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    assert all(p is not mod.model.p_logits for g in opt.param_groups for p in g["params"])


def test_matched_int_loss_connected_when_nothing_matches(x):
    from trainers.picnn import picnn_loss

    m = tiny().train()
    torch.manual_seed(0)
    out = m.forward_train(x)
    wrong = (out["pseudo_label"] + 1) % K
    res = picnn_loss(out, wrong, lambda_int=2.0)
    assert res["matched"] == 0 and res["l_int"] == 0
    res["loss"].backward()
    assert m.p_logits.grad is not None  # graph stays connected (DDP-safe), gradient zero
    res_all = picnn_loss(out, wrong, lambda_int=2.0, int_loss_samples="all")
    assert res_all["l_int"] > 0


def test_clusters_argmax_rule_and_cluster_cams_are_gradcam(model):
    A = model.cluster_assignment()
    assert torch.equal(A.sum(0), torch.ones(model.num_filters, dtype=torch.long))  # one cluster per filter
    assert torch.equal(A.float().argmax(0), model.P.argmax(0))
    assert model.cluster_filters()[1] == A[1].nonzero().flatten().tolist()
    x = torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(2))  # 3x3 maps
    target = torch.tensor([0, 1, 2, 1])
    cams = model.cluster_cams(x, target=target)
    # naive Grad-CAM reference (autograd) on the pathway restricted to a filter set
    h = model.features(x).detach().requires_grad_(True)
    for name in ("all", "cluster", "complement"):
        keep = {"all": torch.ones_like(A[target]), "cluster": A[target], "complement": ~A[target]}[name].float()
        score = model.head(h, keep).gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, h)
        alpha = grad.mean((2, 3))
        ref = torch.relu((alpha[:, :, None, None] * h).sum(1)).detach() * h.shape[2] * h.shape[3]
        assert torch.allclose(model._cam(h.detach(), target, keep.bool()), ref, atol=1e-5), name
        ref = F.interpolate(ref[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        lo, hi = ref.flatten(1).min(1).values, ref.flatten(1).max(1).values
        ref = (ref - lo[:, None, None]) / (hi - lo + 1e-7)[:, None, None]
        assert torch.allclose(cams[name], ref, atol=1e-3), name
    assert not torch.allclose(cams["cluster"], cams["complement"])
    logits, sal = model.forward_explain(x, target=target)
    assert torch.allclose(sal, cams["cluster"]) and sal.shape == (4, 96, 96)
    assert model.explanation_kind == "cluster_cam"


def test_eval_deterministic_label_free_and_metric(model, x):
    y = torch.tensor([0, 1, 2, 0])
    a, b = model.evaluate_pathways(x), model.evaluate_pathways(x, y)
    for k in ("logits", "logits_cluster", "logits_complement", "pooled"):
        assert torch.equal(a[k], b[k])  # labels change nothing but the diagnostic
    A = model.cluster_assignment().float()
    pred = a["logits"].argmax(1)
    h = model.features(x)
    assert torch.allclose(a["logits_cluster"], model.head(h, A[pred]), atol=1e-6)
    assert torch.allclose(a["logits_complement"], model.head(h, 1 - A[pred]), atol=1e-6)
    assert torch.allclose(b["logits_complement_label"], model.head(h, 1 - A[y]), atol=1e-6)
    loader = [{"image": x, "label": y}, {"image": x.flip(-1), "label": y}]
    r1 = evaluate_picnn(model, loader, mis_estimator="binned")
    r2 = evaluate_picnn(model, loader, mis_estimator="binned")
    assert r1 == r2
    acc = lambda key: 100 * (model.evaluate_pathways(x)[key].argmax(1) == y).float().mean()  # noqa: E731
    assert math.isclose(r1["acc2"], 0.5 * (acc("logits_cluster") + 100 * (
        model.evaluate_pathways(x.flip(-1))["logits_cluster"].argmax(1) == y).float().mean()), abs_tol=1e-4)
    assert set(r1) == {"acc1", "acc2", "acc3", "acc3_label", "mis"}


def test_metric_counts_by_hand():
    m = PICNNMetrics(num_classes=3, compute_mis=False)
    eye = torch.eye(3)
    out = {"logits": eye[[0, 1, 2, 0]], "logits_cluster": eye[[0, 1, 1, 1]], "logits_complement": eye[[1, 1, 0, 0]],
           "pooled": torch.zeros(4, 2)}
    m.update(out, torch.tensor([0, 1, 2, 2]))
    r = m.compute()
    assert torch.allclose(torch.stack([r["acc1"], r["acc2"], r["acc3"]]), torch.tensor([75.0, 50.0, 25.0]))
    assert "acc3_label" not in r and "mis" not in r


# ---- MIS ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["knn", "binned"])
def test_mis_high_for_class_specific_filters_low_for_noise(estimator):
    rng = np.random.default_rng(0)
    M = 600
    y = np.arange(M) % K
    noise = rng.normal(size=(M, 6))
    specific = np.stack([(y == (i % K)) * 3.0 for i in range(6)], 1) + 0.3 * noise
    hb = -(1 / K * math.log(1 / K) + (1 - 1 / K) * math.log(1 - 1 / K))  # H_b(1/K) bound
    mis, m = mutual_information_score(specific, y, K, estimator=estimator, return_matrix=True)
    assert m.shape == (K, 6)
    assert 0.8 * hb < mis <= hb * 1.1
    assert mutual_information_score(noise, y, K, estimator=estimator) < 0.1 * hb


# ---- variants and wiring -----------------------------------------------------------------------------
def test_vit_backbone_pathway_over_token_channels():
    xv = torch.rand(2, 3, 32, 32)
    for target_layer in ("new", "last"):
        m = tiny(backbone="deit_tiny_patch16_224", backbone_kwargs={"img_size": 32}, target_layer=target_layer)
        h = m.features(xv)
        assert h.shape[:2] == (2, m.num_filters) and h.dim() == 4
        if target_layer == "last":  # the pathway runs over the channels (embed dim) of the final tokens
            assert m.num_filters == m.backbone.channels[-1] == 192
        out = m.train().forward_train(xv)
        (out["logits"].sum() + out["logits_int"].sum()).backward()
        assert m.p_logits.grad.abs().sum() > 0
        assert m.eval().forward_explain(xv)[1].shape == (2, 32, 32)


def test_existing_layer_by_name_and_baseline_checkpoint(tmp_path):
    m = tiny(target_layer="layer3")
    assert m.num_filters == 256 and m.backbone.stage_names[-1] == "layer3"
    with pytest.raises(ValueError, match="not a stage"):
        tiny(target_layer="layer9")
    with pytest.raises(ValueError, match="p_param"):
        tiny(p_param="tanh")
    from models.weights import load_weights, save_weights

    base = create_model("baseline", num_classes=K)
    save_weights(base, tmp_path / "b.safetensors")
    m = tiny(target_layer="last")
    rep = load_weights(m, str(tmp_path / "b.safetensors"))
    assert rep.new_mechanism_keys == ["p_logits"]


def test_gumbel_sampler_model_and_module_step(x):
    from trainers.picnn import PICNNModule

    m = tiny(sampler="gumbel").train()
    out = m.forward_train(x)
    assert set(torch.unique(out["z"].detach()).tolist()) <= {0.0, 1.0}
    mod = PICNNModule(model_kwargs=dict(backbone="resnet18"), num_classes=K)
    y = torch.tensor([0, 1, 2, 0])
    r = mod.compute_loss({"image": x, "label": y}, "train")
    assert {"loss", "logits", "l_dis", "l_int", "matched"} <= set(r)
    mod.eval()
    with torch.no_grad():
        v1 = mod.compute_loss({"image": x, "label": y}, "val")
        v2 = mod.compute_loss({"image": x, "label": y}, "val")
    assert v1["acc2"] == v2["acc2"] and v1["acc3"] == v2["acc3"]
