"""RSP: relative sectional propagation (Nam, Choi, Lee, AAAI 2021; spec seed004_ucag_rsp §4).

Stage 1 at the target layer L (default ``model.cam_target_layer()``), ``A = f_L(x)``:
``G^c = A * alpha^c`` (Grad-CAM channel map, ``alpha^c_k = mean_ij dy_c/dA^k_ij``), ``G^ = G/(max G + 1e-9)``;
hostile classes H (top-5 predictions minus t, or predicted positives minus t for multi-label, at most 4);
``RG = |H| G^t - sum_h G^h``; ``P = RG+/sum RG+``, ``Q = RG-/min RG-`` rescaled to ``sum Q = sum P``;
``R0 = P - Q``; purge: ``s = sum_k R0[k]``, ``r = 2 s+/sum s+ - |s-|/sum|s-|``, ``R_L[k] = r/K``
(``relative=False`` or empty H: ``R_L = G^t``).

Stage 2, modules in reverse execution order (``⊘`` = division with 0 where the denominator is 0):
ReLU / BatchNorm / Dropout / Identity pass R; max-pool: z-rule; residual blocks (timm / torchvision
BasicBlock, Bottleneck): ``R_a = R a+/(a+ + b+)``, ``R_b = R b+/(a+ + b+)`` (``a+ = max(a,0) + 1e-9``), then
each path; convolutions after the first: *sectional propagation* with comparative kernels
``K± = R±.view(C_out, hw) @ U^T`` (U = unfolded ``max(X, 0)``), ``G± = (K± @ U) * 1[R± > 0]``,
``C± = x+ * fold(K±^T @ (R± ⊘ G±))``; 1x1: ``R_in = C+ - C-``; k > 1 (*uniform shifting*):
``D = 2(C+ - C-)``, ``R_in = D - (sum R / nnz D) 1[D != 0]`` (per image; ``sum R_in = sum R``); the first
convolution: z^B rule with the per-image min/max of its (normalised) input. Output ``r = sum_c R_in[c]``
(signed; ``explain_raw``), saliency ``r+/max r+``.

Supported: CNNs made of Conv2d / BatchNorm2d / ReLU / MaxPool2d / Dropout / Identity and residual
BasicBlock / Bottleneck blocks, also with ResNet-D average-pool shortcuts (VGG, ResNet; zoo models and plain
timm / torchvision models). Grouped convolutions, SE / attention blocks, anti-aliasing and ViTs raise
``NotImplementedError``; 2D only.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Explainer, LayerSpec, capture_outputs

__all__ = ["RSP", "relative_start_relevance", "sectional_conv", "zb_conv", "maxpool_z", "residual_split"]

_PASS = (nn.ReLU, nn.BatchNorm2d, nn.Dropout, nn.Dropout2d, nn.Identity)


def _sdiv(a: Tensor, b: Tensor) -> Tensor:
    """``a ⊘ b``: a / b where b != 0, else 0."""
    nz = b != 0
    return torch.where(nz, a / torch.where(nz, b, torch.ones_like(b)), torch.zeros_like(a))


def _per_image(t: Tensor) -> Tensor:
    return t.view(-1, *([1] * (t.dim() - 1))) if t.dim() == 1 else t


# ---------------------------------------------------------------------------------------------- stage 1
def relative_start_relevance(acts: Tensor, grad_t: Tensor, grad_h: Optional[Tensor] = None,
                             hostile_mask: Optional[Tensor] = None, relative: bool = True) -> Tensor:
    """Start relevance ``R_L`` (B, K, h, w) from activations ``A``, ``dy_t/dA`` and the hostile gradients.

    ``grad_h`` (B, Hn, K, h, w) and ``hostile_mask`` (B, Hn) bool (which hostile slots are real).
    """
    B, K = acts.shape[:2]

    def ghat(g):
        G = acts * g.mean(dim=(-2, -1), keepdim=True)
        return G / (G.flatten(1).amax(1) + 1e-9).view(B, 1, 1, 1)

    gt = ghat(grad_t)
    if not relative or grad_h is None or grad_h.shape[1] == 0:
        return gt
    mask = hostile_mask.to(acts.dtype)  # (B, Hn)
    gh = torch.stack([ghat(grad_h[:, j]) for j in range(grad_h.shape[1])], 1)  # (B, Hn, K, h, w)
    nh = mask.sum(1)  # |H|
    rg = nh.view(B, 1, 1, 1) * gt - (gh * mask.view(B, -1, 1, 1, 1)).sum(1)
    pos, neg = rg.clamp(min=0), rg.clamp(max=0)
    P = _sdiv(pos, pos.flatten(1).sum(1).view(B, 1, 1, 1))
    Q = _sdiv(neg, neg.flatten(1).amin(1).view(B, 1, 1, 1))  # >= 0
    Q = Q * _sdiv(P.flatten(1).sum(1), Q.flatten(1).sum(1)).view(B, 1, 1, 1)
    s = (P - Q).sum(1)  # (B, h, w)
    sp, sn = s.clamp(min=0), s.clamp(max=0).abs()
    r = 2 * _sdiv(sp, sp.flatten(1).sum(1).view(B, 1, 1)) - _sdiv(sn, sn.flatten(1).sum(1).view(B, 1, 1))
    rl = (r / K).unsqueeze(1).expand_as(acts).contiguous()
    return torch.where((nh > 0).view(B, 1, 1, 1), rl, gt)


# ---------------------------------------------------------------------------------------------- stage 2 rules
def _conv_kw(conv: nn.Conv2d) -> dict:
    if conv.groups != 1:
        raise NotImplementedError(f"RSP: grouped convolution ({conv}) is not supported.")
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise NotImplementedError(f"RSP: {conv} with padding={conv.padding!r}/{conv.padding_mode!r} is not supported "
                                  "(numeric zero padding only).")
    return dict(kernel_size=conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)


def sectional_conv(conv: nn.Conv2d, x: Tensor, r: Tensor, shift: Optional[bool] = None) -> Tensor:
    """Sectional propagation through ``conv`` (input ``x`` (B, C_in, H, W), relevance ``r`` at its output).

    ``shift``: uniform shifting (default: kernels larger than 1x1). Per image; the learned weights enter
    only through the geometry (spec §4).
    """
    kw = _conv_kw(conv)
    B, C_out, h, w = r.shape
    xp = x.clamp(min=0)
    U = F.unfold(xp, **kw)  # (B, C_in k^2, L)
    if U.shape[-1] != h * w:
        raise RuntimeError(f"RSP: conv output {h}x{w} does not match its unfolded input ({U.shape[-1]} positions).")
    out = 0
    for sign in (1.0, -1.0):
        rs = (sign * r).clamp(min=0).reshape(B, C_out, h * w)
        Kc = torch.bmm(rs, U.transpose(1, 2))  # (B, C_out, C_in k^2)
        G = torch.bmm(Kc, U) * (rs > 0)  # (B, C_out, L)
        back = torch.bmm(Kc.transpose(1, 2), _sdiv(rs, G))  # (B, C_in k^2, L)
        c = xp * F.fold(back, output_size=x.shape[-2:], **kw)
        out = out + sign * c
    if shift is None:
        shift = any(k > 1 for k in conv.kernel_size)
    if not shift:
        return out
    d = 2 * out
    nz = (d != 0).to(d.dtype)
    total = r.flatten(1).sum(1)
    return d - _sdiv(total, nz.flatten(1).sum(1)).view(B, 1, 1, 1) * nz


def zb_conv(conv: nn.Conv2d, x: Tensor, r: Tensor) -> Tensor:
    """z^B rule for the first convolution, bounds = per-image min / max of its input (spec §4)."""
    kw = _conv_kw(conv)
    kw.pop("kernel_size")
    W = conv.weight.detach()
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    lo = x.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = x.flatten(1).amax(1).view(-1, 1, 1, 1)
    ones = torch.ones_like(x)
    z = F.conv2d(x, W, None, **kw) - F.conv2d(ones * lo, Wp, None, **kw) - F.conv2d(ones * hi, Wn, None, **kw)
    s = _sdiv(r, z)

    def ct(weight):
        return torch.nn.grad.conv2d_input(x.shape, weight, s, **kw)
    return x * ct(W) - lo * ct(Wp) - hi * ct(Wn)


def maxpool_z(pool: nn.Module, x: Tensor, r: Tensor) -> Tensor:
    """z-rule through max- (winner-take-all) or average-pooling: ``R_in = X * grad_X <Z, R ⊘ Z>``, ``X <- X + 1e-9``."""
    xe = (x + 1e-9).detach().requires_grad_(True)
    with torch.enable_grad():
        z = pool.forward(xe)
        (c,) = torch.autograd.grad(z, xe, _sdiv(r, z.detach()))
    return xe.detach() * c


def residual_split(r: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """``y = a + b``: ``R_a = R a+/(a+ + b+)``, ``R_b = R b+/(a+ + b+)``, ``a+ = max(a, 0) + 1e-9``."""
    ap, bp = a.clamp(min=0) + 1e-9, b.clamp(min=0) + 1e-9
    return r * ap / (ap + bp), r * bp / (ap + bp)


# ---------------------------------------------------------------------------------------------- traversal
def _is_block(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("conv1", "bn1", "conv2", "bn2")) and not isinstance(m, nn.Sequential)


def _units(root: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Leaf layers and residual blocks of ``root`` in definition order (Sequential containers expanded)."""
    out = []
    for name, child in root.named_children():
        if _is_block(child) or len(list(child.children())) == 0:
            out.append((name, child))
        elif isinstance(child, (nn.Sequential, nn.ModuleList)) or type(child).__name__ in ("FeatureListNet",):
            out += [(f"{name}.{n}", m) for n, m in _units(child)]
        else:
            out.append((name, child))
    return out


def _block_branch(block: nn.Module) -> List[nn.Module]:
    """The residual branch's convolutions in order, after checking the block has nothing RSP cannot handle."""
    for attr in ("se", "attn", "aa", "drop_block", "drop_path", "act3" if not hasattr(block, "conv3") else "_none"):
        m = getattr(block, attr, None)
        if m is not None and not isinstance(m, (nn.Identity,) + _PASS):
            raise NotImplementedError(f"RSP: block {type(block).__name__} has a {attr} module "
                                      f"({type(m).__name__}); only plain BasicBlock/Bottleneck are supported.")
    convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
    for c in convs:
        if not isinstance(c, nn.Conv2d):
            raise NotImplementedError(f"RSP: block {type(block).__name__} has a non-Conv2d layer {type(c).__name__}.")
    return convs


def _downsample_convs(block: nn.Module) -> List[nn.Module]:
    ds = getattr(block, "downsample", None)
    if ds is None:
        return []
    mods = list(ds.children()) if isinstance(ds, nn.Sequential) else [ds]
    convs = []
    for m in mods:
        if isinstance(m, (nn.Conv2d, nn.AvgPool2d)):
            convs.append(m)
        elif not isinstance(m, _PASS):
            raise NotImplementedError(f"RSP: shortcut layer {type(m).__name__} is not supported "
                                      "(conv, average pool and BN only).")
    return convs


class RSP(Explainer):
    """Relative sectional propagation (spec §4): ``RSP(model, target_layers=None, relative=True,
    hostile="top5", max_hostile=4)``. ``hostile``: ``"top5"`` (single-label: top-5 predictions minus t) or
    ``"multilabel"`` (sigmoid > 0.5 minus t, at most ``max_hostile``). ``last_info``: ``raw`` (signed input
    map r), ``start_relevance`` R_L, ``layer_sums`` [(unit, sum R per image)] after each unit, ``logits``.
    """

    name = "rsp"
    signed = True
    single_layer = True
    supports_3d = False

    def __init__(self, model: nn.Module, target_layers: LayerSpec = None, relative: bool = True,
                 hostile: str = "top5", max_hostile: int = 4) -> None:
        super().__init__(model, target_layers)
        if hostile not in ("top5", "multilabel"):
            raise ValueError(f"rsp: hostile must be 'top5' or 'multilabel', got {hostile!r}.")
        self.relative, self.hostile, self.max_hostile = bool(relative), hostile, int(max_hostile)
        bb = getattr(model, "backbone", None)
        self.root = bb.body if bb is not None and hasattr(bb, "body") else model
        self.units = _units(self.root)
        for name, m in self.units:
            if isinstance(m, nn.Conv2d):
                _conv_kw(m)

    # ------------------------------------------------------------------------------------------
    def _hostile(self, logits: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
        B, C = logits.shape
        if self.hostile == "top5":
            idx = logits.topk(min(5, C), dim=1).indices
            mask = idx != targets.view(-1, 1)
        else:
            k = min(C, self.max_hostile + 1)
            idx = logits.topk(k, dim=1).indices
            mask = (logits.gather(1, idx).sigmoid() > 0.5) & (idx != targets.view(-1, 1))
            # keep at most max_hostile real entries
            mask = mask & (mask.cumsum(1) <= self.max_hostile)
        return idx, mask

    def _record(self, x: Tensor, layer: nn.Module):
        store: Dict[int, dict] = {}
        handles = []

        def pre(mod, inp):
            store.setdefault(id(mod), {})["in"] = inp[0].detach().clone()

        def post(mod, inp, out):
            store.setdefault(id(mod), {})["out"] = out.detach().clone()

        watched = []
        for _, m in self.units:
            watched.append(m)
            if _is_block(m):
                watched += [c for c in _block_branch(m)] + _downsample_convs(m)
                watched.append(m.bn3 if hasattr(m, "conv3") else m.bn2)
                if getattr(m, "downsample", None) is not None:
                    watched.append(m.downsample)
        for m in watched:
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        order: List[int] = []
        handles.append(self.root.register_forward_pre_hook(lambda mod, inp: order.clear()))
        for _, m in self.units:
            handles.append(m.register_forward_hook(lambda mod, inp, out: order.append(id(mod))))
        try:
            x = x.requires_grad_(True)
            with capture_outputs([layer]) as cap:
                logits = self.model(x)
            a = cap.last()[0]
        finally:
            for h in handles:
                h.remove()
        return logits, a, store, order

    def _propagate_block(self, m: nn.Module, r: Tensor, store: dict) -> Tensor:
        convs = _block_branch(m)
        last_bn = m.bn3 if hasattr(m, "conv3") else m.bn2
        a = store[id(last_bn)]["out"]
        ds = getattr(m, "downsample", None)
        b = store[id(ds)]["out"] if ds is not None else store[id(m)]["in"]
        ra, rb = residual_split(r, a, b)
        for c in reversed(convs):
            ra = sectional_conv(c, store[id(c)]["in"], ra)
        for c in reversed(_downsample_convs(m)):  # conv 1x1 (+ average pool of ResNet-D shortcuts)
            xin = store[id(c)]["in"]
            rb = maxpool_z(c, xin, rb) if isinstance(c, nn.AvgPool2d) else sectional_conv(c, xin, rb)
        return ra + rb

    def _run(self, x: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
        layer = self.target_layers[0]
        logits, a, store, order = self._record(x, layer)
        cls, mask = self._hostile(logits.detach(), targets)
        classes = [targets] + ([cls[:, j] for j in range(cls.shape[1])] if self.relative else [])
        grads = []
        for i, c in enumerate(classes):
            y = logits.gather(1, c.view(-1, 1)).sum()
            (g,) = torch.autograd.grad(y, a, retain_graph=i < len(classes) - 1)
            grads.append(g.detach().float())
        acts = a.detach().float()
        gh = torch.stack(grads[1:], 1) if len(grads) > 1 else None
        r = relative_start_relevance(acts, grads[0], gh, mask if gh is not None else None, self.relative)
        by_id = {id(m): (n, m) for n, m in self.units}
        executed = [by_id[i] for i in order if i in by_id]
        start = None
        for k in range(len(executed) - 1, -1, -1):
            out = store.get(id(executed[k][1]), {}).get("out")
            if out is not None and out.shape == a.shape and torch.equal(out, a.detach()):
                start = k
                break
        if start is None:
            raise NotImplementedError("RSP: the target layer's output is not the output of a supported layer or block "
                                      "of the network (use the default layer or a ResNet stage / VGG feature layer).")
        r_start = r
        sums = [("start", r.flatten(1).sum(1))]
        first_conv = next((k for k, (_, m) in enumerate(executed) if isinstance(m, nn.Conv2d)), None)
        for k in range(start, -1, -1):
            name, m = executed[k]
            if _is_block(m):
                r = self._propagate_block(m, r, store)
            elif isinstance(m, nn.Conv2d):
                xin = store[id(m)]["in"]
                r = zb_conv(m, xin, r) if k == first_conv else sectional_conv(m, xin, r)
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                r = maxpool_z(m, store[id(m)]["in"], r)
            elif isinstance(m, _PASS) or type(m).__name__ in ("DropPath", "Identity"):
                pass
            else:
                raise NotImplementedError(f"RSP: no rule for layer {name} ({type(m).__name__}); supported: Conv2d, "
                                          "BatchNorm2d, ReLU, MaxPool2d, Dropout, residual BasicBlock/Bottleneck.")
            sums.append((name, r.flatten(1).sum(1)))
        rmap = r.sum(1)
        if rmap.shape[-2:] != x.shape[-2:]:
            rmap = F.interpolate(rmap.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        self.last_info = dict(raw=rmap, start_relevance=r_start, layer_sums=sums,
                              logits=logits.detach(), hostile=cls, hostile_mask=mask)
        return rmap, logits.detach()

    def native_resolution(self, x: Tensor) -> Tuple[int, ...]:
        """RSP maps are computed at the input's pixels (metrics runner)."""
        return tuple(int(s) for s in x.shape[2:])

    def explain_raw(self, x: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
        """``(signed input map r (B, H, W), logits)`` (UCAG protocol, ``signed = True``)."""
        return self._run(x, targets)

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        r, _ = self._run(x, targets)
        rp = r.clamp(min=0)
        return rp / rp.flatten(1).amax(1).clamp_min(1e-30).view(-1, 1, 1)
