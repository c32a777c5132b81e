"""Fine-tuning (issue 15): a new class count through reset_classifier, portable checkpoints, backbones given
as modules or zoo checkpoints."""
import os

import pytest
import torch

import models
from models.weights import save_weights
from trainers.classification import ClassificationModule, build_optimizer


def _shapes_batch(num_classes=3, n=24, size=32):
    from trainers.data import SyntheticShapes

    ds = SyntheticShapes("train", size=n, num_classes=num_classes, image_size=size)
    items = [ds[i] for i in range(n)]
    return {"image": torch.stack([b["image"] for b in items]), "label": torch.stack([b["label"] for b in items])}


@pytest.mark.parametrize("freeze", [None, ["^backbone\\."]], ids=["all", "frozen_backbone"])
def test_finetune_local_weights_new_class_count_loss_falls(tmp_path, freeze):
    torch.manual_seed(0)
    src = models.create_model("baseline", backbone="resnet18", num_classes=5)
    save_weights(src, tmp_path / "pretrained.safetensors")  # a locally created weights file, 5 classes
    mod = ClassificationModule(num_classes=3, checkpoint_path=str(tmp_path / "pretrained.safetensors"),
                               reset_head=True, freeze=freeze,
                               optimizer={"name": "adam", "lr": 5e-2 if freeze else 1e-3})
    assert mod.model.fc.out_features == 3 and mod.model.num_classes == 3
    for k, v in src.backbone.state_dict().items():  # the backbone weights come from the file
        assert torch.equal(v, mod.model.backbone.state_dict()[k]), k
    opt = build_optimizer(mod.model, mod.optimizer_cfg)
    batch = _shapes_batch()
    mod.train()
    losses = []
    for _ in range(12):
        loss = mod.compute_loss(batch, "train")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < (0.8 if freeze else 0.6) * losses[0], losses
    if freeze:  # frozen: weights and BatchNorm statistics do not move
        for k, v in src.backbone.state_dict().items():
            assert torch.equal(v, mod.model.backbone.state_dict()[k]), k


def _portable_roundtrip(tmp_path, module_cls, mod, parent):
    """Save like Lightning does (hyper-parameters, then on_save_checkpoint), delete the parent, reload."""
    ckpt = {"hyper_parameters": dict(mod.hparams), "state_dict": mod.state_dict(), "pytorch-lightning_version": "2.6.0"}
    mod.on_save_checkpoint(ckpt)
    path = tmp_path / "child.ckpt"
    torch.save(ckpt, path)
    os.remove(parent)
    back = module_cls.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
    return back, path


@pytest.mark.parametrize("name", ["baseline", "ca_stream", "picnn", "exvit"])
def test_reset_head_every_mechanism_and_portable_checkpoint(tmp_path, name):
    from models.registry import test_kwargs
    from trainers.ca_stream import CAStreamModule
    from trainers.exvit import ExViTModule
    from trainers.picnn import PICNNModule

    cls = {"baseline": ClassificationModule, "ca_stream": CAStreamModule, "picnn": PICNNModule,
           "exvit": ExViTModule}[name]
    kw = test_kwargs(name)
    if name == "ca_stream":
        kw["class_specific"] = True  # a class-dependent query table must be reset too
    torch.manual_seed(0)
    src = models.create_model(name, num_classes=4, **kw)
    parent = tmp_path / "parent.safetensors"
    save_weights(src, parent)
    extra = {"multilabel": False, "alpha": 0.0} if name == "exvit" else {}
    mod = cls(model=name, model_kwargs=kw, num_classes=2, checkpoint_path=str(parent), reset_head=True, **extra)
    m = mod.model.eval()
    assert m.num_classes == 2 and m.get_classifier().weight.shape[0] == 2
    if name == "ca_stream":  # stream mode with a new head: the head trains, the backbone stays frozen
        assert m.stream.q0.shape[0] == 2
        assert all(p.requires_grad for p in m.fc.parameters())
        assert not any(p.requires_grad for p in m.backbone.parameters())
    x = torch.rand(2, 3, 32, 32)
    back, path = _portable_roundtrip(tmp_path, cls, mod, parent)  # the parent file is gone now
    with torch.no_grad():
        torch.testing.assert_close(back.model.eval()(x), m(x))
    hp = torch.load(path, weights_only=True)["hyper_parameters"]
    assert hp["checkpoint_path"] is None
    # and through the registry, with the recorded kwargs
    m2 = models.create_model(name, checkpoint_path=str(path), num_classes=2, **hp["model_kwargs"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x))


def test_timm_and_torchvision_instances_as_backbone():
    import timm
    import torchvision

    net = timm.create_model("resnet18").eval()
    m = models.create_model("baseline", backbone=net, num_classes=3).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # the same network: the zoo normalises inside, timm's forward_features does not
        mean, std = torch.tensor(net.pretrained_cfg["mean"]).view(1, 3, 1, 1), torch.tensor(net.pretrained_cfg["std"]).view(1, 3, 1, 1)
        torch.testing.assert_close(m.features(x), net.forward_features((x - mean) / std))
        logits, sal = m.forward_explain(x)
    assert logits.shape == (2, 3) and sal.shape == (2, 64, 64)
    assert m.backbone.reductions == [2, 4, 8, 16, 32]

    tv = torchvision.models.resnet18(weights=None)
    ca = models.create_model("ca_stream", backbone=tv, num_classes=3).eval()
    assert ca.backbone.channels == [64, 64, 128, 256, 512] and ca.backbone.reductions == [2, 4, 8, 16, 32]
    with torch.no_grad():
        assert ca.forward_explain(x)[1].shape == (2, 64, 64)
    with pytest.raises(ValueError, match="load its weights before"):
        models.create_model("baseline", backbone=timm.create_model("resnet18"), pretrained=True)


def test_zoo_checkpoint_as_backbone_weights(tmp_path, capsys):
    torch.manual_seed(0)
    ca = models.create_model("ca_stream", backbone="resnet18", num_classes=4)
    save_weights(ca, tmp_path / "ca.safetensors")
    pic = models.create_model("picnn", backbone="resnet18", num_classes=3, backbone_weights=str(tmp_path / "ca.safetensors"))
    for k, v in ca.backbone.state_dict().items():
        assert torch.equal(v, pic.backbone.state_dict()[k]), k
    out = capsys.readouterr().out
    assert "backbone tensors (backbone.body.*) taken" in out and "not used (fc.*, stream.*)" in out
