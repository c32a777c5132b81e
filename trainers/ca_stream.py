"""CA-Stream training (seed 001 §3, spec ``specs/ca_stream.md`` §6).

    python train.py fit --config configs/ca_stream/synthetic.yaml

The paper's protocol (``train_mode="stream"``, default): attach a stream to an already trained model
(``checkpoint_path`` = a plain baseline checkpoint; only the ``stream.*`` keys start fresh), freeze the
backbone **and** the classifier (``requires_grad=False``) and keep them in ``eval()`` for the whole
run, so BatchNorm statistics never move (Lightning switches the module to ``train()`` every epoch:
:meth:`ClassificationModule.train` re-applies eval to the frozen parts). Only ``q_0`` / ``Q_0`` and the
stream's Linears are trained with cross-entropy on ``g(q_{L+1})`` (BCE-style multi-label loss for VOC).
``train_mode="full"`` fine-tunes everything (not in the paper; for comparison).

The class-specific variant receives the ground-truth label during training only; validation/test
use the baseline (GAP head) prediction, as at inference. Every step also logs ``gap_acc``: the
accuracy of the original GAP model on the same batch (same frozen features), so CA vs GAP accuracy
is read from one run.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from models.ca_stream import CAStreamClassifier
from .classification import ClassificationModule

__all__ = ["CAStreamModule"]

_MODES = ("stream", "full")


class CAStreamModule(ClassificationModule):
    """:class:`ClassificationModule` for ``model: ca_stream`` with the paper's frozen-backbone protocol.

    Args:
        train_mode: ``"stream"`` (paper: backbone + classifier frozen and in eval mode, only ``stream.*``
            trained) or ``"full"`` (fine-tune everything). With ``reset_head: true`` (new classes) the new,
            random ``fc`` is trained with the stream in stream mode (a frozen random head would be useless).
        (other args: :class:`ClassificationModule`; ``model`` defaults to ``"ca_stream"``;
        ``checkpoint_path`` is the baseline checkpoint the stream is attached to.)
    """

    def __init__(self, model: str = "ca_stream", train_mode: str = "stream", freeze: Optional[List[str]] = None,
                 **kwargs) -> None:
        if train_mode not in _MODES:
            raise ValueError(f"train_mode={train_mode!r}; choose 'stream' (paper: frozen backbone and classifier) "
                             "or 'full' (fine-tune everything).")
        freeze = list(freeze or [])
        # a reset head (new classes) is random: the stream protocol then trains it with the stream
        new_head = bool(kwargs.get("reset_head"))
        if train_mode == "stream":
            freeze += [p for p in (r"^backbone\.",) + (() if new_head else (r"^fc\.",)) if p not in freeze]
        super().__init__(model=model, freeze=freeze, **kwargs)
        if not isinstance(self.model, CAStreamClassifier):
            raise TypeError(f"CAStreamModule needs model='ca_stream' (got {type(self.model).__name__}); "
                            "use ClassificationModule for other models.")
        self.save_hyperparameters()
        self.train_mode = train_mode
        if train_mode == "stream" and new_head:
            print("[ca_stream] reset_head with train_mode=stream: the new classifier fc is trained together with the "
                  "stream (backbone frozen); gap_acc then uses that head on GAP features. For the paper protocol "
                  "fine-tune a baseline on the new classes first, then attach the stream to it.")
        elif train_mode == "stream":
            # the classifier g = dropout + fc is frozen: its dropout stays in eval mode too
            self.frozen_modules = list(self.frozen_modules) + [self.model.drop]
            self._eval_frozen()
        if self.model.class_specific and self.multilabel:
            raise ValueError("the class-specific CA-Stream needs single-label data (one query row per image); "
                             "use class_specific: false for multi-label datasets.")

    def _eval_frozen(self) -> None:
        for m in self.frozen_modules:
            m.eval()

    # Lightning >= 2.2 does not call ``module.train()`` when fit starts (it captures/restores each
    # submodule's mode around validation), so the base class's ``train()`` override alone would leave a
    # freshly built backbone in train mode: BatchNorm statistics would move. Re-apply eval() here.
    def on_fit_start(self) -> None:
        self._eval_frozen()

    def on_train_epoch_start(self) -> None:
        self._eval_frozen()

    def compute_loss(self, batch: Dict[str, Tensor], stage: str) -> Dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        labels = y if (self.model.class_specific and stage == "train") else None  # label only in training
        out = self.model.forward_stream(x, labels)
        logits = out["logits"]
        res = {"loss": self.classification_loss(logits, y), "logits": logits}
        if not self.multilabel:
            with torch.no_grad():
                res["gap_acc"] = (out["gap_logits"].argmax(1) == y).float().mean()
        return res
