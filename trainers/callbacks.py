"""Callbacks shared by every run."""
from __future__ import annotations

import os
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

__all__ = ["ZooCheckpoint"]


class ZooCheckpoint(ModelCheckpoint):
    """``best.ckpt`` selected on the **validation** split + ``last.ckpt`` for exact resumption.

    ``monitor="auto"`` picks ``val/acc`` (single-label) or ``val/mAP`` (multi-label) from the module.
    Checkpoints go to ``<trainer.default_root_dir>/checkpoints/`` (a stable place, so
    ``--ckpt_path last`` finds the previous run's ``last.ckpt``).
    """

    def __init__(self, monitor: Optional[str] = "auto", mode: str = "max", filename: str = "best",
                 save_last: bool = True, dirpath: Optional[str] = None, **kwargs) -> None:
        self._auto = monitor == "auto"
        super().__init__(monitor=None if self._auto else monitor, mode=mode, filename=filename, save_last=save_last,
                         dirpath=dirpath, auto_insert_metric_name=False, save_top_k=1, **kwargs)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._auto:
            self.monitor = "val/mAP" if getattr(pl_module, "multilabel", False) else "val/acc"
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)
