"""Random draws that do not depend on how a batch is split over DDP ranks."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["GlobalBatchNoise"]


class GlobalBatchNoise:
    """The DDP rule for per-sample training noise (PICNN's samplers, eX-ViT's two-view augmentation): draws
    are a pure function of ``(seed, step)`` and of a sample's position in the **global** batch, never of the
    rank. Trainers get one per step from ``ClassificationModule.global_batch_noise()``.

    Every call draws uniforms for the whole global batch ``(world_size * B, ...)`` from one generator seeded
    with ``(seed, step)`` and returns rows ``[rank * B, (rank + 1) * B)``. So (i) ranks draw independent noise
    (a plain ``seed_everything`` gives every rank the *same* stream, correlating their masks), (ii) a run is
    reproducible and resumes exactly without saving RNG state, and (iii) N ranks with batch B draw exactly
    the noise one process with batch N*B draws for the same samples (rank r holding global rows r*B...):
    tested in ``tests/test_ddp.py``. Costs N-fold uniforms of a few numbers per sample: negligible.
    """

    def __init__(self, seed: int, step: int, rank: int = 0, world_size: int = 1) -> None:
        state = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(1, np.uint64)[0])
        self.generator = torch.Generator().manual_seed(state & 0x7FFFFFFFFFFFFFFF)
        self.rank, self.world_size = int(rank), int(world_size)

    def uniform(self, shape, like: Tensor) -> Tensor:
        shape = tuple(shape)
        full = torch.rand((self.world_size * shape[0],) + shape[1:], generator=self.generator)  # float32 draws
        return full[self.rank * shape[0]:(self.rank + 1) * shape[0]].to(like.device, like.dtype)
