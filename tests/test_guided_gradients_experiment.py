"""experiments/guided_gradients.py: the insertion blur scaled to the image (spec §10.15) and the explained layer."""
import pytest
import torch

from experiments.guided_gradients import build_model, insertion_blur, target_tap
from experiments.harness import tap_sizes
from models.metrics import gaussian_blur

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size,klen,sigma", [(32, 3, 1.0), (64, 3, 64 * 5 / 224), (224, 11, 5.0), (448, 21, 10.0)])
def test_insertion_blur_scales_with_the_image(size, klen, sigma):
    """Spec §10.15: 3x3, sigma 1 at 32 px; RISE's 11x11, sigma 5 at 224 px; sigma proportional in between."""
    blur, text = insertion_blur(size)
    assert text == f"gaussian {klen}x{klen}, sigma {sigma:.2f}"
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(blur(x), gaussian_blur(x, klen=klen, sigma=sigma))
    assert not torch.allclose(blur(x), gaussian_blur(x, klen=klen, sigma=sigma * 1.5))


def test_default_backbone_explains_an_8x8_stage():
    """The main job's backbone at 64 px: the CAM layer is the last tap and it is 8x8 (>= the papers' 7x7)."""
    import argparse

    args = argparse.Namespace(num_classes=6, backbone_kwargs={"out_indices": [1, 2, 3], "output_stride": 8})
    model = build_model("resnet10t", args)
    i = target_tap(model, 64, 7)
    assert i == len(model.backbone.taps) - 1
    assert tap_sizes(model, 64)[i] == (8, 8)
