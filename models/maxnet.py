"""MAXNet: 3D CNN with dual attention (DAM), multi-resolution fusion (MFM), HAM heatmaps and PCR retrieval.

Seed 000 (L. Yu thesis 2024) ch. 3; spec ``specs/maxnet.md``; docs ``docs/maxnet.md``.

* Stream (spec §2): 5 stages ``[pool] -> conv -> BN -> ReLU``; ``F_n`` = stage-n output before the next
  pooling (``backbone.taps[n-1]``), ``G_5 = F_5`` (no 5th pool). Registered as backbone ``maxnet3d`` so
  the stream is a :class:`models.backbones.Backbone` like every other; any other backbone (``cnn3d``, a timm
  2D net) also works: DAM then sits on ``taps[-3]``/``taps[-2]`` with ``taps[-1]`` as context.
* DAM (eqs 3.2-3.8): voxel-wise and depth-wise attention with the min-shift normalisation of eq 3.4,
  computed **per sample** (the official code's batch-global min makes outputs depend on batch mates).
* MFM + head (eqs 3.9-3.12): ``F~_n = b1 P_n + b2 D_n``; latent vectors ``Z = sigmoid(W max(H3, U(H4), H5))``;
  prototype distances ``d_j = min_v ||Z_v - z_j||^2``; ``z_j = -log(d_j + eta)``; ``logits = W_last z``.
* HAM (eq 3.18) in :meth:`MAXNet.forward_explain`; eq 3.16 class latent maps and PCR (eqs 3.19-3.20,
  3.29-3.30) in :meth:`MAXNet.class_latent_map`, :class:`ReferenceSet`, :func:`swap_confidences`.
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backbones as _backbones
from .backbones import Backbone, _FeatureInfo
from .base import InterpretableClassifier, normalize_saliency, upsample_to
from .registry import register_model

__all__ = ["MAXNet", "MAXNetStream", "DualAttention", "min_shift_normalize", "neg_log_distance", "minmax_relu",
           "prototype_distances", "cluster_contrastive_losses", "ReferenceSet", "build_reference_set",
           "swap_confidences", "swap_logits", "swap_cosines", "insertion_agreement", "top_fraction_mask",
           "reference_path_for"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_BN = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# ---------------------------------------------------------------------------------------------- stream
class MAXNetStream(nn.Module):
    """The thesis' 5-stage conv stream (spec §2). ``forward(x) -> [F_1, ..., F_5]``.

    Stage n: ``MaxPool(2, 2, ceil_mode)`` (n > 1) -> ``Conv(k_n, padding)`` -> BN -> ReLU.
    Defaults: widths 15/25/50/50/50, kernels 3/3/3/3/1, padding 1 (``conv_padding=0`` = official "valid").
    """

    def __init__(self, in_chans: int = 1, widths: Sequence[int] = (15, 25, 50, 50, 50),
                 kernels: Sequence[int] = (3, 3, 3, 3, 1), conv_padding: int = 1, spatial_dims: int = 3) -> None:
        super().__init__()
        if len(widths) != len(kernels) or len(widths) < 3:
            raise ValueError(f"widths {tuple(widths)} and kernels {tuple(kernels)} need the same length >= 3.")
        conv, pool, bn = _CONV[spatial_dims], _POOL[spatial_dims], _BN[spatial_dims]
        stages, cin = [], in_chans
        for i, (w, k) in enumerate(zip(widths, kernels)):
            layers = [pool(2, 2, ceil_mode=True)] if i > 0 else []
            pad = (k // 2) if conv_padding else 0
            layers += [conv(cin, w, k, 1, pad, bias=False), bn(w), nn.ReLU(inplace=True)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.feature_info = _FeatureInfo(widths, [2 ** i for i in range(len(widths))],
                                         [f"stages.{i}" for i in range(len(widths))])

    def forward(self, x: Tensor) -> List[Tensor]:
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return out


class _MAXNetStream2D(MAXNetStream):
    def __init__(self, in_chans: int = 1, **kw) -> None:
        super().__init__(in_chans, spatial_dims=2, **kw)


# the stream joins the backbone registry like cnn3d (spec: "mechanisms attach through models/backbones.py")
_backbones._CUSTOM.setdefault("maxnet3d", (MAXNetStream, 3))
_backbones._CUSTOM.setdefault("maxnet2d", (_MAXNetStream2D, 2))


# ---------------------------------------------------------------------------------------------- numerics
def min_shift_normalize(c: Tensor, dims: Sequence[int], eps: float = 1e-6) -> Tensor:
    """Eq 3.4 ``r = (c - min c) / sum(c - min c)`` over ``dims`` (per sample; other axes kept).

    Scale-free and safe: non-finite entries are clamped to the float range, ``c`` is divided by its max
    ``|c|`` first (no overflow for huge inputs), and a constant ``c`` gives uniform weights. ``r >= 0``
    and sums to 1 over ``dims``.
    """
    dims = tuple(dims)
    big = torch.finfo(c.dtype).max
    c = torch.nan_to_num(c, nan=0.0, posinf=big, neginf=-big)
    scale = c.abs().amax(dim=dims, keepdim=True).clamp_min(torch.finfo(c.dtype).tiny)
    c = c / scale
    c0 = c - c.amin(dim=dims, keepdim=True)
    s = c0.sum(dim=dims, keepdim=True)
    n = math.prod(c.shape[d] for d in dims)
    return torch.where(s > eps, c0 / s.clamp_min(eps), torch.full_like(c0, 1.0 / n))


def neg_log_distance(d: Tensor, eta: float = 1e-4) -> Tensor:
    """Eq 3.11 similarity ``-log(d + eta)`` with ``eta`` inside the log (spec §4): finite for ``d >= 0``."""
    d = torch.nan_to_num(d, nan=0.0, posinf=torch.finfo(d.dtype).max).clamp_min(0)
    return -torch.log(d + eta)


def minmax_relu(x: Tensor, dims: Sequence[int], eps: float = 1e-6) -> Tensor:
    """``nr(X) = N(ReLU(X))``: per-sample min-max over ``dims`` after a ReLU (spec §4); 0 for constant maps
    and for maps whose range is at most 1e-4 of their max (rounding noise, not stretched: batch-independent)."""
    x = x.clamp(min=0)
    lo = x.amin(dim=tuple(dims), keepdim=True)
    hi = x.amax(dim=tuple(dims), keepdim=True)
    return torch.where(hi - lo > 1e-4 * hi, (x - lo) / (hi - lo + eps), torch.zeros_like(x))


def prototype_distances(z: Tensor, protos: Tensor, tau: float = 0.0) -> Tensor:
    """``d_j = min_v ||Z[:, :, v] - proto_j||^2`` (eq 3.11): ``z`` (B, Dp, S), ``protos`` (M, Dp) -> (B, M).

    ``tau > 0`` (option, not the thesis): the hard min over voxels becomes the log-mean-exp soft minimum
    ``-tau log((1/S) sum_v exp(-D_v / tau))``. It lies in ``[min_v D_v, mean_v D_v]`` (so ``d >= 0`` and
    ``-log(d + eta)`` stays finite), tends to the hard min as ``tau -> 0`` (within ``tau log S``) and to the voxel
    mean as ``tau -> inf``; its gradient reaches every voxel with weight ``softmax(-D / tau)`` instead of one.
    """
    z2 = (z * z).sum(1, keepdim=True)  # (B, 1, S)
    p2 = (protos * protos).sum(1).view(1, -1, 1)  # (1, M, 1)
    cross = torch.einsum("bds,md->bms", z, protos)
    d = (z2 + p2 - 2 * cross).clamp_min(0)
    if tau < 0:
        raise ValueError(f"voxel_min_tau must be >= 0 (0 = hard min, eq 3.11), got {tau}.")
    if not tau:
        return d.amin(dim=2)
    soft = -tau * (torch.logsumexp(-d / tau, dim=2) - math.log(d.shape[2]))
    return soft.clamp_min(0)


def cluster_contrastive_losses(dist: Tensor, labels: Tensor, proto_class: Tensor,
                               clamp: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Eqs 3.14-3.15: ``L_cls = mean_b min_{j in P_y} d_j``, ``L_ctr = -mean_b min_{j not in P_y} d_j``.

    ``dist`` (B, M), ``labels`` (B,), ``proto_class`` (M,). ``clamp``: cap ``d`` in ``L_ctr`` (spec §12.11).
    """
    own = proto_class.view(1, -1) == labels.view(-1, 1)  # (B, M)
    inf = torch.finfo(dist.dtype).max
    cls = torch.where(own, dist, torch.full_like(dist, inf)).amin(1)
    other = dist if clamp is None else dist.clamp(max=clamp)
    ctr = torch.where(~own, other, torch.full_like(dist, inf)).amin(1)
    return cls.mean(), -ctr.mean()


# ---------------------------------------------------------------------------------------------- DAM
class DualAttention(nn.Module):
    """Eqs 3.2-3.8 for one stage (spec §3): returns ``P_n``, ``D_n`` (B, K, *grid) and the weights.

    ``Q = W_f(F_n)``, ``Gk = Up(W_a(G_5))``; voxel-wise ``R = nu_vox(Q * Gk)``, ``P = S * R * V``; depth-wise
    ``RD = nu_{i,j}(Q Gk^T)`` (K x K), ``D[j] = K * sum_i RD[i, j] V[i]``; ``V = Q`` (default) or ``F_n``
    (``value="input"``, needs K = C_n). ``rescale=False`` drops the mean-one factors S and K (literal).
    """

    def __init__(self, c_in: int, c_ctx: int, embed: int = 25, spatial_dims: int = 3, value: str = "embed",
                 rescale: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if value not in ("embed", "input"):
            raise ValueError(f"dam_value must be 'embed' or 'input', got {value!r}.")
        if value == "input" and embed != c_in:
            raise ValueError(f"dam_value='input' applies attention to F_n, so embed ({embed}) must equal its "
                             f"channels ({c_in}); pass embed_dim={c_in}.")
        conv = _CONV[spatial_dims]
        self.w_f = conv(c_in, embed, 1)
        self.w_a = conv(c_ctx, embed, 1)
        self.value, self.rescale, self.eps = value, rescale, eps

    def embed(self, f: Tensor, g5: Tensor) -> Tuple[Tensor, Tensor]:
        """``Q = W_f(F_n)`` and ``Gk = Up(W_a(G_5))`` on F_n's grid (trilinear, align_corners=False)."""
        return self.w_f(f), upsample_to(self.w_a(g5), f.shape[2:])

    def forward(self, f: Tensor, q: Tensor, gk: Tensor, use_attention: bool = True) -> Dict[str, Tensor]:
        if not use_attention:
            return {}
        B, K = q.shape[:2]
        grid = q.shape[2:]
        qf, gf = q.flatten(2), gk.flatten(2)
        v = qf if self.value == "embed" else f.flatten(2)
        S = qf.shape[2]
        r = min_shift_normalize(qf * gf, dims=(2,), eps=self.eps)  # (B, K, S), eq 3.3-3.4
        p = r * v * (S if self.rescale else 1.0)  # eq 3.6
        a = torch.bmm(qf, gf.transpose(1, 2))  # (B, K, K), eq 3.7
        rd = min_shift_normalize(a, dims=(1, 2), eps=self.eps)
        d = torch.einsum("bij,biv->bjv", rd, v) * (K if self.rescale else 1.0)  # eq 3.8
        return {"P": p.view(B, -1, *grid), "D": d.view(B, -1, *grid), "R": r, "RD": rd}


# ---------------------------------------------------------------------------------------------- model
@register_model("maxnet", test_kwargs=dict(input_size=(1, 16, 16, 16), stream_widths=(4, 4, 6, 6, 6), embed_dim=4,
                                           latent_dim=8, prototypes_per_class=2))
class MAXNet(InterpretableClassifier):
    """MAXNet (seed 000 ch. 3). Input ``(B, in_chans, D, H, W)`` in [0, 1] -> logits ``(B, num_classes)``.

    Args:
        backbone: ``maxnet3d`` (the thesis stream, default), ``maxnet2d`` (2D variant), ``cnn3d`` or a timm
            name (2D); DAM uses the last three stages.
        stream_widths / stream_kernels / conv_padding: the thesis stream's filters (15/25/50/50/50),
            kernels (3/3/3/3/1) and padding (1; 0 = official valid convs).
        embed_dim: K of the DAM embedding (25). latent_dim: D_p (256). prototypes_per_class: M / classes (10).
        use_dam / use_mfm: ablations (Table 3.5): no DAM -> ``F~_n = W_f(F_n)``; no MFM -> concatenation.
        dam_value / dam_rescale: spec §3 options. eta: of ``-log(d + eta)``. ham_fusion: ``max`` (3.18) or ``sum``.
        prototype_init: ``"normal"`` (default, N(0.5, 0.1) as the official code) or ``"uniform"`` (U(0, 1), the
            ProtoPNet init spec §4 named). The thesis gives no init. Deviation from spec §4 (docs/maxnet.md): the
            sigmoid latents start at ~0.5 +- 0.03, so U(0, 1) prototypes sit ~D_p/12 = 21 away and
            ``-log(d + eta)`` barely differs between volumes (logit spread 0.02 at init). The head then gives
            CE no usable signal, and 2 of 3 seeds never left chance. N(0.5, 0.1) starts them ~8x closer.
        voxel_min_tau: 0 (default) = the hard min over voxels of eq 3.11; ``> 0`` = a log-mean-exp soft minimum
            (:func:`prototype_distances`; a deviation, docs/maxnet.md). It enters the head and, through ``d_j``,
            the cluster / contrastive losses (eqs 3.14-3.15).
    """

    explanation_kind = "ham"
    #: HAM needs d s_c / d F_n (eq 3.18): not exportable as a graph (models/export.py refuses with a message)
    explanation_needs_gradients = True
    mechanism_prefixes = ("dam.", "beta", "latent.", "prototypes", "fc.")

    def __init__(self, num_classes: int = 2, backbone: str = "maxnet3d", pretrained: bool = False,
                 backbone_weights: Optional[str] = None, in_chans: Optional[int] = None,
                 backbone_kwargs: Optional[dict] = None, stream_widths: Sequence[int] = (15, 25, 50, 50, 50),
                 stream_kernels: Sequence[int] = (3, 3, 3, 3, 1), conv_padding: int = 1, embed_dim: int = 25,
                 latent_dim: int = 256, prototypes_per_class: int = 10, use_dam: bool = True, use_mfm: bool = True,
                 dam_value: str = "embed", dam_rescale: bool = True, eta: float = 1e-4, ham_fusion: str = "max",
                 eps: float = 1e-6, prototype_init: str = "normal", voxel_min_tau: float = 0.0) -> None:
        if in_chans is None:
            in_chans = 1 if backbone in ("maxnet3d", "maxnet2d", "cnn3d") else 3
        super().__init__(num_classes, in_chans)
        kw = dict(backbone_kwargs or {})
        if backbone in ("maxnet3d", "maxnet2d"):
            kw.setdefault("widths", tuple(stream_widths))
            kw.setdefault("kernels", tuple(stream_kernels))
            kw.setdefault("conv_padding", conv_padding)
        self.backbone = Backbone(backbone, pretrained=pretrained, weights=backbone_weights, in_chans=in_chans, **kw)
        self.spatial_dims = sd = self.backbone.spatial_dims
        ch = self.backbone.channels
        if len(ch) < 3:
            raise ValueError(f"MAXNet needs a backbone with >= 3 stages; {backbone!r} has {len(ch)}.")
        if ham_fusion not in ("max", "sum"):
            raise ValueError(f"ham_fusion must be 'max' (eq 3.18) or 'sum' (eq 3.1), got {ham_fusion!r}.")
        c3, c4, c5 = ch[-3:]
        self.dam = nn.ModuleList([DualAttention(c3, c5, embed_dim, sd, dam_value, dam_rescale, eps),
                                  DualAttention(c4, c5, embed_dim, sd, dam_value, dam_rescale, eps)])
        self.beta = nn.Parameter(torch.full((2, 2), 0.5))  # eq 3.9: [stage 3/4][beta1, beta2]
        k = embed_dim
        self.latent = _CONV[sd](k if use_mfm else 3 * k, latent_dim, 1, bias=False)  # eq 3.11 "FC per voxel"
        self.prototypes_per_class = prototypes_per_class
        if prototype_init not in ("normal", "uniform"):
            raise ValueError(f"prototype_init must be 'normal' (N(0.5, 0.1), official code) or 'uniform' (U(0, 1)), "
                             f"got {prototype_init!r}.")
        self.prototype_init = prototype_init
        self._build_head(num_classes, latent_dim)
        self.use_dam, self.use_mfm, self.eta, self.eps = use_dam, use_mfm, eta, eps
        if not (voxel_min_tau >= 0 and math.isfinite(voxel_min_tau)):
            raise ValueError(f"voxel_min_tau must be a finite number >= 0 (0 = the thesis' hard min over voxels, "
                             f"eq 3.11), got {voxel_min_tau!r}.")
        self.voxel_min_tau = float(voxel_min_tau)
        self.latent_dim, self.ham_fusion = latent_dim, ham_fusion
        self.pretrained_cfg = dict(input_size=(in_chans,) + ((96, 112, 96) if sd == 3 else (224, 224)),
                                   mean=(0.0,) * in_chans, std=(1.0,) * in_chans, num_classes=num_classes,
                                   inner_normalization=dict(mean=self.backbone.mean.flatten().tolist(),
                                                            std=self.backbone.std.flatten().tolist()))

    # ---- the network ----------------------------------------------------------------------
    def _fuse_norm(self, x: Tensor) -> Tensor:
        return minmax_relu(x, dims=tuple(range(2, x.dim())), eps=self.eps)  # normc: per sample and channel

    def run(self, x: Tensor, feats: Optional[List[Tensor]] = None) -> Dict[str, Tensor]:
        """Everything of one forward pass: ``F`` (stage maps), ``Ft3``/``Ft4`` (eq 3.9), ``Gk3``, DAM weights
        ``R3, RD3, R4, RD4``, ``Z`` (B, Dp, *grid3), ``dist`` (B, M), ``sim`` (B, M), ``logits``."""
        if feats is None:
            self.check_input(x)
            feats = self.backbone(x)
        f3, f4, g5 = feats[-3:]
        out: Dict[str, Tensor] = {"F": feats}
        fts = []
        for i, (f, dam) in enumerate(zip((f3, f4), self.dam)):
            q, gk = dam.embed(f, g5)
            a = dam(f, q, gk, self.use_dam)
            if self.use_dam:
                ft = self.beta[i, 0] * a["P"] + self.beta[i, 1] * a["D"]
                out[f"R{i + 3}"], out[f"RD{i + 3}"] = a["R"], a["RD"]
            else:
                ft = q
            fts.append(ft)
            if i == 0:
                out["Gk3"] = gk
        out["Ft3"], out["Ft4"] = fts
        grid = f3.shape[2:]
        hs = [self._fuse_norm(fts[0]), upsample_to(self._fuse_norm(fts[1]), grid), self._fuse_norm(out["Gk3"])]
        fused = torch.stack(hs).amax(0) if self.use_mfm else torch.cat(hs, 1)  # eq 3.11 (max) / ablation (concat)
        z = torch.sigmoid(self.latent(fused))
        out["Z"] = z
        dist = prototype_distances(z.flatten(2), self.prototypes, self.voxel_min_tau)
        out["dist"] = dist
        out["sim"] = neg_log_distance(dist, self.eta)
        out["logits"] = self.fc(out["sim"])
        return out

    def _build_head(self, num_classes: int, latent_dim: int) -> None:
        """Prototypes (M = per class x K; N(0.5, 0.1) or U(0, 1), ``prototype_init``) and the FC head initialised
        1 / -0.5 (own / other class)."""
        dev = self.beta.device
        self.num_prototypes = self.prototypes_per_class * num_classes
        protos = torch.empty(self.num_prototypes, latent_dim, device=dev)
        protos.normal_(0.5, 0.1) if self.prototype_init == "normal" else protos.uniform_(0.0, 1.0)
        self.prototypes = nn.Parameter(protos)
        self.register_buffer("proto_class", torch.arange(num_classes, device=dev).repeat_interleave(
            self.prototypes_per_class), persistent=False)
        self.fc = nn.Linear(self.num_prototypes, num_classes, bias=False).to(dev)
        with torch.no_grad():  # own class 1, other classes -0.5 (spec §4)
            own = F.one_hot(self.proto_class, num_classes).t().float()
            self.fc.weight.copy_(own - 0.5 * (1 - own))

    def reset_classifier(self, num_classes: int) -> None:
        """New class count: the class prototypes and the FC head are rebuilt (both are per class); the 3D
        stream, DAM, MFM and latent projection keep their weights."""
        super().reset_classifier(num_classes)  # validates num_classes, updates num_classes / cfg
        self._build_head(int(num_classes), self.prototypes.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)["logits"]

    def latent_map(self, x: Tensor) -> Tensor:
        """Eq 3.10 ``p = max(M3, U(M4), U(M5))``, ``M_n = nr(mean_c X_n)`` on the stage-3 grid: (B, 1, *grid3)."""
        out = self.run(x)
        grid = out["Ft3"].shape[2:]
        ms = [minmax_relu(t.mean(1, keepdim=True), tuple(range(2, t.dim())), self.eps)
              for t in (out["Ft3"], out["Ft4"], out["F"][-1])]
        return torch.stack([upsample_to(m, grid) for m in ms]).amax(0)

    # ---- explanations ---------------------------------------------------------------------
    def _grad_run(self, x: Tensor, target: Optional[Tensor], which: str):
        """Forward with gradients on (also under no_grad / inference_mode) and ``d s_c / d X`` for the three
        maps ``X`` of ``which``: ``"stages"`` = (F_3, F_4, F_5) (HAM), ``"fused"`` = (F~_3, F~_4, G_5) (eq 3.16)."""
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            out = self.run(xg)
            c = self.resolve_target(out["logits"].detach(), target)
            ts = list(out["F"][-3:]) if which == "stages" else [out["Ft3"], out["Ft4"], out["F"][-1]]
            grads = torch.autograd.grad(out["logits"].gather(1, c.view(-1, 1)).sum(), ts)
        return out, c, ts, grads

    def ham_stage_maps(self, x: Tensor, target: Optional[Tensor] = None):
        """HAM per-stage maps ``H_n = nr(mean_c(g_n * F_n))`` for n = 3, 4, 5 (eq 3.18), plus logits."""
        out, _, feats, grads = self._grad_run(x, target, "stages")
        maps = [normalize_saliency((g * f).detach().float().mean(dim=1).clamp(min=0),
                                   scale=(g * f).detach().float().abs().mean(dim=1)) for f, g in zip(feats, grads)]
        return out["logits"].detach(), maps

    def forward_explain(self, x: Tensor, target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """HAM (eq 3.18): max-fusion of the stage-3/4/5 grad x activation maps at stage-3 resolution,
        upsampled to the input: ``(logits, saliency (B, *x.shape[2:]))`` (= ``create_explainer("ham", model)``)."""
        from .explainers.aggregate import HAM

        logits, maps = self.ham_stage_maps(x, target)
        return logits, HAM.fuse(maps, x.shape[2:], self.ham_fusion)

    def class_latent_map(self, x: Tensor, target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Eq 3.16 ``p^y = max(nr(mean_c(g3 F~3)), U(nr(mean_c(g4 F~4))), U(nr(mean_c(g5 G5))))`` with
        ``g_n = d s_y / d X_n`` (y = ``target``, default predicted): ``(logits, p^y (B, *grid_3))``."""
        out, _, ts, grads = self._grad_run(x, target, "fused")
        grid = ts[0].shape[2:]
        ms = [normalize_saliency((g * t).detach().float().mean(dim=1).clamp(min=0)) for t, g in zip(ts, grads)]
        p = torch.stack([upsample_to(m.unsqueeze(1), grid).squeeze(1) for m in ms]).amax(0)
        return out["logits"].detach(), p

    def cam_target_layer(self) -> nn.Module:
        return self.backbone.taps[-1]

    @torch.no_grad()
    def intrinsic_resolution(self, x: Tensor) -> Tuple[int, ...]:
        """Native grid of HAM (eq 3.18): the stage-3 grid its three stage maps are fused on (not the stage-5 grid of
        ``cam_target_layer``), read by the coarse-map guard of ``models/metrics/degenerate.py``."""
        with torch.inference_mode(False):
            return tuple(int(s) for s in self.run(x[:1])["F"][-3].shape[2:])

    def no_weight_decay(self) -> set:
        return {"beta"}


# ---------------------------------------------------------------------------------------------- PCR
def reference_path_for(checkpoint_path: str) -> str:
    """Where the PCR reference set of a checkpoint lives: ``<ckpt without suffix>.pcr.safetensors``."""
    root, _ = os.path.splitext(os.fspath(checkpoint_path))
    return root + ".pcr.safetensors"


class ReferenceSet:
    """PCR prediction basis (spec §8): per training volume its id, true label, prediction and ``p^{y^}``.

    ``maps`` (N, S_3) float; ``labels``, ``preds``, ``ids`` (N,) long; ``grid`` the stage-3 grid.
    """

    def __init__(self, maps: Tensor, labels: Tensor, preds: Tensor, ids: Tensor, grid: Sequence[int]) -> None:
        n = maps.shape[0]
        if not (labels.shape[0] == preds.shape[0] == ids.shape[0] == n) or maps.dim() != 2:
            raise ValueError("ReferenceSet needs maps (N, S) and labels/preds/ids (N,) of the same N.")
        self.maps, self.labels, self.preds, self.ids = maps, labels.long(), preds.long(), ids.long()
        self.grid = tuple(int(g) for g in grid)

    def __len__(self) -> int:
        return self.maps.shape[0]

    def save(self, path: str) -> str:
        """Atomic safetensors write (temp file in the same folder + ``os.replace``)."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        t = {"maps": self.maps.detach().cpu().contiguous(), "labels": self.labels.cpu(), "preds": self.preds.cpu(),
             "ids": self.ids.cpu(), "grid": torch.tensor(self.grid, dtype=torch.long)}
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            save_file(t, tmp, metadata={"format": "maxnet-pcr-v1"})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str) -> "ReferenceSet":
        from safetensors.torch import load_file

        if not os.path.isfile(path):
            raise FileNotFoundError(f"PCR reference set {path!r} not found. Build it after training with "
                                    "models.maxnet.build_reference_set(model, train_loader).save(path).")
        t = load_file(path)
        missing = {"maps", "labels", "preds", "ids", "grid"} - set(t)
        if missing:
            raise ValueError(f"{path!r} is not a MAXNet PCR reference set (missing {sorted(missing)}).")
        return cls(t["maps"].float(), t["labels"], t["preds"], t["ids"], t["grid"].tolist())

    def retrieve(self, query_maps: Tensor, query_preds: Tensor, k: int = 3, same_prediction: bool = True,
                 chunk: int = 256) -> Tuple[Tensor, Tensor]:
        """Eqs 3.19-3.20: the ``k`` references with the smallest ``D = mean_v (p^c_v - p^k_v)^2`` among those
        with the same prediction. Returns ``(indices (B, k), distances (B, k))``; index -1 / inf if fewer."""
        q = query_maps.flatten(1).float()
        if q.shape[1] != self.maps.shape[1]:
            raise ValueError(f"query maps have {q.shape[1]} voxels, the reference set {self.maps.shape[1]} "
                             f"(grid {self.grid}); use the model and input size the set was built with.")
        refs = self.maps.to(q.device).float()
        d = torch.cat([((q[:, None, :] - refs[None, i:i + chunk]) ** 2).mean(2) for i in range(0, len(refs), chunk)],
                      1) if len(refs) else q.new_zeros(q.shape[0], 0)
        if same_prediction:
            ok = self.preds.to(q.device)[None, :] == query_preds.to(q.device).view(-1, 1)
            d = torch.where(ok, d, torch.full_like(d, float("inf")))
        kk = min(k, d.shape[1])
        val, idx = d.topk(kk, dim=1, largest=False, sorted=True)
        idx = torch.where(torch.isfinite(val), idx, torch.full_like(idx, -1))
        if kk < k:
            pad = k - kk
            idx = torch.cat([idx, idx.new_full((idx.shape[0], pad), -1)], 1)
            val = torch.cat([val, val.new_full((val.shape[0], pad), float("inf"))], 1)
        return idx, val


@torch.no_grad()
def build_reference_set(model: MAXNet, loader, correct_only: bool = True, device=None,
                        dtype: torch.dtype = torch.float32) -> ReferenceSet:
    """PCR creation (spec §8): ``p^{y^}`` (eq 3.16) of every training volume; by default only correctly
    classified ones are kept. ``loader`` yields dict batches with ``image``, ``label`` (and optional ``index``)."""
    was = model.training
    model.eval()
    maps, labels, preds, ids, n, grid = [], [], [], [], 0, None
    try:
        for batch in loader:
            x = batch["image"].to(device) if device else batch["image"]
            y = batch["label"].long().view(-1)
            logits, p = model.class_latent_map(x)
            pr = logits.argmax(1).cpu()
            idx = batch.get("index", torch.arange(n, n + len(y))).long().view(-1)
            n += len(y)
            keep = (pr == y) if correct_only else torch.ones_like(y, dtype=torch.bool)
            grid = tuple(p.shape[1:])
            maps.append(p.flatten(1).cpu()[keep].to(dtype))
            labels.append(y[keep])
            preds.append(pr[keep])
            ids.append(idx[keep])
    finally:
        model.train(was)
    if grid is None:
        raise ValueError("build_reference_set: the loader yielded no batch.")
    return ReferenceSet(torch.cat(maps), torch.cat(labels), torch.cat(preds), torch.cat(ids), grid)


def top_fraction_mask(maps_grid: Tensor, size: Sequence[int], q: float = 0.1) -> Tensor:
    """Boolean (B, *size): the top ``q`` fraction of voxels of ``maps_grid`` (B, *grid) after upsampling."""
    up = upsample_to(maps_grid.unsqueeze(1).float(), size).flatten(1)
    k = max(1, int(round(q * up.shape[1])))
    idx = up.topk(k, dim=1).indices
    m = torch.zeros_like(up, dtype=torch.bool).scatter_(1, idx, True)
    return m.view(-1, *size)


def _cos(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@torch.no_grad()
def swap_logits(model: nn.Module, x: Tensor, query_maps: Tensor, ref_maps: Tensor, grid: Sequence[int],
                q: float = 0.1) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The five logit vectors of eqs 3.29-3.30: ``s(m), s(mK), s(mC), s(mK'), s(mC')`` (each (B, classes)).
    K/C zero the top-``q`` voxels of ``p^k`` / ``p^c`` (upsampled to the input), K'/C' keep only them."""
    size = x.shape[2:]
    mk = top_fraction_mask(query_maps.view(-1, *grid), size, q).unsqueeze(1).to(x.dtype)
    mc = top_fraction_mask(ref_maps.view(-1, *grid), size, q).unsqueeze(1).to(x.dtype)
    return model(torch.cat([x, x * (1 - mk), x * (1 - mc), x * mk, x * mc])).chunk(5)


def swap_cosines(s0: Tensor, sK: Tensor, sC: Tensor, sK2: Tensor, sC2: Tensor) -> Tuple[Tensor, Tensor]:
    """``rho_D = cos(s(m) - s(mK), s(m) - s(mC))``, ``rho_I = cos(s(mK'), s(mC'))`` from :func:`swap_logits`.

    Degenerate for 2 classes (docs/maxnet.md): ``rho_I`` compares raw logit vectors, whose common offset
    (softmax-invariant; large for this head, where every logit is a sum of ``-log`` distances) dominates, so
    ``rho_I -> 1``; with centred logits a 2-d vector is ``(m/2, -m/2)`` and the cosine is ``sign(m_K' m_C')``
    = +-1 (:func:`insertion_agreement`)."""
    return _cos(s0 - sK, s0 - sC), _cos(sK2, sC2)


def insertion_agreement(sK2: Tensor, sC2: Tensor) -> Tensor:
    """1 where the kept-voxel volumes ``mK'`` and ``mC'`` get the same predicted class, else 0 (the only
    information a centred 2-class insertion cosine carries: it equals ``2 * agreement - 1``)."""
    return (sK2.argmax(1) == sC2.argmax(1)).float()


@torch.no_grad()
def swap_confidences(model: nn.Module, x: Tensor, query_maps: Tensor, ref_maps: Tensor, grid: Sequence[int],
                     q: float = 0.1) -> Tuple[Tensor, Tensor]:
    """Eqs 3.29-3.30 read as cosines (spec §8, §12.18): with K/C = the query volume with the top-``q`` voxels
    of ``p^k`` / ``p^c`` zeroed and K'/C' = only those kept, ``rho_D = cos(s(m) - s(mK), s(m) - s(mC))`` and
    ``rho_I = cos(s(mK'), s(mC'))``; ``s`` = logit vector. ``query_maps``, ``ref_maps`` (B, S_3).
    See :func:`swap_cosines` for why ``rho_I`` is degenerate for 2 classes."""
    return swap_cosines(*swap_logits(model, x, query_maps, ref_maps, grid, q))
