"""LRP rules, Relevance-CAM and XRelevance-CAM (seed 002 eqs 2.3-2.6, 2.18, 4.1-4.2; spec §3.11-3.12).

Rules (autograd forms of spec §3.11, Algorithms 1-2 of seed 002 corrected):

* epsilon (2.3): ``z = layer(x)``, ``s = R / (z + eps*sign(z))``, ``R' = x * VJP(z, x, s)``
  (:func:`lrp_epsilon`);
* alpha1-beta0 / z+ (2.4): ``z+ = layer_{w+}(x+) + layer_{w-}(x-)`` (no bias), ``s = R / (z+ + eps)``,
  ``R' = x+ * VJP(layer_{w+}, x+, s) + x- * VJP(layer_{w-}, x-, s)`` (:func:`lrp_zplus`).

Propagation through a whole zoo model (:class:`LRP`). Why not zennit: zennit passes *relevance*
through unhooked operations, so it needs every sum to be a module (its ResNet canonizers only know
torchvision's blocks); timm blocks add residuals functionally (``x += shortcut``) and our heads pool
with ``mean``, which zennit would duplicate instead of splitting. We therefore propagate a *modified
gradient* ``g`` with relevance ``R = a * g`` at every tensor ``a`` (the gradient x input view of LRP):

* layers with weights (``Conv*d``, ``Linear``; a ``BatchNorm`` whose input is a conv output is folded
  into that conv first -- canonisation found from the forward pass, no per-model code; a BN elsewhere is
  an element-wise layer with weights) get the z+ rule through a custom autograd function whose backward
  returns ``g_in = 1[x>0] VJP(layer_{w+}, s) + 1[x<0] VJP(layer_{w-}, s)`` with ``s = (y * g_out)/(z+ + eps)``;
* average-pooling modules get the epsilon rule;
* everything else keeps its plain gradient, which *is* the epsilon rule with eps -> 0 for bias-free
  linear operations (residual adds, GAP by ``mean``, reshapes: relevance split in proportion to each
  input's contribution), passes relevance unchanged through ReLU, and winner-take-all through max-pool.
* ``LayerNorm`` (incl. timm's ``LayerNorm2d``) is linearised with its standard deviation held constant
  and gets the epsilon rule (the LN rule of LRP for transformers; the plain gradient would give zero
  total relevance because LN is scale-invariant).
  Attention products, GELU/SiLU and sigmoid gates keep their plain gradient: there the maps are
  gradient x input, not strict LRP. Conservation is exact for conv/BN/ReLU/pool/add nets (even with
  biases, since z+ leaves the bias terms out of the redistribution) and approximate otherwise.

The initial relevance at the logits is contrastive: ``R_t = y_t``, ``R_j = -y_t/(C-1)`` (CLRP, 2.5,
Relevance-CAM default) or ``R_j = -y_t/C`` (XRelevance-CAM, seed 002 §4.3.1), or ``'logit'`` (only R_t).
For zoo models the target layer is a backbone tap, so ``R^k_ij`` is the relevance arriving at the tap's
output. Weights: Relevance-CAM ``w_k = mean_ij R^k_ij`` (2.18); XRelevance-CAM
``w_k = sum_ij R^k_ij / (eps + sum_ij A^k_ij)`` (4.2, eps sign-matched), which gives
``sum_k w_k sum_ij A^k_ij = sum R`` (eq 4.2 conservation). ``S = n(up(ReLU(sum_k w_k A^k)))``; several
layers come from one backward pass and are aggregated as in §4.4.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Explainer, LayerSpec, capture_outputs, gather_logit, postprocess_layer_maps

__all__ = ["lrp_epsilon", "lrp_zplus", "LRP", "initial_relevance", "RelevanceCAM", "XRelevanceCAM",
           "layer_relevance"]

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _stab(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with sign(0) = +1 (never divides by zero)."""
    return z + torch.where(z >= 0, torch.full_like(z, eps), torch.full_like(z, -eps))


def lrp_epsilon(layer: Callable[[Tensor], Tensor], x: Tensor, relevance: Tensor, eps: float = 1e-9) -> Tensor:
    """Epsilon rule (seed 002 eq 2.3) for ``z = layer(x)``: ``R_i = sum_j x_i w_ij/(z_j + eps sign z_j) R_j``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = layer(x)
        (c,) = torch.autograd.grad(z, x, relevance / _stab(z.detach(), eps))
    return x.detach() * c


def _zplus_grad(fn_pos, fn_neg, x: Tensor, relevance: Tensor, eps: float) -> Tensor:
    """Modified gradient ``c`` of the z+ rule, with ``R_in = x * c``."""
    xp = x.detach().clamp(min=0).requires_grad_(True)
    xn = x.detach().clamp(max=0).requires_grad_(True)
    with torch.enable_grad():
        zp = fn_pos(xp) + fn_neg(xn)
        cp, cn = torch.autograd.grad(zp, (xp, xn), relevance / (zp.detach() + eps))
    return torch.where(x > 0, cp, torch.where(x < 0, cn, torch.zeros_like(cp)))


def lrp_zplus(fn_pos: Callable[[Tensor], Tensor], fn_neg: Callable[[Tensor], Tensor], x: Tensor, relevance: Tensor,
              eps: float = 1e-9) -> Tensor:
    """alpha1-beta0 (z+) rule (seed 002 eq 2.4, spec §3.11 autograd form).

    ``fn_pos`` / ``fn_neg``: the layer with only its positive / negative weights and no bias
    (see :func:`weight_split`). ``R_i = sum_j (x_i w_ij)+ / sum_i' (x_i' w_i'j)+ R_j``.
    """
    return x.detach() * _zplus_grad(fn_pos, fn_neg, x, relevance, eps)


def _bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features, device=bn.weight.device)
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    return scale.detach()


def weight_split(module: nn.Module, bn: nn.Module = None) -> Tuple[Callable, Callable]:
    """``(layer_{w+}, layer_{w-})`` without bias for a Conv/Linear (optionally with a BatchNorm folded in) or a BN."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        scale = _bn_scale(module)
        shape = lambda t: (1, -1) + (1,) * (t.dim() - 2)  # noqa: E731
        sp, sn = scale.clamp(min=0), scale.clamp(max=0)
        return (lambda t: t * sp.view(shape(t))), (lambda t: t * sn.view(shape(t)))
    w = module.weight.detach()
    if bn is not None:
        w = w * _bn_scale(bn).view(-1, *([1] * (w.dim() - 1)))
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    if isinstance(module, nn.Linear):
        return (lambda t: F.linear(t, wp)), (lambda t: F.linear(t, wn))
    for cls, fn in _CONV.items():
        if type(module) is cls or isinstance(module, cls):
            kw = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
            if isinstance(module.padding, str) or module.padding_mode != "zeros":
                raise ValueError(f"LRP: {type(module).__name__} with padding={module.padding!r}, padding_mode="
                                 f"{module.padding_mode!r} is not supported (only numeric zero padding).")
            return (lambda t: fn(t, wp, None, **kw)), (lambda t: fn(t, wn, None, **kw))
    raise TypeError(f"no z+ rule for {type(module).__name__}")


class _RuleFn(torch.autograd.Function):
    """Identity on ``y`` in forward; backward turns ``g_out`` into the rule's modified input gradient."""

    @staticmethod
    def forward(ctx, x, y, rule):
        ctx.x, ctx.y, ctx.rule = x.detach().clone(), y.detach().clone(), rule
        return y.detach().clone()

    @staticmethod
    def backward(ctx, g):
        return ctx.rule(ctx.x, ctx.y * g), None, None


class LRP:
    """Context manager turning ``model``'s backward pass into LRP (see module docstring).

    Inside it, for any tensor ``a`` of the forward graph, ``a * autograd.grad(logits, a, R0 / logits)``
    is the LRP relevance of ``a`` for the initial relevance ``R0`` at the logits.
    """

    def __init__(self, model: nn.Module, eps: float = 1e-9, fold_bn: bool = True) -> None:
        self.model, self.eps, self.fold_bn = model, float(eps), fold_bn
        self._handles: List = []
        self._pending: dict = {}

    def __enter__(self):
        weighted = (nn.Linear,) + tuple(_CONV)
        for m in self.model.modules():
            if isinstance(m, weighted):
                self._handles.append(m.register_forward_hook(self._weighted))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                self._handles.append(m.register_forward_hook(self._batchnorm))
            elif isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                                nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
                self._handles.append(m.register_forward_hook(self._avgpool))
            elif isinstance(m, nn.LayerNorm):
                self._handles.append(m.register_forward_hook(self._layernorm))
        return self

    def _layernorm(self, module, inp, out):
        """LayerNorm with its scale treated as a constant (the "LN rule" of LRP for transformers), then the
        epsilon rule on that linear map: ``z = w (x - mean x) / std``, ``c = J^T (R / z)``. The plain gradient
        would give zero total relevance (LN is scale-invariant, so ``sum x * dLN/dx = 0``)."""
        x = inp[0]
        if not (torch.is_tensor(x) and x.requires_grad):
            return None
        channels_first = type(module).__name__.endswith("2d")  # timm LayerNorm2d normalises dim 1
        dims = (1,) if channels_first else tuple(range(-len(module.normalized_shape), 0))
        eps, ln_eps = self.eps, module.eps
        w = module.weight.detach() if module.weight is not None else None

        def rule(xx, r):
            std = torch.sqrt(xx.var(dim=dims, unbiased=False, keepdim=True) + ln_eps)
            ww = 1.0 if w is None else (w.view(1, -1, *([1] * (xx.dim() - 2))) if channels_first else w)
            z = ww * (xx - xx.mean(dim=dims, keepdim=True)) / std
            v = ww * (r / _stab(z, eps)) / std
            return v - v.mean(dim=dims, keepdim=True)
        return _RuleFn.apply(x, out, rule)

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pending.clear()
        return False

    def _zplus_rule(self, fns):
        eps = self.eps
        return lambda x, r: _zplus_grad(fns[0], fns[1], x, r, eps)

    def _weighted(self, module, inp, out):
        x = inp[0]
        if not (torch.is_tensor(x) and x.requires_grad):
            return None
        y = _RuleFn.apply(x, out, self._zplus_rule(weight_split(module)))
        self._pending[id(y)] = (y, module, x)
        return y

    def _batchnorm(self, module, inp, out):
        x = inp[0]
        if not (torch.is_tensor(x) and x.requires_grad):
            return None
        entry = self._pending.get(id(x))
        if self.fold_bn and entry is not None and entry[0] is x and isinstance(entry[1], tuple(_CONV)) \
                and entry[1].out_channels == module.num_features:
            _, conv, conv_in = entry  # canonisation: BN folded into the conv that produced its input
            return _RuleFn.apply(conv_in, out, self._zplus_rule(weight_split(conv, bn=module)))
        return _RuleFn.apply(x, out, self._zplus_rule(weight_split(module)))

    def _avgpool(self, module, inp, out):
        x = inp[0]
        if not (torch.is_tensor(x) and x.requires_grad):
            return None
        eps = self.eps

        def rule(xx, r):
            xx = xx.requires_grad_(True)
            with torch.enable_grad():
                z = _call_plain(module, xx)
                (c,) = torch.autograd.grad(z, xx, r / _stab(z.detach(), eps))
            return c
        return _RuleFn.apply(x, out, rule)


def _call_plain(module: nn.Module, x: Tensor) -> Tensor:
    """Run ``module.forward`` without its hooks."""
    return module.forward(x)


def initial_relevance(logits: Tensor, targets: Tensor, contrast: str = "clrp") -> Tensor:
    """Initial relevance at the logits (seed 002 eqs 2.5-2.6 and §4.3.1).

    ``clrp``: ``R_t = y_t``, ``R_j = -y_t/(C-1)`` (sums to 0); ``xrelevance``: ``R_j = -y_t/C`` (sums to
    ``y_t/C``); ``logit``: ``R_t = y_t`` only.
    """
    b, c = logits.shape
    yt = gather_logit(logits, targets)
    onehot = F.one_hot(targets, c).to(logits.dtype)
    if contrast == "logit" or c == 1:
        return onehot * yt[:, None]
    if contrast == "clrp":
        other = -yt / (c - 1)
    elif contrast == "xrelevance":
        other = -yt / c
    else:
        raise ValueError(f"contrast must be 'clrp', 'xrelevance' or 'logit', got {contrast!r}.")
    return onehot * yt[:, None] + (1 - onehot) * other[:, None]


def layer_relevance(model: nn.Module, x: Tensor, targets: Tensor, layers: Sequence[nn.Module],
                    contrast: str = "clrp", eps: float = 1e-9, fold_bn: bool = True
                    ) -> Tuple[List[Tensor], List[Tensor], Tensor, Tensor]:
    """LRP relevance at the outputs of ``layers``: returns ``(activations, relevances, logits, R0)``.

    Call under grad mode with the model in eval (explainers do this); one backward for all layers.
    """
    x = x.detach().requires_grad_(True)
    with LRP(model, eps=eps, fold_bn=fold_bn), capture_outputs(layers) as cap:
        logits = model(x)
        acts = cap.last()
        r0 = initial_relevance(logits.detach(), targets, contrast)
        grads = torch.autograd.grad(logits, acts, r0 / _stab(logits.detach(), 1e-12), allow_unused=True)
    rel = []
    for a, g in zip(acts, grads):
        if g is None:
            raise RuntimeError("a target layer does not lie on the path to the logits; choose another layer.")
        rel.append((a.detach() * g).float())
    return [a.detach().float() for a in acts], rel, logits.detach(), r0


class RelevanceCAM(Explainer):
    """Relevance-CAM (seed 002 eq 2.18): ``w_k = mean_ij R^k_ij`` from CLRP relevance at the target layer(s)."""

    name = "relevancecam"
    default_contrast = "clrp"

    def __init__(self, model: nn.Module, target_layers: LayerSpec = None, contrast: str = None,
                 eps: float = 1e-9, fold_bn: bool = True) -> None:
        super().__init__(model, target_layers)
        self.contrast = contrast or self.default_contrast
        initial_relevance(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), self.contrast)  # validate
        self.eps, self.fold_bn = float(eps), fold_bn

    def weights(self, a: Tensor, r: Tensor) -> Tensor:
        return r.flatten(2).mean(2)

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        acts, rels, logits, r0 = layer_relevance(self.model, x, targets, self.target_layers, self.contrast,
                                                 self.eps, self.fold_bn)
        acts, rels = [self._reshape(a) for a in acts], [self._reshape(r) for r in rels]  # ViT tokens -> maps
        maps, ws = [], []
        for a, r in zip(acts, rels):
            w = self.weights(a, r)
            ws.append(w)
            maps.append(torch.einsum("bk...,bk->b...", a, w))
        self.last_info = dict(activations=acts, relevance=rels, weights=ws, logits=logits, initial_relevance=r0,
                              raw_maps=maps)
        return postprocess_layer_maps(maps, x.shape[2:])

    def explain_raw(self, x: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
        """``(sum_k w_k A^k before ReLU at layer resolution, logits)`` for one target layer (UCAG protocol)."""
        if len(self.target_layers) != 1:
            raise ValueError(f"{self.name}: explain_raw needs exactly one target layer; UCAG over a multi-layer "
                             "explainer uses its normalised maps (patch_maps='normalized').")
        self.explain(x, targets)
        return self.last_info["raw_maps"][0], self.last_info["logits"]


class XRelevanceCAM(RelevanceCAM):
    """XRelevance-CAM (seed 002 eqs 4.1-4.2): ``w_k = sum_ij R^k_ij / (eps + sum_ij A^k_ij)``, contrast ``-y_t/C``."""

    name = "xrelevancecam"
    default_contrast = "xrelevance"

    def weights(self, a: Tensor, r: Tensor) -> Tensor:
        return r.flatten(2).sum(2) / _stab(a.flatten(2).sum(2), 1e-9)
