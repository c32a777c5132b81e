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


# ---------------------------------------------------------------------------------------------- --check-bn
def _tiny(bn):
    """conv -> [BatchNorm] -> ReLU -> conv -> ReLU -> GAP -> linear (3 classes)."""
    from torch import nn

    torch.manual_seed(0)
    norm = nn.BatchNorm2d(6) if bn else nn.Identity()
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    if bn:  # running statistics far from any batch's: the two BatchNorm modes give different networks
        with torch.no_grad():
            norm.running_mean.copy_(torch.tensor([0.8, -0.8] * 3))
            norm.running_var.fill_(6.0)
            norm.weight.copy_(torch.linspace(0.5, 2.0, 6))
            norm.bias.copy_(torch.linspace(-0.3, 0.3, 6))
    return model


class _FixedNorm(torch.nn.Module):
    """A BatchNorm replaced by what it computes, with no mode flag: running statistics (``batch=False``) or the
    statistics of the batch it sees (``batch=True``), differentiated through."""

    def __init__(self, bn, batch):
        super().__init__()
        self.bn, self.batch = bn, batch

    def forward(self, x):
        b = self.bn
        if self.batch:
            return torch.nn.functional.batch_norm(x, None, None, b.weight, b.bias, True, 0.0, b.eps)
        scale = b.weight / torch.sqrt(b.running_var + b.eps)
        return (x - b.running_mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + b.bias.view(1, -1, 1, 1)


def test_check_bn_measures_each_batchnorm_mode(tmp_path, monkeypatch):
    """check_bn's "eval_mode" is the alignment of the network with BatchNorm's running statistics, "train_mode" that
    with the batch's statistics (references without any mode flag), the model's running statistics are untouched,
    and a network without BatchNorm gives the same numbers in both modes."""
    import argparse
    import copy
    import json

    from experiments import guided_gradients as G

    g = torch.Generator().manual_seed(1)
    loader = [dict(image=torch.rand(6, 3, 12, 12, generator=g), label=torch.tensor([0, 1, 2, 0, 1, 2]))]
    models = {0.0: _tiny(bn=True), 1.0: _tiny(bn=False)}
    buffers = {k: v.clone() for k, v in models[0.0][1].state_dict().items()}
    refs = {mode: copy.deepcopy(models[0.0]) for mode in ("eval", "batch")}
    for mode, m in refs.items():
        m[1] = _FixedNorm(m[1], batch=mode == "batch")
    want = {mode: G.gradient_alignment(m, loader, 6) for mode, m in refs.items()}
    assert abs(sum(want["eval"]) - sum(want["batch"])) / 6 > 0.02  # the two modes really differ on this model

    monkeypatch.setattr(G, "loaders", lambda a: (None, loader))
    monkeypatch.setattr(G, "train", lambda bb, lam, err, a, tl: (models[lam], 0.0, dict(loss_c=1.0, lam_loss_r=0.0)))
    args = argparse.Namespace(seeds=[3], backbones="tiny", eval_images=6, out=str(tmp_path / "gg"))
    out = G.check_bn(args, lams=(0.0, 1.0))

    torch.testing.assert_close(torch.tensor(out["0"]["eval_mode"]), torch.tensor(want["eval"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(out["0"]["train_mode"]), torch.tensor(want["batch"]), atol=1e-5, rtol=0)
    for k, v in models[0.0][1].state_dict().items():  # train mode ran on a copy
        assert torch.equal(v, buffers[k]), k
    assert out["1"]["eval_mode"] == out["1"]["train_mode"]  # no BatchNorm: the mode changes nothing
    d = out["0"]["train_minus_eval"]
    assert abs(d["mean"] - 100 * (sum(want["batch"]) - sum(want["eval"])) / 6) < 1e-3
    assert d["ci95_low"] <= d["mean"] <= d["ci95_high"]
    saved = json.loads((tmp_path / "gg_bn.json").read_text())
    assert set(saved) == {"0", "1"} and saved["0"]["eval_mode"] == out["0"]["eval_mode"]


def test_check_bn_quick_cli_writes_only_to_out(tmp_path, monkeypatch):
    """``--check-bn --quick --out <tmp>``: <tmp>_bn.json with both lambdas and per-image values; nothing is written
    anywhere else (docs/ untouched)."""
    import json
    import os

    from experiments import guided_gradients as G
    from experiments import harness as H

    docs = os.path.join(G.ROOT, "docs")
    before = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(docs) for f in fs}
    written = []
    real = H.atomic_write_text
    monkeypatch.setattr(H, "atomic_write_text", lambda path, text: (written.append(path), real(path, text))[1])
    out = str(tmp_path / "gg")
    assert G.main(["--check-bn", "--quick", "--seeds", "0", "--image-size", "32", "--out", out,
                   "--cache-dir", str(tmp_path / "cache")]) == 0
    assert written == [out + "_bn.json"]
    res = json.loads(open(out + "_bn.json").read())
    assert set(res) == {"0", "1"}
    for v in res.values():
        assert len(v["eval_mode"]) == len(v["train_mode"]) == 16  # --quick: 16 evaluation images
        assert all(-1.0 <= c <= 1.0 for c in v["eval_mode"] + v["train_mode"])
    after = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(docs) for f in fs}
    assert after == before
