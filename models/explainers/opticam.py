"""Opti-CAM (seed 001 ch. 2, eqs 2.4-2.12; spec §3.9).

``S_l(x; u) = sum_k softmax(u)_k A^k`` (2.4) with ``A = ReLU(f_l(x))`` detached; the weights ``u`` are
optimised per image to maximise ``F(x; u) = g_c(f(x * n(up(S_l(x; u)))))`` (2.5-2.6, "mask"
objective, ``g_c`` = logit of class c) or ``F = -|g_c(f(x)) - g_c(f(x * n(...)))|`` (2.12, "diff");
``n`` is min-max ("range", 2.9), ``S / max S`` ("max", 2.10) or an element-wise sigmoid (2.11). The
output is ``n(up(S_l(x; u*)))`` (2.7, always min-max).

Algorithm (batched over the B images, thesis values): ``u = 0.5`` (the channel mean, as the reference
code), Adam with lr 0.1, at most 100 iterations; **each image stops on its own** when
``|F_t - F_{t-1}| < 1e-10``: converged images are frozen (their ``u`` no longer moves and they leave the
forward batch) while the others continue. The loss is ``-sum_b F_b``, so images do not interact.

Documented refinement (spec §3.9 step 4 allows it): the returned map uses, per image, the ``u`` with
the best ``F`` seen (including the initialisation), so the explanation never scores worse than the
channel mean. ``explainer.last_info`` holds ``F_init``, ``F_best``, ``n_iter`` (per image) and ``u``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Explainer, LayerSpec, capture_outputs, gather_logit, normalize_saliency, upsample_to

__all__ = ["OptiCAM"]


def _normalise(s: Tensor, how: str) -> Tensor:
    """Normalisations of Table 2.8: range (2.9), max (2.10), sigmoid (2.11); ``s`` is (B, *spatial)."""
    if how == "range":
        return normalize_saliency(s)
    if how == "max":
        return s / (s.flatten(1).max(1).values.view(-1, *([1] * (s.dim() - 1))) + 1e-7)
    return torch.sigmoid(s)


class OptiCAM(Explainer):
    """Opti-CAM explainer (see module docstring). One target layer."""

    name = "opticam"
    single_layer = True

    def __init__(self, model: nn.Module, target_layers: LayerSpec = None, max_iter: int = 100, lr: float = 0.1,
                 objective: str = "mask", normalization: str = "range", tol: float = 1e-10,
                 keep_best: bool = True) -> None:
        super().__init__(model, target_layers)
        if objective not in ("mask", "diff"):
            raise ValueError(f"objective must be 'mask' (eq 2.6) or 'diff' (eq 2.12), got {objective!r}.")
        if normalization not in ("range", "max", "sigmoid"):
            raise ValueError(f"normalization must be 'range', 'max' or 'sigmoid', got {normalization!r}.")
        if max_iter < 0:
            raise ValueError(f"max_iter must be >= 0, got {max_iter}.")
        self.max_iter, self.lr, self.objective = int(max_iter), float(lr), objective
        self.normalization, self.tol, self.keep_best = normalization, float(tol), bool(keep_best)

    def _saliency(self, u: Tensor, a: Tensor, size) -> Tensor:
        s = torch.einsum("bk,bk...->b...", u.softmax(dim=1), a)  # (2.4)
        return upsample_to(s.unsqueeze(1), size).squeeze(1)

    def _objective(self, x: Tensor, a: Tensor, u: Tensor, t: Tensor, base: Tensor) -> Tensor:
        mask = _normalise(self._saliency(u, a, x.shape[2:]), self.normalization)
        score = gather_logit(self.model(x * mask.unsqueeze(1)), t)  # (2.6), mask broadcast over channels
        return score if self.objective == "mask" else -(base - score).abs()  # (2.12)

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        with torch.no_grad(), capture_outputs(self.target_layers) as cap:
            logits = self.model(x)
        a = self._reshape(cap.last()[0]).detach().float().clamp(min=0)
        base = gather_logit(logits, targets).detach()
        b, k = a.shape[:2]
        u = torch.full((b, k), 0.5, device=x.device, requires_grad=True)
        opt = torch.optim.Adam([u], lr=self.lr)
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        prev = torch.full((b,), float("nan"), device=x.device)
        best_f = torch.full((b,), -float("inf"), device=x.device)
        best_u = u.detach().clone()
        n_iter = torch.zeros(b, dtype=torch.long, device=x.device)
        f_init = None
        for it in range(self.max_iter + 1):
            idx = active.nonzero().squeeze(1)
            f = self._objective(x[idx], a[idx], u[idx], targets[idx], base[idx])  # F(u_it) of active images
            fd = f.detach()
            if f_init is None:
                f_init = fd.clone()
            better = fd > best_f[idx]
            best_f[idx] = torch.where(better, fd, best_f[idx])
            best_u[idx] = torch.where(better[:, None], u.detach()[idx], best_u[idx])
            converged = (fd - prev[idx]).abs() < self.tol  # NaN at it = 0 -> False
            prev[idx] = fd
            if it == self.max_iter:
                break
            active[idx[converged]] = False
            keep = ~converged
            if not keep.any():
                break
            frozen = u.detach().clone()
            opt.zero_grad(set_to_none=True)
            (-f[keep].sum()).backward()  # images are independent: sum of per-image objectives
            opt.step()
            with torch.no_grad():  # Adam's momentum would move frozen rows: put them back
                u[~active] = frozen[~active]
            n_iter[active] += 1
        u_star = best_u if self.keep_best else u.detach()
        self.last_info = dict(F_init=f_init, F_best=best_f, n_iter=n_iter, u=u_star, u_last=u.detach().clone())
        with torch.no_grad():
            return normalize_saliency(self._saliency(u_star, a, x.shape[2:]))  # (2.7)
