"""The embedded benchmark and the DataModules."""
import numpy as np
import pytest
import torch

from trainers.data import (DatasetMissingError, SyntheticShapes, SyntheticShapesDataModule, SyntheticVolumes,
                           TorchvisionDataModule, VolumeFolderDataModule)
from trainers.data.datamodules import EpochShuffleSampler
from trainers.data.synthetic import flip_batch


def test_shapes_are_deterministic_and_masks_match_labels():
    a = SyntheticShapes("train", 12, num_classes=6, image_size=48, seed=3)
    b = SyntheticShapes("train", 12, num_classes=6, image_size=48, seed=3)
    c = SyntheticShapes("val", 12, num_classes=6, image_size=48, seed=3)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    for i in range(len(a)):
        s = a[i]
        assert s["image"].shape == (3, 48, 48) and 0 <= s["image"].min() and s["image"].max() <= 1
        present = set(s["mask"].unique().tolist()) - {0}
        assert present == {int(s["label"]) + 1}
        cls, x0, y0, x1, y1 = s["boxes"][0].tolist()
        ys, xs = torch.nonzero(s["mask"] > 0, as_tuple=True)
        assert (cls, x0, y0, x1, y1) == (s["label"].item(), xs.min().item(), ys.min().item(), xs.max().item() + 1,
                                         ys.max().item() + 1)
    assert [int(a[i]["label"]) for i in range(6)] == list(range(6))  # balanced


def test_multilabel_and_volumes():
    ds = SyntheticShapes("train", 10, num_classes=5, image_size=64, multilabel=True, max_objects=3)
    for i in range(len(ds)):
        s = ds[i]
        assert s["label"].dtype == torch.float32 and 1 <= s["label"].sum() <= 3
        assert set(s["mask"].unique().tolist()) - {0} <= {c + 1 for c in torch.nonzero(s["label"]).flatten().tolist()}
    v = SyntheticVolumes("test", 4, num_classes=3, image_size=24)
    s = v[0]
    assert s["image"].shape == (1, 24, 24, 24) and s["mask"].shape == (24, 24, 24)
    assert set(s["mask"].unique().tolist()) == {0, int(s["label"]) + 1}


def test_bad_benchmark_arguments():
    with pytest.raises(ValueError, match="num_classes must be in"):
        SyntheticShapesDataModule(num_classes=50)
    with pytest.raises(ValueError, match="image_size must be in"):
        SyntheticShapes("train", 2, image_size=8)


def test_flip_batch_moves_masks_and_boxes():
    ds = SyntheticShapes("train", 4, image_size=32)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    flip = torch.tensor([True, False, True, False])
    out = flip_batch(batch, flip)
    assert torch.equal(out["image"][0], batch["image"][0].flip(-1)) and torch.equal(out["image"][1], batch["image"][1])
    for i in range(4):
        ys, xs = torch.nonzero(out["mask"][i] > 0, as_tuple=True)
        assert out["boxes"][i, 0, 1] == xs.min() and out["boxes"][i, 0, 3] == xs.max() + 1


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    s = EpochShuffleSampler(range(50), seed=1)
    s.set_epoch(3)
    first = list(s)
    s.set_epoch(4)
    assert list(s) != first
    s2 = EpochShuffleSampler(range(50), seed=1)
    s2.set_epoch(3)
    assert list(s2) == first and sorted(first) == list(range(50))
    # same permutation as DistributedSampler: the union of the ranks' shares is the single-device order
    shares = []
    for r in range(2):
        d = torch.utils.data.DistributedSampler(range(50), num_replicas=2, rank=r, shuffle=True, seed=1)
        d.set_epoch(3)
        shares.append(list(d))
    assert sorted(shares[0][:5] + shares[1][:5]) == sorted(first[:10])


def test_missing_real_datasets_say_how_to_get_them(tmp_path):
    dm = TorchvisionDataModule("cifar10", root=str(tmp_path))
    with pytest.raises(DatasetMissingError, match="download: true"):
        dm.setup("fit")
    dm = TorchvisionDataModule("imagefolder", root=str(tmp_path))
    with pytest.raises(DatasetMissingError, match="<class>"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
        TorchvisionDataModule("mnist")


def test_imagefolder_and_volume_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.uint8(np.random.rand(40, 40, 3) * 255)).save(tmp_path / "img" / split / c / f"{i}.png")
            (tmp_path / "vol" / split / c).mkdir(parents=True)
            np.save(tmp_path / "vol" / split / c / "a.npy", np.random.rand(10, 12, 14).astype(np.float32))
    dm = TorchvisionDataModule("imagefolder", root=str(tmp_path / "img"), image_size=32, batch_size=2, num_workers=0)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert dm.num_classes == 2 and b["image"].shape == (2, 3, 32, 32) and b["image"].max() <= 1
    vm = VolumeFolderDataModule(root=str(tmp_path / "vol"), image_size=16, batch_size=2, num_workers=0)
    vm.setup("fit")
    b = next(iter(vm.val_dataloader()))
    assert vm.num_classes == 2 and b["image"].shape == (2, 1, 16, 16, 16)
    with pytest.raises(DatasetMissingError, match="Arrange"):
        VolumeFolderDataModule(root=str(tmp_path / "nowhere")).setup("fit")
