"""Guided-gradient training: ``L = L_C + lambda L_R`` (seed 001 eqs. 4.1-4.8, Algorithm 3; spec
``specs/guided_gradients.md``).

    python train.py fit --config configs/guided_gradients/synthetic.yaml

The objective is :func:`models.guided_gradients.guided_gradient_loss` (one shared forward for the
standard and the guided input gradient, double backward through the standard one). It is applied in
training only: validation/test log the plain cross-entropy and accuracy (Lightning runs those loops in
inference mode, where no input gradient can be taken). Works with any model of the zoo whose
non-linearities are ReLU/ReLU6 (``model: guided_gradients`` or ``baseline`` with a ReLU backbone).

DDP: the input gradients are taken with ``autograd.grad(., x)``, which accumulates nothing into
parameters, so DDP's reducer fires once, in Lightning's ``loss.backward()`` (spec §6). Keep per-rank
BatchNorm (no SyncBatchNorm) and do not ``torch.compile`` (no double backward).
"""
from __future__ import annotations

from typing import Dict

from torch import Tensor

from models.guided_gradients import check_guided_compatible, get_error_function, guided_gradient_loss, step_lambda
from .classification import ClassificationModule

__all__ = ["GuidedGradientsModule"]


class GuidedGradientsModule(ClassificationModule):
    """:class:`ClassificationModule` trained with the guided-gradient regulariser.

    Args:
        lam: lambda of eq. 4.4 (thesis: 7.5e-3 for ResNet-18, 1e-3 for MobileNet-V2). 0 = plain training
            (bit-identical to :class:`ClassificationModule`, no gradient graph is built).
        error: ``cosine`` (eq. 4.7, default), ``histogram`` (4.8), ``mae`` (4.5) or ``mse`` (4.6).
        fraction: share of each batch on which L_R is estimated (1 = all, shared forward; < 1 = a random
            sub-batch, cheaper; see :func:`~models.guided_gradients.guided_gradient_loss`).
        every: apply L_R on every ``every``-th training step only, with weight ``every * lam`` (same expected
            regularisation per step; average step cost ``(c_reg + every - 1) / every`` plain steps; see
            :func:`~models.guided_gradients.step_lambda`). 1 = every step (thesis).
        grad_target: ``loss`` (thesis) or ``logit`` (ablation, spec §10.6).
        strategy: ``shared`` (one forward) or ``separate`` (the thesis's separate teacher forward).
        (other args: :class:`ClassificationModule`; ``model`` defaults to ``"guided_gradients"``.)
    """

    def __init__(self, model: str = "guided_gradients", lam: float = 7.5e-3, error: str = "cosine",
                 fraction: float = 1.0, every: int = 1, grad_target: str = "loss", strategy: str = "shared",
                 **kwargs) -> None:
        get_error_function(error)  # validates the name
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}.")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
        step_lambda(lam, every, 0)  # validates every
        if grad_target not in ("loss", "logit"):
            raise ValueError(f"grad_target must be 'loss' or 'logit', got {grad_target!r}.")
        if strategy not in ("shared", "separate"):
            raise ValueError(f"strategy must be 'shared' or 'separate', got {strategy!r}.")
        super().__init__(model=model, **kwargs)
        self.save_hyperparameters()
        if self.multilabel and lam > 0:
            raise ValueError("Guided-gradient regularisation is defined for single-label cross-entropy (eqs. 4.1-4.2); "
                             "use a single-label DataModule (multilabel=False) or lam=0.")
        if lam > 0:
            check_guided_compatible(self.model)
        self.lam, self.error, self.fraction, self.every = float(lam), error, float(fraction), int(every)
        self.grad_target, self.strategy = grad_target, strategy

    def compute_loss(self, batch: Dict[str, Tensor], stage: str) -> Dict[str, Tensor]:
        if stage != "train":
            return super().compute_loss(batch, stage)
        lam = step_lambda(self.lam, self.every, self.global_step)
        out = guided_gradient_loss(self.model, batch["image"], batch["label"], lam=lam, error=self.error,
                                   fraction=self.fraction, grad_target=self.grad_target, strategy=self.strategy,
                                   label_smoothing=self.label_smoothing)
        if lam == 0:
            out.pop("loss_r")
        return out
