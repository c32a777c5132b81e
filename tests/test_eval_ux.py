"""Issue 14 item 4 / issue 16: degenerate-map guard, readable pictures, eval.py options (--target-layers,
--explain), reshape_transform for user-built timm ViTs. Tiny models and images only (budget: a few seconds)."""
import json
import math
import os

import pytest
import torch
from torch import nn

from models.metrics import run_interpretability
from models.metrics.degenerate import MIN_NATIVE_SIDE, constant_maps, is_coarse, native_resolution


class PoolNet(nn.Module):
    """conv -> AdaptiveAvgPool(side) ('pool', the explained layer) -> linear: maps are side x side natively."""

    num_classes = 3

    def __init__(self, side: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.fc = nn.Linear(4 * side * side, 3)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def _batch(n=4, size=32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g)
    mask = torch.zeros(n, size, size, dtype=torch.long)
    mask[:, 4:12, 4:12] = 1 + torch.arange(n).remainder(3).view(n, 1, 1)
    return {"image": x, "label": torch.arange(n).remainder(3), "mask": mask}


@pytest.mark.parametrize("side,refused", [(2, True), (8, False)])
def test_coarse_guard_fires_for_2x2_not_8x8(side, refused):
    torch.manual_seed(0)
    model = PoolNet(side)
    res = run_interpretability(model, [_batch()], ["gradcam"], metrics="ad,pg,epg,miou", progress=False,
                               sanity=False, target_layers="pool")
    info = res.meta["maps"]["gradcam"]
    assert info["native_resolution"] == [side, side]
    assert is_coarse((side, side)) is refused and MIN_NATIVE_SIDE == 4
    loc = [res["gradcam"][k] for k in ("pg", "epg", "miou")]
    if refused:
        assert all(math.isnan(v) for v in loc) and info["localisation"] == "refused"
        assert "localisation refused" in info["status"] and "2x2" in info["status"]
        assert all(math.isnan(v) for v in res.per_item["gradcam"]["pg"])
    else:
        assert all(math.isfinite(v) for v in loc) and info["localisation"] == "computed"
        assert info["status"] == "ok"
    assert math.isfinite(res["gradcam"]["ad"])  # faithfulness is still computed on coarse maps


def test_constant_maps_are_reported_not_scored():
    model = PoolNet(8)
    zero = lambda x, t: torch.zeros(x.shape[0], *x.shape[2:])  # noqa: E731

    def half(x, t):  # constant on the first item only
        m = torch.rand(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(1))
        m[0] = 0.5
        return m

    batch = _batch()
    res = run_interpretability(model, [batch], [("zero", zero), ("half", half)], metrics="ad,ag,del,pg",
                               progress=False, sanity=False, steps=4)
    z, h = res.meta["maps"]["zero"], res.meta["maps"]["half"]
    assert z["n_constant"] == 4 and "constant map" in z["status"]
    assert all(math.isnan(res["zero"][k]) for k in ("ad", "ag", "del", "pg"))
    assert h["n_constant"] == 1 and "1/4" in h["status"]
    assert math.isnan(res.per_item["half"]["ad"][0]) and all(map(math.isfinite, res.per_item["half"]["ad"][1:]))
    # the row is the mean over the scored items only: the same as evaluating items 1..3 alone
    sub = {k: v[1:] for k, v in batch.items()}
    alone = run_interpretability(model, [sub], [("h", lambda x, t: half(torch.cat([x[:1], x]), None)[1:])],
                                 metrics="ad,ag,del,pg", progress=False, sanity=False, steps=4)
    for k in ("ad", "ag", "del", "pg"):
        assert res["half"][k] == pytest.approx(alone["h"][k], abs=1e-4), k
    assert constant_maps(torch.stack([torch.zeros(4, 4), torch.eye(4)])).tolist() == [True, False]


def test_native_resolution_of_intrinsic_and_pixel_methods():
    import models
    from models.explainers import create_explainer

    m = models.create_model("baseline", backbone="resnet18", num_classes=3)
    x = torch.rand(1, 3, 64, 64)
    assert native_resolution(create_explainer("intrinsic", m), m, x) == (2, 2)
    assert native_resolution(create_explainer("gradcam", m, target_layers=-3), m, x) == (8, 8)
    assert native_resolution(create_explainer("random", m), m, x) == (64, 64)
    # several layers (aggregation): the finest grid counts
    assert native_resolution(create_explainer("gradcam", m, target_layers=[-1, -3]), m, x) == (8, 8)


# ------------------------------------------------------------------------------------------ timm ViT, user-built
CAM_FAMILY = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "scorecam", "ablationcam", "opticam",
              "relevancecam", "xrelevancecam", "ham"]


def _vit_reshape(t, side=4):
    """pytorch-grad-cam's ViT recipe: drop the class token, (B, h*w, C) -> (B, C, h, w)."""
    return t[:, 1:, :].reshape(t.shape[0], side, side, t.shape[2]).transpose(2, 3).transpose(1, 2)


@pytest.fixture(scope="module")
def user_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2, embed_dim=48, num_heads=2,
                             num_classes=3).eval()


@pytest.mark.parametrize("name", CAM_FAMILY)
def test_reshape_transform_on_a_user_built_timm_vit(user_vit, name):
    from models.explainers import create_explainer

    layers = [user_vit.blocks[-1].norm1, user_vit.blocks[-2].norm1] if name == "ham" else user_vit.blocks[-1].norm1
    kw = {"max_iter": 3} if name == "opticam" else {}
    ex = create_explainer(name, user_vit, target_layers=layers, reshape_transform=_vit_reshape, **kw)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    s = ex(x, torch.tensor([0, 2]))
    assert s.shape == (2, 64, 64) and torch.isfinite(s).all()
    assert not constant_maps(s).all(), name  # real 4x4 maps (a ViT's ReLU-ed Grad-CAM can be blank for an image)
    assert native_resolution(ex, user_vit, x) == (4, 4)


def test_vit_gradcam_equals_pytorch_grad_cam_with_the_same_reshape(user_vit):
    """Our Grad-CAM through reshape_transform == the package's GradCAM (which resizes with OpenCV, = bilinear)."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from models.explainers import create_explainer

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    layer = user_vit.blocks[-1].norm1
    ours = create_explainer("gradcam", user_vit, target_layers=layer, reshape_transform=_vit_reshape)(x, torch.tensor([1, 1]))
    with pgc.GradCAM(user_vit, target_layers=[layer], reshape_transform=_vit_reshape) as cam:
        ref = torch.from_numpy(cam(x, targets=[ClassifierOutputTarget(1)] * 2))
    assert torch.allclose(ours, ref, atol=2e-2), (ours - ref).abs().max()
    with pytest.raises(ValueError, match="reshape_transform|maps"):  # tokens without the transform: clear error
        create_explainer("gradcam", user_vit, target_layers=layer)(x, torch.tensor([1, 1]))


# ------------------------------------------------------------------------------------------ configs give real maps
def _config_native(path):
    import yaml

    import models
    from models.explainers import create_explainer

    cfg = yaml.safe_load(open(path))
    init = cfg["model"]["init_args"]
    size = cfg["data"]["init_args"]["image_size"]
    m = models.create_model(init["model"], num_classes=6, **(init.get("model_kwargs") or {}))
    x = torch.zeros(1, 3, size, size)
    return native_resolution(create_explainer("gradcam", m), m, x)


@pytest.mark.parametrize("cfg,side", [("configs/baseline/synthetic.yaml", 7),
                                      ("configs/guided_gradients/synthetic.yaml", MIN_NATIVE_SIDE),
                                      ("configs/guided_gradients/cifar100_resnet18.yaml", MIN_NATIVE_SIDE),
                                      ("configs/guided_gradients/cifar100_mobilenetv2.yaml", MIN_NATIVE_SIDE)])
def test_config_default_layer_gives_real_maps(cfg, side):
    """The main job explains a >= 7x7 layer (the evidence protocol); the guided-gradient configs >= 4x4."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = _config_native(os.path.join(root, cfg))
    assert min(res) >= side, (cfg, res)


# ------------------------------------------------------------------------------------------ eval.py
@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    import models

    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    w = d / "tiny.safetensors"
    models.save_weights(models.create_model("baseline", backbone="resnet18", num_classes=3), w)
    cfg = d / "data.yaml"
    cfg.write_text("data:\n  class_path: trainers.data.SyntheticShapesDataModule\n  init_args:\n"
                   "    num_classes: 3\n    image_size: 64\n    train_size: 4\n    val_size: 4\n    test_size: 4\n"
                   "    batch_size: 4\n")
    return ["--weights", str(w), "--model", "baseline", "--model-kwargs", '{"backbone": "resnet18"}',
            "--data-config", str(cfg), "--device", "cpu"]


def test_eval_default_run_has_controls_and_target_layers(tiny_weights, tmp_path, capsys):
    import eval as eval_script

    out = tmp_path / "eval"
    eval_script.main(tiny_weights + ["--out", str(out), "--max-images", "4", "--steps", "4", "--grid-images", "2",
                                     "--target-layers", "-3"])
    js = json.loads((out / "interpretability_test.json").read_text())
    assert set(js["results"]) >= {"intrinsic", "gradcam", "random", "gaussian", "fakecam", "colorcontrast", "edges",
                                  "untrained"}
    maps = js["meta"]["maps"]
    assert maps["gradcam"]["native_resolution"] == [8, 8] and maps["gradcam"]["localisation"] == "computed"
    assert maps["intrinsic"]["native_resolution"] == [2, 2] and maps["intrinsic"]["localisation"] == "refused"
    assert js["results"]["intrinsic"]["pg"] is None and js["results"]["gradcam"]["pg"] is not None
    md = (out / "interpretability_test.md").read_text()
    assert "| control | map |" in md and "localisation refused" in md
    assert (out / "overlays_test.png").stat().st_size > 5000
    printed = capsys.readouterr().out
    assert "note: intrinsic" in printed and str(out / "overlays_test.png") in printed
    with pytest.raises(SystemExit, match="target-layers"):
        eval_script.main(tiny_weights + ["--out", str(out), "--target-layers", "backbone.nope"])


def test_eval_explain_own_images(tiny_weights, tmp_path):
    from PIL import Image

    import eval as eval_script

    folder = tmp_path / "mine"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, size in enumerate((64, 100)):  # any size: resized to the training size
        arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "eval"
    res = eval_script.main(tiny_weights + ["--out", str(out), "--explain", str(folder)])
    assert [os.path.basename(r["image"]) for r in res["images"]] == ["img0.png", "img1.png"]
    for r in res["images"]:
        assert 0 < r["confidence"] <= 1 and r["pred"] in ("circle", "square", "triangle")
        assert os.path.getsize(r["overlay"]) > 3000
    assert json.loads((out / "explain" / "predictions.json").read_text())["images"][0]["top"][0]["p"] > 0
    with pytest.raises(SystemExit, match="PNG/JPEG"):
        eval_script.main(tiny_weights + ["--out", str(out), "--explain", str(folder / "notes.txt")])


def test_export_warns_on_blank_saliency(tmp_path):
    """export's "saliency diff 0.0" between two blank maps is flagged (ResNet-18 at 32 px: a 1x1 last stage)."""
    pytest.importorskip("onnxruntime")
    import models
    from models.export import export_onnx, verify_onnx

    m = models.create_model("baseline", backbone="resnet18", num_classes=3).eval()
    x = torch.rand(2, 3, 32, 32)
    rep = verify_onnx(export_onnx(m, str(tmp_path / "m.onnx"), x), m, x)
    assert "2/2 saliency maps are constant" in rep["saliency_warning"]
