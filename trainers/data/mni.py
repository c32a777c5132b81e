"""Embedded 3D benchmark on real anatomy: simulated localised atrophy on the MNI ICBM152 2009 template.

**A simulation for testing localisation, not a clinical dataset.** Every subject is a pure function of
``(seed, split, index)``:

1. the T1 template, its grey-matter map, a hippocampal region (two ellipsoids at MNI (+-26, -22, -14) mm,
   radii 7/14/7 mm) and a ventricle mask (CSF-like voxels, GM and WM < 0.2, in a central box) are loaded
   from the ``nilearn`` wheel (offline) at ``resolution`` mm (2, 3 or 4) and cropped to the brain;
2. torchio's ``RandomAffine`` and ``RandomElasticDeformation`` warp all of them together (at the target
   resolution; labels with nearest neighbour);
3. the "disease" class (label 1) gets, in subject space, grey-matter shrinkage around both hippocampi
   (``t1 <- t1 - s * gm * (t1 - csf)``) and enlarged ventricles (a ``dilation``-voxel rim around the
   ventricles pulled toward CSF intensity by ``s``); the severity ``s ~ U(severity)`` varies per subject;
4. torchio's ``RandomBiasField``, ``RandomGamma`` and ``RandomNoise`` plus a global intensity scale act on
   the image (replayed with the same seed for the healthy twin), which is clipped to [0, 1].

``mask`` (long, ``(D, H, W)``) is 2 (= class 1 + 1, the DESIGN convention) exactly where step 3 changed
the image and 0 elsewhere (all 0 for the healthy class). Global intensity is not informative: the random
scale and gamma dwarf the atrophy's effect on the mean (tested with a logistic regression).
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .datamodules import ZooDataModule

__all__ = ["MNIAtrophy", "MNIAtrophyDataModule", "load_mni_template"]

_SPLIT_ID = {"train": 0, "val": 1, "test": 2}
CLASS_NAMES = ("normal", "atrophy")
HIPPOCAMPI_MM = ((-26.0, -22.0, -14.0), (26.0, -22.0, -14.0))
HIPPO_RADII_MM = (7.0, 14.0, 7.0)


def _need(pkg: str):
    try:
        return __import__(pkg)
    except ImportError:
        raise ImportError(f"The MNI benchmark needs {pkg!r}: pip install nilearn torchio nibabel") from None


@functools.lru_cache(maxsize=4)
def load_mni_template(resolution: int = 4) -> Dict[str, np.ndarray]:
    """T1, GM, brain mask, hippocampal region and ventricles at ``resolution`` mm, cropped to the brain
    (+1 voxel). Cached per process. Arrays are float32 / bool, ``affine`` (4, 4) of the crop."""
    if resolution not in (2, 3, 4):
        raise ValueError(f"resolution must be 2, 3 or 4 (mm), got {resolution!r}.")
    _need("nilearn")
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=resolution)
    aff = t1.affine
    arr = lambda img: np.asarray(img.get_fdata(), dtype=np.float32)  # noqa: E731
    t1a = arr(t1)
    gm = arr(datasets.load_mni152_gm_template(resolution=resolution))
    wm = arr(datasets.load_mni152_wm_template(resolution=resolution))
    brain = arr(datasets.load_mni152_brain_mask(resolution=resolution)) > 0
    ijk = np.indices(t1a.shape).reshape(3, -1).T
    xyz = (ijk @ aff[:3, :3].T + aff[:3, 3]).reshape(*t1a.shape, 3)
    hippo = np.zeros(t1a.shape, bool)
    for c in HIPPOCAMPI_MM:
        hippo |= (((xyz - np.array(c)) / np.array(HIPPO_RADII_MM)) ** 2).sum(-1) <= 1
    box = (np.abs(xyz[..., 0]) < 22) & (xyz[..., 1] > -45) & (xyz[..., 1] < 25) & (xyz[..., 2] > -5) & (xyz[..., 2] < 32)
    vent = brain & box & (gm < 0.2) & (wm < 0.2)
    lo = np.maximum(np.argwhere(brain).min(0) - 1, 0)
    hi = np.minimum(np.argwhere(brain).max(0) + 2, t1a.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    crop_aff = aff.copy()
    crop_aff[:3, 3] = aff[:3, :3] @ lo + aff[:3, 3]
    out = dict(t1=t1a[sl], gm=gm[sl], brain=brain[sl], hippo=hippo[sl] & (gm[sl] > 0.1), vent=vent[sl],
               affine=crop_aff)
    out["csf"] = np.float32(t1a[vent].mean())
    out["codes"] = (out["hippo"] * 1 + out["vent"] * 2 + out["brain"] * 4).astype(np.int16)
    return out


def _torch_seed(seed: int, split: str, index: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed), _SPLIT_ID[split], int(index), stream]).generate_state(1)[0])


def _dilate(mask: torch.Tensor, steps: int) -> torch.Tensor:
    m = mask.float()[None, None]
    for _ in range(steps):
        m = torch.nn.functional.max_pool3d(m, 3, 1, 1)
    return m[0, 0] > 0.5


class MNIAtrophy(Dataset):
    """Subjects on the MNI template (module docstring). Items: ``image`` (1, D, H, W) in [0, 1], ``label``,
    ``mask`` (D, H, W), ``severity``, ``index``.

    Args:
        split: ``train`` / ``val`` / ``test``; size: number of subjects; seed: benchmark seed.
        resolution: 2, 3 or 4 mm. severity: range of ``s`` for the atrophy class.
        dilation_mm: ventricle enlargement (rounded to >= 1 voxel). elastic_mm / degrees / scales:
            spatial augmentation. intensity_scale: range of the global intensity factor.
    """

    def __init__(self, split: str = "train", size: int = 200, seed: int = 0, resolution: int = 4,
                 severity: Tuple[float, float] = (0.4, 1.0), dilation_mm: float = 4.0, elastic_mm: float = 4.0,
                 degrees: float = 4.0, scales: float = 0.04, intensity_scale: Tuple[float, float] = (0.8, 1.2),
                 noise_std: Tuple[float, float] = (0.01, 0.03), cache: bool = True) -> None:
        if split not in _SPLIT_ID:
            raise ValueError(f"split must be one of {tuple(_SPLIT_ID)}, got {split!r}.")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}.")
        self.split, self.size, self.seed, self.resolution = split, int(size), int(seed), int(resolution)
        self.severity, self.dilation = tuple(severity), max(1, int(round(dilation_mm / resolution)))
        self.elastic_mm, self.degrees, self.scales = float(elastic_mm), float(degrees), float(scales)
        self.intensity_scale, self.noise_std = tuple(intensity_scale), tuple(noise_std)
        self.tpl = load_mni_template(self.resolution)
        self.shape = self.tpl["t1"].shape
        self._cache: Optional[Dict[int, Dict[str, torch.Tensor]]] = {} if cache else None

    def __len__(self) -> int:
        return self.size

    def label_of(self, index: int) -> int:
        return int(index) % 2

    # ------------------------------------------------------------------------------------------
    def _spatial(self, index: int):
        tio = _need("torchio")
        tpl, aff = self.tpl, self.tpl["affine"]
        subj = tio.Subject(
            t1=tio.ScalarImage(tensor=torch.from_numpy(tpl["t1"])[None], affine=aff),
            gm=tio.ScalarImage(tensor=torch.from_numpy(tpl["gm"])[None], affine=aff),
            # one label map with bit codes (1 hippocampi, 2 ventricles, 4 brain): one nearest-neighbour resampling
            codes=tio.LabelMap(tensor=torch.from_numpy(tpl["codes"])[None], affine=aff))
        tf = tio.Compose([tio.RandomAffine(scales=self.scales, degrees=self.degrees, translation=self.resolution,
                                           default_pad_value=0.0),
                          tio.RandomElasticDeformation(num_control_points=6, max_displacement=self.elastic_mm,
                                                       locked_borders=2)])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_torch_seed(self.seed, self.split, index, 0))
            out = tf(subj)
        codes = out["codes"].data[0].round().long()
        return {"t1": out["t1"].data[0], "gm": out["gm"].data[0], "hippo": (codes & 1) > 0, "vent": (codes & 2) > 0,
                "brain": (codes & 4) > 0}

    def _intensity(self, t1: torch.Tensor, index: int, rng: np.random.Generator) -> torch.Tensor:
        tio = _need("torchio")
        tf = tio.Compose([tio.RandomBiasField(coefficients=0.3), tio.RandomGamma(log_gamma=0.25),
                          tio.RandomNoise(std=self.noise_std)])
        scale = float(rng.uniform(*self.intensity_scale))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_torch_seed(self.seed, self.split, index, 1))
            img = tf(tio.ScalarImage(tensor=(t1 * scale)[None].float(), affine=self.tpl["affine"])).data[0]
        return img

    def render(self, index: int, label: Optional[int] = None, twin: bool = False) -> Dict[str, torch.Tensor]:
        """Subject ``index`` (class ``label``, default its own). ``twin=True`` also returns ``image_healthy``:
        the same subject and augmentation without the atrophy (for tests), and ``unclipped`` (bool)."""
        label = self.label_of(index) if label is None else int(label)
        rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], int(index), 2])
        sev = float(rng.uniform(*self.severity))
        s = self._spatial(index)
        t1 = s["t1"].float()
        csf = float(self.tpl["csf"])
        hippo, vent, brain = s["hippo"] > 0, s["vent"] > 0, s["brain"] > 0
        sick = t1.clone()
        if label == 1:
            gm = s["gm"].float().clamp(0, 1)
            sick = torch.where(hippo, t1 - sev * gm * (t1 - csf), sick)  # grey matter shrinks around the hippocampi
            rim = _dilate(vent, self.dilation) & ~vent & brain & ~hippo
            sick = torch.where(rim, t1 + sev * (csf - t1), sick)  # ventricles enlarge
        base = sick if label == 1 else t1
        img = self._intensity(base, index, rng)
        changed = sick != t1
        out = {"image": img.clamp(0, 1)[None].float(), "label": torch.tensor(label),
               "mask": (changed.long() * (label + 1)) if label == 1 else torch.zeros_like(changed, dtype=torch.long),
               "severity": torch.tensor(sev if label == 1 else 0.0), "index": torch.tensor(int(index))}
        if twin:
            rng2 = np.random.default_rng([self.seed, _SPLIT_ID[self.split], int(index), 2])
            rng2.uniform(*self.severity)
            healthy = self._intensity(t1, index, rng2)
            out["image_healthy"] = healthy.clamp(0, 1)[None].float()
            out["unclipped"] = ((img > 0) & (img < 1) & (healthy > 0) & (healthy < 1))
        return out

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} subjects.")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        item = self.render(index)
        if self._cache is not None:
            self._cache[index] = item
        return item


class MNIAtrophyDataModule(ZooDataModule):
    """The MNI atrophy benchmark (2 classes: normal / atrophy), ``spatial_dims = 3``, ``in_chans = 1``.

    Default 4 mm (38 x 47 x 40 voxels): MAXNet trains on it in minutes on 2 CPU cores.
    """

    def __init__(self, resolution: int = 4, train_size: int = 200, val_size: int = 60, test_size: int = 100,
                 seed: int = 0, severity: Sequence[float] = (0.4, 1.0), dilation_mm: float = 4.0,
                 elastic_mm: float = 4.0, batch_size: int = 8, num_workers: int = 0,
                 eval_batch_size: Optional[int] = None, cache: bool = True) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.save_hyperparameters()
        self.num_classes, self.multilabel, self.in_chans, self.spatial_dims = 2, False, 1, 3
        self.class_names = list(CLASS_NAMES)
        self.seed, self.augment = seed, False
        self.kw = dict(seed=seed, resolution=resolution, severity=tuple(severity), dilation_mm=dilation_mm,
                       elastic_mm=elastic_mm, cache=cache)
        self.sizes = dict(train=train_size, val=val_size, test=test_size)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.train_set = MNIAtrophy("train", self.sizes["train"], **self.kw)
            self.val_set = MNIAtrophy("val", self.sizes["val"], **self.kw)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = MNIAtrophy("test", self.sizes["test"], **self.kw)
