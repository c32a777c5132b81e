"""X-Pruner: explainability-aware class-wise masks, learned per-layer pruning rates, physical pruning of timm ViTs.

Seed 000 ch. 5 (CVPR 2023 X-Pruner); spec ``/work/shared/specs/xpruner.md`` (choices marked [ours] there).

Masks live *outside* the timm modules (``xp.head_mask.{i}``, ``xp.mlp_mask.{i}``) and act through forward hooks
on timm's own ``blocks[i].attn.proj`` (pre-hook: gate each head's slice of the proj input, eq. 5.4) and
``blocks[i].mlp.fc2`` (pre-hook: gate the post-GELU hidden units, eq. 5.5, ``mlp_site="post_act"``) or
``blocks[i].mlp.fc1`` (forward hook, literal 5.5 ``pre_act``: row + bias). timm's state-dict keys are unchanged.

Mask shapes (per block i): head ``(C, H)``, MLP ``(C, m)``; ``class_agnostic=True``: ``(1, H)``/``(1, m)``.
Groups g are ordered ``[attn_0, mlp_0, attn_1, mlp_1, ...]``; ``xp.theta`` is ``(2L,)``.

Gates (``gate_mode``):
* ``oracle`` (training): ``gate_i = t_iᵀ E`` with ``t`` the one-hot (or soft, mixup) label passed as ``labels``;
* ``mean`` (label-free default): ``Ē = mean_c E[c]`` for every sample;
* ``two_pass_hard`` / ``two_pass_soft``: pass 1 with ``Ē``, pass 2 with ``E[argmax z1]`` / ``softmax(z1)ᵀ E``;
* ``deploy``: ``keep_u · Ē_u`` -- exactly what :func:`prune_model` folds into the weights;
* ``off``: no gate (the plain timm model).

``E = M`` in stage 1, ``E = M̂`` (eq. 5.9, :func:`pruning_op`) once ``xp.pruning_active`` is set (stage 2).

Physically pruned models (``widths={"heads": [...], "mlp_hidden": [...]}`` or a path to a saved pruned model)
are plain timm ``VisionTransformer`` s whose blocks hold timm ``Attention(dim, num_heads=h_l, attn_head_dim=hd)``
and timm ``Mlp(dim, hidden_features=m_l)``; an empty branch is :class:`EmptyBranch` (returns its bias).
"""
from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import create_timm_vit
from .base import InterpretableClassifier, is_capturing, normalize_saliency
from .registry import register_model

__all__ = ["XPruner", "EmptyBranch", "pruning_op", "unit_scores", "soft_rates", "hard_rates", "accumulated_rate",
           "lagrangian", "sparsity_loss", "smoothness_loss", "unit_costs", "analytic_macs", "measure_flops",
           "prune_model", "save_pruned", "load_pruned", "read_widths", "select_keep", "uniform_keep",
           "random_keep", "magnitude_keep", "xpruner_keep", "alpha_for_flops", "flops_remaining"]

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GATE_MODES = ("off", "oracle", "mean", "two_pass_hard", "two_pass_soft", "deploy")
_TINY = dict(backbone="deit_tiny_patch16_224",
             backbone_kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3))


# ----------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------
class EmptyBranch(nn.Module):
    """A block branch with every unit pruned: returns its surviving output bias, broadcast to ``(B, N, D)``."""

    def __init__(self, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.dim = int(dim)
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        out = x * 0.0  # keeps shape/dtype/device (and a trace-friendly dependency on x)
        return out + self.bias if self.bias is not None else out


def _refresh_pruning_active(module: nn.Module, _incompatible) -> None:
    module._pruning_active()


def _create_vit(name: str, pretrained: bool, weights: Optional[str], in_chans: int, num_classes: int,
                kwargs: dict) -> nn.Module:
    kw = dict(num_classes=num_classes, in_chans=in_chans)
    kw.update(kwargs)
    return create_timm_vit(name, pretrained, weights, kw, "X-Pruner",
                           "deit_tiny_patch16_224, deit_small_patch16_224 (paper), deit_base_patch16_224",
                           extra=" Swin is not supported yet.")


def read_widths(widths: Union[None, dict, str, os.PathLike]) -> Optional[dict]:
    """``{"heads": [...], "mlp_hidden": [...]}`` from a dict, a ``.json`` file or a pruned ``.safetensors``."""
    if widths is None or isinstance(widths, dict):
        return widths
    path = os.fspath(widths)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"widths file {path!r} does not exist; pass the pruned model's .safetensors "
                                "(written by models.xpruner.save_pruned) or a JSON {heads, mlp_hidden}.")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if "xp_arch" not in meta:
            raise ValueError(f"{path!r} has no 'xp_arch' metadata: it was not written by save_pruned.")
        return json.loads(meta["xp_arch"])
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------
@register_model("xpruner", test_kwargs=dict(_TINY))
class XPruner(InterpretableClassifier):
    """A timm ViT/DeiT with X-Pruner's class-wise unit masks (eqs. 5.4-5.5) and pruning thresholds (5.9).

    Args:
        num_classes, backbone, pretrained, backbone_weights, in_chans, backbone_kwargs: as every zoo model
            (the timm ViT keeps its own classifier ``vit.head``).
        widths: build the *physically pruned* architecture (dict / path, see :func:`read_widths`); no masks.
        mlp_site: ``"post_act"`` (default) or ``"pre_act"`` (literal eq. 5.5).
        class_agnostic: one mask row shared by all classes (Table 5.3 "w/o mask").
        gate_mode: label-free inference mode (module docstring); training passes ``labels``.
        n, pruned_branch, p: eq. 5.9 (tanh slope n = 10; pruned units get ``eps = 1/p`` (``"eps"``), 0
            (``"zero"``) or the literal ``p`` (``"literal"``, diverges)).
        drop_path_rate: stochastic depth of the timm ViT (0 for mask training).
    """

    explanation_kind = "cam"
    mechanism_prefixes = ("xp.",)

    def __init__(self, num_classes: int = 10, backbone: str = "deit_small_patch16_224", pretrained: bool = False,
                 backbone_weights: Optional[str] = None, in_chans: int = 3, backbone_kwargs: Optional[dict] = None,
                 widths: Union[None, dict, str] = None, mlp_site: str = "post_act", class_agnostic: bool = False,
                 gate_mode: str = "mean", n: float = 10.0, pruned_branch: str = "eps", p: float = 500.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__(num_classes, in_chans)
        if mlp_site not in ("post_act", "pre_act"):
            raise ValueError(f"mlp_site must be 'post_act' or 'pre_act', got {mlp_site!r}.")
        if pruned_branch not in ("eps", "zero", "literal"):
            raise ValueError(f"pruned_branch must be 'eps', 'zero' or 'literal', got {pruned_branch!r}.")
        widths = read_widths(widths)
        kw = dict(backbone_kwargs or {})
        kw.setdefault("drop_path_rate", drop_path_rate)
        self.backbone_name, self.backbone_kwargs = backbone, dict(backbone_kwargs or {})
        self.vit = _create_vit(backbone, pretrained and widths is None, backbone_weights if widths is None else None,
                               in_chans, num_classes, kw)
        v = self.vit
        cfg = getattr(v, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", _IMAGENET_MEAN), cfg.get("std", _IMAGENET_STD)
        if len(mean) != in_chans:
            mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.depth, self.dim = len(v.blocks), v.embed_dim
        a0 = v.blocks[0].attn
        self.num_heads, self.head_dim = a0.num_heads, a0.head_dim
        self.mlp_hidden = v.blocks[0].mlp.fc1.out_features
        self.num_prefix = v.num_prefix_tokens
        self.grid = tuple(v.patch_embed.grid_size)
        self.num_tokens = self.num_prefix + self.grid[0] * self.grid[1]
        self.mlp_site, self.class_agnostic, self.gate_mode = mlp_site, bool(class_agnostic), gate_mode
        self.n, self.pruned_branch, self.p = float(n), pruned_branch, float(p)
        self.tap = nn.Identity()  # (B, D, gh, gw) patch tokens entering the last block: Grad-CAM hook point
        self._gates: Optional[List[Tensor]] = None
        self._deploy_keep: Optional[List[Tensor]] = None
        self.widths = widths
        if widths is not None:
            self.xp = None
            _apply_widths(v, widths, self.head_dim)
            return
        L, C = self.depth, 1 if class_agnostic else num_classes
        xp = nn.Module()
        xp.head_mask = nn.ParameterList([nn.Parameter(torch.ones(C, self.num_heads)) for _ in range(L)])
        xp.mlp_mask = nn.ParameterList([nn.Parameter(torch.ones(C, self.mlp_hidden)) for _ in range(L)])
        # θ (eq. 5.9) and the Lagrange multipliers β, γ (eq. 5.11) are buffers until stage 2 makes them parameters
        # (trainers.xpruner.XPrunerModule), so plain training / DDP never sees unused parameters.
        xp.register_buffer("theta", torch.zeros(2 * L))
        xp.register_buffer("lagrange_beta", torch.zeros(()))
        xp.register_buffer("lagrange_gamma", torch.zeros(()))
        xp.register_buffer("pruning_active", torch.zeros((), dtype=torch.bool))
        self.xp = xp
        self.register_load_state_dict_post_hook(_refresh_pruning_active)  # module-level: ddp_spawn pickles it
        for i, blk in enumerate(v.blocks):
            blk.attn.proj.register_forward_pre_hook(functools.partial(_head_hook, self, 2 * i))
            if mlp_site == "post_act":
                blk.mlp.fc2.register_forward_pre_hook(functools.partial(_mlp_pre_hook, self, 2 * i + 1))
            else:
                blk.mlp.fc1.register_forward_hook(functools.partial(_mlp_out_hook, self, 2 * i + 1))

    # ---- masks and gates ---------------------------------------------------------------------------------
    @property
    def masks(self) -> List[Tensor]:
        """Per-group mask tables ``M^g`` (C, U_g) in group order ``[attn_0, mlp_0, ...]``."""
        out = []
        for h, m in zip(self.xp.head_mask, self.xp.mlp_mask):
            out += [h, m]
        return out

    @property
    def group_sizes(self) -> List[int]:
        return [self.num_heads, self.mlp_hidden] * self.depth

    def _pruning_active(self) -> bool:
        """``xp.pruning_active`` as a Python bool. While a graph is captured (``torch.export``: the buffer is
        symbolic there) the value read by the last eager call or state-dict load is used."""
        if not is_capturing():
            self._active_seen = bool(self.xp.pruning_active)
        return getattr(self, "_active_seen", False)

    def effective_masks(self) -> List[Tensor]:
        """``M`` (stage 1) or ``M̂`` of eq. 5.9 (stage 2, ``xp.pruning_active``)."""
        if not self._pruning_active():
            return self.masks
        return [pruning_op(M, self.xp.theta[g], self.n, self.pruned_branch, self.p) for g, M in enumerate(self.masks)]

    def deploy_gates(self, keep: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
        """Per-unit gates folded by :func:`prune_model`: ``keep_u · mean_c E[c, u]`` (U_g,) per group."""
        keep = keep if keep is not None else (self._deploy_keep or self.keep_sets())
        return [E.mean(0) * k.to(E.device, E.dtype) for E, k in zip(self.effective_masks(), keep)]

    def keep_sets(self) -> List[Tensor]:
        """Hard kept units (bool (U_g,)): ``ŝ_u > θ_g`` in stage 2, everything otherwise."""
        if not self._pruning_active():
            return [torch.ones(U, dtype=torch.bool, device=self.xp.theta.device) for U in self.group_sizes]
        return [unit_scores(M) > self.xp.theta[g] for g, M in enumerate(self.masks)]

    def set_deploy_keep(self, keep: Optional[Sequence[Tensor]]) -> None:
        """Fix the kept units used by ``gate_mode="deploy"`` / :func:`prune_model` (e.g. a baseline's choice)."""
        self._deploy_keep = None if keep is None else [k.bool().clone() for k in keep]

    def _class_gates(self, w: Tensor) -> List[Tensor]:
        """``t_iᵀ E`` (B, U) per group for class weights ``w`` (B, C) (one-hot labels, mixup targets, softmax)."""
        Es = self.effective_masks()
        if self.class_agnostic:
            return [E.expand(w.shape[0], -1) for E in Es]
        return [w.to(E.dtype) @ E for E in Es]

    def _labels_to_weights(self, labels: Tensor) -> Tensor:
        if labels.dim() == 1:
            if (labels < 0).any() or (labels >= self.num_classes).any():
                raise ValueError(f"labels must be class indices in [0, {self.num_classes}), got {labels.tolist()}.")
            return F.one_hot(labels.long(), self.num_classes).float()
        if labels.shape[-1] != self.num_classes:
            raise ValueError(f"soft labels must be (B, {self.num_classes}), got {tuple(labels.shape)}.")
        return labels.float()

    # ---- forward -----------------------------------------------------------------------------------------
    def _tokens(self, x: Tensor) -> Tensor:
        """Normalise, embed, run the blocks (tap before the last one), final norm: ``(B, N, D)``."""
        self.check_input(x)
        v = self.vit
        t = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed((x - self.mean) / self.std))))
        for i, blk in enumerate(v.blocks):
            if i == len(v.blocks) - 1:
                t = self._through_tap(t)
            t = blk(t)
        return v.norm(t)

    def _through_tap(self, t: Tensor) -> Tensor:
        p = self.num_prefix
        B, N, D = t.shape
        gh, gw = self.grid
        maps = self.tap(t[:, p:].transpose(1, 2).reshape(B, D, gh, gw))
        return torch.cat([t[:, :p], maps.flatten(2).transpose(1, 2)], dim=1)

    def _run(self, x: Tensor, gates: Optional[List[Tensor]]) -> Tensor:
        self._gates = gates
        try:
            return self._tokens(x)
        finally:
            self._gates = None

    def forward_tokens(self, x: Tensor, labels: Optional[Tensor] = None, mode: Optional[str] = None) -> Tensor:
        """Final normalised tokens ``(B, N, D)`` under gate ``mode`` (default ``self.gate_mode``; ``labels``
        given -> ``oracle``)."""
        if self.xp is None:
            return self._tokens(x)
        mode = mode or ("oracle" if labels is not None else self.gate_mode)
        if mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {mode!r}.")
        if mode == "off":
            return self._run(x, None)
        if mode == "oracle":
            if labels is None:
                raise ValueError("gate_mode='oracle' needs labels (training only); use 'mean', 'two_pass_hard', "
                                 "'two_pass_soft' or 'deploy' for label-free inference.")
            return self._run(x, self._class_gates(self._labels_to_weights(labels)))
        if mode == "deploy":
            return self._run(x, [g.unsqueeze(0) for g in self.deploy_gates()])
        mean_gates = [E.mean(0, keepdim=True) for E in self.effective_masks()]
        tokens = self._run(x, mean_gates)
        if mode == "mean":
            return tokens
        z1 = self.vit.forward_head(tokens)
        w = F.one_hot(z1.argmax(1), self.num_classes).float() if mode == "two_pass_hard" else z1.softmax(1)
        return self._run(x, self._class_gates(w))

    def forward(self, x: Tensor, labels: Optional[Tensor] = None, mode: Optional[str] = None) -> Tensor:
        return self.vit.forward_head(self.forward_tokens(x, labels, mode))

    def forward_explain(self, x: Tensor, target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Logits and the token CAM ``ReLU(W_c · LN(z_n))`` on the final patch tokens (exact CAM decomposition of
        the logit for ``global_pool='avg'``; for cls-token pooling a linear read-out of the patch tokens)."""
        tokens = self.forward_tokens(x)
        logits = self.vit.forward_head(tokens)
        c = self.resolve_target(logits, target)
        patch = self.vit.fc_norm(tokens[:, self.num_prefix:])
        cam = torch.einsum("bnd,bd->bn", patch, self.vit.head.weight[c]).relu()
        scale = torch.einsum("bnd,bd->bn", patch.abs(), self.vit.head.weight[c].abs())
        cam = cam.reshape(x.shape[0], 1, *self.grid)
        return logits, normalize_saliency(cam.squeeze(1), x.shape[2:], scale=scale)

    def cam_target_layer(self) -> nn.Module:
        return self.tap

    # ---- the zoo's timm-like head API ----------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.vit.get_classifier()

    def reset_classifier(self, num_classes: int) -> None:
        if self.xp is not None and not self.class_agnostic:
            raise ValueError("reset_classifier on a masked X-Pruner would orphan the class-wise masks; reset "
                             "before stage 1 (rebuild with num_classes) or prune first.")
        self.vit.reset_classifier(num_classes)
        self.num_classes = num_classes

    def arch(self) -> dict:
        """Per-block widths of the current (pruned or full) model."""
        heads, mlp = [], []
        for blk in self.vit.blocks:
            heads.append(0 if isinstance(blk.attn, EmptyBranch) else blk.attn.num_heads)
            mlp.append(0 if isinstance(blk.mlp, EmptyBranch) else blk.mlp.fc1.out_features)
        return {"heads": heads, "mlp_hidden": mlp, "head_dim": self.head_dim}


# hooks (module-level functions bound with functools.partial: picklable for ddp_spawn, deep-copyable)
def _head_hook(model: XPruner, g: int, module: nn.Module, args):
    gates = model._gates
    if gates is None:
        return None
    x = args[0]
    B, N, A = x.shape
    gate = gates[g].to(x.dtype)
    x = (x.view(B, N, -1, model.head_dim) * gate[:, None, :, None]).view(B, N, A)  # (5.4)
    return (x,) + tuple(args[1:])


def _mlp_pre_hook(model: XPruner, g: int, module: nn.Module, args):
    gates = model._gates
    if gates is None:
        return None
    return (args[0] * gates[g].to(args[0].dtype)[:, None, :],) + tuple(args[1:])  # (5.5), post-activation


def _mlp_out_hook(model: XPruner, g: int, module: nn.Module, args, out):
    gates = model._gates
    if gates is None:
        return None
    return out * gates[g].to(out.dtype)[:, None, :]  # (5.5) literal: fc1 row j and its bias


def _apply_widths(vit: nn.Module, widths: dict, head_dim: int) -> None:
    """Swap every block's attention / MLP for timm modules of the given widths (random init)."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention

    heads, mlp = list(widths["heads"]), list(widths["mlp_hidden"])
    hd = int(widths.get("head_dim", head_dim))
    if len(heads) != len(vit.blocks) or len(mlp) != len(vit.blocks):
        raise ValueError(f"widths has {len(heads)} heads / {len(mlp)} mlp entries for a {len(vit.blocks)}-block "
                         "ViT; build with the same backbone/backbone_kwargs the model was pruned from.")
    D = vit.embed_dim
    for blk, h, m in zip(vit.blocks, heads, mlp):
        a, f = blk.attn, blk.mlp
        if int(h) > 0:
            qk_norm = not isinstance(a.q_norm, nn.Identity)
            new = Attention(D, num_heads=int(h), attn_head_dim=hd, qkv_bias=a.qkv.bias is not None,
                            qk_norm=qk_norm, proj_bias=a.proj.bias is not None, attn_drop=a.attn_drop.p,
                            proj_drop=a.proj_drop.p, **({"norm_layer": type(a.q_norm)} if qk_norm else {}))
            new.fused_attn = a.fused_attn
            blk.attn = new
        else:
            blk.attn = EmptyBranch(D, a.proj.bias is not None)
        if int(m) > 0:
            blk.mlp = Mlp(D, hidden_features=int(m), act_layer=type(f.act), bias=f.fc1.bias is not None,
                          drop=f.drop1.p)
        else:
            blk.mlp = EmptyBranch(D, f.fc2.bias is not None)


@register_model("xpruner_pruned", test_kwargs=dict(_TINY, widths=dict(heads=[2, 0], mlp_hidden=[0, 17])))
def xpruner_pruned(widths: Union[dict, str], **kwargs) -> XPruner:
    """A physically pruned X-Pruner ViT (``widths``: dict or the pruned ``.safetensors``); no masks."""
    return XPruner(widths=widths, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# equations
# ----------------------------------------------------------------------------------------------------------
def unit_scores(M: Tensor) -> Tensor:
    """``ŝ_u = s_u / max_u s_u`` with ``s_u = mean_c M[c, u]`` and the max detached (spec §4). (U,)"""
    s = M.mean(0)
    return s / s.detach().max().clamp_min(1e-12)


def pruning_op(M: Tensor, theta: Tensor, n: float = 10.0, pruned_branch: str = "eps", p: float = 500.0) -> Tensor:
    """Eq. 5.9, structured: ``M̂[c,u] = (M[c,u] if ŝ_u > θ else ε) · tanh(n(ŝ_u − θ))``; ε = 1/p (``eps``), 0
    (``zero``) or p (``literal``, the text read literally: pruned units amplified and sign-flipped)."""
    s_hat = unit_scores(M)
    t = torch.tanh(n * (s_hat - theta))
    keep = s_hat > theta
    low = {"eps": 1.0 / p, "zero": 0.0, "literal": p}[pruned_branch]
    return torch.where(keep, M, torch.full_like(M, low)) * t


def soft_rates(masks: Sequence[Tensor], theta: Tensor, n: float = 10.0) -> Tensor:
    """``r_g(θ) = (1/U_g) Σ_u ½(1 − tanh(n(ŝ_u − θ_g)))`` (soft share of units below threshold). (G,)"""
    return torch.stack([(0.5 * (1 - torch.tanh(n * (unit_scores(M) - theta[g])))).mean()
                        for g, M in enumerate(masks)])


def hard_rates(masks: Sequence[Tensor], theta: Tensor) -> Tensor:
    """``r_g^hard = #{ŝ_u ≤ θ_g} / U_g``. (G,)"""
    return torch.stack([(unit_scores(M) <= theta[g]).float().mean() for g, M in enumerate(masks)])


def accumulated_rate(rates: Tensor, group_costs: Tensor) -> Tensor:
    """Eq. 5.10: ``R = Σ_g r_g n^g / Σ_g n^g`` with ``n^g`` = U_g × cost per unit (params or MACs)."""
    w = group_costs.to(rates)
    return (rates * w).sum() / w.sum()


def lagrangian(R: Tensor, alpha: float, beta: Tensor, gamma: Tensor) -> Tensor:
    """Eq. 5.11: ``L_R = β(α − R)² + γ(α − R)``; minimised over θ, *maximised* over β, γ."""
    gap = alpha - R
    return beta * gap ** 2 + gamma * gap


def sparsity_loss(masks: Sequence[Tensor]) -> Tensor:
    """Eq. 5.7 [ours: class mean, 1/√U]: ``(1/C) Σ_c Σ_g ||M^g[c,:]||₂ / √U_g``."""
    return sum(M.norm(dim=1).mean() / math.sqrt(M.shape[1]) for M in masks)


def smoothness_loss(masks: Sequence[Tensor], target: Tensor, probs: Tensor) -> Tensor:
    """Eq. 5.6 as a prediction-graph Laplacian [ours]: ``(1/B) Σ_i Σ_g (1/U_g) ||(t_i − p_i)ᵀ M^g||₁``.

    ``target`` (B, C) one-hot/soft labels, ``probs`` (B, C) softmax of the masked pass (detached here)."""
    d = target.float() - probs.detach().float()
    total = 0.0
    for M in masks:
        if M.shape[0] == 1:  # class-agnostic: the term is identically 0
            continue
        total = total + (d @ M).abs().sum(1).mean() / M.shape[1]
    return torch.as_tensor(total, device=target.device, dtype=torch.float32) if isinstance(total, float) else total


# ----------------------------------------------------------------------------------------------------------
# costs and FLOPs
# ----------------------------------------------------------------------------------------------------------
def unit_costs(model: XPruner, weighting: str = "flops") -> List[float]:
    """Cost per unit of each group: params (``3·hd·D + 3·hd + hd·D`` per head, ``2D + 1`` per MLP unit) or MACs
    (``N·4·hd·D + 2·N²·hd`` per head, ``2·N·D`` per MLP unit)."""
    D, hd, N = model.dim, model.head_dim, model.num_tokens
    if weighting == "params":
        head, unit = 3 * hd * D + 3 * hd + hd * D, 2 * D + 1
    elif weighting == "flops":
        head, unit = N * 4 * hd * D + 2 * N * N * hd, 2 * N * D
    else:
        raise ValueError(f"weighting must be 'params' or 'flops', got {weighting!r}.")
    return [float(head), float(unit)] * model.depth


def analytic_macs(model: XPruner, arch: Optional[dict] = None) -> Dict[str, float]:
    """MACs of the ViT (spec §5): blocks ``N·D·(4·hd·h_l + 2·m_l) + 2·N²·hd·h_l``, plus patch embed (or conv
    stem) and head."""
    arch = arch or model.arch()
    D, hd, N = model.dim, model.head_dim, model.num_tokens
    fixed = _embed_macs(model) + D * model.num_classes
    blocks = sum(N * D * (4 * hd * h + 2 * m) + 2 * N * N * hd * h for h, m in zip(arch["heads"], arch["mlp_hidden"]))
    return {"total": float(fixed + blocks), "fixed": float(fixed), "blocks": float(blocks)}


def _embed_macs(model: XPruner) -> float:
    """MACs of the patch embedding: timm's patchify conv, or the convs of a conv stem (``conv_stem``) then its 1x1
    ``proj``, each output side = ceil(input side / stride)."""
    pe = model.vit.patch_embed
    h, w = (int(v) for v in pe.img_size)
    total = 0.0
    convs = [m for m in pe.modules() if isinstance(m, nn.Conv2d) and m is not pe.proj] + [pe.proj]  # data order
    for conv in convs:
        h, w = -(-h // conv.stride[0]), -(-w // conv.stride[1])
        total += h * w * conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] / conv.groups
    return total


def measure_flops(model: nn.Module, input_size: Sequence[int]) -> float:
    """FLOPs (2 per MAC) of one forward at batch 1, counted by ``torch.utils.flop_counter.FlopCounterMode``
    (matmuls/convs only: norms, softmax, GELU are not counted, as in the analytic count)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, *input_size)
    was = model.training
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    model.eval()
    try:
        for m, _ in fused:  # the CPU SDPA kernel is not counted by FlopCounterMode: use timm's explicit matmuls
            m.fused_attn = False
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        for m, f in fused:
            m.fused_attn = f
        model.train(was)
    return float(fc.get_total_flops())


def flops_remaining(model: XPruner, keep: Sequence[Tensor]) -> float:
    """Analytic FLOPs remained (fraction of the unpruned model) for kept-unit sets ``keep``."""
    arch = {"heads": [int(k.sum()) for k in keep[0::2]], "mlp_hidden": [int(k.sum()) for k in keep[1::2]]}
    full = analytic_macs(model, {"heads": [model.num_heads] * model.depth, "mlp_hidden": [model.mlp_hidden] * model.depth})
    return analytic_macs(model, arch)["total"] / full["total"]


def alpha_for_flops(model: XPruner, remaining: float) -> float:
    """The share α of *prunable* MACs to remove so that ``remaining`` of the whole model's FLOPs are left."""
    full = analytic_macs(model, {"heads": [model.num_heads] * model.depth, "mlp_hidden": [model.mlp_hidden] * model.depth})
    alpha = (1.0 - remaining) * full["total"] / full["blocks"]
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"FLOPs remaining {remaining} is not reachable by pruning heads/MLP units "
                         f"(fixed part {full['fixed'] / full['total']:.1%}).")
    return alpha


# ----------------------------------------------------------------------------------------------------------
# choosing kept units (X-Pruner and the Table 5.4 baselines at one budget)
# ----------------------------------------------------------------------------------------------------------
def select_keep(model: XPruner, order: Sequence[Tuple[int, int]], alpha: float, weighting: str = "flops") -> List[Tensor]:
    """Prune units in ``order`` ((group, unit) pairs, first = pruned first) while the removed share of prunable
    cost stays ≤ α (units that would overshoot are skipped). Returns bool keep masks (U_g,) per group."""
    costs = unit_costs(model, weighting)
    sizes = model.group_sizes
    total = sum(c * U for c, U in zip(costs, sizes))
    budget, removed = alpha * total, 0.0
    keep = [torch.ones(U, dtype=torch.bool) for U in sizes]
    for g, u in order:
        if removed + costs[g] <= budget + 1e-9:
            keep[g][u] = False
            removed += costs[g]
    return keep


def _scores(model: XPruner) -> List[Tensor]:
    with torch.no_grad():
        return [unit_scores(M).detach().cpu() for M in model.masks]


def xpruner_keep(model: XPruner, alpha: float, weighting: str = "flops") -> List[Tensor]:
    """Final calibration (spec §4 end): prune in order of the margin ``ŝ_u − θ_g`` (equivalent to shifting every
    θ_g by one common δ), unit by unit, so the removed share reaches α to within one MLP unit."""
    theta = model.xp.theta.detach().cpu()
    cand = [(float(s[u] - theta[g]), g, u) for g, s in enumerate(_scores(model)) for u in range(len(s))]
    cand.sort()
    return select_keep(model, [(g, u) for _, g, u in cand], alpha, weighting)


def _uniform_from_scores(model: XPruner, scores: Sequence[Tensor], alpha: float, weighting: str) -> List[Tensor]:
    """Every block loses α of its prunable cost: round(α·H) lowest-score heads, the MLP absorbs the rounding."""
    costs = unit_costs(model, weighting)
    keep = []
    for i in range(model.depth):
        sh, sm = scores[2 * i], scores[2 * i + 1]
        ch, cm = costs[2 * i], costs[2 * i + 1]
        block = ch * len(sh) + cm * len(sm)
        nh = min(len(sh), int(math.floor(alpha * len(sh) + 0.5)))
        nm = int(round((alpha * block - nh * ch) / cm))
        nm = max(0, min(len(sm), nm))
        kh, km = torch.ones(len(sh), dtype=torch.bool), torch.ones(len(sm), dtype=torch.bool)
        kh[torch.argsort(sh)[:nh]] = False
        km[torch.argsort(sm)[:nm]] = False
        keep += [kh, km]
    return keep


def uniform_keep(model: XPruner, alpha: float, weighting: str = "flops") -> List[Tensor]:
    """Uniform baseline (Table 5.4): the same rate α in every block, units by mask score ``ŝ``."""
    return _uniform_from_scores(model, _scores(model), alpha, weighting)


def magnitude_keep(model: XPruner, alpha: float, weighting: str = "flops") -> List[Tensor]:
    """Magnitude baseline: uniform rate, units by weight norm (head: ||qkv rows, proj cols||₂;
    MLP unit j: ||fc1[j]||₂ · ||fc2[:, j]||₂)."""
    scores = []
    D, hd = model.dim, model.head_dim
    with torch.no_grad():
        for blk in model.vit.blocks:
            qkv = blk.attn.qkv.weight.view(3, -1, hd, D)  # (3, H, hd, D)
            proj = blk.attn.proj.weight.view(D, -1, hd)   # (D, H, hd)
            scores.append((qkv.pow(2).sum((0, 2, 3)) + proj.pow(2).sum((0, 2))).sqrt().cpu())
            scores.append((blk.mlp.fc1.weight.norm(dim=1) * blk.mlp.fc2.weight.norm(dim=0)).cpu())
    return _uniform_from_scores(model, scores, alpha, weighting)


def random_keep(model: XPruner, alpha: float, seed: int = 0, weighting: str = "flops") -> List[Tensor]:
    """Random baseline: a random order over all units, filled to the same budget."""
    gen = torch.Generator().manual_seed(int(seed))
    units = [(g, u) for g, U in enumerate(model.group_sizes) for u in range(U)]
    perm = torch.randperm(len(units), generator=gen).tolist()
    return select_keep(model, [units[i] for i in perm], alpha, weighting)


# ----------------------------------------------------------------------------------------------------------
# physical pruning, saving, loading
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def prune_model(model: XPruner, keep: Optional[Sequence[Tensor]] = None, fold: bool = True) -> XPruner:
    """Cut the pruned heads / MLP units and fold the kept units' deploy gates (``mean_c M̂``) into the weights
    (spec §5). Returns a new mask-free :class:`XPruner` with per-block widths; equals ``gate_mode="deploy"``."""
    if model.xp is None:
        raise ValueError("this model is already pruned (it has no masks).")
    keep = [k.cpu().bool() for k in (keep if keep is not None else (model._deploy_keep or model.keep_sets()))]
    gates = [g.detach().cpu() for g in model.deploy_gates([k.to(model.xp.theta.device) for k in keep])]
    if not fold:
        gates = [torch.ones_like(g) for g in gates]
    heads = [int(k.sum()) for k in keep[0::2]]
    mlp = [int(k.sum()) for k in keep[1::2]]
    widths = {"heads": heads, "mlp_hidden": mlp, "head_dim": model.head_dim}
    new = XPruner(num_classes=model.num_classes, backbone=model.backbone_name, in_chans=model.in_chans,
                  backbone_kwargs=model.backbone_kwargs, widths=widths)
    src = {k: v.detach().cpu() for k, v in model.vit.state_dict().items()}
    sd = {}
    D, hd = model.dim, model.head_dim
    for name, t in src.items():
        if not name.startswith("blocks."):
            sd[name] = t
    for i, blk in enumerate(model.vit.blocks):
        pre = f"blocks.{i}."
        for name, t in src.items():
            if name.startswith(pre) and not name.startswith((pre + "attn.", pre + "mlp.")):
                sd[name] = t
        kh, km = keep[2 * i], keep[2 * i + 1]
        gh, gm = gates[2 * i], gates[2 * i + 1]
        if heads[i] > 0:
            idx = torch.nonzero(kh).flatten()
            cols = (idx[:, None] * hd + torch.arange(hd)).flatten()                     # head-major channels
            rows = torch.cat([t * D + cols for t in range(3)])                          # [q | k | v]
            sd[pre + "attn.qkv.weight"] = src[pre + "attn.qkv.weight"][rows]
            if pre + "attn.qkv.bias" in src:
                sd[pre + "attn.qkv.bias"] = src[pre + "attn.qkv.bias"][rows]
            scale = gh[idx].repeat_interleave(hd)
            sd[pre + "attn.proj.weight"] = src[pre + "attn.proj.weight"][:, cols] * scale
            for k in src:
                if k.startswith(pre + "attn.") and k not in sd and not k.startswith((pre + "attn.qkv.",
                                                                                        pre + "attn.proj.weight")):
                    sd[k] = src[k]  # proj.bias, q_norm/k_norm (per head_dim: unchanged)
        elif pre + "attn.proj.bias" in src:
            sd[pre + "attn.bias"] = src[pre + "attn.proj.bias"]
        if mlp[i] > 0:
            idx = torch.nonzero(km).flatten()
            w1, w2 = src[pre + "mlp.fc1.weight"][idx], src[pre + "mlp.fc2.weight"][:, idx]
            b1 = src.get(pre + "mlp.fc1.bias")
            b1 = b1[idx] if b1 is not None else None
            if model.mlp_site == "post_act":
                w2 = w2 * gm[idx]
            else:
                w1 = w1 * gm[idx][:, None]
                b1 = b1 * gm[idx] if b1 is not None else None
            sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc2.weight"] = w1, w2
            if b1 is not None:
                sd[pre + "mlp.fc1.bias"] = b1
            for k in src:
                if k.startswith(pre + "mlp.") and k not in sd and not k.startswith((pre + "mlp.fc1.", pre + "mlp.fc2.weight")):
                    sd[k] = src[k]  # fc2.bias, norm
        elif pre + "mlp.fc2.bias" in src:
            sd[pre + "mlp.bias"] = src[pre + "mlp.fc2.bias"]
    new.vit.load_state_dict(sd, strict=True)
    return new.train(model.training)


def save_pruned(model: XPruner, path: str) -> str:
    """Save a pruned model atomically as safetensors with its architecture in the metadata (``xp_arch``)."""
    from safetensors.torch import save_file

    if model.xp is not None:
        raise ValueError("save_pruned expects a physically pruned model: call prune_model first.")
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_pruned writes .safetensors, got {path!r}.")
    meta = dict(model.arch(), backbone=model.backbone_name, backbone_kwargs=model.backbone_kwargs,
                num_classes=model.num_classes, in_chans=model.in_chans, model="xpruner_pruned")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(sd, tmp, metadata={"xp_arch": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_pruned(path: str, **overrides) -> XPruner:
    """Rebuild a saved pruned model through the registry: ``create_model("xpruner_pruned", widths=path, ...,
    checkpoint_path=path)`` with the backbone settings stored in the file."""
    from .registry import create_model

    meta = read_widths(path)
    kw = dict(backbone=meta["backbone"], backbone_kwargs=meta.get("backbone_kwargs") or {},
              num_classes=meta["num_classes"], in_chans=meta.get("in_chans", 3))
    kw.update(overrides)
    return create_model("xpruner_pruned", widths=path, checkpoint_path=path, **kw)
