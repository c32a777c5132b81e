"""The embedded benchmark: procedurally generated shapes (2D) and structures (3D) with ground truth.

Nothing is downloaded. Every sample is a pure function of ``(seed, split, index)``, so the benchmark
is identical on every machine, process and DDP rank.

2D (:class:`SyntheticShapes`): ``K`` classes defined by the *shape* of an object (circle, square,
triangle, cross, ring, star, hexagon, ellipse, L, T, ...), drawn at a random position, scale,
rotation and colour on a cluttered textured background (random gratings, colour gradient, noise)
with distractor objects (bars and arcs of random colour, which belong to no class). Colour and
position carry no class information; shape does. Single-label mode: one object. Multi-label mode:
1..``max_objects`` objects of distinct classes (multi-hot label), for multi-label training and
weakly-supervised segmentation.

3D (:class:`SyntheticVolumes`): one-channel noisy volumes with a class-defined local structure
(sphere, cube, 3D cross, hollow shell, pair of rods, ...) at a random position and scale.

Each sample is a dict:
``image`` float (C, *spatial) in [0, 1]; ``label`` long () or float (K,) multi-hot;
``mask`` long (*spatial): 0 = background, ``c + 1`` = pixel of an object of class ``c``;
``boxes`` float (max_objects, 5): ``[class, x0, y0, x1, y1]`` in pixels (3D: ``[class, z0, y0, x0, z1,
y1, x1]``, shape (max_objects, 7)); unused rows have class -1.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES_2D = ("circle", "square", "triangle", "cross", "ring", "star", "hexagon", "ellipse", "ell", "tee")
SHAPES_3D = ("sphere", "cube", "cross3d", "shell", "rods", "plate")
_SPLIT_ID = {"train": 0, "val": 1, "test": 2}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_ID[split], int(index)])


def _polygon(u, v, n: int) -> np.ndarray:
    """Regular n-gon of circumradius 1 (point-in-convex-polygon by half planes)."""
    inside = np.ones_like(u, dtype=bool)
    apothem = math.cos(math.pi / n)
    for k in range(n):
        a = 2 * math.pi * (k + 0.5) / n
        inside &= (u * math.cos(a) + v * math.sin(a)) <= apothem
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in normalised, rotated coordinates (object radius = 1)."""
    r = np.sqrt(u * u + v * v)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":
        return _polygon(u, v, 3)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.6)
    if shape == "star":
        phi = np.arctan2(v, u)
        return r <= 0.45 + 0.55 * np.abs(np.cos(2.5 * phi)) ** 3
    if shape == "hexagon":
        return _polygon(u, v, 6)
    if shape == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.45) ** 2 <= 1.0
    if shape == "ell":
        return ((np.abs(u + 0.6) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v - 0.7) <= 0.3) & (np.abs(u) <= 0.9))
    if shape == "tee":
        return ((np.abs(u) <= 0.25) & (v >= -0.5) & (v <= 1.0)) | ((np.abs(v + 0.75) <= 0.25) & (np.abs(u) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES_2D}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((3, size, size), np.float32)
    base = rng.uniform(0.2, 0.8, size=3)
    grad = rng.uniform(-0.3, 0.3, size=(3, 2))
    for c in range(3):
        img[c] = base[c] + grad[c, 0] * (xx - 0.5) + grad[c, 1] * (yy - 0.5)
    for _ in range(3):  # oriented gratings: texture clutter
        theta, freq, amp = rng.uniform(0, math.pi), rng.uniform(3, 12), rng.uniform(0.03, 0.12)
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
        img += amp * wave[None] * rng.uniform(-1, 1, size=(3, 1, 1))
    img += rng.normal(0, 0.04, size=img.shape)
    return img


def _paint_distractor(rng, img, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = rng.uniform(0, size, size=2)
    theta = rng.uniform(0, math.pi)
    u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
    v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
    length, width = rng.uniform(0.15, 0.4) * size, rng.uniform(0.02, 0.04) * size + 0.5
    if rng.random() < 0.5:  # bar
        m = (np.abs(u) <= length / 2) & (np.abs(v) <= width)
    else:  # arc
        r = np.sqrt(u * u + v * v)
        m = (np.abs(r - length / 2) <= width) & (v > 0)
    img[:, m] = rng.uniform(0, 1, size=(3, 1))


def render_shapes(rng: np.random.Generator, size: int, classes: Sequence[int], num_distractors: int,
                  scale: Sequence[float] = (0.12, 0.24), shapes: Sequence[str] = SHAPES_2D):
    """Render one 2D image; returns (image (3,H,W) float32 in [0,1], mask (H,W) int64, boxes list)."""
    img = _background(rng, size)
    for _ in range(num_distractors):
        _paint_distractor(rng, img, size)
    mask = np.zeros((size, size), np.int64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    boxes = []
    for c in classes:
        for _attempt in range(20):  # avoid heavy overlap between objects
            rad = rng.uniform(*scale) * size
            cx, cy = rng.uniform(rad, size - rad, size=2)
            if all((cx - b[5]) ** 2 + (cy - b[6]) ** 2 > (rad + b[7]) ** 2 * 0.8 for b in boxes):
                break
        theta = rng.uniform(-math.pi / 9, math.pi / 9)
        u = ((xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)) / rad
        v = (-(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)) / rad
        m = shape_mask(shapes[c], u, v)
        if not m.any():
            m[int(cy), int(cx)] = True
        colour = rng.uniform(0, 1, size=3)
        # keep the object visible against the local background
        local = img[:, m].mean(axis=1)
        if np.abs(colour - local).sum() < 0.6:
            colour = np.where(local > 0.5, local - 0.45, local + 0.45)
        img[:, m] = colour[:, None] + rng.normal(0, 0.03, size=(3, int(m.sum())))
        mask[m] = c + 1
        ys, xs = np.nonzero(m)
        boxes.append([c, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, cx, cy, rad])
    np.clip(img, 0, 1, out=img)
    return img, mask, [b[:5] for b in boxes]


def shape_mask_3d(shape: str, z, y, x) -> np.ndarray:
    r = np.sqrt(x * x + y * y + z * z)
    a = np.maximum(np.maximum(np.abs(x), np.abs(y)), np.abs(z))
    if shape == "sphere":
        return r <= 1.0
    if shape == "cube":
        return a <= 0.75
    if shape == "cross3d":
        t = 0.3
        return (((np.abs(y) <= t) & (np.abs(z) <= t) & (np.abs(x) <= 1)) | ((np.abs(x) <= t) & (np.abs(z) <= t) & (np.abs(y) <= 1))
                | ((np.abs(x) <= t) & (np.abs(y) <= t) & (np.abs(z) <= 1)))
    if shape == "shell":
        return (r <= 1.0) & (r >= 0.65)
    if shape == "rods":
        return (((np.abs(x - 0.5) <= 0.22) | (np.abs(x + 0.5) <= 0.22)) & (np.abs(y) <= 0.22) & (np.abs(z) <= 1))
    if shape == "plate":
        return (np.abs(z) <= 0.25) & (np.abs(x) <= 1) & (np.abs(y) <= 1)
    raise ValueError(f"unknown 3D shape {shape!r}; known: {SHAPES_3D}")


def render_volume(rng: np.random.Generator, size: int, classes: Sequence[int], scale=(0.15, 0.28),
                  shapes: Sequence[str] = SHAPES_3D):
    """Render one 3D volume; returns (volume (1,D,H,W) float32 in [0,1], mask (D,H,W) int64, boxes)."""
    zz, yy, xx = np.mgrid[0:size, 0:size, 0:size].astype(np.float32) + 0.5
    vol = rng.normal(0.35, 0.12, size=(size, size, size)).astype(np.float32)
    # smooth anatomical-looking low-frequency background
    for _ in range(3):
        k = rng.uniform(1, 4, size=3)
        ph = rng.uniform(0, 2 * math.pi, size=3)
        vol += 0.06 * np.sin(2 * math.pi * (k[0] * zz / size) + ph[0]) * np.cos(2 * math.pi * (k[1] * yy / size + k[2] * xx / size) + ph[1])
    mask = np.zeros((size, size, size), np.int64)
    boxes = []
    for c in classes:
        rad = rng.uniform(*scale) * size
        cz, cy, cx = rng.uniform(rad, size - rad, size=3)
        m = shape_mask_3d(shapes[c], (zz - cz) / rad, (yy - cy) / rad, (xx - cx) / rad)
        if not m.any():
            m[int(cz), int(cy), int(cx)] = True
        vol[m] = rng.uniform(0.7, 0.95) + rng.normal(0, 0.05, size=int(m.sum()))
        mask[m] = c + 1
        zs, ys, xs = np.nonzero(m)
        boxes.append([c, zs.min(), ys.min(), xs.min(), zs.max() + 1, ys.max() + 1, xs.max() + 1])
    np.clip(vol, 0, 1, out=vol)
    return vol[None], mask, boxes


class _SyntheticBase(Dataset):
    """Cached procedural dataset; samples are generated once at construction."""

    box_width = 5

    def __init__(self, split: str, size: int, num_classes: int, image_size: int, multilabel: bool,
                 max_objects: int, seed: int) -> None:
        if split not in _SPLIT_ID:
            raise ValueError(f"split must be one of {list(_SPLIT_ID)}, got {split!r}")
        self.split, self.num_classes, self.image_size = split, int(num_classes), int(image_size)
        self.multilabel, self.max_objects, self.seed = multilabel, int(max_objects), seed
        self.max_objects = self.max_objects if multilabel else 1
        images, masks, boxes, labels = [], [], [], []
        for i in range(int(size)):
            rng = _rng(seed, split, i)
            if multilabel:
                n = int(rng.integers(1, self.max_objects + 1))
                classes = sorted(rng.choice(self.num_classes, size=min(n, self.num_classes), replace=False).tolist())
            else:
                classes = [int(i % self.num_classes)]  # balanced classes
            img, m, bx = self._render(rng, classes)
            images.append(torch.from_numpy((img * 255).round().astype(np.uint8)))
            masks.append(torch.from_numpy(m.astype(np.uint8)))
            b = torch.full((self.max_objects, self.box_width), -1.0)
            if bx:
                b[: len(bx)] = torch.tensor(bx, dtype=torch.float32)
            boxes.append(b)
            if multilabel:
                lab = torch.zeros(self.num_classes)
                lab[classes] = 1.0
            else:
                lab = torch.tensor(classes[0], dtype=torch.long)
            labels.append(lab)
        self.images, self.masks = torch.stack(images), torch.stack(masks)
        self.boxes, self.labels = torch.stack(boxes), torch.stack(labels)

    def _render(self, rng, classes):  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"image": self.images[i].float() / 255.0, "label": self.labels[i], "mask": self.masks[i].long(),
                "boxes": self.boxes[i].clone()}


class SyntheticShapes(_SyntheticBase):
    """2D shapes benchmark split (see module docstring)."""

    box_width = 5

    def __init__(self, split: str = "train", size: int = 1000, num_classes: int = 6, image_size: int = 64,
                 multilabel: bool = False, max_objects: int = 3, num_distractors: int = 2, seed: int = 0,
                 object_scale: Optional[Sequence[float]] = None) -> None:
        if not 2 <= num_classes <= len(SHAPES_2D):
            raise ValueError(f"num_classes must be in [2, {len(SHAPES_2D)}] for the shapes benchmark "
                             f"(shapes: {', '.join(SHAPES_2D)}), got {num_classes}.")
        if not 32 <= image_size <= 224:
            raise ValueError(f"image_size must be in [32, 224], got {image_size}.")
        self.num_distractors = num_distractors
        # object radius as a fraction of the image side (default 0.20-0.32, 0.15-0.24 in multi-label mode: objects
        # keep their shape after a ResNet's stride-4 stem at 64 px, so a ResNet-18 learns the task in minutes)
        self.object_scale = tuple(object_scale) if object_scale else ((0.15, 0.24) if multilabel else (0.2, 0.32))
        if not (len(self.object_scale) == 2 and 0 < self.object_scale[0] <= self.object_scale[1] <= 0.45):
            raise ValueError(f"object_scale must be [min, max] with 0 < min <= max <= 0.45, got {object_scale}.")
        self.class_names = list(SHAPES_2D[:num_classes])
        super().__init__(split, size, num_classes, image_size, multilabel, max_objects, seed)

    def _render(self, rng, classes):
        return render_shapes(rng, self.image_size, classes, self.num_distractors, self.object_scale)


class SyntheticVolumes(_SyntheticBase):
    """3D structures benchmark split (see module docstring)."""

    box_width = 7

    def __init__(self, split: str = "train", size: int = 300, num_classes: int = 4, image_size: int = 32,
                 multilabel: bool = False, max_objects: int = 2, seed: int = 0) -> None:
        if not 2 <= num_classes <= len(SHAPES_3D):
            raise ValueError(f"num_classes must be in [2, {len(SHAPES_3D)}] for the volumes benchmark "
                             f"(structures: {', '.join(SHAPES_3D)}), got {num_classes}.")
        if not 16 <= image_size <= 128:
            raise ValueError(f"image_size (volume side) must be in [16, 128], got {image_size}.")
        self.class_names = list(SHAPES_3D[:num_classes])
        super().__init__(split, size, num_classes, image_size, multilabel, max_objects, seed)

    def _render(self, rng, classes):
        return render_volume(rng, self.image_size, classes)


def flip_batch(batch: Dict[str, torch.Tensor], flip: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Horizontally flip (last axis) the samples where ``flip`` (B,) is True; masks and boxes follow."""
    if not bool(flip.any()):
        return batch
    out = dict(batch)
    img = batch["image"]
    view = (-1,) + (1,) * (img.dim() - 1)
    out["image"] = torch.where(flip.view(view), img.flip(-1), img)
    if "mask" in batch:
        m = batch["mask"]
        out["mask"] = torch.where(flip.view((-1,) + (1,) * (m.dim() - 1)), m.flip(-1), m)
    if "boxes" in batch:
        b = batch["boxes"].clone()
        c0, c1 = (1, 3) if b.shape[-1] == 5 else (3, 6)  # x columns: [c,x0,y0,x1,y1] / [c,z0,y0,x0,z1,y1,x1]
        w = float(img.shape[-1])
        sel = flip.view(-1, 1) & (b[..., 0] >= 0)
        x0, x1 = b[..., c0].clone(), b[..., c1].clone()
        b[..., c0] = torch.where(sel, w - x1, x0)
        b[..., c1] = torch.where(sel, w - x0, x1)
        out["boxes"] = b
    return out
