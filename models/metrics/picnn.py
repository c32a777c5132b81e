"""PICNN interpretability metrics (seed 003, "Evaluation metrics"): ACC1 / ACC2 / ACC3 / MIS.

* ACC1: accuracy of the discrimination pathway (``model(x)``).
* ACC2: accuracy of the shared classifier fed only the cluster of the **predicted** class.
* ACC3: accuracy with all filters *except* that cluster (lower = more class-specific filters).
* MIS: ``mean_i max_c MI(h_i ; 1[y = c])`` (nats), ``h_i`` the spatial sum of filter map ``i``.

Deterministic and label-free: clusters are read from ``P`` by the model's stated rule
(``PICNN.cluster_assignment``, default argmax over classes per filter). The official, label-indexed ACC3
(complement of the *true* class's cluster) is reported only as the diagnostic ``acc3_label``.
Model outputs come from ``PICNN.evaluate_pathways``; any model with that method works.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["PICNNMetrics", "mutual_information_score", "evaluate_picnn"]


def _binned_mi(x: np.ndarray, y: np.ndarray, bins: int) -> np.ndarray:
    """Plug-in MI (nats) between each column of ``x`` (equal-frequency bins) and binary ``y``."""
    M, N = x.shape
    ranks = x.argsort(axis=0, kind="stable").argsort(axis=0, kind="stable")
    b = np.minimum((ranks * bins) // M, bins - 1)  # (M, N) bin index per sample and filter
    out = np.zeros(N)
    py1 = y.mean()
    for i in range(N):
        joint = np.zeros((bins, 2))
        np.add.at(joint, (b[:, i], y.astype(int)), 1.0)
        joint /= M
        pb = joint.sum(1, keepdims=True)
        py = np.array([[1 - py1, py1]])
        nz = joint > 0
        out[i] = (joint[nz] * np.log(joint[nz] / (pb @ py)[nz])).sum()
    return out


def mutual_information_score(features: Union[Tensor, np.ndarray], labels: Union[Tensor, np.ndarray],
                             num_classes: int, estimator: str = "knn", n_neighbors: int = 3, bins: int = 16,
                             random_state: int = 0, return_matrix: bool = False):
    """MIS = mean_i max_c m_{c,i}, ``m_{c,i} = MI(h_i ; 1[y = c])`` in nats (paper, metric 4).

    ``features`` (M, N): per image, the spatial sum of each target-layer filter map
    (:meth:`PICNN.evaluate_pathways` ``pooled``); ``labels`` (M,): ground-truth classes.
    Estimator ``"knn"`` (default; the official choice): scikit-learn ``mutual_info_classif``
    (Kraskov/Ross kNN estimator for continuous-vs-discrete MI, ``n_neighbors=3``,
    ``random_state=0``), one-vs-rest per class. ``"binned"``: plug-in MI with ``bins``
    equal-frequency bins per filter (fast, deterministic, biased upwards for small M).
    Upper bound: ``m <= H_b(1/K)`` nats for balanced classes.
    """
    x = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, float)
    y = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"mutual_information_score expects features (M, N) and labels (M,), got "
                         f"{x.shape} and {y.shape}.")
    m = np.zeros((num_classes, x.shape[1]))
    for c in range(num_classes):
        yc = (y == c).astype(int)
        if yc.min() == yc.max():  # class absent (or alone): no information
            continue
        if estimator == "knn":
            from sklearn.feature_selection import mutual_info_classif

            m[c] = mutual_info_classif(x, yc, discrete_features=False, n_neighbors=n_neighbors,
                                       random_state=random_state)
        elif estimator == "binned":
            m[c] = _binned_mi(x, yc, bins)
        else:
            raise ValueError(f"estimator must be 'knn' or 'binned', got {estimator!r}.")
    mis = float(m.max(axis=0).mean()) if m.size else 0.0
    return (mis, m) if return_matrix else mis


try:  # torchmetrics is a dependency of the zoo's metrics; keep the functions usable without it
    from torchmetrics import Metric as _Metric
except ImportError:  # pragma: no cover
    _Metric = None


if _Metric is not None:
    class PICNNMetrics(_Metric):
        """ACC1/ACC2/ACC3 (in %) and MIS from :meth:`PICNN.evaluate_pathways` outputs.

        ``update(outputs, labels)``; ``compute()`` -> dict ``acc1`` (discrimination pathway), ``acc2``
        (only the predicted class's cluster), ``acc3`` (all filters but that cluster), ``mis`` (see
        :func:`mutual_information_score`; ``mis_estimator``) and, when the outputs carry it,
        ``acc3_label`` (complement of the *true* class's cluster: the official, label-based variant,
        a diagnostic only). All deterministic: clusters are read from ``P`` by the model's rule.
        """

        full_state_update = False

        def __init__(self, num_classes: int, mis_estimator: str = "knn", compute_mis: bool = True, **kwargs):
            super().__init__(**kwargs)
            self.num_classes, self.mis_estimator, self.compute_mis = int(num_classes), mis_estimator, compute_mis
            for k in ("acc1", "acc2", "acc3", "acc3_label"):
                self.add_state(f"{k}_correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
            self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
            self.add_state("label_total", default=torch.tensor(0.0), dist_reduce_fx="sum")
            self.add_state("pooled", default=[], dist_reduce_fx="cat")
            self.add_state("labels", default=[], dist_reduce_fx="cat")

        def update(self, outputs: Dict[str, Tensor], labels: Tensor) -> None:  # type: ignore[override]
            labels = labels.long().reshape(-1)
            for k, key in (("acc1", "logits"), ("acc2", "logits_cluster"), ("acc3", "logits_complement"),
                           ("acc3_label", "logits_complement_label")):
                if key in outputs:
                    correct = (outputs[key].argmax(dim=1) == labels).sum().float()
                    setattr(self, f"{k}_correct", getattr(self, f"{k}_correct") + correct)
            self.total += labels.numel()
            if "logits_complement_label" in outputs:
                self.label_total += labels.numel()
            if self.compute_mis:
                self.pooled.append(outputs["pooled"].detach().float())
                self.labels.append(labels)

        def compute(self) -> Dict[str, Tensor]:
            n = self.total.clamp_min(1)
            out = {k: 100.0 * getattr(self, f"{k}_correct") / n for k in ("acc1", "acc2", "acc3")}
            if self.label_total > 0:
                out["acc3_label"] = 100.0 * self.acc3_label_correct / self.label_total
            if self.compute_mis and len(self.pooled):
                feats = torch.cat(self.pooled) if isinstance(self.pooled, list) else self.pooled
                labs = torch.cat(self.labels) if isinstance(self.labels, list) else self.labels
                out["mis"] = torch.tensor(mutual_information_score(feats, labs, self.num_classes,
                                                                   estimator=self.mis_estimator))
            return out
else:  # pragma: no cover
    PICNNMetrics = None


@torch.no_grad()
def evaluate_picnn(model, loader, device: Union[str, torch.device] = "cpu", max_images: Optional[int] = None,
                   mis_estimator: str = "knn", label_diagnostic: bool = True) -> Dict[str, float]:
    """ACC1/ACC2/ACC3/MIS (+ ``acc3_label`` diagnostic) of ``model`` over ``loader`` (dict or tuple batches)."""
    was_training = model.training
    model.eval()
    metric = PICNNMetrics(model.num_classes, mis_estimator=mis_estimator).to(device)
    seen = 0
    for batch in loader:
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch[:2]
        if max_images is not None and seen >= max_images:
            break
        if max_images is not None:
            x, y = x[: max_images - seen], y[: max_images - seen]
        x, y = x.to(device), y.to(device)
        metric.update(model.evaluate_pathways(x, y if label_diagnostic else None), y)
        seen += len(y)
    model.train(was_training)
    return {k: float(v) for k, v in metric.compute().items()}
