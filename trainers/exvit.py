"""Siamese training of eX-ViT (seed 000 §4.3, spec ``/work/shared/specs/exvit.md`` §5-§7).

:class:`ExViTModule` trains ``models/exvit.py: ExViT``:

* two views of every batch image are drawn inside the module (:func:`two_views`: random rescale by
  s ~ U(0.5, 2.0), pad-if-needed with the mean colour, random crop back to the input size, horizontal flip);
* the online branch θ (encoder + AttE + classifier) sees view 1; the momentum branch ξ (EMA copy of encoder +
  AttE, no classifier, eval mode, ``no_grad``) sees view 2;
* loss (4.15): ``L = L_global + α L_dis + β L_div`` (α = 0.5, β = 1.0); ``L_global`` is the multilabel
  soft-margin loss (4.12) for multi-hot labels, or softmax cross-entropy when the data are single-label
  (``multilabel: false``, integer labels): nothing else changes, L_dis/L_div do not use labels;
* AdamW with lr 5e-5 for the encoder (minus the new E-MHA biases) and 5e-4 for everything new, weight decay
  0.01 except norms/biases/``attn_bias``/GeM p, polynomial decay (power 0.9) per step;
* after every optimiser step ``ξ <- μ ξ + (1 - μ) θ`` (μ = 0.996).

**EMA on DDP.** The momentum branch is not a registered sub-module (so DDP never sees it and the
checkpoint's ``state_dict`` holds only ``model.*``; the branch is saved under ``checkpoint["exvit_momentum"]``).
It is (re)initialised from the online weights in ``on_train_start`` -- after DDP has wrapped the model, which
broadcasts rank 0's parameters to all ranks -- and updated in :meth:`optimizer_step` right after the
optimiser step, from the online parameters only. DDP all-reduces the gradients, so every rank applies the
same optimiser step to the same weights; the EMA reads nothing else (no data, no random numbers), hence
the momentum weights are identical on every rank at every step. Running the update after the step (not
per batch) also keeps it correct under gradient accumulation.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from models.exvit import ExViT, balance_loss, discriminability_loss, ema_update_, momentum_copy
from models.noise import GlobalBatchNoise

from .classification import ClassificationModule

__all__ = ["ExViTModule", "two_views", "random_scale_crop_flip", "exvit_param_groups"]


def random_scale_crop_flip(x: Tensor, scale: Sequence[float] = (0.5, 2.0), crop: Optional[Sequence[int]] = None,
                           flip_p: float = 0.5, fill: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                           generator: Optional[torch.Generator] = None):
    """One augmented view of a batch (§7), independently per image.

    Each image is rescaled by s ~ U(scale) (bilinear), padded at the bottom/right to at least ``crop``
    with ``fill`` (per-channel colour in [0,1] pixel space, default the ImageNet mean), randomly cropped to
    ``crop`` (default: the input size) and flipped horizontally with probability ``flip_p``. A ``mask``
    (B, H, W) follows the same geometry (nearest, padded with 255 = ignore). Returns the view, or
    ``(view, mask)`` when a mask is given.
    """
    B, C, H, W = x.shape
    ch, cw = (H, W) if crop is None else (int(crop[0]), int(crop[1]))
    if fill is None:
        fill = torch.tensor([0.485, 0.456, 0.406] if C == 3 else [0.5] * C)
    fill = fill.to(x.device, x.dtype).reshape(1, C, 1, 1)
    if isinstance(generator, GlobalBatchNoise):  # DDP-split-independent draws (models/noise.py)
        u = generator.uniform((B, 4), x).float().cpu()
    else:
        dev = generator.device if generator is not None else "cpu"
        u = torch.rand(B, 4, generator=generator, device=dev).cpu()
    out = x.new_empty(B, C, ch, cw)
    mout = mask.new_empty(B, ch, cw) if mask is not None else None
    for i in range(B):
        s = scale[0] + (scale[1] - scale[0]) * float(u[i, 0])
        h, w = max(1, round(H * s)), max(1, round(W * s))
        xi = F.interpolate(x[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)
        ph, pw = max(ch, h), max(cw, w)
        canvas = fill.expand(1, C, ph, pw).clone()
        canvas[..., :h, :w] = xi
        top, left = int(u[i, 1] * (ph - ch + 1)), int(u[i, 2] * (pw - cw + 1))
        view = canvas[..., top:top + ch, left:left + cw]
        flip = bool(u[i, 3] < flip_p)
        out[i] = view[0].flip(-1) if flip else view[0]
        if mask is not None:
            mi = F.interpolate(mask[i:i + 1, None].float(), size=(h, w), mode="nearest")[0, 0].to(mask.dtype)
            mc = torch.full((ph, pw), 255, dtype=mask.dtype, device=mask.device)
            mc[:h, :w] = mi
            mv = mc[top:top + ch, left:left + cw]
            mout[i] = mv.flip(-1) if flip else mv
    return (out, mout) if mask is not None else out


def two_views(x: Tensor, **kwargs):
    """Two independent draws of :func:`random_scale_crop_flip` of the same batch (the siamese inputs)."""
    return random_scale_crop_flip(x, **kwargs), random_scale_crop_flip(x, **kwargs)


def exvit_param_groups(model: ExViT, encoder_lr: float, lr: float, weight_decay: float) -> List[dict]:
    """AdamW groups (§7): encoder (pretrained) at ``encoder_lr``, everything new (AttE, classifier, GeM p,
    E-MHA ``attn_bias``) at ``lr``; no weight decay on norms, biases, ``attn_bias``, tokens/pos-embed, p."""
    groups = {(e, d): [] for e in (True, False) for d in (True, False)}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        enc = n.startswith("encoder.") and not n.endswith("attn_bias")
        no_decay = (p.ndim <= 1 or n.endswith(("attn_bias", "cls_token", "pos_embed", "reg_token", "dist_token"))
                    or ".norm" in n or n.startswith("gem."))
        groups[(enc, not no_decay)].append(p)
    out = []
    for (enc, decay), ps in groups.items():
        if ps:
            out.append({"params": ps, "lr": encoder_lr if enc else lr, "weight_decay": weight_decay if decay else 0.0,
                        "name": f"{'encoder' if enc else 'new'}{'' if decay else '_no_decay'}"})
    return out


class ExViTModule(ClassificationModule):
    """LightningModule for eX-ViT (see module docstring).

    Args (besides :class:`ClassificationModule`'s):
        alpha, beta: weights of L_dis and L_div (eq. 4.15); 0 switches a term off (Table 4.6 ablations).
        gamma: weight of the optional attribute-balance term :func:`~models.exvit.balance_loss` (not in the
            thesis; 0 = off, the paper's loss). Counters the attribute collapse that L_dis favours ([D 16]).
        momentum: μ of the EMA branch (0.996).
        encoder_lr: lr of the encoder group when ``param_groups`` is not given (``optimizer.lr`` is the lr of
            everything new).
        aug_scale, aug_flip, aug_crop: two-view augmentation (§7); ``aug_crop`` None = input size.
    """

    def __init__(self, model: str = "exvit", model_kwargs: Optional[Dict[str, Any]] = None, num_classes: int = 20,
                 multilabel: bool = True, in_chans: Optional[int] = None,
                 optimizer: Optional[Dict[str, Any]] = None, param_groups: Optional[List[Dict[str, Any]]] = None,
                 scheduler: Optional[Dict[str, Any]] = None, freeze: Optional[List[str]] = None,
                 checkpoint_path: Optional[str] = None, label_smoothing: float = 0.0, reset_head: bool = False,
                 alpha: float = 0.5, beta: float = 1.0, gamma: float = 0.0, momentum: float = 0.996,
                 encoder_lr: float = 5e-5,
                 aug_scale: Sequence[float] = (0.5, 2.0), aug_flip: float = 0.5,
                 aug_crop: Optional[Sequence[int]] = None) -> None:
        optimizer = dict(optimizer or {"name": "adamw", "lr": 5e-4, "weight_decay": 0.01})
        scheduler = scheduler if scheduler is not None else {"name": "poly", "power": 0.9, "interval": "step"}
        super().__init__(model, model_kwargs, num_classes, multilabel, in_chans, optimizer, param_groups, scheduler,
                         freeze, checkpoint_path, reset_head=reset_head, label_smoothing=label_smoothing)
        if not isinstance(self.model, ExViT):
            raise TypeError(f"ExViTModule trains the 'exvit' model, got {type(self.model).__name__}; use "
                            "trainers.classification.ClassificationModule for other models.")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
        uses_atte = self.model.head_mode == "atte"
        if (alpha > 0 or beta > 0 or gamma > 0) and not uses_atte:
            raise ValueError("alpha/beta/gamma > 0 need the AttE head: set model_kwargs.head='atte' (or "
                             "alpha=beta=gamma=0 for the plain 'E^θ only' baseline).")
        if gamma < 0:
            raise ValueError(f"gamma (balance weight) must be >= 0, got {gamma}.")
        self.gamma = float(gamma)
        self.alpha, self.beta, self.momentum, self.encoder_lr = float(alpha), float(beta), float(momentum), encoder_lr
        self.aug = dict(scale=tuple(aug_scale), flip_p=float(aug_flip), crop=aug_crop)
        # not registered as a sub-module on purpose (see module docstring): a list hides it from nn.Module
        self._momentum: List[ExViT] = [momentum_copy(self.model)] if alpha > 0 else []
        self._momentum_restored = False

    # ---- momentum branch ------------------------------------------------------------------------------------------
    @property
    def momentum_branch(self) -> Optional[ExViT]:
        return self._momentum[0] if self._momentum else None

    def _sync_momentum_device(self) -> None:
        mb = self.momentum_branch
        if mb is not None:
            p = next(self.model.parameters())
            if next(mb.parameters()).device != p.device:
                self._momentum[0] = mb.to(p.device)

    def on_train_start(self) -> None:
        if self._momentum and not self._momentum_restored:
            # start from the online weights as they are now: after DDP's broadcast from rank 0 and after
            # any checkpoint_path loading, so ξ_0 = θ_0 on every rank
            self._momentum[0] = momentum_copy(self.model)
        self._sync_momentum_device()

    @torch.no_grad()
    def momentum_update(self) -> None:
        """ξ <- μ ξ + (1 - μ) θ (encoder + AttE), from the synchronised online weights."""
        if self._momentum:
            self._sync_momentum_device()
            ema_update_(self._momentum[0], self.model, self.momentum)

    def optimizer_step(self, *args, **kwargs):
        out = super().optimizer_step(*args, **kwargs)
        self.momentum_update()
        return out

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._momentum:
            checkpoint["exvit_momentum"] = {k: v.detach().cpu() for k, v in self._momentum[0].state_dict().items()}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        sd = checkpoint.get("exvit_momentum")
        if sd is not None and self._momentum:
            self._momentum[0].load_state_dict(sd)
            self._momentum_restored = True

    # ---- loss ----------------------------------------------------------------------------------------------
    def _fill(self) -> Tensor:
        return self.model.mean.flatten()

    def compute_loss(self, batch: Dict[str, Tensor], stage: str) -> Dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        if stage != "train":
            logits = self.model(x)
            return {"loss": self.classification_loss(logits, y), "logits": logits}
        noise = self.global_batch_noise()
        v1 = random_scale_crop_flip(x, fill=self._fill(), generator=noise, **self.aug)
        out = self.model.forward_train(v1)
        l_global = self.classification_loss(out["logits"], y)                 # (4.12)
        loss = l_global
        res = {"logits": out["logits"], "global": l_global.detach()}
        if self.alpha > 0:
            v2 = random_scale_crop_flip(x, fill=self._fill(), generator=noise, **self.aug)
            self._sync_momentum_device()
            mb = self._momentum[0].eval()
            u2 = mb.attribute_pool(v2)                                           # ξ branch, no gradient
            l_dis = discriminability_loss(out["u"], u2)                          # (4.13)
            loss = loss + self.alpha * l_dis
            res["dis"] = l_dis.detach()
        if self.beta > 0:
            l_div = out["div"]                                                   # (4.14), factored
            loss = loss + self.beta * l_div
            res["div"] = l_div.detach()
        if self.gamma > 0:
            l_bal = balance_loss(out["m"])
            loss = loss + self.gamma * l_bal
            res["bal"] = l_bal.detach()
        if "m" in out:  # attribute usage: share of the most used attribute (collapse monitor, [D 16])
            res["attr_max_share"] = out["m"].mean((0, 1)).max().detach()
        res["loss"] = loss                                                       # (4.15)
        return res

    # ---- optimisation ----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.param_groups_cfg:
            return super().configure_optimizers()
        cfg = dict(self.optimizer_cfg)
        name = str(cfg.pop("name", "adamw")).lower()
        lr, wd = float(cfg.pop("lr", 5e-4)), float(cfg.pop("weight_decay", 0.01))
        cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]
        groups = exvit_param_groups(self.model, self.encoder_lr, lr, wd)
        return self.with_scheduler(cls(groups, lr=lr, **cfg))
