"""PICNN: a pathway that groups the filters of a late conv layer into class-specific clusters.

Guo, Yang, Yin, Chen, Ye, "PICNN: A Pathway towards Interpretable Convolutional Neural Networks",
AAAI 2024 (seed 003; spec ``/work/shared/specs/picnn.md``). Equations -> code:

* target layer ``H`` (B, N, *spatial): by default a new ``Conv2d(C_last, N, 3, padding=1)`` after the
  backbone's last stage with ``N = round(12.8 K)`` (the paper's filter-to-class ratio), or an existing
  backbone stage chosen by name (``target_layer="layer4"``; the backbone is truncated there).
* classifier ``g`` = GAP + ``fc`` (Linear N -> K), shared by both pathways; ``y1 = g(H)`` (eq. 1).
* correspondence matrix ``P`` (K, N) in [0, 1] (:attr:`PICNN.P`), see ``p_param``.
* pseudo-label (eqs. 8-10): :func:`categorical_straight_through` -- ``y~ ~ Cat(softmax(y1))`` by
  inverse-CDF sampling, value one-hot, gradient identity into ``softmax(y1)``. Labels never enter.
* filter mask (eqs. 5-7): :func:`bernoulli_straight_through` -- ``z ~ Ber(p)`` with ``p = y~ P``,
  value exactly binary, ``dz/dp = 1``; :func:`gumbel_filter_mask` is the Table 4 ablation.
* masked features (eq. 4) ``H~ = H * z`` through the same ``g``: ``y2 = g(H~)`` (eq. 2).
  The loss ``L = L_dis + lambda L_int`` (eq. 3) lives in ``trainers/picnn.py``.

At inference ``forward`` is the discrimination pathway alone (plain logits, no sampling, no extra
cost). The intrinsic explanation (kind ``"cluster_cam"``) is the (Grad-)CAM of the target class
restricted to that class's cluster. Clusters are read from ``P`` by a stated deterministic,
label-free rule (:meth:`PICNN.cluster_assignment`; default: every filter belongs to the class with the
largest ``p_{k,i}``, i.e. argmax over classes per filter -- the "argmax assignment" of the paper's
introduction). Evaluation metrics ACC1/ACC2/ACC3/MIS: ``models/metrics/picnn.py``
(:class:`PICNNMetrics`, :func:`mutual_information_score`, :func:`evaluate_picnn`; also importable from here).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone
from .base import InterpretableClassifier, normalize_saliency
from .noise import GlobalBatchNoise
from .registry import register_model

__all__ = ["PICNN", "GlobalBatchNoise", "bernoulli_straight_through", "categorical_straight_through", "gumbel_filter_mask",
           "DEFAULT_FILTER_RATIO"]

#: N / K in the paper (N = 128 filters for CIFAR-10).
DEFAULT_FILTER_RATIO = 12.8
_P_PARAMS = ("softmax", "sigmoid", "clamp")
_SAMPLERS = ("bernoulli", "gumbel")
_CLUSTER_RULES = ("argmax", "threshold")


# ---------------------------------------------------------------------------------------------------
# Reparameterised samplers (pure functions; tested in tests/test_picnn.py)
# ---------------------------------------------------------------------------------------------------
def _uniform(shape, like: Tensor, generator) -> Tensor:
    """``U(0, 1)`` draws from ``generator``: a ``torch.Generator``, ``None`` (global RNG) or a
    :class:`GlobalBatchNoise` (DDP: the rank's rows of draws made for the whole global batch)."""
    if isinstance(generator, GlobalBatchNoise):
        return generator.uniform(shape, like)
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)


def bernoulli_straight_through(p: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Eqs. 5-7: ``z = p + eta``, ``eta = 1[p >= eps] - p`` a constant, ``eps ~ U(0, 1)``.

    Theorem 1: ``P(z_i = 1) = P(eps_i <= p_i) = p_i``. The value is written as
    ``hard + (p - p.detach())`` -- numerically identical to ``p + (hard - p).detach()`` in exact
    arithmetic, but *exactly* binary in floating point (``p + (1 - p)`` may round to 0.99999994);
    the gradient is the identity, ``dz/dp = 1`` (straight-through).
    """
    if (p.detach() < 0).any() or (p.detach() > 1).any():
        raise ValueError("bernoulli_straight_through: p must lie in [0, 1] (use PICNN.P, which is kept there).")
    hard = (p.detach() >= _uniform(p.shape, p, generator)).to(p.dtype)
    return hard + (p - p.detach())


def categorical_straight_through(probs: Tensor, generator: Optional[torch.Generator] = None
                                 ) -> Tuple[Tensor, Tensor]:
    """Eqs. 8-10: pseudo-label ``y~ ~ Cat(probs)`` by inverse-CDF sampling, straight-through one-hot.

    With ``c_k = sum_{j<=k} probs_j`` and ``xi ~ U(0, 1)``, the class is the ``k`` with
    ``c_{k-1} < xi <= c_k`` (``c_{-1} = 0``), so ``P(k) = probs_k`` (Theorem 2). Returns
    ``(y_vec, index)``: ``y_vec = e + (probs - probs.detach())`` has the one-hot ``e`` as value and
    identity gradient into ``probs`` (``y~ = y1 + tau`` with the constant ``tau = e - y1``, eq. 8).
    """
    if probs.dim() != 2:
        raise ValueError(f"categorical_straight_through expects (B, K) probabilities, got {tuple(probs.shape)}.")
    xi = _uniform((probs.shape[0], 1), probs, generator)
    cdf = probs.detach().cumsum(dim=1)
    index = (cdf < xi).sum(dim=1).clamp_(max=probs.shape[1] - 1)  # number of c_k below xi
    onehot = F.one_hot(index, probs.shape[1]).to(probs.dtype)
    return onehot + (probs - probs.detach()), index


def gumbel_filter_mask(log_p: Tensor, y_vec: Tensor, tau: float = 0.01,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """Table 4 ablation: per sample, assign every filter to one class with hard Gumbel-softmax.

    ``log_p`` (K, N) are log-probabilities of the filter-class correspondence (the logits of the
    argmax over classes per filter that the Gumbel-softmax relaxes); ``Z_b = onehot(argmax_k(log_p +
    g)) + (s - s.detach())`` with ``s = softmax((log_p + g) / tau, dim=classes)``, ``g ~ Gumbel(0, 1)``
    (Jang et al. 2016, straight-through variant). The mask of sample ``b`` is ``z_b = y_vec_b Z_b``.
    """
    if tau <= 0:
        raise ValueError(f"gumbel tau must be > 0, got {tau}.")
    B, (K, N) = y_vec.shape[0], log_p.shape
    u = _uniform((B, K, N), log_p, generator).clamp_(min=1e-20, max=1.0 - 1e-7)
    logits = (log_p.unsqueeze(0) - torch.log(-torch.log(u))) / tau
    soft = logits.softmax(dim=1)
    hard = F.one_hot(soft.detach().argmax(dim=1), K).permute(0, 2, 1).to(soft.dtype)
    Z = hard + (soft - soft.detach())
    return torch.einsum("bk,bkn->bn", y_vec, Z)


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
@register_model("picnn", test_kwargs=dict(backbone="resnet18"))
class PICNN(InterpretableClassifier):
    """timm backbone -> target layer ``H`` (N filters) -> GAP -> ``fc``, plus the pathway matrix ``P``.

    Args:
        num_classes: K.
        backbone: any timm model with ``features_only`` (CNNs and ViTs: the Backbone returns the final
            tokens as a ``(B, D, h, w)`` map, so the pathway runs over the token channels) or ``cnn3d``.
        pretrained, backbone_weights, in_chans, backbone_kwargs: as for ``baseline``.
        target_layer: ``"new"`` (default; the official code's extra 3x3 conv after the last stage),
            ``"last"`` (the backbone's last stage itself, N = its channels; a baseline checkpoint then
            loads with only ``P`` new) or the name of a backbone stage (``model.backbone.stage_names``,
            e.g. ``"layer3"``; the backbone is truncated after it).
        num_filters: N for ``target_layer="new"``; default ``round(filter_ratio * K)``.
        filter_ratio: N / K (paper: 12.8).
        target_relu: ReLU after the new conv (official: none, so masking zeroes signed maps).
        p_param: how ``P`` stays in [0, 1]. ``"softmax"`` (default, official): ``P = softmax(P_raw,
            dim=classes)``; each filter spreads unit mass over classes, so the expected cluster size
            is N/K and classes compete for filters. ``"sigmoid"``: independent ``sigma(P_raw)``;
            ``"clamp"``: ``P_raw`` clipped to [0, 1] (trainer projects after each step). Both are
            cheap ablations but nothing stops every ``p -> 1`` (all filters in every cluster, so
            ``y2 -> y1``): the degenerate optimum the spec warns about.
        sampler: ``"bernoulli"`` (eqs. 5-7) or ``"gumbel"`` (Table 4 ablation, ``gumbel_tau``).
        cluster_rule: label-free rule reading clusters from ``P``: ``"argmax"`` (default; filter i is
            in the cluster of ``argmax_k P[k, i]``, every filter in exactly one cluster) or
            ``"threshold"`` (``P[k, i] >= 0.5``; natural for ``p_param="sigmoid"``).
    """

    explanation_kind = "cluster_cam"
    mechanism_prefixes = ("target_conv.", "p_logits")

    def __init__(self, num_classes: int = 10, backbone: str = "resnet18", pretrained: bool = False,
                 backbone_weights: Optional[str] = None, in_chans: Optional[int] = None,
                 backbone_kwargs: Optional[dict] = None, target_layer: str = "new",
                 num_filters: Optional[int] = None, filter_ratio: float = DEFAULT_FILTER_RATIO,
                 target_relu: bool = False, p_param: str = "softmax", sampler: str = "bernoulli",
                 gumbel_tau: float = 0.01, cluster_rule: str = "argmax") -> None:
        if in_chans is None:
            in_chans = 1 if backbone == "cnn3d" else 3
        super().__init__(num_classes, in_chans)
        for val, allowed, arg in ((p_param, _P_PARAMS, "p_param"), (sampler, _SAMPLERS, "sampler"),
                                  (cluster_rule, _CLUSTER_RULES, "cluster_rule")):
            if val not in allowed:
                raise ValueError(f"{arg}={val!r} is not supported; choose one of {allowed}.")
        self.p_param, self.sampler, self.gumbel_tau, self.cluster_rule = p_param, sampler, float(gumbel_tau), cluster_rule
        bkw = dict(backbone_kwargs or {})
        out_indices = bkw.pop("out_indices", None)  # e.g. the main job's out_indices=[1, 2, 3]
        if target_layer not in ("new", "last"):
            names = Backbone(backbone, pretrained=False, in_chans=in_chans, **bkw).stage_names
            if target_layer not in names:
                raise ValueError(f"target_layer={target_layer!r} is not a stage of backbone {backbone!r}; "
                                 f"use 'new', 'last' or one of {names}.")
            out_indices = tuple(range(names.index(target_layer) + 1))
        self.target_layer = target_layer
        self.backbone = Backbone(backbone, pretrained=pretrained, weights=backbone_weights, in_chans=in_chans,
                                 out_indices=out_indices, **bkw)
        self.spatial_dims = self.backbone.spatial_dims
        c_last = self.backbone.num_features
        if target_layer == "new":
            n = int(num_filters) if num_filters else max(1, int(round(filter_ratio * num_classes)))
            conv = {2: nn.Conv2d, 3: nn.Conv3d}[self.spatial_dims]
            self.target_conv = nn.Sequential(conv(c_last, n, 3, padding=1))
            if target_relu:
                self.target_conv.append(nn.ReLU(inplace=False))
        else:
            if num_filters not in (None, c_last):
                raise ValueError(f"num_filters={num_filters} conflicts with target_layer={target_layer!r} "
                                 f"({c_last} channels); num_filters only applies to target_layer='new'.")
            n = c_last
            self.target_conv = nn.Identity()
        self.num_filters = n
        #: hook point on H (post-hoc CAM explainers use it: Grad-CAM on the pathway's filters).
        self.target_tap = nn.Identity()
        self.fc = nn.Linear(n, num_classes)
        self.p_logits = nn.Parameter(self._init_p_raw(num_classes, n))

    def _init_p_raw(self, K: int, N: int) -> Tensor:
        """Random init with ``P`` near 1/K (official: softmax of U(0,1) over classes, softmaxed again)."""
        u = torch.rand(K, N)
        if self.p_param == "softmax":
            return u.softmax(dim=0)
        p0 = (2.0 * u / K).clamp(1e-3, 1 - 1e-3)  # mean 1/K
        return torch.logit(p0) if self.p_param == "sigmoid" else p0

    # ---- P and the clusters -----------------------------------------------------------------------
    @property
    def P(self) -> Tensor:
        """Filter-class correspondence matrix (K, N), entries in [0, 1]."""
        if self.p_param == "softmax":
            return self.p_logits.softmax(dim=0)
        if self.p_param == "sigmoid":
            return torch.sigmoid(self.p_logits)
        return self.p_logits.clamp(0.0, 1.0)

    @torch.no_grad()
    def project_parameters_(self) -> None:
        """Projected-gradient step for ``p_param="clamp"`` (trainer calls it after each step)."""
        if self.p_param == "clamp":
            self.p_logits.clamp_(0.0, 1.0)

    @torch.no_grad()
    def cluster_assignment(self) -> Tensor:
        """Deterministic label-free clusters ``A`` (K, N) bool read from ``P`` (rule ``cluster_rule``)."""
        P = self.P
        if self.cluster_rule == "threshold":
            return P >= 0.5
        return F.one_hot(P.argmax(dim=0), self.num_classes).T.bool()

    def cluster_filters(self) -> Dict[int, list]:
        """Per class, the indices of the filters of its cluster."""
        A = self.cluster_assignment().cpu()
        return {k: A[k].nonzero().flatten().tolist() for k in range(self.num_classes)}

    # ---- pathways -------------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """Target-layer maps ``H`` (B, N, *spatial)."""
        self.check_input(x)
        return self.target_tap(self.target_conv(self.backbone(x)[-1]))

    def head(self, h: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The shared classifier ``g``: GAP + fc, on ``H`` or on ``H * mask`` (eq. 4; mask (B, N))."""
        pooled = h.flatten(2).mean(dim=2)
        if mask is not None:  # GAP(H * z) == GAP(H) * z for a per-filter mask
            pooled = pooled * mask.to(pooled.dtype)
        return self.fc(pooled)

    def forward(self, x: Tensor) -> Tensor:
        """Discrimination pathway only (inference): plain logits, no sampling."""
        return self.head(self.features(x))

    def forward_train(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """Both pathways (training). Takes no label: the interpretation pathway is label-free.

        Returns ``logits`` (y1), ``logits_int`` (y2 = g(H * z)), ``pseudo_label`` (y~ index), ``p`` (the
        selected row y~ P, (B, N)), ``z`` (the binary mask, (B, N)).
        """
        h = self.features(x)
        y1 = self.head(h)
        out = self.interpretation_pathway(h, y1, generator)
        out["logits"] = y1
        return out

    def interpretation_pathway(self, h: Tensor, y1: Tensor, generator: Optional[torch.Generator] = None
                               ) -> Dict[str, Tensor]:
        """Eqs. 4-10 given ``H`` and ``y1``: pseudo-label -> row of P -> sampled mask -> ``g(H * z)``."""
        y_vec, index = categorical_straight_through(y1.softmax(dim=1), generator)  # eqs. 8-10
        P = self.P
        p = y_vec @ P                                                              # (B, N): row y~ of P
        if self.sampler == "bernoulli":
            z = bernoulli_straight_through(p, generator)                            # eqs. 5-7
        else:
            z = gumbel_filter_mask(torch.log(P.clamp_min(1e-12)), y_vec, self.gumbel_tau, generator)
        return {"logits_int": self.head(h, z), "pseudo_label": index, "p": p, "z": z}

    @torch.no_grad()
    def evaluate_pathways(self, x: Tensor, labels: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Deterministic, label-free evaluation outputs for ACC1/ACC2/ACC3/MIS (:class:`PICNNMetrics`).

        ``logits`` (ACC1), ``logits_cluster`` = g(H restricted to the cluster of the *predicted*
        class) (ACC2), ``logits_complement`` = g(H without that cluster) (ACC3), ``pooled`` = spatial
        sum of each filter map (MIS). If ``labels`` are given, ``logits_complement_label`` (the
        official, label-indexed ACC3; a diagnostic only) is added.
        """
        h = self.features(x)
        y1 = self.head(h)
        A = self.cluster_assignment().to(h.dtype)
        keep = A[y1.argmax(dim=1)]
        out = {"logits": y1, "logits_cluster": self.head(h, keep), "logits_complement": self.head(h, 1 - keep),
               "pooled": h.flatten(2).sum(dim=2)}
        if labels is not None:
            out["logits_complement_label"] = self.head(h, 1 - A[labels.long().to(h.device)])
        return out

    # ---- explanations -----------------------------------------------------------------------------
    def _cam(self, h: Tensor, classes: Tensor, filter_mask: Tensor) -> Tensor:
        """Grad-CAM of ``g`` restricted to ``filter_mask`` (B, N): for GAP + linear the Grad-CAM weights
        are ``alpha_i = W[c, i] / |spatial|``, so Grad-CAM = ReLU(sum_i mask_i W[c, i] H_i) (up to scale)."""
        w = self.fc.weight[classes] * filter_mask.to(h.dtype)
        return torch.relu(torch.einsum("bn...,bn->b...", h, w))

    def _cam_scale(self, h: Tensor, classes: Tensor, filter_mask: Tensor) -> Tensor:
        """``sum_i |mask_i W[c, i]| |H_i|``: the magnitude :meth:`_cam` sums (noise floor of ``normalize_saliency``)."""
        w = self.fc.weight[classes] * filter_mask.to(h.dtype)
        return torch.einsum("bn...,bn->b...", h.abs(), w.abs())

    def forward_explain(self, x: Tensor, target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(logits, cluster CAM)``: the CAM of class ``target`` (default: predicted) restricted to the
        filters of that class's cluster (paper Fig. 7 b), normalised to [0, 1] at input resolution."""
        h = self.features(x)
        logits = self.head(h)
        c = self.resolve_target(logits, target)
        A = self.cluster_assignment()
        return logits, normalize_saliency(self._cam(h, c, A[c]), x.shape[2:], scale=self._cam_scale(h, c, A[c]))

    def cluster_cams(self, x: Tensor, target: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Paper Fig. 7 a/b/c: CAMs of class ``target`` from ``all`` filters, its ``cluster`` and the
        ``complement``; each (B, *x.shape[2:]) in [0, 1]. Also returns ``logits`` and ``target``."""
        h = self.features(x)
        logits = self.head(h)
        c = self.resolve_target(logits, target)
        keep = self.cluster_assignment()[c]
        out = {"logits": logits, "target": c}
        for name, m in (("all", torch.ones_like(keep)), ("cluster", keep), ("complement", ~keep)):
            out[name] = normalize_saliency(self._cam(h, c, m), x.shape[2:], scale=self._cam_scale(h, c, m))
        return out

    def cam_target_layer(self) -> nn.Module:
        return self.target_tap

    def reset_classifier(self, num_classes: int) -> None:
        """New ``fc`` (N -> K) and a fresh ``P`` (K, N); the target layer (its N filters) is kept."""
        super().reset_classifier(num_classes)
        self.p_logits = nn.Parameter(self._init_p_raw(self.num_classes, self.num_filters).to(self.p_logits))

    def rebuild_kwargs(self) -> Dict[str, object]:
        return {"num_filters": self.num_filters} if self.target_layer == "new" else {}


_METRIC_NAMES = ("PICNNMetrics", "mutual_information_score", "evaluate_picnn")


def __getattr__(name):  # PEP 562: the metrics live in models/metrics/picnn.py (imported lazily, no cycle)
    if name in _METRIC_NAMES:
        from .metrics import picnn as _m

        return getattr(_m, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
