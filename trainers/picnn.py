"""PICNN training: ``L = L_dis + lambda L_int`` (seed 003 eqs. 1-3; spec ``specs/picnn.md`` §3-4).

    python train.py fit --config configs/picnn/synthetic.yaml

* ``L_dis = CE(y1, y)`` on the discrimination pathway (eq. 1).
* ``L_int = CE(y2, y)`` on the interpretation pathway (eq. 2), ``y2 = g(H * z)`` with the mask drawn
  from the row of ``P`` selected by a pseudo-label sampled from the model's own prediction
  (``PICNN.forward_train`` never sees ``y``). ``int_loss_samples="matched"`` (default, official code)
  averages it over the samples whose pseudo-label equals the true label, as
  ``sum_b m_b CE_b / max(1, sum_b m_b)`` so the graph stays connected (DDP) even with no match;
  ``"all"`` is the paper-literal average over the batch.
* ``lambda_int = 2`` (paper). ``lambda_int = 0`` is the paper's STD baseline: the pathway is not run
  in training and ``P`` is frozen at its random initialisation (so weight decay cannot move it either).

Validation/test log deterministic, label-free ``acc2`` (only the predicted class's cluster) and ``acc3``
(all filters but that cluster) next to ``acc`` (= ACC1); checkpoints are selected on ``val/acc``
(never on test). MIS is computed by ``experiments/picnn.py`` / :func:`models.picnn.evaluate_picnn`.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch.nn.functional as F
from torch import Tensor

from models.picnn import PICNN
from .classification import ClassificationModule

__all__ = ["PICNNModule", "picnn_loss"]

_SAMPLE_MODES = ("matched", "all")


def picnn_loss(out: Dict[str, Tensor], labels: Tensor, lambda_int: float = 2.0,
               int_loss_samples: str = "matched", matched_norm: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Eq. 3 from :meth:`PICNN.forward_train` outputs; returns ``loss``, ``l_dis``, ``l_int``, ``matched``.

    ``matched_norm``: under DDP, ``max(matched samples of the global batch, 1) / world_size`` (the trainer
    all-reduces it), so that the ranks' averaged gradients equal one process's mean over the matched samples
    of the whole global batch (a per-rank mean would weight ranks with few matches up).
    """
    if int_loss_samples not in _SAMPLE_MODES:
        raise ValueError(f"int_loss_samples={int_loss_samples!r}; choose one of {_SAMPLE_MODES}.")
    l_dis = F.cross_entropy(out["logits"], labels)
    res = {"l_dis": l_dis}
    if "logits_int" not in out:
        res["loss"] = l_dis
        return res
    ce = F.cross_entropy(out["logits_int"], labels, reduction="none")
    match = (out["pseudo_label"] == labels).to(ce.dtype)
    if int_loss_samples == "matched":
        denom = match.sum().clamp_min(1.0) if matched_norm is None else matched_norm.to(ce.dtype)
        l_int = (match * ce).sum() / denom
    else:
        l_int = ce.mean()
    res.update(loss=l_dis + lambda_int * l_int, l_int=l_int.detach(), matched=match.mean())
    return res


class PICNNModule(ClassificationModule):
    """:class:`ClassificationModule` for ``model: picnn`` with the PICNN objective.

    Args:
        lambda_int: weight of the interpretation loss (paper: 2; 0 = STD baseline with a frozen random P).
        int_loss_samples: ``"matched"`` (official) or ``"all"`` (paper text), see module docstring.
        (other args: :class:`ClassificationModule`; ``model`` defaults to ``"picnn"``.)
    """

    def __init__(self, model: str = "picnn", lambda_int: float = 2.0, int_loss_samples: str = "matched",
                 **kwargs) -> None:
        if int_loss_samples not in _SAMPLE_MODES:
            raise ValueError(f"int_loss_samples={int_loss_samples!r}; choose one of {_SAMPLE_MODES}.")
        if lambda_int < 0:
            raise ValueError(f"lambda_int must be >= 0, got {lambda_int}.")
        super().__init__(model=model, **kwargs)
        if not isinstance(self.model, PICNN):
            raise TypeError(f"PICNNModule needs model='picnn' (got {type(self.model).__name__}); "
                            "use ClassificationModule for other models.")
        self.save_hyperparameters()
        self.lambda_int, self.int_loss_samples = float(lambda_int), int_loss_samples
        if self.lambda_int == 0:  # STD: P keeps its random init (paper Table 1, "randomly initialize P")
            self.model.p_logits.requires_grad_(False)

    def compute_loss(self, batch: Dict[str, Tensor], stage: str) -> Dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        if self.multilabel:
            raise ValueError("PICNN is single-label (one class cluster per image); use a single-label DataModule.")
        if stage == "train":
            if self.lambda_int > 0:
                out = self.model.forward_train(x, generator=self.global_batch_noise())
            else:
                out = {"logits": self.model(x)}
            res = picnn_loss(out, y, self.lambda_int, self.int_loss_samples, self._matched_norm(out, y))
            res["logits"] = out["logits"]
            if "logits_int" in out:
                res["acc2_sampled"] = (out["logits_int"].argmax(1) == y).float().mean()
            return res
        ev = self.model.evaluate_pathways(x)  # deterministic and label-free
        logits = ev["logits"]
        return {"loss": F.cross_entropy(logits, y), "logits": logits,
                "acc2": (ev["logits_cluster"].argmax(1) == y).float().mean(),
                "acc3": (ev["logits_complement"].argmax(1) == y).float().mean()}

    def _matched_norm(self, out: Dict[str, Tensor], y: Tensor) -> Optional[Tensor]:
        """``max(global matched count, 1) / world_size`` under DDP (see :func:`picnn_loss`); None otherwise."""
        t = self._trainer
        if self.int_loss_samples != "matched" or "pseudo_label" not in out or t is None or t.world_size == 1:
            return None
        n = (out["pseudo_label"] == y).sum().detach().float()
        total = self.all_gather(n).sum()
        return total.clamp_min(1.0) / t.world_size

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.model.project_parameters_()  # projected step for p_param="clamp" (no-op otherwise)
