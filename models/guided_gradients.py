"""Guided-gradient regularisation ("A learning paradigm for interpretable gradients", seed 001 ch. 4).

Training makes the ordinary input gradient ``delta = dL_C/dx`` agree with the guided-backpropagation
gradient ``delta_G`` of the same scalar, used as a detached teacher:

* (4.1)/(4.2) ``L_C = mean_i CE(f(x_i), t_i)`` (``F.cross_entropy``; the seed's eq. 4.2 drops the log),
* (4.3) ``L_R = mean_i E(delta_i, delta_G,i)``, (4.4) ``L = L_C + lambda * L_R``,
* (4.5) MAE, (4.6) MSE, (4.7) negated cosine (default), (4.8) negated histogram intersection of the
  L1-normalised absolute gradients (corrected form, spec §10.4): :data:`ERROR_FUNCTIONS`.

The mechanism works with any network whose non-linearities are ReLU / ReLU6 -- timm, torchvision or
hand-written -- without touching the model: :class:`GuidableActivations` is a
:class:`~torch.overrides.TorchFunctionMode` that, while active during a forward pass, routes every
``nn.ReLU``/``nn.ReLU6`` module, ``F.relu``/``F.relu6``/``F.hardtanh(0, 6)``, ``torch.relu``,
``Tensor.relu`` and their in-place variants through :class:`_GuidableClamp`, an autograd Function
whose backward applies either the standard rule ``g * 1[a>0]`` or, while ``switch.guided()`` is on,
the guided rule ``relu(g) * 1[a>0]`` (ReLU6: ``* 1[0<a<6]``; Springenberg et al., seed 002 §2.5.2).
One forward therefore serves both gradients (spec §5 A): the guided teacher is taken with
``autograd.grad(..., create_graph=False)`` and the student with ``create_graph=True``; both see the
same BatchNorm batch statistics and running statistics are updated once. The flag is read once per
activation call, so the thesis's "if-else bottleneck" (§4.4) does not arise. In-place calls are
computed out of place inside the Function (the caller gets a fresh tensor, no in-place-view errors).

Smooth activations (GELU, SiLU/Swish, Mish, Hard-Swish, ELU, LeakyReLU, ...) have no guided rule:
they are **refused** with an error that names them (both as modules, at construction, and as
functional calls, during the forward). Sigmoid / tanh / softmax gates (squeeze-excitation, attention)
are not activations in this sense and pass their gradient unchanged, as in captum's GuidedBackprop.

Pure PyTorch; the Lightning module is ``trainers/guided_gradients.py``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .baseline import Baseline
from .registry import register_model

__all__ = ["ERROR_FUNCTIONS", "step_lambda", "error_mae", "error_mse", "error_cosine", "error_histogram_intersection",
           "GuidableActivations", "check_guided_compatible", "UnsupportedActivationError", "guided_backprop",
           "input_gradient", "guided_gradient_loss", "GuidedGradientsClassifier"]


# ---------------------------------------------------------------------------------------------
# error functions E(delta, delta') between gradient images, eqs. 4.5-4.8 (per sample, shape (B,))
# ---------------------------------------------------------------------------------------------
def _flat(d: Tensor) -> Tensor:
    d = d.flatten(1)  # all C*H*W entries (spec §10.5)
    return d.float() if d.dtype in (torch.float16, torch.bfloat16) else d  # at least fp32 (spec §5 D)


def error_mae(d: Tensor, t: Tensor) -> Tensor:
    """Eq. 4.5: ``(1/p) ||d - t||_1`` per sample."""
    return (_flat(d) - _flat(t)).abs().mean(1)


def error_mse(d: Tensor, t: Tensor) -> Tensor:
    """Eq. 4.6: ``(1/p) ||d - t||_2^2`` per sample."""
    return (_flat(d) - _flat(t)).pow(2).mean(1)


def error_cosine(d: Tensor, t: Tensor, eps: float = 1e-12) -> Tensor:
    """Eq. 4.7 (negated similarity): ``-<d, t> / (||d||_2 ||t||_2 + eps)`` in [-1, 1]."""
    d, t = _flat(d), _flat(t)
    return -(d * t).sum(1) / (d.norm(dim=1) * t.norm(dim=1) + eps)


def error_histogram_intersection(d: Tensor, t: Tensor, eps: float = 1e-12) -> Tensor:
    """Eq. 4.8, corrected (spec §10.4): ``-sum_i min(|d_i|/||d||_1, |t_i|/||t||_1)`` in [-1, 0]."""
    d, t = _flat(d).abs(), _flat(t).abs()
    d = d / (d.sum(1, keepdim=True) + eps)
    t = t / (t.sum(1, keepdim=True) + eps)
    return -torch.minimum(d, t).sum(1)


ERROR_FUNCTIONS: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mae": error_mae, "mse": error_mse, "cosine": error_cosine, "histogram": error_histogram_intersection}
_ALIASES = {"cos": "cosine", "hi": "histogram", "histogram_intersection": "histogram", "l1": "mae", "l2": "mse"}


def get_error_function(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in ERROR_FUNCTIONS:
        raise ValueError(f"Unknown error function {name!r}; choose one of {sorted(ERROR_FUNCTIONS)} "
                         f"(eqs. 4.5-4.8; aliases {sorted(_ALIASES)}).")
    return ERROR_FUNCTIONS[key]


# ---------------------------------------------------------------------------------------------
# switchable ReLU: one forward, standard or guided backward
# ---------------------------------------------------------------------------------------------
class UnsupportedActivationError(ValueError):
    """The network uses an activation without a guided-backprop rule (GELU, SiLU, ...)."""


#: activation modules without a guided rule (refused by :func:`check_guided_compatible`).
_SMOOTH_MODULES = tuple(c for c in (nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.ELU, nn.CELU, nn.SELU,
                                    nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Softplus, nn.Hardsigmoid, nn.GLU,
                                    nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold))
#: the same as functional calls (caught during the forward by :class:`GuidableActivations`).
_SMOOTH_FUNCS = {F.gelu, F.silu, F.mish, F.hardswish, F.elu, F.elu_, F.celu, F.selu, F.leaky_relu,
                 F.leaky_relu_, F.prelu, F.rrelu, F.softplus, F.hardsigmoid, F.glu, torch.nn.functional.threshold}
_RELU_FUNCS = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
_RELU6_FUNCS = {F.relu6}
_HARDTANH_FUNCS = {F.hardtanh, F.hardtanh_}


def _refusal(what: str) -> str:
    return (f"Guided-gradient regularisation needs ReLU/ReLU6 non-linearities, but the network uses {what}. "
            "Guided backpropagation (seed 002 §2.5.2) is only defined for ReLU-type units. Use a ReLU backbone "
            "(e.g. resnet18/resnet50, mobilenetv2_100, vgg11_bn, or any timm CNN built with act_layer='relu'; "
            "timm models accept act_layer='relu' for many families), or train it with the plain baseline.")


class _GuidableClamp(torch.autograd.Function):
    """``clamp(a, 0, hi)`` (ReLU: hi=None, ReLU6: hi=6) whose backward reads the switch.

    Standard: ``g * 1[0 < a < hi]`` written with differentiable ops, so ``create_graph=True`` gives
    the exact double backward. Guided (switch on): ``relu(g) * 1[0 < a < hi]``.
    """

    @staticmethod
    def forward(ctx, a: Tensor, hi: Optional[float], switch: "GuidableActivations") -> Tensor:
        out = torch.relu(a) if hi is None else a.clamp(0.0, hi)
        ctx.hi, ctx.switch = hi, switch
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        (out,) = ctx.saved_tensors
        if ctx.switch.is_guided:
            g = g.clamp_min(0)
        if ctx.hi is None:
            gin = torch.ops.aten.threshold_backward(g, out, 0.0)
        else:
            gin = torch.ops.aten.hardtanh_backward(g, out, 0.0, float(ctx.hi))
        return gin, None, None


class GuidableActivations(TorchFunctionMode):
    """Context (a ``TorchFunctionMode``) that makes every ReLU of a forward pass switchable.

    >>> switch = GuidableActivations()
    >>> with switch:                       # record: ReLUs become _GuidableClamp
    ...     logits = model(x)
    >>> with switch.guided():              # guided rule for this backward
    ...     g_guided = torch.autograd.grad(score, x, retain_graph=True)[0]
    >>> g_std = torch.autograd.grad(score, x, create_graph=True)[0]   # standard rule

    ``hardtanh`` with bounds other than (0, 6) and every smooth activation raise
    :class:`UnsupportedActivationError`. The flag is read in backward, so it only matters while
    gradients are computed, not while recording.
    """

    def __init__(self) -> None:
        super().__init__()
        self._guided = 0
        self.calls = 0  # number of activations routed in the last recorded forward(s)

    @property
    def is_guided(self) -> bool:
        return self._guided > 0

    @contextlib.contextmanager
    def guided(self) -> Iterator["GuidableActivations"]:
        """Use the guided-backprop rule in backward passes run inside this block."""
        self._guided += 1
        try:
            yield self
        finally:
            self._guided -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU_FUNCS:
            self.calls += 1
            return _GuidableClamp.apply(args[0], None, self)
        if func in _RELU6_FUNCS:
            self.calls += 1
            return _GuidableClamp.apply(args[0], 6.0, self)
        if func in _HARDTANH_FUNCS:
            lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
            hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
            if float(lo) != 0.0 or float(hi) != 6.0:
                raise UnsupportedActivationError(_refusal(f"hardtanh({lo}, {hi}) (only ReLU6 = hardtanh(0, 6) "
                                                          "has a guided rule)"))
            self.calls += 1
            return _GuidableClamp.apply(args[0], 6.0, self)
        if func in _SMOOTH_FUNCS:
            raise UnsupportedActivationError(_refusal(f"the functional activation {func.__name__}"))
        return func(*args, **kwargs)


#: class-name fragments of smooth activations in other libraries (timm's GELU, GELUTanh, QuickGELU, Swish,
#: SwishMe, Mish, HardSwishMe, ...; timm's memory-efficient variants are custom autograd Functions that no
#: functional check could see, hence the check by name).
_SMOOTH_NAME_FRAGMENTS = ("gelu", "silu", "swish", "mish", "softplus", "hardsigmoid", "hard_sigmoid", "leakyrelu",
                          "prelu", "rrelu", "selu", "celu")


def _is_smooth(m: nn.Module) -> bool:
    if isinstance(m, _SMOOTH_MODULES):
        return True
    if next(m.children(), None) is not None:  # activations are leaf modules (a model named "*Gelu*" is not)
        return False
    name = type(m).__name__.lower()
    return name == "elu" or any(f in name for f in _SMOOTH_NAME_FRAGMENTS)


def check_guided_compatible(model: nn.Module) -> None:
    """Raise :class:`UnsupportedActivationError` if ``model`` holds activation modules without a guided rule.

    Functional calls are checked during the forward by :class:`GuidableActivations`.
    """
    found: Dict[str, list] = {}
    for name, m in model.named_modules():
        if _is_smooth(m):
            found.setdefault(type(m).__name__, []).append(name)
    if found:
        what = ", ".join(f"{k} x{len(v)} (e.g. {v[0]})" for k, v in sorted(found.items()))
        raise UnsupportedActivationError(_refusal("activation modules " + what))


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
def _require_grad_mode(name: str) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{name} needs autograd, but inference mode is on (Lightning validation/test/predict "
                           "loops run in torch.inference_mode). Create the Trainer with inference_mode=False, or "
                           "call it outside torch.inference_mode().")


def _resolve_target(logits: Tensor, target) -> Tensor:
    if target is None:
        return logits.argmax(1)
    target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if target.numel() == 1:
        target = target.expand(logits.shape[0])
    if target.shape[0] != logits.shape[0] or (target < 0).any() or (target >= logits.shape[1]).any():
        raise ValueError(f"target must be None, one class or one class per image in [0, {logits.shape[1]}); "
                         f"got {target.tolist()} for a batch of {logits.shape[0]}.")
    return target


def input_gradient(model: nn.Module, x: Tensor, target=None, guided: bool = False) -> Tensor:
    """Gradient of the target logit ``y_t`` w.r.t. the input ``x`` (standard or guided), ``(B, *x.shape[1:])``.

    Batched; no graph is kept; the model's train/eval mode is left as it is.
    """
    _require_grad_mode("input_gradient")
    check_guided_compatible(model)
    switch = GuidableActivations()
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        with switch:
            logits = model(x)
        t = _resolve_target(logits, target)
        score = logits.gather(1, t[:, None]).sum()
        with switch.guided() if guided else contextlib.nullcontext():
            (g,) = torch.autograd.grad(score, x)
    return g


def guided_backprop(model: nn.Module, x: Tensor, target=None) -> Tensor:
    """Guided backpropagation (Springenberg et al. 2015; seed 002 §2.5.2) for any ReLU network.

    Args:
        model: any ``nn.Module`` mapping ``x`` to logits ``(B, K)`` whose non-linearities are ReLU/ReLU6
            (modules or functional, in-place or not). Smooth activations raise
            :class:`UnsupportedActivationError`. Its train/eval mode is not changed (call ``model.eval()``).
        x: input batch ``(B, C, *spatial)`` (our models take [0, 1] pixels).
        target: ``None`` (predicted class), an int, or a ``(B,)`` tensor of classes.

    Returns:
        ``(B, C, *spatial)`` gradient of ``logits[b, target[b]]`` w.r.t. ``x`` in which every ReLU passes
        ``relu(g) * 1[a > 0]``; signed and unnormalised (take ``.abs().amax(1)`` or similar for a map).
        Equals captum's ``GuidedBackprop(model).attribute(x, target)`` (tested).
    """
    return input_gradient(model, x, target, guided=True)


def _bn_buffers(model: nn.Module):
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers()]


@contextlib.contextmanager
def _frozen_bn_buffers(model: nn.Module):
    """Restore BatchNorm running statistics after an extra forward (spec §10.7)."""
    bufs = _bn_buffers(model)
    saved = [b.detach().clone() for b in bufs]
    try:
        yield
    finally:
        # ``.data``: not a version bump, so the graph of the extra forward (which saved these buffers as
        # inputs of batch_norm; train-mode backward does not read them) stays valid
        for b, s in zip(bufs, saved):
            b.data.copy_(s)


def step_lambda(lam: float, every: int, step: int) -> float:
    """lambda for training step ``step`` when L_R is applied on every ``every``-th step only.

    Returns ``lam * every`` on steps ``0, every, 2*every, ...`` and 0 otherwise, so the regulariser's
    weight summed over any ``every`` consecutive steps is ``every * lam`` as in eq. 4.4 applied at each step
    (an unbiased estimate over steps, like ``fraction`` is over the batch). Unregularised steps cost a plain
    step, so the average step costs ``(c_reg + (every - 1)) / every`` plain steps.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}.")
    return float(lam) * every if step % every == 0 else 0.0


def guided_gradient_loss(model: nn.Module, x: Tensor, y: Tensor, lam: float = 7.5e-3, error: str = "cosine",
                         fraction: float = 1.0, grad_target: str = "loss", strategy: str = "shared",
                         generator: Optional[torch.Generator] = None, label_smoothing: float = 0.0
                         ) -> Dict[str, Tensor]:
    """The training objective ``L = L_C + lambda * L_R`` (eqs. 4.1-4.8, Algorithm 3).

    Args:
        model: a ReLU network ``x -> logits`` (checked: see :func:`check_guided_compatible`).
        x, y: images and class indices ``(B,)``.
        lam: lambda of eq. 4.4. ``lam == 0`` is plain training: one forward, no gradient graph is built.
        error: ``"cosine"`` (eq. 4.7, default), ``"histogram"`` (4.8), ``"mae"`` (4.5), ``"mse"`` (4.6).
        fraction: share of the batch on which L_R is estimated. ``1.0``: every sample, one shared forward.
            ``< 1``: a random subset of ``ceil(fraction*B)`` samples goes through a second forward (its
            BatchNorm running-stat update is undone) and L_R is their mean -- an unbiased estimate of the
            per-sample mean (4.3) up to BatchNorm's batch coupling, at ~``fraction`` of the extra cost.
        grad_target: ``"loss"`` (thesis: both gradients of ``sum_i CE_i``) or ``"logit"`` (of ``sum_i y_{t_i}``).
        strategy: ``"shared"`` (one forward for teacher and student, spec §5 A) or ``"separate"`` (the
            thesis's scheme: a separate guided teacher forward, then a forward with double backward; kept
            for the benchmark; BatchNorm running stats are restored after the teacher forward).
        generator: random generator for the subset of ``fraction < 1``.
        label_smoothing: of the cross-entropy (both L_C and the gradient scalar); 0 in the thesis.

    The gradients are taken of the *summed* per-sample loss (spec §10.8: delta_i does not depend on the
    batch size). The student gradient uses ``create_graph=True`` (L_R depends on theta only through it);
    the teacher is computed without a graph and detached.

    Returns a dict with ``loss`` (L), ``loss_c``, ``loss_r`` (0 if lam == 0), ``logits`` (of the full batch).
    """
    if grad_target not in ("loss", "logit"):
        raise ValueError(f"grad_target must be 'loss' or 'logit', got {grad_target!r}.")
    if strategy not in ("shared", "separate"):
        raise ValueError(f"strategy must be 'shared' or 'separate', got {strategy!r}.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    if y.dim() != 1:
        raise ValueError(f"guided-gradient regularisation expects class indices (B,), got labels of shape "
                         f"{tuple(y.shape)} (multi-label targets are not supported by eqs. 4.1-4.2).")
    err = get_error_function(error)
    if lam == 0:
        logits = model(x)
        loss_c = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return {"loss": loss_c, "loss_c": loss_c, "loss_r": torch.zeros((), device=x.device), "logits": logits}
    _require_grad_mode("guided_gradient_loss")
    check_guided_compatible(model)

    def scalar(logits_, y_):
        if grad_target == "loss":
            return F.cross_entropy(logits_, y_, reduction="sum", label_smoothing=label_smoothing)
        return logits_.gather(1, y_[:, None]).sum()

    switch = GuidableActivations()
    x = x.detach()
    n = x.shape[0]
    m = max(1, math.ceil(fraction * n)) if fraction < 1 else n
    if m == n and strategy == "shared":
        xr = x.requires_grad_(True)
        with switch:
            logits = model(xr)
        loss_c = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        s = scalar(logits, y)
        with switch.guided():
            (teacher,) = torch.autograd.grad(s, xr, retain_graph=True)
        (student,) = torch.autograd.grad(s, xr, create_graph=True)
    else:
        logits = model(x)  # plain forward of the whole batch for L_C
        loss_c = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        idx = torch.randperm(n, device=x.device, generator=generator)[:m] if m < n else None
        xs, ys = (x, y) if idx is None else (x[idx], y[idx])
        if strategy == "separate":  # teacher: its own forward + guided backward, no graph kept
            xt = xs.clone().requires_grad_(True)
            with _frozen_bn_buffers(model), torch.enable_grad(), switch:
                lt = model(xt)
            with switch.guided():
                (teacher,) = torch.autograd.grad(scalar(lt, ys), xt)
            del lt
        xr = xs.clone().requires_grad_(True)
        with _frozen_bn_buffers(model), switch:  # running stats are updated by the L_C forward only
            lr_ = model(xr)
        s = scalar(lr_, ys)
        if strategy == "shared":
            with switch.guided():
                (teacher,) = torch.autograd.grad(s, xr, retain_graph=True)
        (student,) = torch.autograd.grad(s, xr, create_graph=True)
    loss_r = err(student, teacher.detach()).mean()
    return {"loss": loss_c + lam * loss_r, "loss_c": loss_c.detach(), "loss_r": loss_r.detach(), "logits": logits}


# ---------------------------------------------------------------------------------------------
# registered model: the baseline, checked for ReLU-only non-linearities
# ---------------------------------------------------------------------------------------------
@register_model("guided_gradients", test_kwargs=dict(backbone="resnet18"))
class GuidedGradientsClassifier(Baseline):
    """The plain baseline (timm backbone -> GAP -> linear) for guided-gradient training.

    The mechanism is a training objective (``trainers/guided_gradients.py``), so the architecture and the
    intrinsic explanation (CAM) are the baseline's and checkpoints are interchangeable. At construction the
    backbone is checked for activations without a guided rule (GELU/SiLU/... raise with a clear message).
    ``guided_backprop(model, x, target)`` gives the model's guided gradient.
    """

    explanation_kind = "cam"

    def __init__(self, num_classes: int = 10, backbone: str = "resnet18", **kwargs) -> None:
        super().__init__(num_classes=num_classes, backbone=backbone, **kwargs)
        try:
            check_guided_compatible(self)
        except UnsupportedActivationError as e:
            raise UnsupportedActivationError(f"backbone {backbone!r}: {e}") from None

    def guided_gradient(self, x: Tensor, target: Optional[Tensor] = None) -> Tensor:
        """Guided-backprop gradient of the target logit w.r.t. ``x`` (see :func:`guided_backprop`)."""
        return guided_backprop(self, x, target)
