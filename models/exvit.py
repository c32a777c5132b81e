"""eX-ViT: a ViT with explainable multi-head attention (E-MHA) and an attribute-guided explainer (AttE).

Seed 000 (Lu Yu thesis), chapter 4; spec ``/work/shared/specs/exvit.md``. No public implementation exists;
every choice the text leaves open follows the spec's "Ambiguities and decisions" (§12), cited as [D n].

Equations -> code
-----------------
* (4.1)-(4.4) :class:`EMHAttention` -- ``W_h = Q_h K_h^T / sqrt(d_h)``, ``Â_h = f(W_h + b_h)`` with
  ``f(Y) = Y / max(||Y||_F, eps)`` over the whole T x T matrix of one sample and head [D 2], ``S_h = Â_h V_h``
  (the paper's ``A = Â^T``, so ``S = A^T V``). It subclasses timm's ``Attention`` with the same parameter
  names, so ViT/DeiT weights load; :func:`swap_attention` replaces every ``block.attn`` of any timm
  ``VisionTransformer`` (eq. 4.6: the block itself is timm's pre-LN block, unchanged).
* (4.5) ``||S_h||_F <= ||Â_h||_2 ||V_h||_F <= ||V_h||_F`` holds by construction (tested).
* (4.7)-(4.9) :class:`AttE` -- 2-layer MLP (Linear-LN-ReLU-Linear) to ``c`` channels, L2 over channels,
  ``S`` groups, each reduced to a soft spatial weight ``m_s = ||C̄_s||²`` (a partition of unity, [D 10]),
  ``G_s = m_s ⊙ F^L``.
* (4.10) ``F̂`` = mean of the last ``K`` block outputs (after the encoder's final LayerNorm, patch tokens).
* (4.11) ``M_s = F̂ ⊙ G_s``; classifier = GeM over locations (learnable p) then Linear(S·d -> C) [D 13].
* (4.12)-(4.15) :func:`global_loss`, :func:`discriminability_loss`, :func:`diversity_loss`; the siamese
  momentum branch is :func:`momentum_copy` + :func:`ema_update_` (used by ``trainers/exvit.py``).

Intrinsic explanation: the class map ``CAM_c(n) = ReLU(Σ_s <w_{c,s}, clamp(M_s(n))>)`` (§8), computed in the
forward pass; :meth:`ExViT.explain_all` also returns all class maps, the S attribute maps and the
per-attribute contributions; :meth:`ExViT.pseudo_masks` turns class maps into segmentation masks.

The encoder is a timm ``VisionTransformer`` built directly (``timm.create_model(name, num_classes=0,
dynamic_img_size=True, dynamic_img_pad=True)``), not through :class:`models.backbones.Backbone`:
AttE needs the last K block outputs *after* the final LayerNorm, which timm's feature wrapper prunes.
Inputs are [0, 1] pixels normalised inside with the model's ``pretrained_cfg`` mean/std, exactly like the
``Backbone`` wrapper, so ``create_model("baseline", backbone="deit_small_patch16_224", ...)`` is the
plain ViT with identical input handling.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import create_timm_vit
from .base import InterpretableClassifier, normalize_saliency
from .registry import register_model

__all__ = ["EMHAttention", "swap_attention", "AttE", "GeM", "gem", "ExViT", "global_loss",
           "normalized_mse", "discriminability_loss", "diversity_loss", "balance_loss", "factored_gem",
           "factored_diversity", "momentum_copy", "ema_update_"]

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------
# E-MHA (eqs. 4.1-4.5)
# ----------------------------------------------------------------------------------------------------------
def l2_normalize_scores(y: Tensor, norm: str = "matrix", eps: float = 1e-6) -> Tensor:
    """``f`` of eq. 4.3 on scores ``(..., T, T)``: divide by the Frobenius norm of each T x T matrix
    (``norm="matrix"``, default [D 2]) or by the L2 norm of each query row (``norm="row"``)."""
    if norm == "matrix":
        n = torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True)
    elif norm == "row":
        n = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    else:
        raise ValueError(f"norm must be 'matrix' or 'row', got {norm!r}.")
    return y / n.clamp_min(eps)


def _make_attention_base():
    from timm.models.vision_transformer import Attention

    return Attention


class EMHAttention(_make_attention_base()):
    """Explainable multi-head attention (eqs. 4.1-4.4), a drop-in for timm's ``Attention``.

    Same constructor arguments and parameter names as timm (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``,
    ``proj``, ``proj_drop``), plus

    Args:
        num_tokens: T0, tokens of the native grid (prefix + gh*gw); size of the token-pair bias.
        grid_size: native patch grid (gh, gw), for resampling the bias on other grids (§3).
        num_prefix_tokens: cls/dist/register tokens in front of the patch tokens.
        norm: ``"matrix"`` (Frobenius norm per sample and head, [D 2]) or ``"row"`` (per query).
        bias: ``"token"`` (trainable (H, T0, T0), zero init), ``"head"`` (one scalar per head) or ``"none"``.
        eps: floor of the norm in ``f``.

    ``forward`` never uses the fused softmax kernel. ``W + b`` and the norm are computed in float32. When
    ``store_attention`` is True the normalised scores ``Â`` (B, H, T, T) of the last call are kept in
    ``self.last_attention`` (for visualisation).
    """

    def __init__(self, dim: int, num_heads: int = 8, *args, num_tokens: int = 197,
                 grid_size: Tuple[int, int] = (14, 14), num_prefix_tokens: int = 1, norm: str = "matrix",
                 bias: str = "token", eps: float = 1e-6, **kwargs) -> None:
        super().__init__(dim, num_heads, *args, **kwargs)
        if norm not in ("matrix", "row"):
            raise ValueError(f"E-MHA norm must be 'matrix' or 'row', got {norm!r}.")
        if bias not in ("token", "head", "none"):
            raise ValueError(f"E-MHA bias must be 'token', 'head' or 'none', got {bias!r}.")
        self.fused_attn = False
        self.norm_mode, self.bias_mode, self.eps = norm, bias, float(eps)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.bias_grid = (int(grid_size[0]), int(grid_size[1]))
        self.num_tokens = int(num_tokens)
        if self.num_tokens != self.num_prefix_tokens + self.bias_grid[0] * self.bias_grid[1]:
            raise ValueError(f"num_tokens={num_tokens} must equal num_prefix_tokens + gh*gw = "
                             f"{num_prefix_tokens} + {grid_size[0]}*{grid_size[1]}.")
        if bias == "token":
            self.attn_bias = nn.Parameter(torch.zeros(num_heads, self.num_tokens, self.num_tokens))
        elif bias == "head":
            self.attn_bias = nn.Parameter(torch.zeros(num_heads, 1, 1))
        else:
            self.register_parameter("attn_bias", None)
        self.grid: Optional[Tuple[int, int]] = None  # set by the owning model before each forward
        self.store_attention = False
        self.last_attention: Optional[Tensor] = None
        self._bias_cache: Dict[Tuple[int, int], Tuple[int, Tensor]] = {}

    @classmethod
    def from_attention(cls, attn: nn.Module, **kwargs) -> "EMHAttention":
        """Build an E-MHA with the configuration and weights of a timm ``Attention`` ``attn``."""
        dim = attn.qkv.in_features
        cfg = dict(num_heads=attn.num_heads, attn_head_dim=attn.head_dim, dim_out=attn.proj.out_features,
                   qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
                   attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p)
        qk_norm = not isinstance(attn.q_norm, nn.Identity)
        scale_norm = not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)
        if qk_norm or scale_norm:
            cfg.update(qk_norm=qk_norm, scale_norm=scale_norm,
                       norm_layer=type(attn.q_norm if qk_norm else attn.norm))
        if getattr(attn, "gate", None) is not None:
            cfg["gated"] = True
        new = cls(dim, **cfg, **kwargs).to(attn.qkv.weight.device, attn.qkv.weight.dtype)
        missing, unexpected = new.load_state_dict(attn.state_dict(), strict=False)
        if unexpected or [k for k in missing if k != "attn_bias"]:
            raise RuntimeError(f"cannot convert {type(attn).__name__} to E-MHA: missing {missing}, "
                               f"unexpected {unexpected}")
        return new

    # -- bias on other grids (§3) ------------------------------------------------------------------------
    def _resample_bias(self, grid: Tuple[int, int]) -> Tensor:
        b, p = self.attn_bias, self.num_prefix_tokens
        (h0, w0), (h1, w1) = self.bias_grid, grid
        H = b.shape[0]

        def rs(maps: Tensor) -> Tensor:  # (..., h0, w0) -> (..., h1, w1)
            lead = maps.shape[:-2]
            out = F.interpolate(maps.reshape(-1, 1, h0, w0), size=(h1, w1), mode="bicubic", align_corners=False)
            return out.reshape(*lead, h1, w1)

        pp = b[:, :p, :p]
        pg = rs(b[:, :p, p:].reshape(H, p, h0, w0)).reshape(H, p, h1 * w1)
        gp = rs(b[:, p:, :p].permute(0, 2, 1).reshape(H, p, h0, w0)).reshape(H, p, h1 * w1).permute(0, 2, 1)
        gg = b[:, p:, p:].reshape(H, h0 * w0, h0, w0)
        gg = rs(gg).reshape(H, h0, w0, h1 * w1).permute(0, 3, 1, 2)  # keys resized; (H, Nk1, h0, w0) queries
        gg = rs(gg).reshape(H, h1 * w1, h1 * w1).permute(0, 2, 1)    # (H, Nq1, Nk1)
        top = torch.cat([pp, pg], dim=2)
        bottom = torch.cat([gp, gg], dim=2)
        return torch.cat([top, bottom], dim=1)

    def bias_for(self, num_tokens: int) -> Optional[Tensor]:
        """The bias ``b`` for ``num_tokens`` tokens: native, or resampled to ``self.grid`` (or a square grid)."""
        if self.attn_bias is None or self.bias_mode == "head":
            return self.attn_bias
        grid = self.grid
        if grid is None and num_tokens == self.num_tokens:
            return self.attn_bias
        if grid is None or self.num_prefix_tokens + grid[0] * grid[1] != num_tokens:
            side = math.isqrt(max(num_tokens - self.num_prefix_tokens, 0))
            if side * side + self.num_prefix_tokens != num_tokens:
                raise ValueError(f"E-MHA got {num_tokens} tokens that do not form a square grid; set "
                                 "attn.grid = (gh, gw) (ExViT does this automatically).")
            grid = (side, side)
        if tuple(grid) == self.bias_grid:
            return self.attn_bias
        if self.training or torch.is_grad_enabled():
            return self._resample_bias(tuple(grid))
        key, version = tuple(grid), self.attn_bias._version
        hit = self._bias_cache.get(key)
        if hit is None or hit[0] != version or hit[1].device != self.attn_bias.device:
            hit = (version, self._resample_bias(key).detach())
            self._bias_cache[key] = hit
        return hit[1]

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False, **kwargs) -> Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                          # (4.1) (B, H, T, d_h)
        q, k = self.q_norm(q), self.k_norm(k)
        w = (q.float() * self.scale) @ k.float().transpose(-2, -1)        # (4.2) W_h, (B, H, T, T)
        b = self.bias_for(N)
        if b is not None:
            w = w + b.float()
        if is_causal:
            attn_mask = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
        if attn_mask is not None:  # masked pairs take no part (zeroed before f)
            keep = attn_mask if attn_mask.dtype == torch.bool else ~torch.isneginf(attn_mask)
            w = w.masked_fill(~keep, 0.0)
        a_hat = l2_normalize_scores(w, self.norm_mode, self.eps)         # (4.3) Â_h = f(W_h + b_h) = A_h^T
        if self.store_attention:
            self.last_attention = a_hat.detach()
        a_hat = self.attn_drop(a_hat)
        x = a_hat.to(v.dtype) @ v                                        # (4.4) S_h = A_h^T V_h
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _num_prefix(vit: nn.Module) -> int:
    return int(getattr(vit, "num_prefix_tokens", 1))


def swap_attention(vit: nn.Module, norm: str = "matrix", bias: str = "token", eps: float = 1e-6) -> nn.Module:
    """Replace ``block.attn`` of every block of a timm ``VisionTransformer`` by E-MHA (eq. 4.6), in place.

    Works for any ViT/DeiT size: the new modules copy the configuration and the weights of the old ones
    (``qkv``/``proj`` kept, ``attn_bias`` new and zero).
    """
    from timm.models.vision_transformer import Attention

    blocks = getattr(vit, "blocks", None)
    if blocks is None or not hasattr(vit, "patch_embed"):
        raise TypeError(f"swap_attention needs a timm VisionTransformer (with .blocks and .patch_embed), got "
                        f"{type(vit).__name__}. Use a vit_*/deit_* backbone.")
    grid = tuple(vit.patch_embed.grid_size)
    npt = _num_prefix(vit)
    n = 0
    for blk in blocks:
        attn = getattr(blk, "attn", None)
        if isinstance(attn, EMHAttention):
            continue
        if not isinstance(attn, Attention):
            raise TypeError(f"block attention {type(attn).__name__} is not timm's Attention; E-MHA only "
                            "replaces the standard ViT attention.")
        blk.attn = EMHAttention.from_attention(attn, num_tokens=npt + grid[0] * grid[1], grid_size=grid,
                                               num_prefix_tokens=npt, norm=norm, bias=bias, eps=eps)
        n += 1
    return vit


# ----------------------------------------------------------------------------------------------------------
# AttE (eqs. 4.7-4.9), GeM, losses (4.12-4.14)
# ----------------------------------------------------------------------------------------------------------
def gem(x: Tensor, p, dim: int, eps: float = 1e-6) -> Tensor:
    """Generalized-mean pooling ``(mean_n clamp(x, eps)^p)^(1/p)`` over ``dim``."""
    return x.clamp_min(eps).pow(p).mean(dim=dim).pow(1.0 / p)


class GeM(nn.Module):
    """GeM with a learnable exponent ``p`` (init 3)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: Tensor, dim: int) -> Tensor:
        return gem(x, self.p.clamp_min(1.0), dim, self.eps)


class AttE(nn.Module):
    """Attribute-guided explainer (eqs. 4.7-4.9).

    ``forward(P)`` with patch features ``P`` (B, N, d) returns the soft attribute assignment ``m`` (B, N, S):
    ``C = f_φ(P)`` (4.7), ``C̄ = C / ||C||`` over the c channels (4.8), sliced into S groups of c/S
    channels, each reduced to ``m_s = ||C̄_s||²`` (Σ_s m_s = 1, [D 10]; the spec's signed "group mean"
    alternative is not offered: every map must stay non-negative for the factored GeM/CAM, see
    :func:`factored_gem`). ``G_s = m_s ⊙ P`` (4.9) is :meth:`attributes`.
    """

    def __init__(self, dim: int, channels: int = 256, num_attributes: int = 8, hidden: int = 384,
                 reduce: str = "sqnorm", eps: float = 1e-6) -> None:
        super().__init__()
        if channels % num_attributes:
            raise ValueError(f"AttE channels c={channels} must be divisible by the number of attributes "
                             f"S={num_attributes} (each attribute gets c/S channels).")
        if reduce != "sqnorm":
            raise ValueError(f"AttE reduce must be 'sqnorm' (m_s = ||C̄_s||², [D 10]), got {reduce!r}.")
        self.num_attributes, self.channels, self.reduce, self.eps = num_attributes, channels, reduce, eps
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, channels))

    def forward(self, P: Tensor) -> Tensor:
        c = self.mlp(P)                                                       # (4.7)
        c = c / torch.linalg.vector_norm(c, dim=-1, keepdim=True).clamp_min(self.eps)  # (4.8)
        c = c.unflatten(-1, (self.num_attributes, self.channels // self.num_attributes))
        return c.pow(2).sum(-1)                                               # (B, N, S), Σ_s = 1

    @staticmethod
    def attributes(m: Tensor, P: Tensor) -> Tensor:
        """(4.9) ``G_s = m_s ⊙ P``: (B, N, S) x (B, N, d) -> (B, S, N, d)."""
        return m.transpose(1, 2).unsqueeze(-1) * P.unsqueeze(1)


def global_loss(logits: Tensor, target: Tensor) -> Tensor:
    """(4.12) multilabel soft-margin loss for multi-hot ``target`` (B, C) (the printed equation's missing
    minus sign restored, [D 14]); softmax cross-entropy for integer class ``target`` (B,) (single-label data)."""
    if target.dim() == 1 and not torch.is_floating_point(target):
        return F.cross_entropy(logits, target)
    if target.shape != logits.shape:
        raise ValueError(f"multi-label targets must have the logits' shape {tuple(logits.shape)}, got "
                         f"{tuple(target.shape)}; pass class indices (B,) for single-label data.")
    return F.multilabel_soft_margin_loss(logits, target.float())


def normalized_mse(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """``ℓ(a, b) = || a/||a|| - b/||b|| ||²`` over the last axis (= 2 - 2 cos) [D 15]."""
    a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(eps)
    b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp_min(eps)
    return (a - b).pow(2).sum(-1)


def discriminability_loss(u: Tensor, u_prime: Tensor) -> Tensor:
    """(4.13) ``L_dis = mean_batch |d - Σ_s d_s|`` with ``d = ℓ(u, u')`` on the concatenated attributes and
    ``d_s = ℓ(u_s, u'_s)`` per attribute; ``u, u'`` = GeM-pooled attribute features (B, S, d); ``u'`` is
    the momentum branch's (treated as a constant)."""
    u_prime = u_prime.detach()
    d = normalized_mse(u.flatten(1), u_prime.flatten(1))
    ds = normalized_mse(u, u_prime).sum(1)
    return (d - ds).abs().mean()


def diversity_loss(G: Tensor, eps: float = 1e-6) -> Tensor:
    """(4.14) mean over ordered pairs i != j of ``cos(vec G_i, vec G_j)``, batch mean; ``G`` (B, S, ...)."""
    S = G.shape[1]
    if S < 2:
        return G.new_zeros(())
    g = G.flatten(2)
    g = g / torch.linalg.vector_norm(g, dim=-1, keepdim=True).clamp_min(eps)
    gram = g @ g.transpose(1, 2)                                    # (B, S, S)
    off = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return (off / (S * (S - 1))).mean()


def balance_loss(m: Tensor, eps: float = 1e-12) -> Tensor:
    """Optional attribute-balance term (not in the thesis; spec [D 16]): ``KL(m̄ || uniform) =
    Σ_s m̄_s log(S m̄_s)`` with ``m̄_s`` = mean of the soft assignment ``m`` (B, N, S) over images and tokens.
    0 when every attribute is used equally, ``log S`` when one attribute takes all the mass (the collapse
    that L_dis's literal ``|d - Σ_s d_s|`` rewards, docs/results/exvit_notes.md). Per-token assignments
    stay free: only the *average* usage is pushed towards uniform."""
    mbar = m.reshape(-1, m.shape[-1]).mean(0)
    return (mbar * (mbar.clamp_min(eps) * m.shape[-1]).log()).sum()


def factored_gem(w: Tensor, Q: Tensor, p, eps: float = 1e-6) -> Tensor:
    """GeM over locations of ``clamp(w_s(n) Q(n), eps)`` without building the (B, S, N, d) tensor.

    For ``w >= 0``: ``(mean_n (w_s(n) Q(n))_+^p)^(1/p) = (Σ_n w_s(n)^p Q(n)_+^p / N)^(1/p)``, one matmul.
    Bases are floored at ``eps`` (as :func:`gem` does), so it equals ``gem(w ⊗ Q)`` up to O(eps).
    ``w`` (B, N, S) >= 0, ``Q`` (B, N, d) -> (B, S, d)."""
    N = Q.shape[1]
    wp = w.clamp_min(eps).pow(p)
    qp = Q.clamp_min(eps).pow(p)
    return (torch.einsum("bns,bnd->bsd", wp, qp) / N).pow(1.0 / p)


def factored_diversity(m: Tensor, P: Tensor, eps: float = 1e-6) -> Tensor:
    """:func:`diversity_loss` of ``G_s = m_s ⊙ P`` without building G: <G_i, G_j> = Σ_n m_i m_j ||P_n||²."""
    S = m.shape[-1]
    if S < 2:
        return m.new_zeros(())
    r = P.pow(2).sum(-1)                                            # (B, N)
    gram = torch.einsum("bni,bnj->bij", m * r.unsqueeze(-1), m)     # (B, S, S)
    nrm = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().clamp_min(eps)
    cos = gram / (nrm.unsqueeze(2) * nrm.unsqueeze(1))
    off = cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(-1)
    return (off / (S * (S - 1))).mean()


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------
def _create_vit(name: str, pretrained: bool, weights: Optional[str], in_chans: int, kwargs: dict) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(name, nn.Module):  # bring your own encoder: a timm VisionTransformer instance, used as is
        if not isinstance(name, VisionTransformer) or pretrained or weights:
            raise TypeError(f"eX-ViT takes a timm VisionTransformer instance (with its weights loaded) or a timm "
                            f"name; got {type(name).__name__}" + (" with pretrained/backbone_weights" if
                                                                   isinstance(name, VisionTransformer) else "") + ".")
        name.reset_classifier(0)  # (build it with dynamic_img_size=True to accept any input size)
        return name
    kw = dict(num_classes=0, in_chans=in_chans, dynamic_img_size=True, dynamic_img_pad=True)
    kw.update(kwargs)
    return create_timm_vit(name, pretrained, weights, kw, "eX-ViT",
                           "deit_small_patch16_224 (paper), deit_tiny_patch16_224, vit_small_patch16_224")


@register_model("exvit", test_kwargs=dict(backbone="deit_tiny_patch16_224", backbone_kwargs=dict(img_size=32, depth=2),
                                          attr_channels=16, num_attributes=4, attr_hidden=32, fuse_layers=2,
                                          drop_path_rate=0.0))
class ExViT(InterpretableClassifier):
    """eX-ViT online branch: E-MHA ViT encoder + AttE + GeM classifier (eqs. 4.1-4.11).

    Args:
        num_classes: C.
        backbone: timm ViT/DeiT name (default ``deit_small_patch16_224``: 12 layers, 6 heads, d = 384).
        pretrained / backbone_weights: timm hub weights / a local weights file (strictly checked).
        in_chans: input channels.
        backbone_kwargs: extra timm kwargs (``img_size``, ``depth``, ``patch_size``...).
        attention: ``"emha"`` (eq. 4.3) or ``"softmax"`` (timm's, for the plain-ViT ablation).
        attn_norm, attn_bias: E-MHA options (see :class:`EMHAttention`).
        head: ``"atte"`` (AttE + attribute-guided classifier, eqs. 4.7-4.11) or ``"plain"``
            (Linear(GeM(clamp(F^L))), the "E^θ only" baseline of Table 4.6, [§6 ablation switches]).
        num_attributes, attr_channels, attr_hidden, attr_reduce: S, c, f_φ width, group reduction.
        fuse_layers: K of eq. 4.10.
        fuse_mode: ``"product"`` (M_s = F̂ ⊙ G_s, eq. 4.11) or ``"gate"`` (M_s = m_s ⊙ F̂) [D 12].
        gem_p: initial GeM exponent of the classifier (learnable).
        drop_path_rate: stochastic depth of the online encoder (0.1, §3).
    """

    explanation_kind = "cam"
    mechanism_prefixes = ("atte.", "head.", "gem.")

    def __init__(self, num_classes: int = 20, backbone: str = "deit_small_patch16_224", pretrained: bool = False,
                 backbone_weights: Optional[str] = None, in_chans: int = 3, backbone_kwargs: Optional[dict] = None,
                 attention: str = "emha", attn_norm: str = "matrix", attn_bias: str = "token",
                 head: str = "atte", num_attributes: int = 8, attr_channels: int = 256, attr_hidden: int = 384,
                 attr_reduce: str = "sqnorm", fuse_layers: int = 3, fuse_mode: str = "product",
                 gem_p: float = 3.0, drop_path_rate: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__(num_classes, in_chans)
        if attention not in ("emha", "softmax"):
            raise ValueError(f"attention must be 'emha' or 'softmax', got {attention!r}.")
        if head not in ("atte", "plain"):
            raise ValueError(f"head must be 'atte' or 'plain', got {head!r}.")
        if fuse_mode not in ("product", "gate"):
            raise ValueError(f"fuse_mode must be 'product' or 'gate', got {fuse_mode!r}.")
        kw = dict(backbone_kwargs or {})
        kw.setdefault("drop_path_rate", drop_path_rate)
        self.encoder = _create_vit(backbone, pretrained, backbone_weights, in_chans, kw)
        if attention == "emha":
            swap_attention(self.encoder, norm=attn_norm, bias=attn_bias, eps=eps)
        depth = len(self.encoder.blocks)
        if not 1 <= fuse_layers <= depth:
            raise ValueError(f"fuse_layers K={fuse_layers} must be in [1, depth={depth}].")
        cfg = getattr(self.encoder, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", _IMAGENET_MEAN), cfg.get("std", _IMAGENET_STD)
        if len(mean) != in_chans:
            mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        d = self.encoder.embed_dim
        self.embed_dim, self.fuse_layers, self.fuse_mode, self.head_mode = d, fuse_layers, fuse_mode, head
        self.attention, self.eps = attention, eps
        self.num_attributes = num_attributes if head == "atte" else 0
        self.gem = GeM(gem_p, eps)
        self.tap = nn.Identity()  # (B, d, gh, gw) final normalised patch features: post-hoc CAM hook point
        if head == "atte":
            self.atte = AttE(d, attr_channels, num_attributes, attr_hidden, attr_reduce, eps)
            self.head = nn.Linear(num_attributes * d, num_classes)
        else:
            self.atte = None
            self.head = nn.Linear(d, num_classes)

    # -- encoder -----------------------------------------------------------------------------------------------
    def grid_size(self, spatial: Sequence[int]) -> Tuple[int, int]:
        return tuple(self.encoder.patch_embed.dynamic_feat_size(tuple(int(s) for s in spatial)))

    def encode(self, x: Tensor, num_layers: Optional[int] = None) -> Tuple[List[Tensor], Tuple[int, int]]:
        """Normalise [0,1] pixels, run the encoder; return the last ``num_layers`` (default K) block outputs
        after the final LayerNorm, patch tokens only, each (B, N, d), and the grid (gh, gw)."""
        self.check_input(x)
        grid = self.grid_size(x.shape[2:])
        for blk in self.encoder.blocks:
            if isinstance(blk.attn, EMHAttention):
                blk.attn.grid = grid
        k = num_layers or (self.fuse_layers if self.head_mode == "atte" else 1)
        feats = self.encoder.forward_intermediates((x - self.mean) / self.std, indices=k, norm=True,
                                                   output_fmt="NLC", intermediates_only=True)
        P = feats[-1]
        feats[-1] = self.tap(P.transpose(1, 2).reshape(P.shape[0], -1, *grid)).flatten(2).transpose(1, 2)
        return feats, grid

    def features(self, x: Tensor) -> Dict[str, Tensor]:
        """Everything the losses and explanations need for one view, in factored form.

        Every map the classifier pools is ``feat_s(n) = w_s(n) Q(n)`` with a non-negative per-location weight
        ``w`` (B, N, S) and a feature ``Q`` (B, N, d), so GeM, CAMs and L_div never materialise the
        (B, S, N, d) tensors (see :func:`factored_gem`):

        * AttE head: ``m`` (B, N, S) from AttE; ``G_s = m_s ⊙ P`` (4.9); ``M_s = F̂ ⊙ G_s = m_s (F̂ ⊙ P)`` (4.11),
          i.e. ``w = m``, ``Q = F̂ ⊙ P`` (``fuse_mode="gate"``: ``Q = F̂``), with F̂ the mean of the last K
          normalised block outputs (4.10);
        * plain head: ``w = 1`` (S = 1), ``Q = P``.

        Returns ``P`` (B, N, d) = LN(F^L) patch tokens, ``grid``, ``w``, ``Q`` and (AttE) ``m``.
        :meth:`materialize` builds ``G`` and ``M`` explicitly."""
        feats, grid = self.encode(x)
        P = feats[-1]
        out = {"P": P, "grid": grid}
        if self.head_mode == "plain":
            out.update(w=P.new_ones(P.shape[0], P.shape[1], 1), Q=P)
            return out
        m = self.atte(P)                                                # (4.7)-(4.8), groups -> m_s
        f_hat = torch.stack(feats, 0).mean(0)                           # (4.10)
        Q = f_hat * P if self.fuse_mode == "product" else f_hat          # (4.11) M_s = m_s ⊙ Q
        out.update(m=m, w=m, Q=Q)
        return out

    @staticmethod
    def materialize(out: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Explicit ``G`` (B, S, N, d) (4.9) and ``M`` (B, S, N, d) (4.11) from :meth:`features` (tests, plots)."""
        res = {"M": AttE.attributes(out["w"], out["Q"])}
        if "m" in out:
            res["G"] = AttE.attributes(out["m"], out["P"])
        return res

    def classify(self, out: Dict[str, Tensor]) -> Tensor:
        """GeM over the N locations of clamp(M) (learnable p), then Linear(S·d -> C) (§6 [D 13])."""
        return self.head(factored_gem(out["w"], out["Q"], self.gem.p.clamp_min(1.0), self.eps).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.features(x))

    def forward_train(self, x: Tensor) -> Dict[str, Tensor]:
        """``features`` plus ``logits`` and, for AttE, ``u`` = GeM_3(clamp(G)) (B, S, d) for eq. 4.13 and
        ``div`` = L_div (4.14) of this view."""
        out = self.features(x)
        out["logits"] = self.classify(out)
        if "m" in out:
            out["u"] = factored_gem(out["m"], out["P"], 3.0, self.eps)
            out["div"] = factored_diversity(out["m"], out["P"], self.eps)
        return out

    @torch.no_grad()
    def attribute_pool(self, x: Tensor) -> Tensor:
        """Momentum-branch output: ``u' = GeM_3(clamp(G'))`` (B, S, d) of eq. 4.13 (no gradient)."""
        feats, _ = self.encode(x, num_layers=1)
        P = feats[-1]
        return factored_gem(self.atte(P), P, 3.0, self.eps)

    # -- explanations (§8) ---------------------------------------------------------------------------------
    def _cams(self, out: Dict[str, Tensor], magnitude: bool = False) -> Tensor:
        """Pre-ReLU per-attribute contributions E_{c,s}(n) = <w_{c,s}, clamp(M_s(n))> = m_s(n) <w_{c,s},
        clamp(Q(n))>: (B, C, S, N) (the clamp moved onto Q: equal up to eps·||w||). ``magnitude``: the same
        sums of absolute terms (the noise floor of ``normalize_saliency``)."""
        wgt, Q = out["w"], out["Q"]
        S = wgt.shape[-1]
        W = self.head.weight.view(self.num_classes, S, self.embed_dim)
        if magnitude:
            return torch.einsum("csd,bnd->bcsn", W.abs(), Q.clamp_min(self.eps)) * wgt.transpose(1, 2).abs().unsqueeze(1)
        return torch.einsum("csd,bnd->bcsn", W, Q.clamp_min(self.eps)) * wgt.transpose(1, 2).unsqueeze(1)

    def _to_image(self, maps: Tensor, grid: Tuple[int, int], size: Sequence[int]) -> Tensor:
        """(B, K, N) patch maps -> (B, K, H, W): upsample to the padded size and crop the padding."""
        ph, pw = self.encoder.patch_embed.patch_size
        maps = maps.reshape(*maps.shape[:2], *grid)
        maps = F.interpolate(maps, size=(grid[0] * ph, grid[1] * pw), mode="bilinear", align_corners=False)
        return maps[..., : int(size[0]), : int(size[1])]

    def forward_explain(self, x: Tensor, target: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        out = self.features(x)
        logits = self.classify(out)
        c = self.resolve_target(logits, target)
        cam = self._cams(out)[torch.arange(x.shape[0], device=x.device), c].sum(1).relu()  # (B, N)
        scale = self._cams(out, magnitude=True)[torch.arange(x.shape[0], device=x.device), c].sum(1)
        cam = self._to_image(cam.unsqueeze(1), out["grid"], x.shape[2:]).squeeze(1)
        return logits, normalize_saliency(cam, scale=scale)

    @torch.no_grad()
    def explain_all(self, x: Tensor, upsample: bool = True) -> Dict[str, Tensor]:
        """All explanations of one pass.

        Returns ``logits`` (B, C); ``cams`` (B, C, H, W) = ReLU class maps (not normalised); ``attributes``
        (B, S, H, W) = m_s; ``contributions`` (B, C, S) = Σ_n E_{c,s}(n) (sums to the pre-ReLU CAM mass; the
        top-5 attributes of Fig. 4.10 are its 5 largest entries for the predicted class). With
        ``upsample=False`` maps stay on the patch grid."""
        out = self.features(x)
        logits = self.classify(out)
        E = self._cams(out)                                      # (B, C, S, N)
        cams = E.sum(2).relu()
        res = {"logits": logits, "contributions": E.sum(-1)}
        attrs = out["m"].transpose(1, 2) if "m" in out else None
        if upsample:
            cams = self._to_image(cams, out["grid"], x.shape[2:])
            attrs = self._to_image(attrs, out["grid"], x.shape[2:]) if attrs is not None else None
        else:
            cams = cams.reshape(*cams.shape[:2], *out["grid"])
            attrs = attrs.reshape(*attrs.shape[:2], *out["grid"]) if attrs is not None else None
        res["cams"] = cams
        if attrs is not None:
            res["attributes"] = attrs
        return res

    @torch.no_grad()
    def class_maps(self, x: Tensor, scales: Sequence[float] = (1.0,), flip: bool = False) -> Tuple[Tensor, Tensor]:
        """Multi-scale (+flip) class maps (§8): sum of upsampled ReLU CAMs, each class divided by its max
        (+1e-5). Returns (logits at scale 1 (B, C), maps (B, C, H, W) in [0, 1])."""
        H, W = x.shape[2:]
        total, logits = 0.0, None
        for s in scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            for fl in ((False, True) if flip else (False,)):
                xi = xs.flip(-1) if fl else xs
                r = self.explain_all(xi, upsample=True)
                cam = r["cams"].flip(-1) if fl else r["cams"]
                total = total + F.interpolate(cam, size=(H, W), mode="bilinear", align_corners=False)
                if s == 1.0 and not fl:
                    logits = r["logits"]
        if logits is None:
            logits = self(x)
        maps = total / (total.flatten(2).amax(-1)[..., None, None] + 1e-5)
        return logits, maps

    @torch.no_grad()
    def pseudo_masks(self, x: Tensor, labels: Optional[Tensor] = None, threshold: float = 0.45,
                     scales: Sequence[float] = (1.0,), flip: bool = False) -> Tensor:
        """Pseudo segmentation masks (B, H, W), 0 = background, c + 1 = class c (the dataset convention).

        Rule (§8): class maps from :meth:`class_maps` are kept only for the image's classes -- the multi-hot
        ``labels`` when given (standard for train-set pseudo labels), otherwise the predicted ones
        (σ(logit) > 0.5, at least the top-1); a constant background plane ``threshold`` (τ) is stacked in front
        and every pixel takes the argmax. A pixel is background unless some present class map exceeds τ."""
        logits, maps = self.class_maps(x, scales, flip)
        if labels is None:
            present = logits.sigmoid() > 0.5
            present[torch.arange(len(x)), logits.argmax(1)] = True
        else:
            labels = torch.as_tensor(labels, device=x.device)
            if labels.dim() == 1:  # class indices (single-label)
                labels = F.one_hot(labels.long(), self.num_classes)
            present = labels > 0
        maps = maps * present[..., None, None]
        bg = torch.full_like(maps[:, :1], float(threshold))
        return torch.cat([bg, maps], 1).argmax(1)

    def cam_target_layer(self) -> nn.Module:
        return self.tap

    def encoder_parameters(self) -> Iterable[Tuple[str, nn.Parameter]]:
        """(name, param) of the (pretrained) encoder, excluding the new E-MHA biases."""
        for n, p in self.named_parameters():
            if n.startswith("encoder.") and not n.endswith("attn_bias"):
                yield n, p


# ----------------------------------------------------------------------------------------------------------
# Siamese momentum branch (§5)
# ----------------------------------------------------------------------------------------------------------
def momentum_copy(model: ExViT) -> ExViT:
    """The momentum branch ξ: a copy of the online encoder + AttE (no classifier), eval mode, no gradients."""
    if model.atte is None:
        raise ValueError("the momentum branch needs the AttE head (head='atte').")
    head, model.head = model.head, None
    try:
        m = copy.deepcopy(model)
    finally:
        model.head = head
    m.head, m.gem = None, None  # no classifier; u' uses a fixed GeM p = 3
    m.requires_grad_(False)
    return m.eval()


def _ema_pairs(momentum: nn.Module, online: nn.Module):
    own = dict(online.named_parameters())
    pairs = []
    for n, p in momentum.named_parameters():
        if n.startswith(("encoder.", "atte.")):
            if n not in own:
                raise KeyError(f"momentum parameter {n} has no online counterpart.")
            pairs.append((p, own[n]))
    return pairs


@torch.no_grad()
def ema_update_(momentum: nn.Module, online: nn.Module, mu: float) -> None:
    """ξ <- μ ξ + (1 - μ) θ for the encoder and AttE parameters; buffers copied (§5)."""
    pairs = _ema_pairs(momentum, online)
    if pairs:
        ms = [a for a, _ in pairs]
        os_ = [b.detach().to(a.dtype) for a, b in pairs]
        torch._foreach_mul_(ms, mu)
        torch._foreach_add_(ms, os_, alpha=1.0 - mu)
    own_b = dict(online.named_buffers())
    for n, b in momentum.named_buffers():
        if n in own_b:
            b.copy_(own_b[n])
