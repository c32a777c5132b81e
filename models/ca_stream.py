"""CA-Stream: a cross-attention stream that replaces global average pooling (seed 001, ch. 3).

A learnable query ``q_0`` runs beside a (frozen) CNN. At every stage ``ℓ`` it cross-attends to the
stage's feature map ``F_ℓ`` (rows = positions, columns = channels) and is projected to the next
stage's width; the last state replaces the GAP vector in front of the backbone's own classifier:

* (3.1)/(3.2) ``a_ℓ = softmax(F_ℓ q_ℓ / sqrt(d_ℓ)) = h_ℓ(Σ_k q_k f^k)``: a class-agnostic CAM with
  channel weights ``q`` (:meth:`CrossAttention.attention_logits`).
* (3.3)/(3.4) ``CA_ℓ(q, F) = F^T a``: attention-weighted average of positions (GAP if ``a`` is uniform).
* (3.7) ``q_{ℓ+1} = W_ℓ CA_ℓ(q_ℓ, F_ℓ)``, ``W_ℓ`` a biased Linear ``d_ℓ -> d_{ℓ+1}``, ``d_{L+1} = d_L``;
  ``y = g(q_{L+1})`` with ``g`` the classifier after pooling (here the zoo baseline's ``drop`` + ``fc``).
* (3.8) PROJ->CA variant: ``CA_ℓ(q, F) = (F W^V)^T h_ℓ(F W^K q)`` (``proj_kv=True``).
* Class-specific variant: ``Q_0 ∈ R^{C x d_0}``; the row of the label during training, of the
  *baseline* (GAP head) prediction at inference.

The vanilla block has no Q/K/V projections, no residual, no normalisation (like the official code), so
with the paper's stage mapping the stream adds exactly 439,808 parameters to ResNet-18 and 6,969,152
to ResNet-50 (Table 3.3; the thesis prints "0.44M" / "6.96M").

Stages (spec §3.1) are found generically through timm's ``feature_info``: the stream attends to every
feature stage the :class:`~models.backbones.Backbone` exposes, except that when the first (stem)
feature is followed by a stage-less pooling (the tensor entering the next stage has the same channels
but a lower resolution: ResNet's max-pool), the pooled tensor that the first stage actually receives
is used instead (captured by a forward pre-hook). This gives the paper's mapping: ResNets 5 blocks
(post-max-pool stem + layer1..4, 56x56 stem at 224 px), ConvNeXt 4 blocks (stages 0..3; timm exposes
no stem feature there). ``start_stage`` selects S_start..S_L (Table 3.5).

Parameter names keep the baseline's ``backbone.*`` / ``fc.*``; the stream lives under ``stream.*``
(``mechanism_prefixes``), so a plain baseline checkpoint loads with exactly the stream keys new.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone
from .base import InterpretableClassifier, is_capturing, normalize_saliency
from .baseline import global_avg_pool
from .registry import register_model

__all__ = ["CrossAttention", "CABlock", "CAStream", "CAStreamClassifier"]


class CrossAttention(nn.Module):
    """Single-query cross attention over a feature map (eqs. 3.1-3.3; eq. 3.8 with ``proj_kv``).

    Input ``q (B, d)`` and ``feat (B, d, *spatial)``; returns ``(CA(q, F) (B, d), a (B, p))``.
    Logits and softmax are computed in float32 (large ``d``, unnormalised features, AMP).
    """

    def __init__(self, dim: int, proj_kv: bool = False) -> None:
        super().__init__()
        self.dim = int(dim)
        self.scale = 1.0 / math.sqrt(self.dim)
        self.proj_kv = bool(proj_kv)
        if self.proj_kv:  # eq. 3.8: W^K, W^V in R^{d x d} (biased Linears: 18.13M stream params, Table 3.4)
            self.key = nn.Linear(dim, dim)
            self.value = nn.Linear(dim, dim)

    def _check(self, q: Tensor, feat: Tensor) -> None:
        if feat.dim() < 3 or feat.shape[1] != self.dim or q.shape != (feat.shape[0], self.dim):
            raise ValueError(f"CrossAttention(dim={self.dim}) expects q (B, {self.dim}) and features "
                             f"(B, {self.dim}, *spatial); got q {tuple(q.shape)} and features "
                             f"{tuple(feat.shape)}. The stream width must follow the backbone's stage widths.")

    def attention_logits(self, q: Tensor, feat: Tensor) -> Tensor:
        """``F q / sqrt(d) = Σ_k q_k f^k / sqrt(d)`` (eq. 3.2; ``F W^K q`` for eq. 3.8), shape (B, p)."""
        self._check(q, feat)
        with torch.autocast(feat.device.type, enabled=False):  # fp32 even under AMP
            return self._logits(q, feat)

    def _logits(self, q: Tensor, feat: Tensor) -> Tensor:
        tokens = feat.flatten(2).float()  # (B, d, p): column k is channel map f^k
        q = q.float()
        if self.proj_kv:
            keys = F.linear(tokens.transpose(1, 2), self.key.weight.float(), self.key.bias.float())  # (B, p, d)
            return torch.einsum("bpd,bd->bp", keys, q) * self.scale
        return torch.einsum("bdp,bd->bp", tokens, q) * self.scale

    def forward(self, q: Tensor, feat: Tensor) -> Tuple[Tensor, Tensor]:
        self._check(q, feat)
        with torch.autocast(feat.device.type, enabled=False):  # fp32 even under AMP
            return self._attend(q, feat)

    def _attend(self, q: Tensor, feat: Tensor) -> Tuple[Tensor, Tensor]:
        a = self._logits(q, feat).softmax(dim=1)  # eq. 3.1
        tokens = feat.flatten(2).float()
        if self.proj_kv:
            values = F.linear(tokens.transpose(1, 2), self.value.weight.float(), self.value.bias.float())
            return torch.einsum("bpd,bp->bd", values, a), a  # eq. 3.8
        return torch.einsum("bdp,bp->bd", tokens, a), a  # eq. 3.3 / 3.4


class CABlock(nn.Module):
    """One stream step (eq. 3.7): ``q_{ℓ+1} = W_ℓ CA_ℓ(q_ℓ, F_ℓ)``."""

    def __init__(self, dim: int, out_dim: int, proj_kv: bool = False) -> None:
        super().__init__()
        self.attn = CrossAttention(dim, proj_kv=proj_kv)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, q: Tensor, feat: Tensor) -> Tuple[Tensor, Tensor]:
        z, a = self.attn(q, feat)
        return self.proj(z.to(self.proj.weight.dtype)), a


class CAStream(nn.Module):
    """The stream: ``q_0`` (or a per-class table ``Q_0``) and one :class:`CABlock` per stage.

    ``dims``: stage widths ``d_start..d_L``; the last projection is square (``d_{L+1} = d_L``).
    """

    def __init__(self, dims: List[int], num_classes: int = 0, class_specific: bool = False,
                 proj_kv: bool = False, q0_init: str = "trunc_normal") -> None:
        super().__init__()
        dims = [int(d) for d in dims]
        if not dims:
            raise ValueError("CAStream needs at least one stage width.")
        self.dims = dims
        self.class_specific = bool(class_specific)
        shape = (int(num_classes), dims[0]) if class_specific else (dims[0],)
        self.q0 = nn.Parameter(torch.zeros(shape))
        outs = dims[1:] + [dims[-1]]
        self.blocks = nn.ModuleList(CABlock(d, o, proj_kv) for d, o in zip(dims, outs))
        self.q0_init = q0_init
        self._init_q0()

    @torch.no_grad()
    def _init_q0(self) -> None:
        if self.q0_init == "trunc_normal":  # spec §6 recommendation
            nn.init.trunc_normal_(self.q0, std=0.02)
        elif self.q0_init == "official":  # the official code: N(1, 1)
            nn.init.normal_(self.q0, mean=1.0, std=1.0)
        elif self.q0_init == "zeros":  # zeros: the first block is exactly GAP (eq. 3.4)
            self.q0.zero_()
        else:
            raise ValueError(f"q0_init must be 'trunc_normal', 'official' or 'zeros', got {self.q0_init!r}.")

    def reset_queries(self, num_classes: int) -> None:
        """Class-specific stream: a fresh ``Q_0`` table for ``num_classes`` rows (same init rule)."""
        if self.class_specific:
            self.q0 = nn.Parameter(self.q0.new_zeros(int(num_classes), self.dims[0]))
            self._init_q0()

    def initial_query(self, batch: int, classes: Optional[Tensor] = None) -> Tensor:
        if self.class_specific:
            if classes is None:
                raise ValueError("the class-specific stream needs the class of each image (label or prediction).")
            return self.q0[classes]
        return self.q0.unsqueeze(0).expand(batch, -1)

    def forward(self, feats: List[Tensor], classes: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor]]:
        """``feats``: stage maps F_start..F_L. Returns ``(q_{L+1} (B, d_L), [a_start..a_L])``."""
        if len(feats) != len(self.blocks):
            raise ValueError(f"CAStream has {len(self.blocks)} blocks but got {len(feats)} feature maps.")
        q = self.initial_query(feats[0].shape[0], classes)
        attns = []
        for block, f in zip(self.blocks, feats):
            q, a = block(q, f)
            attns.append(a)
        return q, attns


@register_model("ca_stream", test_kwargs=dict(backbone="resnet18"))
class CAStreamClassifier(InterpretableClassifier):
    """Backbone + CA-Stream pooling + the baseline's classifier (seed 001 ch. 3).

    Args:
        num_classes, backbone, pretrained, backbone_weights, in_chans, drop_rate, backbone_kwargs: as
            :class:`~models.baseline.Baseline` (same parameter names, so baseline checkpoints load).
        start_stage: first stream stage S_start (0 = stem for ResNets; Table 3.5). Negative counts from
            the end (-1 = S_L only).
        pooled_stem: use the pooled stem (input of the first stage) as S0; ``None`` = auto-detect
            (see module docstring), ``False`` = timm's first feature as is.
        proj_kv: PROJ->CA blocks (eq. 3.8).
        class_specific: one ``q_0`` per class (label at training, baseline prediction at inference).
        q0_init: ``"trunc_normal"`` (std 0.02, default), ``"official"`` (N(1,1)) or ``"zeros"``.
    """

    explanation_kind = "attention"
    mechanism_prefixes = ("stream.",)

    def __init__(self, num_classes: int = 10, backbone: str = "resnet18", pretrained: bool = False,
                 backbone_weights: Optional[str] = None, in_chans: Optional[int] = None, drop_rate: float = 0.0,
                 backbone_kwargs: Optional[dict] = None, start_stage: int = 0, pooled_stem: Optional[bool] = None,
                 proj_kv: bool = False, class_specific: bool = False, q0_init: str = "trunc_normal") -> None:
        if in_chans is None:
            in_chans = 1 if backbone == "cnn3d" else 3
        super().__init__(num_classes, in_chans)
        self.backbone = Backbone(backbone, pretrained=pretrained, weights=backbone_weights, in_chans=in_chans,
                                 **(backbone_kwargs or {}))
        self.spatial_dims = self.backbone.spatial_dims
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.backbone.num_features, num_classes)
        self.class_specific = bool(class_specific)

        # -- stage mapping through feature_info (+ a pre-hook for a pooled stem) ------------------
        self.stem_tap = nn.Identity()  # hook point for the pooled stem S0 (when used)
        self._captured: Optional[Tensor] = None
        stem_module = self._first_stage_module() if len(self.backbone.channels) > 1 else None
        if pooled_stem and stem_module is None:
            raise ValueError(f"pooled_stem=True needs a backbone with at least two feature stages ({backbone!r}).")
        handle = stem_module.register_forward_pre_hook(self._capture_stem_input) if stem_module is not None else None
        detected, stem_channels = self._probe_stem() if handle is not None and pooled_stem is not False else (False, 0)
        self.pooled_stem = detected if pooled_stem is None else bool(pooled_stem)
        if handle is not None and not self.pooled_stem:
            handle.remove()
        dims = list(self.backbone.channels)
        if self.pooled_stem:
            dims[0] = stem_channels
        self.num_stages = len(dims)  # S0..SL
        start = int(start_stage) + (self.num_stages if start_stage < 0 else 0)
        if not 0 <= start < self.num_stages:
            raise ValueError(f"start_stage={start_stage} is out of range: backbone {backbone!r} gives the stream "
                             f"{self.num_stages} stages S0..S{self.num_stages - 1} (widths {dims}).")
        self.start_stage = start
        self.stream = CAStream(dims[start:], num_classes=num_classes, class_specific=class_specific,
                               proj_kv=proj_kv, q0_init=q0_init)

    # ---- stage discovery ----------------------------------------------------------------------
    def _first_stage_module(self) -> Optional[nn.Module]:
        """The module of timm feature 1 (the first stage after the stem), found by its feature_info name."""
        name = self.backbone.stage_names[1]
        body = self.backbone.body
        for cand in (name, name.replace(".", "_"), "model." + name, "graph." + name):  # timm / module-instance wrappers
            try:
                return body.get_submodule(cand)
            except AttributeError:
                continue
        return None

    def _capture_stem_input(self, module: nn.Module, args):
        if not args or not torch.is_tensor(args[0]):
            return None
        x = self.stem_tap(args[0])
        self._captured = x
        return (x,) + tuple(args[1:])

    @torch.no_grad()
    def _probe_stem(self) -> Tuple[bool, int]:
        """Dry run: does the first stage receive the stem feature pooled (same channels, lower resolution)?

        Returns ``(pooled, channels of the tensor entering the first stage)``."""
        size = getattr(getattr(self.backbone.body, "patch_embed", None), "img_size", None)  # ViTs
        side = int(size[0] if isinstance(size, (tuple, list)) else size or (64 if self.spatial_dims == 2 else 32))
        was_training = self.backbone.training
        self.backbone.eval()  # never move BatchNorm statistics during the dry run
        try:
            feats = self.backbone(torch.rand((1, self.in_chans) + (side,) * self.spatial_dims))
        finally:
            self.backbone.train(was_training)
        captured, self._captured = self._captured, None
        pooled = (captured is not None and captured.dim() == feats[0].dim() and captured.shape[1] == feats[0].shape[1]
                  and captured.shape[2:].numel() < feats[0].shape[2:].numel())
        return pooled, int(captured.shape[1]) if captured is not None else 0

    def stage_features(self, x: Tensor) -> List[Tensor]:
        """Stream stage maps S0..SL ``(B, d_ℓ, *spatial_ℓ)`` (S0 = pooled stem when used)."""
        self.check_input(x)
        self._captured = None
        feats = list(self.backbone(x))
        captured, self._captured = self._captured, None
        if self.pooled_stem:
            if captured is None:
                raise RuntimeError("the pooled-stem hook did not fire; build with pooled_stem=False for this backbone.")
            feats[0] = captured
        return feats

    # ---- forward ------------------------------------------------------------------------------
    def _check_labels(self, labels: Tensor, batch: int) -> Tensor:
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.dim() != 1 or labels.shape[0] != batch:
            raise ValueError(f"the class-specific CA-Stream needs integer class labels of shape ({batch},), got "
                             f"{tuple(labels.shape)} {labels.dtype}. Multi-label targets are not supported: use the "
                             "class-agnostic stream (class_specific=False).")
        if (labels < -1).any() or (labels >= self.num_classes).any():
            raise ValueError(f"labels must be in [0, {self.num_classes}) (-1 = the baseline prediction), got "
                             f"{labels.tolist()}.")
        return labels

    def forward_stream(self, x: Tensor, labels: Optional[Tensor] = None) -> Dict[str, object]:
        """Full pass: ``logits``, ``gap_logits`` (the original GAP model, same features), ``attentions``
        ``[a_start..a_L]`` (B, p_ℓ), ``shapes`` (spatial shapes), ``query_class`` (class-specific only)."""
        feats = self.stage_features(x)
        out: Dict[str, object] = {}
        gap_logits = self.fc(self.drop(global_avg_pool(feats[-1])))
        classes = None
        if self.class_specific:
            # training: the label's row; inference: the row of the original (GAP) model's prediction
            pred = gap_logits.argmax(dim=1)
            if labels is None:
                classes = pred
            else:  # -1 = the baseline prediction (forward_explain's default, exported graphs)
                labels = torch.as_tensor(labels, device=x.device).long().reshape(-1) if is_capturing() \
                    else self._check_labels(labels, x.shape[0]).to(x.device)
                classes = torch.where(labels < 0, pred, labels)
            out["query_class"] = classes
        q, attns = self.stream(feats[self.start_stage:], classes)
        out["logits"] = self.fc(self.drop(q.to(self.fc.weight.dtype)))
        out["gap_logits"] = gap_logits
        out["attentions"] = attns
        out["shapes"] = [tuple(f.shape[2:]) for f in feats[self.start_stage:]]
        return out

    def forward(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """Logits ``g(q_{L+1})``. ``labels`` are used only by the class-specific variant (training)."""
        return self.forward_stream(x, labels)["logits"]

    def forward_gap(self, x: Tensor) -> Tensor:
        """The original model (GAP + the same classifier) on the same backbone."""
        return self.fc(self.drop(global_avg_pool(self.stage_features(x)[-1])))

    def forward_explain(self, x: Tensor, target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Raw attention of the last block, upsampled and min-max normalised (spec §7).

        Class-agnostic: ``target`` is ignored, except by the class-specific variant, where it picks the
        query row (default: the baseline prediction, as at inference).
        """
        labels = None
        if self.class_specific and target is not None:
            labels = torch.as_tensor(target, device=x.device).long().reshape(-1)
            if labels.numel() == 1 and x.shape[0] > 1 and not is_capturing():
                labels = labels.expand(x.shape[0])
        out = self.forward_stream(x, labels)
        a = out["attentions"][-1]
        maps = a.view(a.shape[0], *out["shapes"][-1])
        return out["logits"], normalize_saliency(maps, x.shape[2:])

    def attention_maps(self, x: Tensor, labels: Optional[Tensor] = None) -> List[Tensor]:
        """All raw attention maps ``a_start..a_L`` reshaped to ``(B, *spatial_ℓ)`` (not normalised)."""
        out = self.forward_stream(x, labels)
        return [a.view(a.shape[0], *s) for a, s in zip(out["attentions"], out["shapes"])]

    def cam_target_layer(self) -> nn.Module:
        return self.backbone.taps[-1]

    def reset_classifier(self, num_classes: int) -> None:
        """New ``fc`` (and, class-specific, a new ``Q_0`` table); backbone and stream blocks are kept."""
        super().reset_classifier(num_classes)
        self.stream.reset_queries(num_classes)

    def stream_parameter_count(self) -> int:
        return sum(p.numel() for _, p in self.mechanism_parameters())


def baseline_from_timm(name: str, weights: str, out_path: Optional[str] = None):
    """A zoo :class:`~models.baseline.Baseline` holding a *complete* timm classifier (backbone and head).

    CA-Stream interprets an already trained model (e.g. timm's ImageNet ResNet-50), so its classifier
    must be kept; ``Baseline(backbone_weights=...)`` drops it on purpose. This reads a local timm weights
    file (safetensors / state dict, never unpickled), loads the backbone strictly and copies the head
    into ``fc``. Only single-Linear heads (``pretrained_cfg['classifier']``, e.g. ResNet ``fc``) fit the
    zoo baseline (GAP + linear); heads with a norm (ConvNeXt ``head.norm``) raise an error. With
    ``out_path`` the result is saved (then ``checkpoint_path: <out_path>`` in a CA-Stream config).
    """
    import timm

    from .baseline import Baseline
    from .weights import WeightLoadError, read_state_dict, save_weights

    sd = read_state_dict(weights)
    heads = timm.create_model(name, pretrained=False).pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    head = heads[0] if len(heads) == 1 else None
    if head is None or f"{head}.weight" not in sd or any(k.startswith(head.rsplit(".", 1)[0] + ".norm")
                                                            for k in sd if "." in head):
        raise WeightLoadError(f"{name!r}: the classifier {heads} is not a single Linear after GAP (or is missing "
                              f"from {weights!r}); the zoo baseline cannot hold it. Fine-tune a zoo baseline instead "
                              "(python train.py fit --config configs/baseline/synthetic.yaml with your data).")
    w, b = sd[f"{head}.weight"], sd.get(f"{head}.bias")
    model = Baseline(num_classes=w.shape[0], backbone=name, backbone_weights=weights)
    with torch.no_grad():
        model.fc.weight.copy_(w)
        if b is not None:
            model.fc.bias.copy_(b)
    if out_path:
        save_weights(model, out_path)
    return model
