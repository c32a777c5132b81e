"""MAXNet (seed 000 ch. 3): equations, batch independence, numerical safety, HAM, PCR, the MNI benchmark."""
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from models import create_model
from models.explainers import create_explainer
from models.maxnet import (DualAttention, MAXNet, ReferenceSet, build_reference_set, cluster_contrastive_losses,
                           min_shift_normalize, neg_log_distance, prototype_distances, reference_path_for,
                           swap_confidences, top_fraction_mask)

TINY = dict(stream_widths=(4, 5, 6, 6, 6), embed_dim=4, latent_dim=8, prototypes_per_class=2)


def tiny(**kw):
    torch.manual_seed(0)
    return create_model("maxnet", num_classes=2, **{**TINY, **kw})


@pytest.fixture(scope="module")
def model():
    m = tiny().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm3d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def x():
    return torch.rand(3, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ network
def test_shapes_through_every_stage(model, x):
    with torch.no_grad():
        out = model.run(x)
    grids = [32, 16, 8, 4, 2]  # padding 1, pools after stages 1-4 (spec §2 table)
    for f, c, g in zip(out["F"], TINY["stream_widths"], grids):
        assert f.shape == (3, c, g, g, g)
    assert out["Ft3"].shape == (3, 4, 8, 8, 8) and out["Ft4"].shape == (3, 4, 4, 4, 4)
    assert out["Gk3"].shape == (3, 4, 8, 8, 8)
    assert out["R3"].shape == (3, 4, 512) and out["RD4"].shape == (3, 4, 4)
    assert out["Z"].shape == (3, 8, 8, 8, 8) and out["dist"].shape == (3, 4) and out["logits"].shape == (3, 2)
    assert model.latent_map(x).shape == (3, 1, 8, 8, 8)
    # official "valid" convolutions shrink the grids
    m0 = tiny(conv_padding=0).eval()
    with torch.no_grad():  # 40 -conv-> 38 -pool-> 19 -conv-> 17 -pool-> 9 -conv-> 7
        assert m0.run(torch.rand(1, 1, 40, 40, 40))["F"][2].shape[2:] == (7, 7, 7)


def test_dam_weights_are_distributions_and_formulas(model, x):
    with torch.no_grad():
        out = model.run(x)
        f3, g5 = out["F"][2], out["F"][4]
        dam = model.dam[0]
        q, gk = dam.embed(f3, g5)
    for r, dims in ((out["R3"], (2,)), (out["R4"], (2,)), (out["RD3"], (1, 2)), (out["RD4"], (1, 2))):
        assert (r >= 0).all()
        assert torch.allclose(r.sum(dims), torch.ones(()), atol=1e-5)
    # naive eq 3.3-3.8 for sample 1
    b = 1
    qf, gf = q[b].flatten(1), gk[b].flatten(1)
    c = qf * gf
    r = (c - c.min(1, keepdim=True).values) / (c - c.min(1, keepdim=True).values).sum(1, keepdim=True)
    S, K = qf.shape[1], qf.shape[0]
    a = torch.zeros(K, K)
    for i in range(K):
        for j in range(K):
            a[i, j] = (qf[i] * gf[j]).sum()
    rd = (a - a.min()) / (a - a.min()).sum()
    d = torch.zeros_like(qf)
    for j in range(K):
        for i in range(K):
            d[j] += rd[i, j] * qf[i]
    beta = model.beta.detach()
    ft = beta[0, 0] * S * r * qf + beta[0, 1] * K * d
    assert torch.allclose(out["Ft3"][b].flatten(1), ft, atol=1e-4, rtol=1e-4)


def test_batch_equals_one_at_a_time(model, x):
    """Per-sample normalisation: a volume's outputs never depend on its batch mates (official code fails)."""
    with torch.no_grad():
        full = model.run(x)
        for i in range(x.shape[0]):
            one = model.run(x[i:i + 1])
            for k in ("logits", "dist", "Ft3", "Ft4", "R3", "RD3", "R4", "RD4"):
                assert torch.allclose(full[k][i:i + 1], one[k], atol=1e-5, rtol=1e-4), k
    # the DAM alone, in train mode, with very different batch mates
    dam = DualAttention(6, 6, 4).train()
    f, g = torch.rand(2, 6, 8, 8, 8), torch.rand(2, 6, 2, 2, 2)
    f[1] *= 1000
    q, gk = dam.embed(f, g)
    both = dam(f, q, gk)
    q0, gk0 = dam.embed(f[:1], g[:1])
    alone = dam(f[:1], q0, gk0)
    for k in ("P", "D", "R", "RD"):
        assert torch.allclose(both[k][:1], alone[k], atol=1e-5, rtol=1e-5)


def test_mfm_betas_and_latent_projection_get_gradients(x):
    m = tiny().train()
    out = m.run(x)
    loss = F.cross_entropy(out["logits"], torch.tensor([0, 1, 0]))
    cls, ctr = cluster_contrastive_losses(out["dist"], torch.tensor([0, 1, 0]), m.proto_class)
    (loss + 0.6 * cls + 0.06 * ctr).backward()
    for p in (m.beta, m.latent.weight, m.prototypes, m.dam[0].w_f.weight, m.dam[1].w_a.weight, m.fc.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert m.beta.shape == (2, 2) and torch.equal(m.beta.detach(), torch.full((2, 2), 0.5))
    # last layer init: 1 to own class, -0.5 to the other
    assert torch.equal(m.fc.weight[0], torch.tensor([1.0, 1.0, -0.5, -0.5]))


def test_head_distances_and_similarity_formula():
    z = torch.rand(2, 5, 7)
    protos = torch.rand(3, 5)
    d = prototype_distances(z, protos)
    ref = torch.stack([torch.stack([((z[b, :, v] - protos[j]) ** 2).sum() for v in range(7)]).min()
                       for b in range(2) for j in range(3)]).view(2, 3)
    assert torch.allclose(d, ref, atol=1e-5)
    m = tiny().eval()
    with torch.no_grad():
        out = m.run(torch.rand(1, 1, 16, 16, 16))
    assert torch.allclose(out["sim"], -torch.log(out["dist"] + 1e-4))
    assert torch.allclose(out["logits"], out["sim"] @ m.fc.weight.t())


def test_soft_min_over_voxels_matches_loop_and_limits():
    """voxel_min_tau (option, docs/maxnet.md): d_j = -tau log(mean_v exp(-D_v / tau)). Naive float64 loop;
    tau = 0 is the hard min of eq 3.11; min <= soft <= mean, soft - min <= tau log S; tau -> 0: hard min;
    tau -> inf: voxel mean; gradient reaches one voxel (hard) vs every voxel (soft)."""
    g = torch.Generator().manual_seed(3)
    z, protos = torch.rand(2, 5, 7, generator=g), torch.rand(3, 5, generator=g)
    D = torch.stack([torch.stack([torch.stack([((z[b, :, v] - protos[j]) ** 2).sum() for v in range(7)])
                                  for j in range(3)]) for b in range(2)]).double()  # (B, M, S)
    hard, mean = D.amin(2), D.mean(2)
    assert torch.allclose(prototype_distances(z, protos, 0.0).double(), hard, atol=1e-5)
    for tau in (1e-3, 0.05, 0.3, 2.0):
        soft = prototype_distances(z, protos, tau).double()
        ref = torch.tensor([[hard[b, j].item() - tau * np.log(np.mean([np.exp(-(D[b, j, v] - hard[b, j]).item() / tau)
                                                                      for v in range(7)]))  # shifted: no underflow
                             for j in range(3)] for b in range(2)], dtype=torch.float64)
        assert torch.allclose(soft, ref, atol=1e-5), tau
        assert (soft >= hard - 1e-5).all() and (soft <= mean + 1e-5).all()
        assert (soft - hard <= tau * np.log(7) + 1e-5).all()
    assert torch.allclose(prototype_distances(z, protos, 1e-4).double(), hard, atol=1e-3)
    assert torch.allclose(prototype_distances(z, protos, 100.0).double(), mean, atol=2e-3)  # gap ~ var / (2 tau)
    for tau, n_expected in ((0.0, 1), (0.3, 7)):
        zz = z.clone().requires_grad_(True)
        prototype_distances(zz, protos, tau)[0, 0].backward()
        assert int((zz.grad[0].abs().sum(0) > 0).sum()) == n_expected
    with pytest.raises(ValueError, match="voxel_min_tau"):
        tiny(voxel_min_tau=-1.0)
    m = tiny(voxel_min_tau=0.2).eval()
    with torch.no_grad():
        out = m.run(torch.rand(2, 1, 16, 16, 16))
    assert torch.allclose(out["dist"], prototype_distances(out["Z"].flatten(2), m.prototypes, 0.2))
    assert torch.allclose(out["logits"], -torch.log(out["dist"] + 1e-4) @ m.fc.weight.t())
    assert torch.isfinite(out["logits"]).all()


def test_experiment_cache_key_unchanged_at_defaults():
    """New experiment flags enter the run cache key only when non-default (cached runs stay valid)."""
    from experiments import maxnet as XM

    base = {"exp", "arm", "seed", "v", "ce_only_epochs", "resolution", "train_size", "val_size", "test_size",
            "data_seed", "severity", "epochs", "batch_size", "lr", "weight_decay", "xai_volumes", "curve_steps",
            "pcr_queries"}
    for arm in XM.ARMS:
        assert set(XM.run_config(XM.parse([]), arm, 0)) == base
    a = XM.parse(["--voxel-tau", "0.1", "--select"])
    assert XM.run_config(a, "maxnet", 0)["voxel_tau"] == 0.1 and XM.run_config(a, "maxnet", 0)["select"] == 1
    assert "voxel_tau" not in XM.run_config(a, "cnn", 0)
    assert XM.make_module("maxnet", a, 1).model.voxel_min_tau == 0.1


def test_heatmap_figure_comes_from_best_validation_seed(tmp_path):
    """maxnet_heatmaps.png is the figure of the reported seed with the best validation accuracy (first on ties),
    not simply the first seed (which may be at chance)."""
    from experiments import maxnet as XM

    args = XM.parse(["--out", str(tmp_path / "res" / "maxnet"), "--cache-dir", str(tmp_path / "cache"),
                     "--seeds", "0,1,2"])
    (tmp_path / "cache").mkdir()
    (tmp_path / "res").mkdir()
    for s in (0, 1, 2):
        open(XM.heatmap_path(args, XM.run_config(args, "maxnet", s)), "w").write(f"seed{s}")
    per = {0: dict(best_val_acc=0.5), 1: dict(best_val_acc=0.95), 2: dict(best_val_acc=0.95)}
    assert XM.publish_heatmaps(args, per) == 1
    assert open(tmp_path / "res" / "maxnet_heatmaps.png").read() == "seed1"


def test_cluster_loss_falls_toward_prototype_and_contrastive_matches_loop():
    protos = torch.rand(4, 6)
    pc = torch.tensor([0, 0, 1, 1])
    labels = torch.tensor([0, 1, 1])
    z = torch.rand(3, 6, 10)
    target = protos[[0, 2, 3]]
    prev = None
    for t in (0.0, 0.3, 0.6, 0.9):
        zt = z.clone()
        zt[:, :, 4] = (1 - t) * z[:, :, 4] + t * target  # one voxel moves toward a true-class prototype
        cls, _ = cluster_contrastive_losses(prototype_distances(zt, protos), labels, pc)
        if prev is not None:
            assert cls < prev
        prev = cls
    d = torch.rand(5, 4) * 3
    y = torch.tensor([0, 1, 1, 0, 1])
    cls, ctr = cluster_contrastive_losses(d, y, pc)
    naive_cls = sum(min(d[b, j] for j in range(4) if pc[j] == y[b]) for b in range(5)) / 5
    naive_ctr = -sum(min(d[b, j] for j in range(4) if pc[j] != y[b]) for b in range(5)) / 5
    assert torch.allclose(cls, naive_cls) and torch.allclose(ctr, naive_ctr)
    _, ctr_c = cluster_contrastive_losses(d, y, pc, clamp=0.5)
    assert ctr_c >= -0.5


def test_numerical_safety():
    for c in (torch.zeros(2, 3, 10), torch.full((2, 3, 10), 7.0), torch.rand(2, 3, 10) * 1e30,
              torch.tensor([[[3e38, -3e38, 0.0, float("inf"), float("nan")]]]), torch.rand(2, 3, 10) * 1e-30):
        r = min_shift_normalize(c, dims=(2,))
        assert torch.isfinite(r).all() and (r >= 0).all()
        assert torch.allclose(r.sum(2), torch.ones(()), atol=1e-5)
    assert torch.allclose(min_shift_normalize(torch.full((1, 4), 2.0), (1,)), torch.full((1, 4), 0.25))
    s = neg_log_distance(torch.tensor([0.0, 1e-30, 1.0, 1e30, 3e38, float("inf"), -1e-7]))
    assert torch.isfinite(s).all() and s.max() <= -np.log(1e-4) + 1e-4
    m = tiny().eval()
    with torch.no_grad():
        for xx in (torch.zeros(2, 1, 16, 16, 16), torch.ones(2, 1, 16, 16, 16)):
            assert torch.isfinite(m(xx)).all()
        feats = m.backbone(torch.rand(2, 1, 16, 16, 16))  # inputs are refused outside [0, 1]: scale the features
        for scale in (0.0, 1e6, 1e15):
            out = m.run(None, feats=[f * scale for f in feats])
            assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["R3"]).all()
    _, sal = m.forward_explain(torch.zeros(1, 1, 16, 16, 16))
    assert torch.isfinite(sal).all()


# ------------------------------------------------------------------------------------------------ HAM
def test_ham_equals_explainer_and_has_input_resolution(model, x):
    logits, sal = model.forward_explain(x)
    assert sal.shape == (3, 32, 32, 32) and sal.min() >= 0 and sal.max() <= 1
    assert torch.allclose(logits, model(x).detach(), atol=1e-5)
    ref = create_explainer("ham", model)(x)
    assert torch.allclose(sal, ref, atol=1e-6)
    t = torch.tensor([1, 0, 1])
    assert torch.allclose(model.explain(x, t), create_explainer("ham", model)(x, t), atol=1e-6)
    with torch.inference_mode():  # Lightning validation
        assert torch.allclose(model.explain(x), sal, atol=1e-6)


def test_ham_native_resolution_is_the_stage3_grid(model, x):
    """The coarse-map guard reads HAM at the stage-3 grid it is fused on, not at stage 5 (Grad-CAM's layer): on the
    4 mm MNI volume stage 5 is 3x3x3 (localisation refused) but HAM is 10x12x10."""
    from models.metrics.degenerate import is_coarse, native_resolution

    grid3 = tuple(model.run(x[:1])["F"][-3].shape[2:])
    assert native_resolution(create_explainer("intrinsic", model), model, x) == grid3 == (8, 8, 8)
    assert native_resolution(create_explainer("ham", model), model, x) == grid3
    assert native_resolution(create_explainer("gradcam", model), model, x) == (2, 2, 2)
    mni = tiny().eval()
    v = torch.rand(1, 1, 38, 47, 40)
    assert native_resolution(create_explainer("intrinsic", mni), mni, v) == (10, 12, 10)
    assert not is_coarse((10, 12, 10)) and is_coarse(native_resolution(create_explainer("gradcam", mni), mni, v))


def test_ham_is_zero_where_all_activations_are_zero(model, x):
    def zero_front(mod, inp, out):
        out = out.clone()
        out[:, :, : out.shape[2] // 2] = 0  # first half along depth, at every stage
        return out

    hs = [t.register_forward_hook(zero_front) for t in model.backbone.taps[2:]]
    try:
        _, sal = model.forward_explain(x)
    finally:
        for h in hs:
            h.remove()
    # stage 5 (2 slices) -> 8 -> 32 trilinear: input slices 0..5 only see zero stage slices
    assert sal[:, :6].abs().max() == 0 and sal[:, 16:].max() > 0


# ------------------------------------------------------------------------------------------------ PCR
def test_pcr_equals_brute_force_and_roundtrips(tmp_path, model, x):
    g = torch.Generator().manual_seed(3)
    refs = torch.rand(20, 512, generator=g)
    ref = ReferenceSet(refs, torch.randint(0, 2, (20,), generator=g), torch.randint(0, 2, (20,), generator=g),
                       torch.arange(20), (8, 8, 8))
    path = ref.save(reference_path_for(str(tmp_path / "best.ckpt")))
    assert path.endswith("best.pcr.safetensors") and not list(tmp_path.glob("*.tmp"))
    loaded = ReferenceSet.load(path)
    qm = torch.rand(4, 512, generator=g)
    qp = torch.tensor([0, 1, 1, 0])
    idx, dist = loaded.retrieve(qm, qp, k=3, chunk=7)
    for b in range(4):
        cands = [(((refs[j] - qm[b]) ** 2).mean().item(), j) for j in range(20) if ref.preds[j] == qp[b]]
        best = sorted(cands)[:3]
        assert idx[b].tolist() == [j for _, j in best]
        assert np.allclose(dist[b].numpy(), [d for d, _ in best], atol=1e-6)
    with pytest.raises(ValueError, match="voxels"):
        loaded.retrieve(torch.rand(1, 10), torch.tensor([0]))
    # built from a model: maps are eq 3.16 class latent maps in [0, 1] on the stage-3 grid
    loader = [{"image": x, "label": model(x).argmax(1)}]
    rs = build_reference_set(model, loader)
    assert len(rs) == 3 and rs.grid == (8, 8, 8) and rs.maps.min() >= 0 and rs.maps.max() <= 1
    rho_d, rho_i = swap_confidences(model, x, rs.maps, rs.maps, rs.grid)
    assert (rho_d.abs() <= 1 + 1e-6).all()
    assert (rho_i.abs() <= 1 + 1e-6).all()
    m = top_fraction_mask(rs.maps.view(3, 8, 8, 8), (32, 32, 32), 0.1)
    assert m.shape == (3, 32, 32, 32) and (m.flatten(1).sum(1) == round(0.1 * 32 ** 3)).all()


def test_swap_confidence_is_cosine_of_logit_changes(model, x):
    g = torch.Generator().manual_seed(5)
    pk, pc = torch.rand(3, 512, generator=g), torch.rand(3, 512, generator=g)
    rho_d, rho_i = swap_confidences(model, x, pk, pc, (8, 8, 8), q=0.2)
    mk = top_fraction_mask(pk.view(3, 8, 8, 8), (32,) * 3, 0.2).unsqueeze(1).float()
    mc = top_fraction_mask(pc.view(3, 8, 8, 8), (32,) * 3, 0.2).unsqueeze(1).float()
    with torch.no_grad():
        s, sk, sc, sk2, sc2 = (model(v) for v in (x, x * (1 - mk), x * (1 - mc), x * mk, x * mc))
    assert torch.allclose(rho_d, F.cosine_similarity(s - sk, s - sc, dim=1, eps=1e-12), atol=1e-4)
    assert torch.allclose(rho_i, F.cosine_similarity(sk2, sc2, dim=1, eps=1e-12), atol=1e-4)
    # identical masks -> cosine 1
    rd, ri = swap_confidences(model, x, pk, pk, (8, 8, 8))
    assert torch.allclose(ri, torch.ones(3), atol=1e-5)


# ------------------------------------------------------------------------------------------------ MNI data
mni = pytest.importorskip("trainers.data.mni")


@pytest.fixture(scope="module")
def mni_set():
    pytest.importorskip("nilearn")
    pytest.importorskip("torchio")
    return mni.MNIAtrophy("train", 48, seed=0, resolution=4)


def test_mni_deterministic_and_mask_is_exactly_the_change(mni_set):
    a = mni_set.render(5, twin=True)
    b = mni.MNIAtrophy("train", 48, seed=0, resolution=4, cache=False).render(5)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    c = mni.MNIAtrophy("val", 48, seed=0, resolution=4, cache=False).render(5)
    assert not torch.equal(a["image"], c["image"])
    assert a["label"] == 1 and a["image"].shape == (1, 38, 47, 40) and 0 <= a["image"].min() and a["image"].max() <= 1
    changed = (a["image"] != a["image_healthy"])[0]
    gt = a["mask"] > 0
    assert gt.sum() > 100 and set(a["mask"].unique().tolist()) == {0, 2}
    assert not (changed & ~gt).any(), "a voxel outside the mask changed"
    assert not (gt & a["unclipped"] & ~changed).any(), "a mask voxel did not change"
    h = mni_set.render(4, twin=True)
    assert h["label"] == 0 and h["mask"].sum() == 0 and torch.equal(h["image"], h["image_healthy"])


def test_mni_other_resolution_deterministic_and_mask_covers_change():
    """The benchmark at 3 mm (not only the 4 mm default): deterministic per (seed, split, index), and the mask
    is exactly the changed voxels."""
    pytest.importorskip("nilearn")
    pytest.importorskip("torchio")
    a = mni.MNIAtrophy("train", 8, seed=1, resolution=3, cache=False).render(3, twin=True)
    b = mni.MNIAtrophy("train", 8, seed=1, resolution=3, cache=False).render(3)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    four = mni.load_mni_template(4)["t1"].shape
    assert a["label"] == 1 and all(s3 > s4 for s3, s4 in zip(a["image"].shape[1:], four))
    changed = (a["image"] != a["image_healthy"])[0]
    gt = a["mask"] > 0
    assert gt.sum() > 100 and set(a["mask"].unique().tolist()) == {0, 2}
    assert not (changed & ~gt).any(), "a voxel outside the mask changed"
    assert not (gt & a["unclipped"] & ~changed).any(), "a mask voxel did not change"


def test_mni_class_not_readable_from_mean_intensity(mni_set):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    feats = np.array([[mni_set[i]["image"].mean().item()] for i in range(len(mni_set))])
    labels = np.array([mni_set.label_of(i) for i in range(len(mni_set))])
    acc = cross_val_score(LogisticRegression(), (feats - feats.mean()) / feats.std(), labels, cv=4).mean()
    assert acc < 0.7, f"mean intensity predicts the class ({acc:.2f})"


# ------------------------------------------------------------------------------------------------ trainer
def test_two_phase_training_and_pcr_file(tmp_path):
    pytest.importorskip("torchio")
    from trainers.maxnet import MAXNetModule, PCRReferenceCallback

    class Record(pl.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            with torch.no_grad():
                out = module.model.run(batch["image"])
            self.rows.append((module.phase(), float(outputs["loss"]),
                              float(F.cross_entropy(out["logits"], batch["label"]))))

    pl.seed_everything(0)
    dm = mni.MNIAtrophyDataModule(train_size=8, val_size=4, test_size=4, batch_size=4)
    module = MAXNetModule(model_kwargs=TINY, num_classes=2, ce_only_epochs=1,
                          optimizer={"name": "adam", "lr": 0.0, "weight_decay": 5e-4})
    assert [g.get("weight_decay") for g in module.configure_optimizers().param_groups] == [0.0, 5e-4]
    rec, pcr = Record(), PCRReferenceCallback()
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc", mode="max")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[rec, pcr, ck])
    trainer.fit(module, dm)
    phases = [r[0] for r in rec.rows]
    assert phases == [1, 1, 2, 2]
    for ph, loss, ce in rec.rows:  # lr 0: the model does not move, BN in train mode both times
        assert (abs(loss - ce) < 1e-4) == (ph == 1)
    assert pcr.saved_path == str(tmp_path / "best.pcr.safetensors")
    rs = ReferenceSet.load(pcr.saved_path)
    assert rs.maps.shape[1] == int(np.prod(rs.grid)) and len(rs) <= 8


# ------------------------------------------------------------------------------------------------ real MRI folders
def test_volume_folder_nifti_csv_crop_and_spacing(tmp_path):
    nib = pytest.importorskip("nibabel")
    from trainers.data import VolumeFolderDataModule

    rng = np.random.default_rng(0)
    rows = {"train": [], "val": []}
    for split in rows:
        for i in range(4):
            vol = np.zeros((20, 24, 16), np.float32)
            vol[5:15, 6:18, 4:12] = rng.uniform(0.5, 1.0, (10, 12, 8))  # "brain" in a zero background
            name = f"{split}_{i}.nii.gz"
            nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / name))
            rows[split].append(f"{name},{'AD' if i % 2 else 'CN'}")
        (tmp_path / f"{split}.csv").write_text("path,label\n" + "\n".join(rows[split]) + "\n")
    dm = VolumeFolderDataModule(root=str(tmp_path), image_size=(8, 8, 8), num_workers=0, brain_crop=True)
    assert dm.use_csv and dm.class_names == ["AD", "CN"] and dm.num_classes == 2
    dm.setup("fit")
    item = dm.train_set[1]
    assert item["image"].shape == (1, 8, 8, 8) and int(item["label"]) == 0
    assert (item["image"] > 0.1).float().mean() > 0.25  # brain share after the crop (10x12x8 in 14x16x12: 36 %)
    dm0 = VolumeFolderDataModule(root=str(tmp_path), image_size=(8, 8, 8), num_workers=0)
    dm0.setup("fit")
    assert (dm0.train_set[1]["image"] > 0.1).float().mean() < 0.2  # without the crop: 12.5 %
    dm2 = VolumeFolderDataModule(root=str(tmp_path), image_size=8, num_workers=0, spacing=4.0)
    dm2.setup("fit")
    assert dm2.train_set[0]["image"].shape == (1, 8, 8, 8)
    from trainers.data.datamodules import _read_nifti
    assert _read_nifti(str(tmp_path / "train_0.nii.gz"), 4.0).shape[1:] == (10, 12, 8)  # 2 mm -> 4 mm
    (tmp_path / "val.csv").write_text("path,label\ntrain_0.nii.gz,MCI\n")
    with pytest.raises(ValueError, match="do not occur in train.csv"):
        VolumeFolderDataModule(root=str(tmp_path), num_workers=0).setup("fit")
    (tmp_path / "val.csv").write_text("file,label\nx,CN\n")
    with pytest.raises(ValueError, match="path,label"):
        VolumeFolderDataModule(root=str(tmp_path), num_workers=0).setup("fit")


def test_reset_classifier_rebuilds_class_prototypes():
    """A new class count rebuilds the per-class prototypes and the 1 / -0.5 FC head; the rest keeps its weights."""
    import models
    from models.registry import test_kwargs

    kw = test_kwargs("maxnet")
    size = kw.pop("input_size")
    m = models.create_model("maxnet", num_classes=3, **kw)
    latent = m.latent.weight.detach().clone()
    per = m.prototypes_per_class
    m.reset_classifier(5)
    assert m.prototypes.shape[0] == 5 * per and m.fc.weight.shape == (5, 5 * per)
    assert m.proto_class.tolist() == [c for c in range(5) for _ in range(per)]
    own = m.proto_class[None, :] == torch.arange(5)[:, None]
    assert torch.all(m.fc.weight[own] == 1) and torch.all(m.fc.weight[~own] == -0.5)
    assert torch.equal(m.latent.weight, latent)
    assert m(torch.rand(2, *size)).shape == (2, 5)


def test_prototype_init_starts_near_the_latents():
    """Default prototypes are N(0.5, 0.1) (official code), near the sigmoid latents (~0.5): the mean squared distance
    is ~0.01 D_p. U(0, 1) (``prototype_init="uniform"``) starts ~D_p / 12 away. There ``-log(d + eta)`` hardly
    differs between volumes, and 2 of 3 MNI runs stayed at chance (docs/maxnet.md)."""
    x = torch.rand(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    rel = {}
    for init in ("normal", "uniform"):
        m = tiny(latent_dim=256, prototypes_per_class=10, prototype_init=init).train()
        with torch.no_grad():
            rel[init] = float(m.run(x)["dist"].mean()) / 256
        if init == "normal":
            p = m.prototypes.detach()
            assert abs(float(p.mean()) - 0.5) < 0.01 and abs(float(p.std()) - 0.1) < 0.01
            m.reset_classifier(3)  # the rebuilt head keeps the init
            assert abs(float(m.prototypes.detach().std()) - 0.1) < 0.01
    assert rel["normal"] < 0.03 and rel["uniform"] > 0.07, rel
    with pytest.raises(ValueError, match="prototype_init"):
        tiny(prototype_init="zeros")


# ------------------------------------------------------------------------------------------------ experiment guards
def test_two_class_insertion_cosine_is_degenerate():
    """Eq 3.30 read as a cosine of raw 2-d logits is dominated by their common (softmax-invariant) offset: ~1 for any
    two margins. Centred, a 2-d logit vector is (m/2, -m/2) and the cosine is sign(m1 m2) = 2 * agreement - 1.
    (Why experiments/maxnet.py reports rho_I as degenerate and adds insertion_agreement.)"""
    from models.maxnet import insertion_agreement, swap_cosines

    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(64, generator=g), torch.randn(64, generator=g)  # half margins of mK', mC'
    off = 10.0  # this head: every logit is a sum of -log distances (offset ~6-7 measured, margins ~0.2)
    sk2, sc2 = torch.stack([off - m1, off + m1], 1), torch.stack([off - m2, off + m2], 1)
    s0 = torch.randn(64, 2, generator=g)
    _, rho_i = swap_cosines(s0, s0 + 1, s0 - 1, sk2, sc2)
    assert rho_i.min() > 0.9 and rho_i.max() <= 1 + 1e-6  # any pair of margins: saturated
    _, rho_c = swap_cosines(s0, s0 + 1, s0 - 1, sk2 - off, sc2 - off)
    agree = insertion_agreement(sk2, sc2)
    assert torch.allclose(rho_c, 2 * agree - 1, atol=1e-5)
    assert torch.equal(agree, ((m1 > 0) == (m2 > 0)).float())


def _fake_results(rho_i_spread):
    """Cached-result dicts of experiments/maxnet.py for 3 seeds (no training): PCR insertion cosines in
    [1 - spread, 1], PCR slightly higher than random (as measured), deletion cosines spread out."""
    rng = np.random.default_rng(0)
    res = {"maxnet": {}, "cnn": {}}
    for s in range(3):
        n = 10
        xai = {e: dict(insertion=rng.uniform(0.4, 0.6, n).tolist(), deletion=rng.uniform(0.4, 0.6, n).tolist(),
                       pointing=[0.0] * n, iou=rng.uniform(0, 0.1, n).tolist(), seconds=0.01)
               for e in ("ham", "gradcam", "gradcampp", "scorecam")}
        pcr = {k: [] for k in ("pcr_D", "rand_D", "pcr_I", "rand_I", "pcr_agree", "rand_agree", "insertion_offset",
                               "insertion_margin")}
        for _ in range(3):
            pcr["pcr_D"].append(rng.uniform(0.5, 1, n).tolist())
            pcr["rand_D"].append(rng.uniform(-0.5, 0.6, n).tolist())
            pcr["pcr_I"].append((1 - rho_i_spread * rng.uniform(0, 0.3, n)).tolist())
            pcr["rand_I"].append((1 - rho_i_spread * rng.uniform(0.3, 1, n)).tolist())
            pcr["pcr_agree"].append([1.0] * n)
            pcr["rand_agree"].append([1.0] * (n - 1) + [0.0])
            pcr["insertion_offset"].append([6.5] * n)
            pcr["insertion_margin"].append([0.2] * n)
        pcr["rand_I"][1][0] = min(pcr["rand_I"][1][0], 0.985)  # one outlier (measured: r2 random down to ~0.97)
        pcr.update(ref_label_agrees=[1.0, 1.0, 1.0], reference_size=150)
        res["maxnet"][s] = dict(acc=0.9 + 0.01 * s, auc=0.95, train_seconds=50, best_epoch=7, xai=xai, pcr=pcr)
        res["cnn"][s] = dict(acc=0.98, auc=0.99, train_seconds=50, best_epoch=7)
    return res


def test_experiment_marks_constant_metrics_degenerate(tmp_path):
    """A saturated metric (the 2-class insertion cosine stuck at ~1.000, PCR higher in the 4th decimal) must not
    decide a claim: if the pooled values of both arms have sd < 0.01 (one outlier allowed) the claim is 'degenerate
    (constant metric)' with no interval
    (and verdicts.py recomputes 'inconclusive' from it, never 'supported'). Fails if the guard is removed."""
    import json

    from experiments import maxnet as XM
    from experiments.harness import claim_verdict

    args = XM.parse(["--out", str(tmp_path / "mx"), "--arms", "maxnet,cnn"])
    assert args.ce_only_epochs == 0  # short-run default: full loss from epoch 1 (docs/maxnet.md)
    md = XM.report(args, _fake_results(1e-3), [0, 1, 2])
    claims = {c["claim"]: c for c in json.load(open(tmp_path / "mx.json"))["claims"]}
    for r in (1, 2, 3):
        ins = claims[f"PCR r{r} > random same-label: swap insertion"]
        assert ins["verdict"] == "degenerate (constant metric)" and ins["ci95_low"] is None and ins["degenerate"]
        assert claim_verdict(float("nan"), float("nan"), +1, 3) == "inconclusive"
        dele = claims[f"PCR r{r} > random same-label: swap deletion"]
        assert dele["verdict"] in ("supported", "contradicted", "inconclusive") and dele["ci95_low"] is not None
        assert claims[f"PCR r{r} > random same-label: insertion agreement"]["verdict"] != "degenerate (constant metric)"
    assert claims["HAM vs gradcam: pointing"]["verdict"] == "degenerate (constant metric)"  # all zeros
    assert "swap_insertion (degenerate: constant)" in md and "median |common offset| 6.50" in md
    # the same claim on a spread-out metric gets a real verdict (the guard is not a blanket)
    XM.report(args, _fake_results(0.5), [0, 1, 2])
    claims = {c["claim"]: c for c in json.load(open(tmp_path / "mx.json"))["claims"]}
    assert claims["PCR r1 > random same-label: swap insertion"]["verdict"] == "supported"


def test_experiment_flags_localisation_of_coarse_cams(tmp_path):
    """Issue 14 guard in the MAXNet report: pointing / IoU claims against a CAM whose native grid is coarser than
    4x4 (stage 5: 3x3x3 at 4 mm) are flagged in the claim; insertion / deletion and the stage-3 Grad-CAM (HAM's own
    grid) are not. Fails if the flag is dropped or applied to every claim."""
    import json

    from experiments import maxnet as XM

    res = _fake_results(0.5)
    native = dict(ham=[10, 12, 10], gradcam=[3, 3, 3], gradcampp=[3, 3, 3], scorecam=[3, 3, 3],
                  gradcam_s3=[10, 12, 10])
    for s in res["maxnet"]:
        xai = res["maxnet"][s]["xai"]
        xai["gradcam_s3"] = dict(xai["gradcam"])
        for e, n in native.items():
            xai[e]["native"] = n
    args = XM.parse(["--out", str(tmp_path / "mx"), "--arms", "maxnet,cnn"])
    md = XM.report(args, res, [0, 1, 2])
    names = [c["claim"] for c in json.load(open(tmp_path / "mx.json"))["claims"]]
    flag = " [gradcam native 3x3x3 < 4x4: localisation flagged]"
    assert f"HAM vs gradcam: pointing{flag}" in names and f"HAM vs gradcam: iou{flag}" in names
    assert "HAM vs gradcam: insertion" in names and "HAM vs gradcam: deletion" in names
    assert {"HAM vs gradcam_s3: pointing", "HAM vs gradcam_s3: iou"} <= set(names)
    assert sum("flagged" in n for n in names) == 6  # pointing + IoU of the three stage-5 CAMs
    assert "gradcam 3x3x3 (coarser than 4x4: pointing / IoU flagged)" in md and "gradcam_s3 10x12x10" in md


def test_short_run_schedule_defaults():
    """MNI config: full loss from epoch 1; paper config: the thesis' 20 CE-only epochs of 70."""
    import yaml

    root = __import__("os").path.dirname(__import__("os").path.dirname(__file__))
    cfg = {n: yaml.safe_load(open(f"{root}/configs/maxnet/{n}.yaml"))["model"]["init_args"] for n in ("mni", "paper")}
    assert cfg["mni"]["ce_only_epochs"] == 0
    assert cfg["paper"]["ce_only_epochs"] == 20 and cfg["paper"]["optimizer"]["lr"] == 1e-4
    # the experiment's default and the MNI config train the same 16 epochs (chosen on validation seeds 10-12,
    # docs/maxnet.md; 8 epochs were bimodal)
    from experiments.maxnet import parse

    assert parse([]).epochs == 16
    assert yaml.safe_load(open(f"{root}/configs/maxnet/mni.yaml"))["trainer"]["max_epochs"] == 16
