"""LightningDataModules: the embedded benchmark (2D shapes, 3D volumes) and real datasets.

Every DataModule has train / val / test splits (checkpoints are selected on ``val``; ``test`` is only
for the final number), yields dict batches (``image`` in [0, 1], ``label``, and where available
``mask``/``boxes`` ground truth), and exposes ``num_classes``, ``multilabel``, ``in_chans``,
``spatial_dims`` and ``class_names`` (``train.py`` links them into the model).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .synthetic import SHAPES_2D, SHAPES_3D, SyntheticShapes, SyntheticVolumes, flip_batch

__all__ = ["EpochShuffleSampler", "ZooDataModule", "SyntheticShapesDataModule", "SyntheticVolumesDataModule", "TorchvisionDataModule",
           "VolumeFolderDataModule", "DatasetMissingError"]


class DatasetMissingError(FileNotFoundError):
    """The dataset is not on disk (and could not be downloaded)."""


class EpochShuffleSampler(torch.utils.data.RandomSampler):
    """Random order that is a pure function of ``(seed, epoch)``: ``randperm(n)`` seeded with
    ``seed + epoch``, the rule of ``DistributedSampler`` (whose seed Lightning takes from
    ``PL_GLOBAL_SEED``, i.e. ``seed_everything``).

    * Lightning calls ``set_epoch`` every epoch, so a run resumed from ``last.ckpt`` sees exactly the
      order the uninterrupted run would have seen (a plain ``shuffle=True`` draws from the global RNG).
    * Under DDP Lightning swaps in a ``DistributedSampler`` over the same permutation, so N devices with
      batch b see exactly the global batches of one device with batch N*b.
    """

    def __init__(self, data_source, seed: Optional[int] = None) -> None:
        super().__init__(data_source)  # a RandomSampler, so Lightning knows the training split is shuffled
        self.n, self.seed, self.epoch = len(data_source), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        g = torch.Generator().manual_seed(seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class ZooDataModule(pl.LightningDataModule):
    """Common loaders and metadata."""

    num_classes: int = 0
    multilabel: bool = False
    in_chans: int = 3
    spatial_dims: int = 2
    class_names: List[str] = []

    #: seed of the epoch-wise shuffling and of batch augmentation (set by subclasses)
    seed: int = 0
    #: random horizontal flips applied to training batches (``on_after_batch_transfer``)
    augment: bool = False

    def __init__(self, batch_size: int = 64, num_workers: int = 0, eval_batch_size: Optional[int] = None) -> None:
        super().__init__()
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def _loader(self, ds: Optional[Dataset], train: bool) -> DataLoader:
        if ds is None:
            self.setup("fit")
            ds = self.train_set if train else self.val_set
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size,
                          sampler=EpochShuffleSampler(ds) if train else None, drop_last=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Random horizontal flips of training batches, seeded by (seed, global step, rank): resuming from a
        checkpoint replays exactly the same augmentation, and every DDP rank draws its own flips."""
        trainer = self._trainer if hasattr(self, "_trainer") else None
        if self.augment and trainer is not None and trainer.training and isinstance(batch, dict):
            g = torch.Generator().manual_seed(hash((self.seed, trainer.global_step, trainer.global_rank)) % (2 ** 62))
            flip = (torch.rand(batch["image"].shape[0], generator=g) < 0.5).to(batch["image"].device)
            batch = flip_batch(batch, flip)
        return batch

    def train_dataloader(self):
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False)

    def test_dataloader(self):
        if self.test_set is None:
            self.setup("test")
        return self._loader(self.test_set, False)

    def predict_dataloader(self):
        return self.test_dataloader()


class _SyntheticDataModule(ZooDataModule):
    """Builds the three splits of a procedural dataset (``dataset_cls``) with the same generator kwargs."""

    dataset_cls: type = SyntheticShapes
    kw: Dict[str, Any]
    sizes: Dict[str, int]

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.train_set = self.dataset_cls("train", self.sizes["train"], **self.kw)
            self.val_set = self.dataset_cls("val", self.sizes["val"], **self.kw)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self.dataset_cls("test", self.sizes["test"], **self.kw)


class SyntheticShapesDataModule(_SyntheticDataModule):
    """The embedded 2D benchmark (``trainers/data/synthetic.py``), single- or multi-label.

    Args:
        num_classes: 2..10 shape classes.
        image_size: 32..224 pixels.
        train_size / val_size / test_size: number of images per split.
        multilabel: several objects per image, multi-hot labels (for multi-label / WSSS).
        max_objects: objects per image in multi-label mode.
        num_distractors: bars/arcs of no class per image.
        object_scale: ``[min, max]`` object radius as a fraction of the image side (default 0.20-0.32;
            0.15-0.24 in multi-label mode). Larger objects make the task easier at small image sizes.
        augment: random horizontal flips for training.
        seed: the benchmark's seed (data are a pure function of it).
    """

    def __init__(self, num_classes: int = 6, image_size: int = 64, train_size: int = 3000, val_size: int = 600,
                 test_size: int = 600, multilabel: bool = False, max_objects: int = 3, num_distractors: int = 2,
                 object_scale: Optional[List[float]] = None, augment: bool = True, seed: int = 0,
                 batch_size: int = 64, num_workers: int = 0, eval_batch_size: Optional[int] = None) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.save_hyperparameters()
        if not 2 <= num_classes <= len(SHAPES_2D):
            raise ValueError(f"num_classes must be in [2, {len(SHAPES_2D)}] for the shapes benchmark, got {num_classes}.")
        self.num_classes, self.multilabel, self.in_chans, self.spatial_dims = num_classes, multilabel, 3, 2
        self.class_names = list(SHAPES_2D[:num_classes])
        self.kw = dict(num_classes=num_classes, image_size=image_size, multilabel=multilabel, max_objects=max_objects,
                       num_distractors=num_distractors, seed=seed, object_scale=object_scale)
        self.sizes = dict(train=train_size, val=val_size, test=test_size)
        self.augment, self.seed = augment, seed



class SyntheticVolumesDataModule(_SyntheticDataModule):
    """The embedded 3D benchmark: one-channel volumes with class-defined structures."""

    dataset_cls = SyntheticVolumes

    def __init__(self, num_classes: int = 4, image_size: int = 32, train_size: int = 400, val_size: int = 100,
                 test_size: int = 100, multilabel: bool = False, max_objects: int = 2, augment: bool = True,
                 seed: int = 0, batch_size: int = 16, num_workers: int = 0, eval_batch_size: Optional[int] = None) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.save_hyperparameters()
        if not 2 <= num_classes <= len(SHAPES_3D):
            raise ValueError(f"num_classes must be in [2, {len(SHAPES_3D)}] for the volumes benchmark, got {num_classes}.")
        self.num_classes, self.multilabel, self.in_chans, self.spatial_dims = num_classes, multilabel, 1, 3
        self.class_names = list(SHAPES_3D[:num_classes])
        self.kw = dict(num_classes=num_classes, image_size=image_size, multilabel=multilabel, max_objects=max_objects,
                       seed=seed)
        self.sizes = dict(train=train_size, val=val_size, test=test_size)
        self.augment, self.seed = augment, seed



# ---------------------------------------------------------------------------------------------
# Real datasets (torchvision)
# ---------------------------------------------------------------------------------------------
_VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
                "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
_HOW_TO_GET = {
    "cifar10": "pass download: true (data.init_args.download=true) with internet, or place cifar-10-batches-py/ in {root}",
    "cifar100": "pass download: true with internet, or place cifar-100-python/ in {root}",
    "stl10": "pass download: true with internet, or place stl10_binary/ in {root}",
    "voc2012": "pass download: true with internet, or place VOCdevkit/VOC2012/ in {root}",
    "imagefolder": "arrange images as {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg (optionally {root}/test/); "
                   "for ImageNet extract ILSVRC2012 into that layout, for CUB use the train/test split lists",
}


class _DictDataset(Dataset):
    """Wrap a torchvision (image, target) dataset into the zoo's dict batches."""

    def __init__(self, ds: Dataset, transform, kind: str, num_classes: int) -> None:
        self.ds, self.transform, self.kind, self.num_classes = ds, transform, kind, num_classes

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        from torchvision import tv_tensors

        try:
            img, target = self.ds[i]
        except OSError as e:  # PIL: truncated / corrupt image (its message names no file)
            samples = getattr(self.ds, "samples", None) or getattr(self.ds, "images", None)
            where = samples[i][0] if samples and isinstance(samples[i], tuple) else samples[i] if samples else f"item {i}"
            raise OSError(f"Could not read image {where!r} ({type(e).__name__}: {e}): the file is truncated or "
                          "corrupt. Re-download or delete it.") from None
        if self.kind == "voc":  # segmentation mask -> multi-hot label + class map (0 bg, c+1, 255 ignore)
            mask = tv_tensors.Mask(torch.as_tensor(__import__("numpy").array(target), dtype=torch.long))
            img, mask = self.transform(tv_tensors.Image(_to_tensor(img)), mask)
            label = torch.zeros(self.num_classes)
            present = mask.unique()
            present = present[(present > 0) & (present < 255)]
            label[present - 1] = 1.0
            mask = mask.clone()
            mask[mask == 255] = 0
            return {"image": img.as_subclass(torch.Tensor), "label": label, "mask": mask.as_subclass(torch.Tensor)}
        img = self.transform(tv_tensors.Image(_to_tensor(img)))
        return {"image": img.as_subclass(torch.Tensor), "label": torch.tensor(int(target))}


def _align_classes(ds, classes: List[str]):
    """Index an ImageFolder split with the **train** class list (torchvision indexes each folder on its own, so
    a split missing a class would be silently mislabelled); a class that train does not have is an error."""
    unknown = sorted(set(ds.classes) - set(classes))
    if unknown:
        raise ValueError(f"{ds.root}: class folder(s) {unknown} do not exist in train/ (classes {classes}); "
                         "every val/test class must also be a train class. Rename or remove them.")
    idx = {c: i for i, c in enumerate(classes)}
    remap = [idx[c] for c in ds.classes]
    ds.samples = [(p, remap[t]) for p, t in ds.samples]
    ds.imgs, ds.targets = ds.samples, [t for _, t in ds.samples]
    ds.classes, ds.class_to_idx = list(classes), dict(idx)
    return ds


def _to_tensor(img):
    from torchvision.transforms.v2 import functional as TF

    return TF.to_dtype(TF.to_image(img), torch.float32, scale=True)


class TorchvisionDataModule(ZooDataModule):
    """CIFAR-10/100, STL-10, ImageFolder (ImageNet, CUB, any folder) and PASCAL VOC 2012 (multi-label).

    Args:
        name: ``cifar10`` | ``cifar100`` | ``stl10`` | ``imagefolder`` | ``voc2012``.
        root: data directory.
        download: let torchvision download the data (needs internet; ImageFolder never downloads).
        image_size: training crop / evaluation size.
        val_fraction: held-out fraction of the training split used for validation when the dataset has
            no validation split of its own (CIFAR, STL-10); the official test split stays the test set.
        augment: RandomResizedCrop + flip for training; otherwise resize.
    """

    def __init__(self, name: str = "cifar10", root: str = "data", download: bool = False, image_size: int = 224,
                 val_fraction: float = 0.1, augment: bool = True, seed: int = 0, batch_size: int = 64,
                 num_workers: int = 4, eval_batch_size: Optional[int] = None) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.save_hyperparameters()
        name = name.lower()
        if name not in _HOW_TO_GET:
            raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(_HOW_TO_GET)} "
                             "(or SyntheticShapesDataModule for the embedded benchmark).")
        self.name, self.root, self.download = name, os.path.expanduser(root), download
        self.image_size, self.val_fraction, self.seed = image_size, val_fraction, seed
        self.tv_augment = augment  # torchvision transforms (crop + flip) in the datasets
        self.multilabel = name == "voc2012"
        self.num_classes, self.class_names = self._meta()

    def _meta(self):
        if self.name == "cifar10":
            return 10, ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        if self.name == "cifar100":
            return 100, [str(i) for i in range(100)]
        if self.name == "stl10":
            return 10, ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
        if self.name == "voc2012":
            return 20, list(_VOC_CLASSES)
        train_dir = os.path.join(self.root, "train")
        if not os.path.isdir(train_dir):
            return 0, []  # resolved (with a clear error) in setup
        classes = sorted(d.name for d in os.scandir(train_dir) if d.is_dir())
        return len(classes), classes

    def _transforms(self, train: bool):
        from torchvision.transforms import v2 as T

        s = self.image_size
        if train and self.tv_augment:
            return T.Compose([T.RandomResizedCrop(s, scale=(0.35, 1.0), antialias=True), T.RandomHorizontalFlip()])
        return T.Compose([T.Resize(s, antialias=True), T.CenterCrop(s)])

    def _missing(self, err: Exception):
        how = _HOW_TO_GET[self.name].format(root=self.root)
        raise DatasetMissingError(f"Dataset {self.name!r} was not found under {self.root!r} ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:160]}). To get it: {how}.") from None

    def prepare_data(self) -> None:
        if self.download and self.name != "imagefolder":
            try:
                self._raw("train", download=True)
                self._raw("test", download=True)
            except Exception as e:
                self._missing(e)

    def _raw(self, split: str, download: bool = False):
        from torchvision import datasets

        if self.name == "cifar10":
            return datasets.CIFAR10(self.root, train=split == "train", download=download)
        if self.name == "cifar100":
            return datasets.CIFAR100(self.root, train=split == "train", download=download)
        if self.name == "stl10":
            return datasets.STL10(self.root, split="train" if split == "train" else "test", download=download)
        if self.name == "voc2012":
            return datasets.VOCSegmentation(self.root, year="2012", image_set="train" if split == "train" else "val",
                                            download=download)
        folder = os.path.join(self.root, split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no folder {folder}")
        return datasets.ImageFolder(folder)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        kind = "voc" if self.name == "voc2012" else "cls"
        try:
            train_raw = self._raw("train")
            if self.name == "imagefolder":
                self.num_classes, self.class_names = len(train_raw.classes), list(train_raw.classes)
                val_raw = _align_classes(self._raw("val"), self.class_names)
                test_dir = os.path.join(self.root, "test")
                test_raw = _align_classes(self._raw("test"), self.class_names) if os.path.isdir(test_dir) else val_raw
            else:
                test_raw = self._raw("test")
                val_raw = None
        except (RuntimeError, FileNotFoundError, OSError) as e:
            self._missing(e)
        wrap = lambda ds, train: _DictDataset(ds, self._transforms(train), kind, self.num_classes)  # noqa: E731
        if val_raw is None and self.name != "voc2012":
            n = len(train_raw)
            g = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(n, generator=g).tolist()
            n_val = int(round(n * self.val_fraction))
            self.train_set = Subset(wrap(train_raw, True), perm[n_val:])
            self.val_set = Subset(wrap(train_raw, False), perm[:n_val])
        elif self.name == "voc2012":  # VOC test annotations are not public: hold out part of train for val
            n = len(train_raw)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = int(round(n * self.val_fraction))
            self.train_set = Subset(wrap(train_raw, True), perm[n_val:])
            self.val_set = Subset(wrap(train_raw, False), perm[:n_val])
        else:
            self.train_set, self.val_set = wrap(train_raw, True), wrap(val_raw, False)
        self.test_set = wrap(test_raw, False)


class _VolumeFolder(Dataset):
    """``root/<split>/<class>/*.npy|*.npz|*.nii[.gz]`` volumes, resized to ``size``^3, scaled to [0, 1]."""

    EXTS = (".npy", ".npz", ".nii", ".nii.gz")

    def __init__(self, folder: str, classes: List[str], size, items: Optional[List] = None, brain_crop: bool = False,
                 spacing=None) -> None:
        self.items = list(items) if items is not None else []
        for ci, c in enumerate(classes if items is None else []):
            d = os.path.join(folder, c)
            for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                if f.endswith(self.EXTS):
                    self.items.append((os.path.join(d, f), ci))
        self.size = (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
        self.brain_crop, self.spacing = brain_crop, spacing

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import numpy as np

        path, label = self.items[i]
        if path.endswith(".npy"):
            vol = np.load(path, allow_pickle=False)
        elif path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                vol = z[z.files[0]]
        else:
            try:
                import nibabel
            except ImportError:
                raise ImportError(f"{path} is NIfTI: pip install nibabel to read it (or convert to .npy).") from None
            vol = _read_nifti(path, self.spacing)
        v = torch.as_tensor(vol, dtype=torch.float32)
        if not torch.isfinite(v).all():
            raise ValueError(f"{path}: the volume has {int((~torch.isfinite(v)).sum())} NaN/inf voxels. Fix the file "
                             "(e.g. numpy.nan_to_num) or remove it.")
        if v.dim() == 3:
            v = v[None]
        if v.dim() != 4:
            raise ValueError(f"{path}: expected a 3D volume (D, H, W) or (C, D, H, W), got shape {tuple(v.shape)}.")
        if self.brain_crop:
            v = _brain_crop(v)
        v = torch.nn.functional.interpolate(v[None], size=self.size, mode="trilinear", align_corners=False)[0]
        lo, hi = v.amin(), v.amax()
        v = (v - lo) / (hi - lo + 1e-8)
        return {"image": v, "label": torch.tensor(label)}


def _read_nifti(path: str, spacing=None):
    """A NIfTI volume as a float array; with ``spacing`` (mm, float or 3) resampled by torchio (linear)."""
    if spacing is None:
        import nibabel
        import numpy as np

        return np.asarray(nibabel.load(path).get_fdata(dtype=np.float32))
    try:
        import torchio as tio
    except ImportError:
        raise ImportError("spacing= resamples with torchio: pip install torchio (or pre-resample the volumes).") from None
    img = tio.Resample(tuple(spacing) if isinstance(spacing, (list, tuple)) else float(spacing))(tio.ScalarImage(path))
    return img.data.numpy()


def _brain_crop(v: torch.Tensor, frac: float = 0.05, margin: int = 2) -> torch.Tensor:
    """Crop ``(C, D, H, W)`` to the bounding box of voxels above ``frac`` of the intensity range (+ margin)."""
    lo, hi = v.amin(), v.amax()
    fg = (v > lo + frac * (hi - lo)).any(0)
    if not fg.any():
        return v
    idx = fg.nonzero()
    a = (idx.amin(0) - margin).clamp(min=0)
    b = torch.minimum(idx.amax(0) + margin + 1, torch.tensor(fg.shape))
    return v[:, a[0]:b[0], a[1]:b[1], a[2]:b[2]]


def _read_split_csv(path: str, root: str):
    """``path,label`` rows (header required; paths relative to ``root``) -> [(abs path, label string)]."""
    import csv

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: the CSV needs a header with the columns 'path,label' (got {reader.fieldnames}).")
        rows = [(os.path.join(root, r["path"].strip()), r["label"].strip()) for r in reader]
    missing = [p for p, _ in rows if not os.path.isfile(p)]
    if missing:
        raise DatasetMissingError(f"{path}: {len(missing)} listed volume(s) do not exist, e.g. {missing[0]!r} "
                                  "(paths are relative to the data root).")
    return rows


class VolumeFolderDataModule(ZooDataModule):
    """A folder of 3D volumes (``.npy``/``.npz``, NIfTI ``.nii``/``.nii.gz`` via nibabel), scaled to [0, 1].

    Labels: class folders ``root/{train,val,test}/<class>/*``, or (``labels="csv"``, automatic when
    ``root/train.csv`` exists) one CSV per split ``root/{train,val,test}.csv`` with a ``path,label`` header
    (paths relative to ``root``). ``image_size``: int or (D, H, W). ``brain_crop``: crop to the foreground
    bounding box first. ``spacing``: resample NIfTI volumes to this voxel size in mm (torchio) first.
    """

    def __init__(self, root: str = "data/volumes", image_size=64, in_chans: int = 1, batch_size: int = 8,
                 num_workers: int = 2, eval_batch_size: Optional[int] = None, labels: str = "auto",
                 brain_crop: bool = False, spacing=None) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.save_hyperparameters()
        self.root, self.image_size = os.path.expanduser(root), image_size
        self.in_chans, self.spatial_dims = in_chans, 3
        if labels not in ("auto", "folders", "csv"):
            raise ValueError(f"labels must be 'auto', 'folders' or 'csv', got {labels!r}.")
        self.use_csv = labels == "csv" or (labels == "auto" and os.path.isfile(os.path.join(self.root, "train.csv")))
        self.brain_crop, self.spacing = brain_crop, spacing
        train = os.path.join(self.root, "train")
        if self.use_csv:
            csv_path = os.path.join(self.root, "train.csv")
            rows = _read_split_csv(csv_path, self.root) if os.path.isfile(csv_path) else []
            self.class_names = sorted({lab for _, lab in rows}, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
        else:
            self.class_names = sorted(d.name for d in os.scandir(train) if d.is_dir()) if os.path.isdir(train) else []
        self.num_classes = len(self.class_names)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        if self.use_csv:
            self._setup_csv()
            return
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(self.root, split)):
                raise DatasetMissingError(f"Volume folder {os.path.join(self.root, split)!r} is missing. Arrange "
                                          f"volumes as {self.root}/{{train,val,test}}/<class>/*.npy (or .npz/.nii.gz).")
        mk = lambda s: _VolumeFolder(os.path.join(self.root, s), self.class_names, self.image_size,  # noqa: E731
                                     brain_crop=self.brain_crop, spacing=self.spacing)
        self.train_set, self.val_set = mk("train"), mk("val")
        self.test_set = mk("test") if os.path.isdir(os.path.join(self.root, "test")) else self.val_set
        if len(self.train_set) == 0:
            raise DatasetMissingError(f"No volumes ({', '.join(_VolumeFolder.EXTS)}) under {self.root}/train/<class>/.")

    def _setup_csv(self) -> None:
        """Splits from ``root/{train,val,test}.csv`` (``path,label``); labels must be among train's classes."""
        sets = {}
        for split in ("train", "val", "test"):
            p = os.path.join(self.root, f"{split}.csv")
            if not os.path.isfile(p):
                if split == "test":
                    continue
                raise DatasetMissingError(f"{p!r} is missing: with labels from CSV, write root/{{train,val,test}}.csv "
                                          "with a 'path,label' header (paths relative to root).")
            rows = _read_split_csv(p, self.root)
            unknown = sorted({lab for _, lab in rows} - set(self.class_names))
            if unknown:
                raise ValueError(f"{p}: labels {unknown} do not occur in train.csv (classes {self.class_names}).")
            items = [(path, self.class_names.index(lab)) for path, lab in rows]
            sets[split] = _VolumeFolder(self.root, self.class_names, self.image_size, items=items,
                                        brain_crop=self.brain_crop, spacing=self.spacing)
        self.train_set, self.val_set = sets["train"], sets["val"]
        self.test_set = sets.get("test", self.val_set)
        if len(self.train_set) == 0:
            raise DatasetMissingError(f"{os.path.join(self.root, 'train.csv')} lists no volumes.")
