"""Registry-wide contract test (in timm's spirit): every registered model builds tiny, runs forward and
backward, and returns its explanation through the shared interface. New mechanisms join by registering."""
import pytest
import torch
from torch import nn

import models
from models.registry import test_kwargs as registry_test_kwargs

CASES = [(name, None) for name in models.list_models()] + [("baseline", "cnn3d"), ("baseline", "deit_tiny_patch16_224")]


def _build(name, backbone):
    kw = registry_test_kwargs(name)
    size = kw.pop("input_size", None)
    if backbone == "cnn3d":
        kw.update(backbone="cnn3d")
        size = (1, 16, 16, 16)
    elif backbone is not None:
        kw.update(backbone=backbone, backbone_kwargs={"img_size": 32})
        size = (3, 32, 32)
    model = models.create_model(name, num_classes=3, **kw)
    return model, size or (model.in_chans, 32, 32)


@pytest.mark.parametrize("name,backbone", CASES, ids=[f"{n}-{b or 'default'}" for n, b in CASES])
def test_model_contract(name, backbone):
    model, size = _build(name, backbone)
    assert isinstance(model, models.InterpretableClassifier)
    x = torch.rand(2, *size)
    model.train()
    logits = model(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    model.eval()
    with torch.no_grad():
        ref = model(x)
        out, sal = model.forward_explain(x)
    assert torch.allclose(out, ref, atol=1e-5), "forward_explain must return the same logits as forward"
    assert sal.shape == (2,) + tuple(size[1:])
    assert torch.isfinite(sal).all() and sal.min() >= 0 and sal.max() <= 1 + 1e-6
    sal_t = model.explain(x, target=torch.tensor([1, 2]))
    assert sal_t.shape == sal.shape
    assert isinstance(model.explanation_kind, str) and model.explanation_kind

    # the default CAM layer yields (B, C, *spatial) maps
    seen = {}
    layer = model.cam_target_layer()
    h = layer.register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    with torch.no_grad():
        model(x)
    h.remove()
    assert isinstance(seen["o"], torch.Tensor) and seen["o"].dim() == len(size) + 1

    # head surgery (timm API): a new class count, the rest of the weights kept; or a clear refusal
    cfg = model.pretrained_cfg
    assert cfg["mean"] == (0.0,) * model.in_chans and cfg["std"] == (1.0,) * model.in_chans  # [0, 1] pixels in
    assert cfg["num_classes"] == 3 and cfg["input_size"][0] == model.in_chans
    kept = {k: v.clone() for k, v in model.state_dict().items()
            if not k.startswith(model.classifier_name() + ".")}
    try:
        model.reset_classifier(5)
    except ValueError as e:  # a mechanism that cannot reset in its current state must say why
        assert "reset_classifier" in str(e)
        return
    assert model.num_classes == 5 and model.pretrained_cfg["num_classes"] == 5
    with torch.no_grad():
        out5, sal5 = model.forward_explain(x, target=torch.tensor([4, -1]))
    assert out5.shape == (2, 5) and sal5.shape == sal.shape
    same = [k for k, v in model.state_dict().items() if k in kept and v.shape == kept[k].shape and torch.equal(v, kept[k])]
    assert len(same) >= 0.8 * len(kept), "reset_classifier must keep the backbone weights"


def test_list_models_and_unknown_name():
    names = models.list_models()
    assert "baseline" in names and names == sorted(names)
    assert models.list_models("base*") == ["baseline"]
    with pytest.raises(ValueError, match="Known models: .*baseline"):
        models.create_model("no_such_model")


def test_unknown_backbone_lists_alternatives():
    with pytest.raises(ValueError, match="Unknown backbone 'resnet_18'.*Similar timm names"):
        models.create_model("baseline", backbone="resnet_18")


def test_bad_input_messages():
    m = models.create_model("baseline", num_classes=3, in_chans=1).eval()
    with pytest.raises(ValueError, match="in_chans=1 but the input has 3 channels"):
        m(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="expects 2D images .*Use a 3D model"):
        m(torch.rand(1, 1, 8, 32, 32))
    with pytest.raises(ValueError, match="target classes must be in"):
        m.explain(torch.rand(1, 1, 32, 32), target=torch.tensor([7]))


def test_baseline_cam_is_classifier_weighted_features():
    """CAM (seed 001 eq. 1.3 with w = W_fc[c]): check against a naive per-channel sum."""
    m = models.create_model("baseline", num_classes=4).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        f = m.features(x)
        _, sal = m.forward_explain(x, target=torch.tensor([3, 0]))
        for b, c in enumerate([3, 0]):
            cam = sum(m.fc.weight[c, k] * f[b, k] for k in range(f.shape[1]))
            ref = models.normalize_saliency(cam[None], x.shape[2:])[0]
            assert torch.allclose(sal[b], ref, atol=1e-5)
        # and GAP(CAM) + bias is the logit
        logits = m(x)
        cam3 = torch.einsum("bchw,c->bhw", f, m.fc.weight[3]).flatten(1).mean(1) + m.fc.bias[3]
        assert torch.allclose(cam3, logits[:, 3], atol=1e-5)
