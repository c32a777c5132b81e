"""eX-ViT (seed 000 ch. 4): E-MHA (4.1-4.5), swap into timm ViTs (4.6), AttE (4.7-4.9), losses (4.12-4.14),
momentum branch (EMA), pseudo masks, trainer wiring."""
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from models import create_model
from models.exvit import (AttE, EMHAttention, ExViT, diversity_loss, discriminability_loss, ema_update_, factored_diversity,
                          factored_gem, gem,
                          global_loss, momentum_copy, normalized_mse, swap_attention)

TINY = dict(backbone="deit_tiny_patch16_224", backbone_kwargs=dict(img_size=32, depth=3, patch_size=8),
            attr_channels=16, num_attributes=4, attr_hidden=32, drop_path_rate=0.0)


def _emha(dim, heads, grid, bias="token", norm="matrix", npt=1):
    torch.manual_seed(0)
    m = EMHAttention(dim, heads, qkv_bias=True, num_tokens=npt + grid[0] * grid[1], grid_size=grid,
                     num_prefix_tokens=npt, norm=norm, bias=bias)
    if m.attn_bias is not None:
        torch.nn.init.normal_(m.attn_bias, std=0.5)
    return m.eval()


def _capture(m, x):
    """Run ``m`` and return Â (B,H,T,T), V (B,H,T,dh) and S (B,H,T,dh) (S = the module's pre-projection output)."""
    got = {}
    h = m.norm.register_forward_hook(lambda mod, inp, out: got.__setitem__("S", inp[0]))
    m.store_attention = True
    with torch.no_grad():
        y = m(x)
    h.remove()
    B, T, _ = x.shape
    v = m.qkv(x).reshape(B, T, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)[2]
    S = got["S"].reshape(B, T, m.num_heads, m.head_dim).transpose(1, 2)
    return m.last_attention, v, S, y


@pytest.mark.parametrize("B,dim,heads,grid", [(2, 32, 2, (2, 2)), (3, 48, 3, (4, 3)), (1, 64, 4, (7, 7))])
def test_emha_norm_and_bound(B, dim, heads, grid):
    """eq. 4.3: ||Â_h||_F = 1 (so <= 1) per sample and head; eq. 4.5: ||S_h||_F <= ||V_h||_F."""
    m = _emha(dim, heads, grid)
    T = 1 + grid[0] * grid[1]
    x = torch.randn(B, T, dim) * 3
    A, V, S, y = _capture(m, x)
    assert y.shape == x.shape and A.shape == (B, heads, T, T)
    fro = A.flatten(2).norm(dim=-1)
    assert torch.allclose(fro, torch.ones_like(fro), atol=1e-5)     # exactly unit (not softmax: rows sum != 1)
    assert (A < 0).any()                                              # signed, no softmax/exp
    sn, vn = S.flatten(2).norm(dim=-1), V.flatten(2).norm(dim=-1)
    assert (sn <= vn * (1 + 1e-5)).all()
    # and the bound is not vacuous: the spectral-norm version ||S|| <= ||Â||_2 ||V|| also holds
    spec = torch.linalg.matrix_norm(A, ord=2)
    assert (sn <= spec * vn * (1 + 1e-5)).all() and (spec < 1 + 1e-5).all()


def test_emha_row_norm_option():
    m = _emha(32, 2, (3, 3), norm="row")
    A, V, S, _ = _capture(m, torch.randn(2, 10, 32))
    rows = A.norm(dim=-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    assert (S.norm(dim=-1) <= V.flatten(2).norm(dim=-1)[..., None] * (1 + 1e-5)).all()


def test_emha_matches_naive_loop():
    """eqs. 4.1-4.4 written out per sample and head, then concat + W^O."""
    dim, H, grid = 12, 3, (2, 2)
    m = _emha(dim, H, grid)
    T, dh = 1 + 4, dim // H
    x = torch.randn(2, T, dim)
    with torch.no_grad():
        y = m(x)
        Wqkv, bqkv = m.qkv.weight, m.qkv.bias
        ref = torch.zeros(2, T, dim)
        for b in range(2):
            heads = []
            for h in range(H):
                sl = lambda i: slice(i * dim + h * dh, i * dim + (h + 1) * dh)  # noqa: E731
                Q = x[b] @ Wqkv[sl(0)].T + bqkv[sl(0)]                        # (4.1)
                K = x[b] @ Wqkv[sl(1)].T + bqkv[sl(1)]
                V = x[b] @ Wqkv[sl(2)].T + bqkv[sl(2)]
                W = Q @ K.T / math.sqrt(dh)                                   # (4.2)
                Y = W + m.attn_bias[h]
                A = (Y / torch.sqrt((Y ** 2).sum())).T                        # (4.3) A = f(W + b)^T
                heads.append(A.T @ V)                                         # (4.4) S = A^T V
            ref[b] = torch.cat(heads, dim=1) @ m.proj.weight.T + m.proj.bias
    assert torch.allclose(y, ref, atol=1e-5)


def test_swap_into_timm_vit_keeps_weights_and_shape():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", num_classes=5, img_size=32, depth=2)
    x = torch.rand(2, 3, 32, 32)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    shape = vit(x).shape
    swap_attention(vit)
    assert all(isinstance(b.attn, EMHAttention) for b in vit.blocks)
    after = vit.state_dict()
    assert set(after) - set(before) == {f"blocks.{i}.attn.attn_bias" for i in range(2)}
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert vit(x).shape == shape
    # the attention really changed (not softmax any more) while the rest of the block is the same
    y = vit.blocks[0].attn(torch.randn(1, 5, 192))
    assert y.shape == (1, 5, 192)
    with pytest.raises(TypeError, match="VisionTransformer"):
        swap_attention(torch.nn.Linear(2, 2))


def test_bias_resampling():
    m = _emha(16, 2, (4, 4))
    with torch.no_grad():
        assert m.bias_for(17) is m.attn_bias                        # native grid
        m.attn_bias.fill_(0.7)
        m.grid = (6, 2)
        b = m.bias_for(13)
        assert b.shape == (2, 13, 13) and torch.allclose(b, torch.full_like(b, 0.7), atol=1e-5)
        m.attn_bias.normal_()
        m.grid = (4, 4)
        assert torch.equal(m.bias_for(17), m.attn_bias)
        m.grid = None
        with pytest.raises(ValueError, match="square grid"):
            m.bias_for(14)


def test_atte_partition_and_gem():
    torch.manual_seed(0)
    att = AttE(24, channels=16, num_attributes=4, hidden=8)
    P = torch.randn(2, 9, 24)
    m = att(P)
    assert m.shape == (2, 9, 4) and (m >= 0).all()
    assert torch.allclose(m.sum(-1), torch.ones(2, 9), atol=1e-5)     # unit-norm C̄ split in groups
    G = AttE.attributes(m, P)                                         # (4.9)
    assert G.shape == (2, 4, 9, 24)
    assert torch.allclose(G.sum(1), P, atol=1e-5)
    assert torch.allclose(G[:, 2, 5], m[:, 5, 2, None] * P[:, 5])
    w, Q = torch.rand(2, 9, 4), torch.randn(2, 9, 24)
    assert torch.allclose(factored_gem(w, Q, 2.5), gem(AttE.attributes(w, Q), 2.5, dim=2), atol=1e-5)
    assert torch.allclose(factored_diversity(m, P), diversity_loss(G), atol=1e-5)
    x = torch.rand(3, 7) + 0.1
    assert torch.allclose(gem(x, 1.0, dim=1), x.mean(1)) and torch.allclose(gem(x, 3.0, dim=1), (x ** 3).mean(1) ** (1 / 3))
    with pytest.raises(ValueError, match="divisible"):
        AttE(8, channels=10, num_attributes=4)


def test_diversity_loss_values():
    """eq. 4.14: 0 for orthogonal attribute maps, 1 for identical ones."""
    eye = torch.eye(4).reshape(1, 4, 2, 2).repeat(3, 1, 1, 1)         # disjoint supports
    assert diversity_loss(eye).abs() < 1e-6
    same = torch.rand(1, 1, 5, 6).repeat(2, 3, 1, 1) + 0.1
    assert torch.allclose(diversity_loss(same), torch.tensor(1.0), atol=1e-5)
    G = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])          # cos: (1,2)=(2,3)=1/sqrt2, (1,3)=0
    assert torch.allclose(diversity_loss(G), torch.tensor(4 / math.sqrt(2) / 6), atol=1e-6)


def test_balance_loss_values_and_gradient():
    from models.exvit import balance_loss

    S = 8
    uniform = torch.full((2, 5, S), 1.0 / S)
    assert balance_loss(uniform).abs() < 1e-6
    onehot = torch.zeros(2, 5, S)
    onehot[..., 3] = 1
    assert torch.allclose(balance_loss(onehot), torch.tensor(math.log(S)))
    # per-token assignments may be peaked as long as the average usage is uniform
    peaked = torch.eye(S).repeat(2, 1).reshape(2, S, S)
    assert balance_loss(peaked).abs() < 1e-6
    m = torch.softmax(torch.randn(2, 5, S), -1).requires_grad_(True)
    mbar = m.detach().mean((0, 1))
    assert torch.allclose(balance_loss(m), (mbar * (S * mbar).log()).sum(), atol=1e-6)
    balance_loss(m).backward()
    assert m.grad is not None and m.grad.abs().sum() > 0


def test_discriminability_loss_values():
    """eq. 4.13: 0 for identical views; a hand-computed value otherwise."""
    u = torch.rand(3, 4, 8) + 0.1
    assert discriminability_loss(u, u.clone()).abs() < 1e-6
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    # d = ||(1,0,0,1)/√2 - (0,1,0,1)/√2||² = 1; d_1 = ||(1,0)-(0,1)||² = 2; d_2 = 0  -> |1 - 2| = 1
    assert torch.allclose(discriminability_loss(a, b), torch.tensor(1.0))
    assert torch.allclose(normalized_mse(a[0, 0], b[0, 0]), torch.tensor(2.0))
    # u' is a stop-gradient target
    a.requires_grad_(True)
    b2 = b.clone().requires_grad_(True)
    discriminability_loss(a, b2).backward()
    assert b2.grad is None and a.grad is not None


def test_global_loss():
    z, y = torch.randn(4, 5), (torch.rand(4, 5) > 0.5).float()
    s = torch.sigmoid(z)
    manual = -(y * s.log() + (1 - y) * (1 - s).log()).mean(1).mean()      # (4.12) with the sign restored
    assert torch.allclose(global_loss(z, y), manual, atol=1e-6)
    t = torch.tensor([0, 3, 1, 4])
    assert torch.allclose(global_loss(z, t), F.cross_entropy(z, t))       # single-label data


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("exvit", num_classes=3, **TINY)


def test_model_shapes_and_explanations(tiny):
    x = torch.rand(2, 3, 32, 32)
    out = tiny.train().forward_train(x)
    full = ExViT.materialize(out)
    assert out["logits"].shape == (2, 3) and full["G"].shape == (2, 4, 16, 192) and out["u"].shape == (2, 4, 192)
    # the factored GeM / L_div used in training equal the literal ones on the materialised G and M
    assert torch.allclose(out["u"], gem(full["G"], 3.0, dim=2), atol=1e-5)
    assert torch.allclose(out["div"], diversity_loss(full["G"]), atol=1e-5)
    f_hat = torch.stack(tiny.encode(x)[0], 0).mean(0)
    assert torch.allclose(full["M"], f_hat.unsqueeze(1) * full["G"], atol=1e-6)     # (4.11) M = F̂ ⊙ G
    z = tiny.head(gem(full["M"], tiny.gem.p, dim=2).flatten(1))
    assert torch.allclose(z, out["logits"], atol=1e-4)
    tiny.eval()
    logits, sal = tiny.forward_explain(x, target=torch.tensor([1, 2]))
    assert sal.shape == (2, 32, 32) and sal.min() >= 0 and sal.max() <= 1
    r = tiny.explain_all(x)
    assert r["cams"].shape == (2, 3, 32, 32) and r["attributes"].shape == (2, 4, 32, 32)
    assert torch.allclose(r["attributes"].sum(1), torch.ones(2, 32, 32), atol=1e-4)
    # contributions are the attribute decomposition of the class-map mass (pre-ReLU): compare on the grid
    g = tiny.explain_all(x, upsample=False)
    feat = ExViT.materialize(tiny.features(x))["M"].clamp_min(tiny.eps)
    w = tiny.head.weight.view(3, 4, 192)
    pre = torch.einsum("bsnd,csd->bcn", feat, w)
    assert torch.allclose(g["contributions"].sum(-1), pre.sum(-1), atol=1e-4)
    assert torch.allclose(g["cams"].flatten(2), pre.relu(), atol=1e-4)
    # the logits are GeM-pooled M through the same weights (CAM is the unpooled version)
    z = gem(feat, tiny.gem.p, dim=2).flatten(1) @ tiny.head.weight.T + tiny.head.bias
    assert torch.allclose(z, r["logits"], atol=1e-4)
    # other input sizes: dynamic grid + padding, bias resampled
    assert tiny.forward_explain(torch.rand(1, 3, 44, 36))[1].shape == (1, 44, 36)
    with pytest.raises(ValueError, match="channels"):
        tiny(torch.rand(1, 1, 32, 32))


def test_pseudo_mask_rule(tiny, monkeypatch):
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 0, 0, 0], maps[0, 1, 0, 1], maps[0, 2] = 0.9, 0.3, 0.8
    monkeypatch.setattr(tiny, "class_maps", lambda x, scales, flip: (torch.tensor([[5.0, 5.0, -5.0]]), maps))
    x = torch.rand(1, 3, 2, 2)
    pm = tiny.pseudo_masks(x, threshold=0.45)             # predicted classes 0, 1 (σ > 0.5); class 2 absent
    assert pm.tolist() == [[[1, 0], [0, 0]]]
    pm = tiny.pseudo_masks(x, labels=torch.tensor([[0.0, 1.0, 1.0]]), threshold=0.2)
    assert pm.tolist() == [[[3, 3], [3, 3]]]             # class 0 dropped by the labels, 2 wins over 1
    pm = tiny.pseudo_masks(x, labels=torch.tensor([[0.0, 1.0, 0.0]]), threshold=0.2)
    assert pm.tolist() == [[[0, 2], [0, 0]]]


def test_ema_rule_and_no_gradient():
    torch.manual_seed(0)
    online = create_model("exvit", num_classes=3, **TINY)
    mom = momentum_copy(online)
    assert mom.head is None and online.head is not None
    assert all(not p.requires_grad for p in mom.parameters())
    opt = torch.optim.SGD(online.parameters(), lr=0.1)
    x = torch.rand(2, 3, 32, 32)
    for _ in range(2):
        out = online.forward_train(x)
        loss = out["logits"].sum() + discriminability_loss(out["u"], mom.attribute_pool(x)) + out["div"]
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in mom.parameters())
        opt.step()
        old = {k: v.clone() for k, v in mom.named_parameters()}
        ema_update_(mom, online, 0.9)
        on = dict(online.named_parameters())
        for k, v in mom.named_parameters():
            assert torch.allclose(v, 0.9 * old[k] + 0.1 * on[k].detach(), atol=1e-6), k
    assert not torch.equal(mom.encoder.blocks[0].attn.qkv.weight, online.encoder.blocks[0].attn.qkv.weight)


def test_trainer_momentum_moves_by_ema_each_step():
    import pytorch_lightning as pl

    from trainers.data import SyntheticShapesDataModule
    from trainers.exvit import ExViTModule

    class Check(pl.Callback):
        steps = 0

        def on_train_batch_start(self, trainer, module, batch, i):
            self.old = {k: v.detach().clone() for k, v in module.momentum_branch.named_parameters()}
            if i == 0:  # initialised from the online weights
                on = dict(module.model.named_parameters())
                assert all(torch.equal(v, on[k]) for k, v in self.old.items())

        def on_train_batch_end(self, trainer, module, outputs, batch, i):
            mu = module.momentum
            on = dict(module.model.named_parameters())
            moved = False
            for k, v in module.momentum_branch.named_parameters():
                assert v.grad is None and not v.requires_grad
                assert torch.allclose(v, mu * self.old[k] + (1 - mu) * on[k].detach(), atol=1e-6), k
                moved |= not torch.equal(v, self.old[k])
            assert moved
            Check.steps += 1

    dm = SyntheticShapesDataModule(num_classes=3, image_size=32, train_size=8, val_size=4, test_size=4,
                                   multilabel=True, batch_size=4)
    module = ExViTModule(model_kwargs=TINY, num_classes=3, multilabel=True, momentum=0.9, gamma=0.5)
    assert "momentum" not in dict(module.named_children())              # not in the state dict / DDP
    groups = module.configure_optimizers()["optimizer"].param_groups
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["encoder"] == 5e-5 and lrs["new"] == 5e-4 and lrs["new_no_decay"] == 5e-4
    bias_ids = {id(b.attn.attn_bias) for b in module.model.encoder.blocks}
    assert all(g["lr"] == 5e-4 and g["weight_decay"] == 0 for g in groups for p in g["params"] if id(p) in bias_ids)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Check()],
                         limit_val_batches=0)
    trainer.fit(module, dm)
    assert Check.steps == 2
    for k in ("train/global", "train/dis", "train/div", "train/bal"):
        assert k in trainer.callback_metrics


def test_two_views_geometry():
    from trainers.exvit import random_scale_crop_flip

    g = torch.Generator().manual_seed(0)
    B, H = 4, 16
    mask = torch.randint(0, 4, (B, 4, 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)  # blocks
    img = mask[:, None].float().repeat(1, 3, 1, 1) / 10            # image encodes the mask
    v, mv = random_scale_crop_flip(img, mask=mask, generator=g, fill=torch.full((3,), 0.9))
    assert v.shape == img.shape and mv.shape == mask.shape
    valid = mv != 255
    # nearest-resampled mask and bilinear image agree wherever the image is locally constant
    same = (v[:, 0] * 10 - mv.float()).abs() < 1e-4
    assert (same | ~valid).float().mean() > 0.6
    assert torch.allclose(v[:, 0][~valid], torch.tensor(0.9))      # padding = fill colour, mask ignore
    v2 = random_scale_crop_flip(img, generator=g)
    assert not torch.equal(v, v2)


class _GatherMomentum(pl.Callback):
    """Asserts rank-identical online and EMA weights after every step (module level: ddp_spawn pickles it)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, i):
        flat = torch.cat([p.detach().flatten() for p in module.momentum_branch.parameters()])
        online = torch.cat([p.detach().flatten() for p in module.model.parameters()])
        allm = trainer.strategy.all_gather(flat)          # (world, n)
        allo = trainer.strategy.all_gather(online)
        assert allm.shape[0] == 2
        assert torch.equal(allo[0], allo[1])               # DDP keeps θ identical ...
        assert torch.equal(allm[0], allm[1])               # ... so the EMA ξ is identical too


def test_ema_identical_on_ddp_ranks():
    import pytorch_lightning as pl

    from trainers.data import SyntheticShapesDataModule
    from trainers.exvit import ExViTModule

    dm = SyntheticShapesDataModule(num_classes=3, image_size=32, train_size=16, val_size=4, test_size=4,
                                   multilabel=True, batch_size=4)
    module = ExViTModule(model_kwargs=TINY, num_classes=3, multilabel=True, momentum=0.9)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[_GatherMomentum()], limit_val_batches=0)
    trainer.fit(module, dm)
