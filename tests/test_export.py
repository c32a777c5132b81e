"""Export with the explanation: ONNX (logits, saliency) matches PyTorch; model card round trip."""
import json

import pytest
import torch

import models
from models.export import ExplainedModel, export_onnx, load_model_card, save_model_card, verify_onnx


@pytest.mark.parametrize("backbone,size", [("resnet18", (3, 48, 48)), ("cnn3d", (1, 16, 16, 16))])
def test_onnx_export_returns_logits_and_explanation(tmp_path, backbone, size):
    m = models.create_model("baseline", backbone=backbone, num_classes=3).eval()
    path = export_onnx(m, str(tmp_path / "m.onnx"), torch.rand(2, *size))
    diffs = verify_onnx(path, m, torch.rand(3, *size))  # another batch size: the batch axis is dynamic
    assert diffs["logits_max_abs_diff"] < 1e-4 and diffs["saliency_max_abs_diff"] < 1e-4


def test_model_card_roundtrip(tmp_path):
    m = models.create_model("baseline", num_classes=3, in_chans=1).eval()
    card = save_model_card(m, str(tmp_path), "baseline", {"num_classes": 3, "in_chans": 1})
    assert json.load(open(card))["explanation_kind"] == "cam"
    m2 = load_model_card(card).eval()
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(m(x), m2(x))
    logits, sal = ExplainedModel(m2)(x)
    assert sal.shape == (2, 32, 32)
