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


# ---- 5: a diverged run stops; evaluation refuses non-finite logits ------------------------------------
def _tiny_dm(**kw):
    from trainers.data import SyntheticShapesDataModule

    args = dict(num_classes=3, image_size=32, train_size=48, val_size=8, test_size=8, batch_size=16, augment=False)
    return SyntheticShapesDataModule(**{**args, **kw})


def test_nonfinite_loss_stops_training(tmp_path):
    import pytorch_lightning as pl

    from models.base import NonFiniteError
    from trainers.classification import ClassificationModule

    class Diverging(ClassificationModule):
        def compute_loss(self, batch, stage):
            out = super().compute_loss(batch, stage)
            if stage == "train" and self.global_step >= 1:
                out["loss"] = out["loss"] * float("nan")  # what lr=1e6 produces after a step or two
            return out

    m = Diverging(model="baseline", model_kwargs={"backbone": "resnet18"}, num_classes=3)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(NonFiniteError, match="diverged.*step 1.*[Ll]ower the learning rate"):
        trainer.fit(m, datamodule=_tiny_dm())


def test_eval_refuses_nonfinite_logits():
    import eval as eval_script

    model = models.create_model("baseline", num_classes=3, backbone="resnet18")
    with torch.no_grad():
        model.fc.bias.fill_(float("inf"))
    loader = [{"image": torch.rand(2, 3, 32, 32), "label": torch.tensor([0, 1])}]
    with pytest.raises(ValueError, match="NaN/inf logits.*diverged"):
        eval_script.evaluate_accuracy(model, loader, 3, False)


# ---- 6: NaN/inf, integer and 0-255 / normalised inputs are refused with the fix --------------------------
def test_bad_input_values_refused():
    from models.base import NonFiniteError

    m = models.create_model("baseline", num_classes=3, backbone="resnet18").eval()
    x = torch.rand(2, 3, 32, 32)
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="1 NaN/inf"):
        m(bad)
    with pytest.raises(NonFiniteError):  # the saliency used to be all-zero and finite, hiding the NaN logits
        m.forward_explain(bad.clone().fill_(float("inf")))
    with pytest.raises(TypeError, match=r"uint8 pixels.*/ 255"):
        m((x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="0-255 values.*255"):
        m(x * 255)
    with pytest.raises(ValueError, match="Do not normalise"):
        m((x - 0.45) / 0.225)
    m(x), m(x.double().float())  # [0, 1] passes


# ---- 7: ImageFolder val/test use the train class list ------------------------------------------------
def _png(path, color=(120, 30, 200)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), color).save(path)


def test_imagefolder_splits_use_train_classes(tmp_path):
    from trainers.data import TorchvisionDataModule

    for c in ("cat", "dog", "fox"):
        _png(tmp_path / "train" / c / "a.png")
    _png(tmp_path / "val" / "cat" / "a.png")
    _png(tmp_path / "val" / "fox" / "a.png")  # no dog in val: torchvision alone would index fox as 1
    dm = TorchvisionDataModule(name="imagefolder", root=str(tmp_path), image_size=8, augment=False, num_workers=0)
    dm.setup("fit")
    assert [int(dm.val_set[i]["label"]) for i in range(len(dm.val_set))] == [0, 2]
    _png(tmp_path / "test" / "wolf" / "a.png")
    dm = TorchvisionDataModule(name="imagefolder", root=str(tmp_path), image_size=8, augment=False, num_workers=0)
    with pytest.raises(ValueError, match=r"\['wolf'\] do not exist in train"):
        dm.setup("fit")


# ---- 17: a truncated JPEG names its file ---------------------------------------------------------------
def test_truncated_jpeg_names_the_file(tmp_path):
    from PIL import Image

    from trainers.data import TorchvisionDataModule

    for c in ("a", "b"):
        _png(tmp_path / "train" / c / "ok.png")
        _png(tmp_path / "val" / c / "ok.png")
    bad = tmp_path / "train" / "b" / "broken.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(bad, quality=95)
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    dm = TorchvisionDataModule(name="imagefolder", root=str(tmp_path), image_size=8, augment=False, num_workers=0)
    dm.setup("fit")
    idx = [i for i, (p, _) in enumerate(dm.train_set.ds.samples) if p.endswith("broken.jpg")][0]
    with pytest.raises(OSError, match="broken.jpg.*truncated or corrupt"):
        dm.train_set[idx]


# ---- 8: typos in optimizer / scheduler dicts are errors naming the key and the accepted ones ------------
def test_unknown_optimizer_and_scheduler_keys():
    from trainers.classification import ClassificationModule

    kw = dict(model="baseline", model_kwargs={"backbone": "resnet18"}, num_classes=3)
    with pytest.raises(ValueError, match=r"'eta_mn' in scheduler \(cosine\); accepted: .*eta_min.*did you mean 'eta_mn' -> 'eta_min'"):
        ClassificationModule(**kw, scheduler={"name": "cosine", "eta_mn": 1e-5})
    with pytest.raises(ValueError, match=r"'momentun' in optimizer \(sgd\).*momentum"):
        ClassificationModule(**kw, optimizer={"name": "sgd", "lr": 0.1, "momentun": 0.9})
    with pytest.raises(ValueError, match="'lr_scale' in param_groups"):
        ClassificationModule(**kw, param_groups=[{"params": "^fc", "lr_scale": 2}])
    ClassificationModule(**kw, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
                         scheduler={"name": "cosine", "eta_min": 1e-5, "warmup": 2, "interval": "step"})


def test_shipped_configs_pass_the_key_check():
    import glob
    import importlib
    import os

    import yaml

    from trainers.classification import check_optim_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(root, "configs", "*", "*.yaml")))
    assert files
    for path in files:
        with open(path) as f:
            model = (yaml.safe_load(f) or {}).get("model") or {}
        mod, _, name = model.get("class_path", "trainers.classification.ClassificationModule").rpartition(".")
        cls = getattr(importlib.import_module(mod), name)
        a = model.get("init_args") or {}
        check_optim_config(a.get("optimizer"), a.get("param_groups"), a.get("scheduler"), cls.extra_scheduler_keys)


# ---- 13: volumes with NaN are refused with the file name ----------------------------------------------
def test_volume_with_nan_names_the_file(tmp_path):
    import numpy as np

    from trainers.data import VolumeFolderDataModule

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            np.save(tmp_path / split / c / "v.npy", np.random.rand(6, 6, 6).astype("float32"))
    vol = np.random.rand(6, 6, 6).astype("float32")
    vol[2, 2, 2] = np.nan
    np.save(tmp_path / "train" / "b" / "w.npy", vol)
    dm = VolumeFolderDataModule(root=str(tmp_path), image_size=4, num_workers=0)
    dm.setup("fit")
    items = [p for p, _ in dm.train_set.items]
    with pytest.raises(ValueError, match=r"w\.npy: the volume has 1 NaN/inf voxels"):
        dm.train_set[items.index(str(tmp_path / "train" / "b" / "w.npy"))]
    assert torch.isfinite(dm.train_set[0]["image"]).all()


# ---- 12, 15, 16: eval.py validates its numbers and names first; one inapplicable explainer is skipped ----
def _exported(tmp_path, name="baseline", **model_kw):
    """Weights + a tiny data config for ``eval.py --weights`` (no training needed)."""
    import yaml

    from models.weights import save_weights

    model = models.create_model(name, num_classes=3, **model_kw)
    w = tmp_path / "w" / "model.safetensors"
    w.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, str(w))
    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"class_path": "trainers.data.SyntheticShapesDataModule", "init_args": dict(
        num_classes=3, image_size=32, train_size=8, val_size=4, test_size=4, batch_size=2, augment=False)}}))
    return ["--weights", str(w), "--model", name, "--model-kwargs", __import__("json").dumps(model_kw),
            "--data-config", str(cfg), "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("flag", ["--limit-batches", "--batch-size", "--max-images"])
def test_eval_numbers_must_be_positive(flag, capsys):
    import eval as eval_script

    with pytest.raises(SystemExit):
        eval_script.main(["--checkpoint", "nowhere.ckpt", flag, "0"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_eval_validates_names_before_accuracy(tmp_path, monkeypatch):
    import eval as eval_script

    def no_accuracy(*a, **k):
        raise AssertionError("the accuracy pass ran before the names were checked")

    monkeypatch.setattr(eval_script, "evaluate_accuracy", no_accuracy)
    args = _exported(tmp_path, backbone="resnet18")
    with pytest.raises(SystemExit, match="--explainers: Unknown explainer 'gradcan'"):
        eval_script.main(args + ["--explainers", "gradcan", "--metrics", "ad"])
    with pytest.raises(SystemExit, match="--metrics: Unknown metric 'insertion_auc'"):
        eval_script.main(args + ["--explainers", "gradcam", "--metrics", "ad,insertion_auc"])


def test_eval_skips_an_explainer_that_does_not_apply(tmp_path):
    import json

    import eval as eval_script

    kw = registry_test_kwargs("exvit")
    args = _exported(tmp_path, "exvit", **kw)
    res = eval_script.main(args + ["--explainers", "ham,intrinsic", "--metrics", "ad", "--max-images", "2",
                                   "--limit-batches", "1", "--grid-images", "0", "--steps", "2"])
    skipped = res["interpretability"]["skipped"]
    assert list(skipped) == ["ham"] and "does not apply to ExViT" in skipped["ham"]
    assert "intrinsic" in res["interpretability"]["results"]
    out = tmp_path / "out"
    md = next(out.rglob("interpretability_test.md")).read_text()
    assert "| ham | does not apply" in md
    assert "ham" in json.loads(next(out.rglob("interpretability_test.json")).read_text())["skipped"]


# ---- 14: train.py prints the project's own error in one line plus a hint -------------------------------
@pytest.mark.parametrize("override,expect", [
    ("--model.init_args.model=no_such_model", "Unknown model 'no_such_model'"),
    ("--model.init_args.scheduler={name: cosine, eta_mn: 0.1}", "'eta_mn' in scheduler"),
])
def test_train_cli_prints_one_clear_line(tmp_path, capsys, override, expect):
    import os

    import train

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with pytest.raises(SystemExit) as e:
        train.main(["fit", "--config", os.path.join(root, "configs", "baseline", "synthetic.yaml"),
                    f"--trainer.default_root_dir={tmp_path}", override])
    text = str(e.value)
    assert expect in text and "Expected NoneType" not in text and "Union" not in text, text
    assert len(text.splitlines()) == 2 and text.splitlines()[1].startswith("hint:")
