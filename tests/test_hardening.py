"""Issue 13 (hardening), items 5-8 and 11-17: every test here failed on the code before the fix.

Guarantees and where they are implemented: docs/reliability.md.
"""
import pytest
import torch

import models
from models.registry import test_kwargs as registry_test_kwargs


# ---- 11: saliency normalisation is batch-independent and does not stretch rounding noise -------------
_SAL_CASES = [(n, None) for n in models.list_models()] + [
    ("baseline", "convnext_tiny"), ("ca_stream", "convnext_tiny"), ("picnn", "convnext_tiny"),
    ("baseline", "mobilenetv2_100")]


def test_normalize_saliency_noise_floor():
    """A CAM of a constant image is ``c +- 1e-6`` (cancellation: its terms are ~9): zeros, not [0, 1]."""
    g = torch.Generator().manual_seed(0)
    noise = -0.0116 + 4e-7 * torch.rand(2, 2, 2, generator=g)
    assert models.normalize_saliency(noise, (8, 8), scale=torch.full((2,), 8.8)).abs().max() == 0
    # a real map is min-max normalised exactly, alone or in any batch
    real = torch.rand(3, 5, 5, generator=g) - 0.5
    out = models.normalize_saliency(real)
    flat = real.flatten(1)
    ref = (flat - flat.min(1, keepdim=True).values) / (flat.max(1, keepdim=True).values - flat.min(1, keepdim=True).values)
    assert torch.allclose(out.flatten(1), ref, atol=1e-6)
    assert torch.equal(models.normalize_saliency(real[1:2]), out[1:2])
    assert models.normalize_saliency(torch.full((1, 4, 4), 3.0), (8, 8)).abs().max() == 0  # constant -> zeros


@pytest.mark.parametrize("name,backbone", _SAL_CASES, ids=[f"{n}-{b or 'default'}" for n, b in _SAL_CASES])
def test_saliency_batch_independent(name, backbone):
    """Constant images (0, 0.5, 1) and a random one: each image's saliency is the same alone and in a batch."""
    kw = registry_test_kwargs(name)
    size = kw.pop("input_size", None)
    if backbone:
        kw["backbone"] = backbone
    model = models.create_model(name, num_classes=3, **kw).eval()
    if size is None:
        side = (kw.get("backbone_kwargs") or {}).get("img_size", 64)  # 64 px: convnext's last map is 2x2
        size = (model.in_chans, side, side)
    x = torch.cat([torch.full((1, *size), v) for v in (0.0, 0.5, 1.0)] + [torch.rand(1, *size)])
    with torch.no_grad():
        _, batched = model.forward_explain(x)
        for i in range(x.shape[0]):
            _, single = model.forward_explain(x[i:i + 1])
            diff = float((single[0] - batched[i]).abs().max())
            assert diff < 1e-3, f"{name}/{backbone}: image {i} saliency differs by {diff:.3g} between batch and single run"
