"""Guided-gradient regularisation (seed 001 ch. 4, eqs. 4.1-4.8; spec specs/guided_gradients.md §9)."""
from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from models import create_model
from models.guided_gradients import (GuidableActivations, step_lambda, UnsupportedActivationError, _GuidableClamp,
                                     check_guided_compatible, error_cosine, error_histogram_intersection, error_mae,
                                     error_mse, get_error_function, guided_backprop, guided_gradient_loss, input_gradient)


def _tiny_resnet(num_classes=4, **kw):
    torch.manual_seed(0)
    return create_model("guided_gradients", backbone="resnet18", num_classes=num_classes, **kw)


def _captum_guided(model, x, target=None):
    from captum.attr import GuidedBackprop

    model = copy.deepcopy(model)
    for m in model.modules():  # captum's module hooks cannot handle in-place ReLUs
        if isinstance(m, nn.ReLU):
            m.inplace = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GuidedBackprop(model).attribute(x.clone(), target=target)


# ---- guided gradient = reference guided backprop ------------------------------------------------
def test_guided_backprop_matches_captum_on_timm_resnet():
    model = _tiny_resnet().eval()  # timm's ReLUs are in-place modules
    x = torch.rand(3, 3, 16, 16)
    target = torch.tensor([0, 2, 3])
    ours = guided_backprop(model, x, target)
    ref = _captum_guided(model, x, target)
    assert ours.shape == x.shape
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    # guided differs from the plain gradient (otherwise the comparison above would be vacuous)
    plain = input_gradient(model, x, target)
    assert (plain - ours).abs().max() > 1e-3 * ours.abs().max()


def test_training_teacher_matches_captum_on_loss_in_train_mode():
    """The teacher of Algorithm 3 is the guided gradient of sum_i CE_i (train-mode BN), spec §4 step 3."""
    model = _tiny_resnet().train()
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])

    class LossNet(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, inp):
            return F.cross_entropy(self.m(inp), y, reduction="none")

    ref = _captum_guided(LossNet(copy.deepcopy(model)), x)
    switch = GuidableActivations()
    xr = x.clone().requires_grad_(True)
    with switch:
        logits = model(xr)
    with switch.guided():
        (teacher,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xr, retain_graph=True)
    (student,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xr)
    torch.testing.assert_close(teacher, ref, rtol=1e-5, atol=1e-7)
    # the same forward with the switch off gives the plain gradient (spec §9, 1e-6)
    model2 = copy.deepcopy(model)
    model2.load_state_dict(_tiny_resnet().state_dict())  # BN stats as before the forward above
    xp = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(F.cross_entropy(model2(xp), y, reduction="sum"), xp)
    torch.testing.assert_close(student, plain, rtol=0, atol=1e-6)


def test_guided_rule_elementwise():
    a = torch.tensor([-1.0, 0.5, 2.0, 7.0, 3.0, -0.2])
    g = torch.tensor([1.0, -2.0, 3.0, 4.0, -5.0, 6.0])
    for hi, std, gd in ((None, [0, -2, 3, 4, -5, 0], [0, 0, 3, 4, 0, 0]),
                        (6.0, [0, -2, 3, 0, -5, 0], [0, 0, 3, 0, 0, 0])):
        sw = GuidableActivations()
        ar = a.clone().requires_grad_(True)
        out = _GuidableClamp.apply(ar, hi, sw)
        assert torch.equal(out, a.clamp(0, hi) if hi else a.relu())
        (gs,) = torch.autograd.grad(out, ar, g, retain_graph=True)
        with sw.guided():
            (gg,) = torch.autograd.grad(out, ar, g)
        assert gs.tolist() == std and gg.tolist() == gd
    # all-positive incoming gradient: guided == standard (spec §9)
    sw = GuidableActivations()
    ar = a.clone().requires_grad_(True)
    out = _GuidableClamp.apply(ar, None, sw)
    with sw.guided():
        (gg,) = torch.autograd.grad(out, ar, g.abs(), retain_graph=True)
    (gs,) = torch.autograd.grad(out, ar, g.abs())
    assert torch.equal(gg, gs)


class _FunctionalNet(nn.Module):
    """Every way of writing a ReLU: in-place module, functional, torch.*, Tensor.*, in-place, ReLU6."""

    def __init__(self, ref_act=None):
        super().__init__()
        torch.manual_seed(1)
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3)
        self.c4, self.c5 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.act_mod, self.act6 = nn.ReLU(inplace=True), nn.ReLU6(inplace=True)
        self.fc = nn.Linear(8, 3)
        self.ref_act = ref_act  # None: real activations; else a reference (a, hi) -> guided clamp

    def _a(self, kind, x):
        if self.ref_act is not None:
            return self.ref_act(x, 6.0 if kind == "relu6" else None)
        return {"mod": lambda t: self.act_mod(t), "F": lambda t: F.relu(t, inplace=True),
                "torch": torch.relu, "method_": lambda t: t.relu_(), "relu6": lambda t: self.act6(t)}[kind](x)

    def forward(self, x):
        x = self._a("mod", self.c1(x * 4 - 2))
        x = self._a("F", self.c2(x)) + x  # residual add after a functional in-place ReLU
        x = self._a("torch", self.c3(x))
        x = self._a("method_", self.c4(x))
        x = self._a("relu6", self.c5(x) * 8)
        return self.fc(x.mean((2, 3)))


class _RefGuidedClamp(torch.autograd.Function):
    """Naive reference guided ReLU/ReLU6 (written independently of the implementation)."""

    @staticmethod
    def forward(ctx, a, hi):
        ctx.save_for_backward(a)
        ctx.hi = hi
        return a.clamp(min=0) if hi is None else a.clamp(0, hi)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        inside = (a > 0) if ctx.hi is None else ((a > 0) & (a < ctx.hi))
        return torch.where(inside & (g > 0), g, torch.zeros_like(g)), None


def test_inplace_and_functional_relus_are_all_switched():
    net = _FunctionalNet().eval()
    ref = _FunctionalNet(ref_act=_RefGuidedClamp.apply).eval()
    ref.load_state_dict(net.state_dict())
    x = torch.rand(2, 3, 12, 12)
    ours = guided_backprop(net, x, torch.tensor([0, 2]))
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(ref(xr)[torch.arange(2), torch.tensor([0, 2])].sum(), xr)
    assert want.abs().max() > 0
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-7)
    sw = GuidableActivations()
    with sw:
        net(x)
    assert sw.calls == 5  # every activation went through the switchable Function
    # flag off: the plain gradient of the (unmodified) network
    xp = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(net(xp)[torch.arange(2), torch.tensor([0, 2])].sum(), xp)
    torch.testing.assert_close(input_gradient(net, x, torch.tensor([0, 2])), plain, rtol=1e-5, atol=1e-7)


# ---- refusal of smooth activations -----------------------------------------------------------
def test_refuses_gelu_and_silu_with_clear_message():
    with pytest.raises(UnsupportedActivationError, match="GELU.*ReLU backbone"):
        create_model("guided_gradients", backbone="resnet18", num_classes=3, backbone_kwargs={"act_layer": "gelu"})
    with pytest.raises(UnsupportedActivationError, match="SiLU"):
        check_guided_compatible(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU()))

    class FunctionalGelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.gelu(self.c(x)).mean((2, 3)))

    with pytest.raises(UnsupportedActivationError, match="functional activation gelu"):
        guided_gradient_loss(FunctionalGelu(), torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(UnsupportedActivationError, match="hardtanh"):
        guided_backprop(nn.Sequential(nn.Flatten(), nn.Linear(12, 2), nn.Hardtanh()), torch.rand(2, 3, 2, 2))


# ---- error functions, eqs. 4.5-4.8 -------------------------------------------------------------
def test_error_functions_hand_computed():
    d = torch.tensor([[1.0, -2.0, 0.0, 3.0]]).view(1, 1, 2, 2)
    t = torch.tensor([[2.0, 1.0, -1.0, 1.0]]).view(1, 1, 2, 2)
    torch.testing.assert_close(error_mae(d, t), torch.tensor([7 / 4]))          # (1+3+1+2)/4
    torch.testing.assert_close(error_mse(d, t), torch.tensor([15 / 4]))         # (1+9+1+4)/4
    torch.testing.assert_close(error_cosine(d, t), torch.tensor([-3 / math.sqrt(14 * 7)]))  # -<d,t>/(|d||t|)
    # -sum min(|d|/6, |t|/5) = -(1/6 + 1/5 + 0 + 1/5)
    torch.testing.assert_close(error_histogram_intersection(d, t), torch.tensor([-(1 / 6 + 2 / 5)]))
    # signs / bounds: identical gradients are the best value of every error
    g = torch.randn(3, 3, 4, 4)
    torch.testing.assert_close(error_cosine(g, g), -torch.ones(3))
    torch.testing.assert_close(error_histogram_intersection(g, 2 * g), -torch.ones(3))
    assert torch.equal(error_mae(g, g), torch.zeros(3)) and torch.equal(error_mse(g, g), torch.zeros(3))
    torch.testing.assert_close(error_cosine(g, -g), torch.ones(3))
    hi = error_histogram_intersection(g, torch.randn(3, 3, 4, 4))
    assert ((hi >= -1) & (hi <= 0)).all()
    # per-sample over all C*H*W entries: batch entries are independent
    torch.testing.assert_close(error_mse(g, 0 * g), g.flatten(1).pow(2).mean(1))


# ---- gradients of the objective ------------------------------------------------------------
class _Tiny64(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.c1, self.c2, self.fc = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("error", ["cosine", "histogram", "mae", "mse"])
def test_regulariser_gradient_double_backward_gradcheck(error):
    """dL/dtheta of the full objective (teacher fixed) passes gradcheck in float64 (spec §9)."""
    from torch.func import functional_call

    net = _Tiny64().double()
    x, y = torch.rand(2, 2, 7, 7, dtype=torch.float64), torch.tensor([0, 2])
    names = [n for n, _ in net.named_parameters()]
    params = tuple(p.detach().clone() for _, p in net.named_parameters())
    teacher = guided_backprop_loss_teacher(net, x, y)

    def objective(*ps):
        xr = x.clone().requires_grad_(True)
        sw = GuidableActivations()
        with sw:
            logits = functional_call(net, dict(zip(names, ps)), (xr,))
        s = F.cross_entropy(logits, y, reduction="sum")
        (student,) = torch.autograd.grad(s, xr, create_graph=True)
        return F.cross_entropy(logits, y) + 0.7 * get_error_function(error)(student, teacher).mean()

    assert torch.autograd.gradcheck(objective, tuple(p.requires_grad_(True) for p in params), eps=1e-6, atol=1e-5, fast_mode=True)
    # guided_gradient_loss gives exactly this gradient (its teacher is detached)
    out = guided_gradient_loss(net, x, y, lam=0.7, error=error)
    got = torch.autograd.grad(out["loss"], list(net.parameters()))
    ps = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())
    want = torch.autograd.grad(objective(*ps), ps)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def guided_backprop_loss_teacher(net, x, y):
    sw = GuidableActivations()
    xr = x.clone().requires_grad_(True)
    with sw:
        logits = net(xr)
    with sw.guided():
        return torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xr)[0]


def test_regulariser_gradient_reaches_parameters():
    """Fails if create_graph were dropped: then L_R would be a constant w.r.t. theta."""
    model = _tiny_resnet()
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    grads = {}
    for lam in (0.0, 1.0, 2.0):
        m = copy.deepcopy(model).train()
        out = guided_gradient_loss(m, x, y, lam=lam)
        out["loss"].backward()
        grads[lam] = {n: p.grad.clone() for n, p in m.named_parameters()}
    conv1 = "backbone.body.conv1.weight"
    d1 = grads[1.0][conv1] - grads[0.0][conv1]
    d2 = grads[2.0][conv1] - grads[0.0][conv1]
    assert d1.abs().max() > 1e-4 * grads[0.0][conv1].abs().max()
    torch.testing.assert_close(d2, 2 * d1, rtol=1e-3, atol=1e-3 * float(d1.abs().max()))  # linear in lambda (4.4)


def test_fraction_and_separate_strategies():
    model = _tiny_resnet()
    x, y = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 3] * 2)
    full = guided_gradient_loss(copy.deepcopy(model).train(), x, y, lam=1.0)
    sep = guided_gradient_loss(copy.deepcopy(model).train(), x, y, lam=1.0, strategy="separate")
    # the separate teacher forward sees the same batch statistics: same L_R (but BN stats updated once)
    torch.testing.assert_close(sep["loss_r"], full["loss_r"], rtol=1e-4, atol=1e-6)
    m = copy.deepcopy(model).train()
    before = m.backbone.body.bn1.running_mean.clone()
    ref = copy.deepcopy(model).train()
    ref(x)
    part = guided_gradient_loss(m, x, y, lam=1.0, fraction=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(part["loss"]) and part["logits"].shape == (8, 4)
    assert not torch.equal(m.backbone.body.bn1.running_mean, before)
    torch.testing.assert_close(m.backbone.body.bn1.running_mean, ref.backbone.body.bn1.running_mean)  # updated once
    with pytest.raises(ValueError, match="fraction"):
        guided_gradient_loss(m, x, y, fraction=0.0)


# ---- Lightning module ---------------------------------------------------------------------------
def _modules(lam):
    from trainers.classification import ClassificationModule
    from trainers.guided_gradients import GuidedGradientsModule

    kw = dict(model_kwargs={"backbone": "resnet18"}, num_classes=4, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9})
    torch.manual_seed(0)
    plain = ClassificationModule(model="guided_gradients", **kw)
    torch.manual_seed(0)
    reg = GuidedGradientsModule(lam=lam, **kw)
    return plain, reg


def test_lambda_zero_reproduces_plain_training_exactly():
    plain, reg = _modules(0.0)
    torch.manual_seed(1)
    batches = [{"image": torch.rand(4, 3, 16, 16), "label": torch.randint(0, 4, (4,))} for _ in range(3)]
    for module in (plain, reg):
        module.train()
        opt = module.configure_optimizers()
        for b in batches:
            opt.zero_grad()
            out = module.compute_loss(b, "train")
            out["loss"].backward()
            opt.step()
    sp, sr = plain.state_dict(), reg.state_dict()
    assert all(torch.equal(sp[k], sr[k]) for k in sp)
    # and no gradient graph is built when lambda = 0 (no switchable ReLU in the graph)
    out = reg.compute_loss(batches[0], "train")
    seen, stack = set(), [out["loss"].grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        assert "GuidableClamp" not in type(fn).__name__
        stack.extend(f for f, _ in fn.next_functions)
    # sanity: with lambda > 0 the parameters do differ
    _, reg2 = _modules(1.0)
    reg2.train()
    opt = reg2.configure_optimizers()
    for b in batches:
        opt.zero_grad()
        reg2.compute_loss(b, "train")["loss"].backward()
        opt.step()
    assert not all(torch.equal(sp[k], reg2.state_dict()[k]) for k in sp)


def test_step_lambda_every_k_is_unbiased_over_steps(monkeypatch):
    from trainers.guided_gradients import GuidedGradientsModule

    assert [step_lambda(0.5, 3, s) for s in range(6)] == [1.5, 0, 0, 1.5, 0, 0]
    assert all(step_lambda(0.5, 1, s) == 0.5 for s in range(4))
    assert sum(step_lambda(0.25, 4, s) for s in range(8)) == pytest.approx(8 * 0.25)
    with pytest.raises(ValueError, match="every"):
        step_lambda(0.5, 0, 0)
    torch.manual_seed(0)
    m = GuidedGradientsModule(model_kwargs={"backbone": "resnet18"}, num_classes=4, lam=0.3, every=2).train()
    b = {"image": torch.rand(4, 3, 16, 16), "label": torch.randint(0, 4, (4,))}
    for step, expect_reg in ((0, True), (1, False), (2, True)):
        monkeypatch.setattr(GuidedGradientsModule, "global_step", property(lambda self, s=step: s))
        out = m.compute_loss(b, "train")
        if expect_reg:  # L = L_C + (every * lam) L_R on the regularised steps
            assert torch.allclose(out["loss"], out["loss_c"] + 0.6 * out["loss_r"])
        else:
            assert "loss_r" not in out and torch.equal(out["loss"], out["loss_c"])


def test_module_refuses_multilabel_and_gelu():
    from trainers.guided_gradients import GuidedGradientsModule

    with pytest.raises(ValueError, match="single-label"):
        GuidedGradientsModule(model_kwargs={"backbone": "resnet18"}, num_classes=3, multilabel=True)
    with pytest.raises(UnsupportedActivationError, match="GELU"):
        GuidedGradientsModule(model="baseline", model_kwargs={"backbone": "resnet18",
                                                                "backbone_kwargs": {"act_layer": "gelu"}}, num_classes=3)


# ---- DDP ------------------------------------------------------------------------------------
class _DictData(torch.utils.data.Dataset):
    def __init__(self, n=16, size=16):
        g = torch.Generator().manual_seed(5)
        self.x = torch.rand(n, 3, size, size, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


class _RankSampler(torch.utils.data.Sampler):
    """Rank r of w reads samples r, r+w, ...: each global step sees the same 8 images as 1 process x 8."""

    def __init__(self, n):
        self.n = n

    def _rank(self):
        import torch.distributed as dist

        return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)

    def __iter__(self):
        r, w = self._rank()
        return iter(range(r, self.n, w))

    def __len__(self):
        return self.n // self._rank()[1]


class _SaveParams(pl.Callback):
    """Every rank writes its final parameters (to compare ranks and single-process training)."""

    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        torch.save({k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()},
                   os.path.join(self.path, f"rank{trainer.global_rank}_of{trainer.world_size}.pt"))


def _fit(tmp_path, devices, batch_size, steps=3, lam=1.0):
    from trainers.guided_gradients import GuidedGradientsModule

    pl.seed_everything(0)
    # GroupNorm removes BatchNorm's batch coupling so that 2 x 4 samples == 8 samples (spec §9)
    module = GuidedGradientsModule(model_kwargs={"backbone": "resnet18", "backbone_kwargs": {"norm_layer": "groupnorm"}},
                                   num_classes=4, lam=lam, optimizer={"name": "sgd", "lr": 0.05})
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[_SaveParams(str(tmp_path))], default_root_dir=str(tmp_path))
    data = _DictData()
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=_RankSampler(len(data)), num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)


def test_ddp_two_ranks_match_single_process(tmp_path):
    """2 CPU ranks (gloo, ddp_spawn) x 4 images == 1 process x 8 images: same parameters after 3 steps."""
    _fit(tmp_path, devices=1, batch_size=8)
    _fit(tmp_path, devices=2, batch_size=4)
    single = torch.load(tmp_path / "rank0_of1.pt", weights_only=True)
    r0 = torch.load(tmp_path / "rank0_of2.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1_of2.pt", weights_only=True)
    init = _tiny_init_state()
    moved = max((single[k].float() - init[k].float()).abs().max().item() for k in single)
    assert moved > 1e-3  # training did happen
    for k in single:
        assert torch.equal(r0[k], r1[k]), k  # identical on both ranks
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5, msg=k)  # float-sum order only


def _tiny_init_state():
    from trainers.guided_gradients import GuidedGradientsModule

    pl.seed_everything(0)
    m = GuidedGradientsModule(model_kwargs={"backbone": "resnet18", "backbone_kwargs": {"norm_layer": "groupnorm"}},
                              num_classes=4, lam=1.0)
    return m.model.state_dict()
