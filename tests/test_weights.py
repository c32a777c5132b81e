"""Loud, safe weight loading: timm backbones from local files, zoo checkpoints, bad files."""
import os

import pytest
import timm
import torch

import models
from models.weights import WeightLoadError, load_weights, read_state_dict, save_weights


@pytest.fixture(scope="module")
def timm_r18(tmp_path_factory):
    d = tmp_path_factory.mktemp("w")
    ref = timm.create_model("resnet18", num_classes=10)
    torch.save(ref.state_dict(), d / "r18.pth")
    from safetensors.torch import save_file

    save_file(ref.state_dict(), str(d / "r18.safetensors"))
    return ref, d


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_backbone_weights_equal_timm(timm_r18, fmt):
    ref, d = timm_r18
    m = models.create_model("baseline", num_classes=3, backbone_weights=str(d / f"r18.{fmt}"))
    ref_sd, own = ref.state_dict(), m.backbone.body.state_dict()
    assert set(own) == {k for k in ref_sd if not k.startswith("fc.")}
    for k, v in own.items():
        assert torch.equal(v, ref_sd[k]), k
    assert m.fc.weight.shape == (3, 512)  # new head


def test_in_chans_1_adapts_stem(timm_r18):
    ref, d = timm_r18
    m = models.create_model("baseline", num_classes=3, in_chans=1, backbone_weights=str(d / "r18.pth"))
    w = m.backbone.body.conv1.weight
    assert w.shape == (64, 1, 7, 7)
    assert torch.allclose(w[:, 0], ref.conv1.weight.sum(1), atol=1e-5)  # timm's adapt_input_conv: sum over RGB
    assert torch.equal(m.backbone.body.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)


def test_mismatched_backbone_file_fails_loudly(tmp_path, timm_r18):
    ref, _ = timm_r18
    sd = dict(ref.state_dict())
    sd.pop("layer1.0.conv1.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightLoadError, match=r"1 missing: layer1\.0\.conv1\.weight; 1 unexpected: extra\.weight"):
        models.create_model("baseline", num_classes=3, backbone_weights=str(tmp_path / "bad.pth"))


def test_zoo_roundtrip_and_class_mismatch(tmp_path):
    m = models.create_model("baseline", num_classes=3)
    save_weights(m, tmp_path / "m.safetensors")
    m2 = models.create_model("baseline", num_classes=3, checkpoint_path=str(tmp_path / "m.safetensors"))
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(WeightLoadError, match="different number of classes.*reset_head: true"):
        models.create_model("baseline", num_classes=5, checkpoint_path=str(tmp_path / "m.safetensors"))


def test_prefixes_are_unwrapped(tmp_path):
    m = models.create_model("baseline", num_classes=3)
    torch.save({"state_dict": {f"model._orig_mod.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "x.ckpt")
    sd = read_state_dict(tmp_path / "x.ckpt")
    assert set(sd) == set(m.state_dict())
    torch.save({f"module.{k}": v for k, v in m.state_dict().items()}, tmp_path / "ddp.pth")
    rep = load_weights(models.create_model("baseline", num_classes=3), tmp_path / "ddp.pth")
    assert rep.loaded == len(m.state_dict()) and not rep.missing and not rep.unexpected


def test_corrupted_and_pickled_files_are_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightLoadError, match="corrupted"):
        read_state_dict(tmp_path / "junk.pth")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": torch.zeros(1), "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(WeightLoadError, match="pickled Python objects"):
        read_state_dict(tmp_path / "evil.pth")
    with pytest.raises(WeightLoadError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")


def test_missing_key_fails_and_mechanism_keys_are_allowed(tmp_path):
    m = models.create_model("baseline", num_classes=3)
    sd = dict(m.state_dict())
    sd.pop("fc.bias")
    with pytest.raises(WeightLoadError, match=r"1 missing: fc\.bias"):
        load_weights(models.create_model("baseline", num_classes=3), sd)
    target = models.create_model("baseline", num_classes=3)
    rep = load_weights(target, sd, allowed_missing=("fc.",))
    assert rep.new_mechanism_keys == ["fc.bias"]


def test_load_error_names_the_mechanism_the_file_came_from(tmp_path):
    """A CA-Stream file loaded into a plain baseline: the error names the registered model whose mechanism keys
    explain every unexpected key (weights asks the registry through a hook, without importing it)."""
    src = models.create_model("ca_stream", backbone="resnet18", num_classes=3)
    save_weights(src, tmp_path / "cas.safetensors")
    with pytest.raises(WeightLoadError, match=r"stream\..*looks like a 'ca_stream' model"):
        load_weights(models.create_model("baseline", backbone="resnet18", num_classes=3), tmp_path / "cas.safetensors")


def test_reset_head_fine_tunes_on_new_classes(tmp_path):
    from trainers.classification import ClassificationModule

    m = models.create_model("baseline", num_classes=3)
    save_weights(m, tmp_path / "m.safetensors")
    with pytest.raises(WeightLoadError, match="reset_head: true"):
        ClassificationModule(num_classes=5, checkpoint_path=str(tmp_path / "m.safetensors"))
    mod = ClassificationModule(num_classes=5, checkpoint_path=str(tmp_path / "m.safetensors"), reset_head=True)
    assert mod.model.fc.weight.shape == (5, 512)
    assert torch.equal(mod.model.backbone.body.conv1.weight, m.backbone.body.conv1.weight)
