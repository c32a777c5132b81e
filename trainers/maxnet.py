"""MAXNet training: ``L = L_ce + a1 L_cls + a2 L_ctr`` (seed 000 eqs 3.13-3.15; spec ``specs/maxnet.md`` §5-6).

    python train.py fit --config configs/maxnet/mni.yaml

* Phase 1 (epochs ``< ce_only_epochs``): cross-entropy only. Phase 2: all terms (a1 = 0.6, a2 = 0.06).
* ``L_cls`` / ``L_ctr`` from the prototype distances of :meth:`models.maxnet.MAXNet.run` (min over voxels inside
  ``d_j``, min over the prototypes of / not of the true class); ``L_ctr`` caps ``d`` at ``D_p`` (spec §12.11).
* Optional ``l1_last``: ``lambda ||W_last * (1 - own class)||_1`` (spec §5 option).
* The MFM betas get no weight decay (own parameter group unless ``param_groups`` is given).
* :class:`PCRReferenceCallback` builds the PCR reference set (eq 3.16 maps of the correctly classified training
  volumes) when fitting ends and saves it as safetensors beside the best (else last) checkpoint.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from models.maxnet import MAXNet, build_reference_set, cluster_contrastive_losses, reference_path_for
from .classification import ClassificationModule

__all__ = ["MAXNetModule", "PCRReferenceCallback", "maxnet_loss"]


def maxnet_loss(out: Dict[str, Tensor], labels: Tensor, proto_class: Tensor, alpha_cls: float = 0.6,
                alpha_ctr: float = 0.06, clamp: Optional[float] = None) -> Dict[str, Tensor]:
    """Eq 3.13 from :meth:`MAXNet.run` outputs: ``loss``, ``ce``, ``cls``, ``ctr``."""
    ce = F.cross_entropy(out["logits"], labels)
    cls, ctr = cluster_contrastive_losses(out["dist"], labels, proto_class, clamp=clamp)
    loss = ce
    if alpha_cls or alpha_ctr:
        loss = ce + alpha_cls * cls + alpha_ctr * ctr
    return {"loss": loss, "ce": ce.detach(), "cls": cls.detach(), "ctr": ctr.detach()}


class MAXNetModule(ClassificationModule):
    """:class:`ClassificationModule` for ``model: maxnet`` with the two-phase MAXNet objective.

    Args:
        alpha_cls / alpha_ctr: weights of the cluster and contrastive terms (0.6 / 0.06).
        ce_only_epochs: length of phase 1 (CE only; thesis: 20 of 70 epochs).
        l1_last: weight of the L1 penalty on the last layer's other-class connections (0 = off).
        (other args: :class:`ClassificationModule`; ``model`` defaults to ``"maxnet"``.)
    """

    def __init__(self, model: str = "maxnet", alpha_cls: float = 0.6, alpha_ctr: float = 0.06,
                 ce_only_epochs: int = 20, l1_last: float = 0.0, **kwargs) -> None:
        if alpha_cls < 0 or alpha_ctr < 0 or l1_last < 0 or ce_only_epochs < 0:
            raise ValueError("alpha_cls, alpha_ctr, l1_last and ce_only_epochs must be >= 0.")
        if kwargs.get("param_groups") is None:
            kwargs["param_groups"] = [{"params": r"^beta$", "weight_decay": 0.0}]
        super().__init__(model=model, **kwargs)
        if not isinstance(self.model, MAXNet):
            raise TypeError(f"MAXNetModule needs model='maxnet' (got {type(self.model).__name__}); "
                            "use ClassificationModule for other models.")
        if self.multilabel:
            raise ValueError("MAXNet is single-label (prototypes belong to one class); use a single-label DataModule.")
        self.save_hyperparameters()
        self.alpha_cls, self.alpha_ctr = float(alpha_cls), float(alpha_ctr)
        self.ce_only_epochs, self.l1_last = int(ce_only_epochs), float(l1_last)

    def phase(self) -> int:
        """1 = CE only, 2 = all terms."""
        return 1 if self.current_epoch < self.ce_only_epochs else 2

    def compute_loss(self, batch: Dict[str, Tensor], stage: str) -> Dict[str, Tensor]:
        x, y = batch["image"], batch["label"].long()
        out = self.model.run(x)
        full = stage != "train" or self.phase() == 2
        res = maxnet_loss(out, y, self.model.proto_class, self.alpha_cls if full else 0.0,
                          self.alpha_ctr if full else 0.0, clamp=float(self.model.latent_dim))
        if self.l1_last and full:
            own = F.one_hot(self.model.proto_class, self.num_classes).t().to(self.model.fc.weight.dtype)
            res["loss"] = res["loss"] + self.l1_last * (self.model.fc.weight * (1 - own)).abs().sum()
        res["logits"] = out["logits"]
        if stage == "train":
            res["phase"] = torch.tensor(float(self.phase()))
        return res


class PCRReferenceCallback(pl.Callback):
    """After ``fit``: build the PCR reference set from the training data (no augmentation) and save it as
    ``<checkpoint>.pcr.safetensors`` beside the best (else last) checkpoint. Rank 0 only.

    Args:
        path: explicit output path (default: beside the checkpoint, or ``default_root_dir/pcr.safetensors``).
        correct_only: keep only correctly classified training volumes (spec §12.16).
    """

    def __init__(self, path: Optional[str] = None, correct_only: bool = True, batch_size: int = 8) -> None:
        self.path, self.correct_only, self.batch_size = path, correct_only, int(batch_size)
        self.saved_path: Optional[str] = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 or not isinstance(getattr(pl_module, "model", None), MAXNet):
            return
        dm = trainer.datamodule
        ds = getattr(dm, "train_set", None) if dm is not None else None
        if ds is None:
            return
        path = self.path
        if path is None:
            ck = trainer.checkpoint_callback
            best = getattr(ck, "best_model_path", "") or getattr(ck, "last_model_path", "") if ck else ""
            path = reference_path_for(best) if best else os.path.join(trainer.default_root_dir, "pcr.safetensors")
        loader = torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=False)
        ref = build_reference_set(pl_module.model, _on_device(loader, pl_module.device), self.correct_only)
        self.saved_path = ref.save(path)


class _on_device:
    """Iterate a loader, moving the batch's ``image`` to ``device``."""

    def __init__(self, loader, device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        for b in self.loader:
            yield {**b, "image": b["image"].to(self.device)}
