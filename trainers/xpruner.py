"""X-Pruner training stages (seed 000 ch. 5; spec ``xpruner.md`` §3-§5), each one YAML, chained by checkpoints.

* ``stage="masks"`` (eq. 5.8): every timm weight frozen (kept in eval), masks trained with
  ``CE(f(x; gate_y), y) + λ_sm L_smooth + λ_sp L_sparse``; masks clamped ≥ 0 after every step.
* ``stage="prune"`` (eqs. 5.9-5.12): ``CE(f(x; gate(M̂)), y) + L_R`` -- the gate is the label-free class mean of M̂
  (``prune_gate="mean"``, default [ours]: the network that is folded and deployed; the paper's ground-truth row
  ``"oracle"`` lets the class-wise masks carry the label, so W learns a network that is never deployed; see
  docs/xpruner.md) -- with learnable thresholds θ (AdamW, constant lr),
  W and M (AdamW, cosine), and the Lagrange multipliers β, γ updated by gradient **ascent** (their AdamW group has
  ``maximize=True``). At the end the kept units are calibrated to α (:func:`models.xpruner.xpruner_keep`) and, with
  ``pruned_path``, the physically pruned model is written (safetensors + per-block widths).
* ``stage="finetune"``: plain CE on the pruned model (``model: xpruner_pruned``, ``widths`` = ``checkpoint_path`` =
  the pruned file).

DDP rule: θ, β and γ are parameters of this LightningModule, so DDP all-reduces their gradients like every weight;
they start identical (0 / from the same checkpoint) and the achieved rate R is computed from θ and the masks, which are
identical on every rank. Hence β, γ, θ and the final kept sets are identical on all ranks; only rank 0 writes files.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.xpruner import (XPruner, accumulated_rate, hard_rates, lagrangian, prune_model, save_pruned,
                            smoothness_loss, soft_rates, sparsity_loss, unit_costs, unit_scores, xpruner_keep)

from .classification import ClassificationModule

__all__ = ["XPrunerModule", "init_thresholds"]

STAGES = ("masks", "prune", "finetune")


@torch.no_grad()
def init_thresholds(model: XPruner, rate: float) -> None:
    """θ_g between the k-th and (k+1)-th smallest ŝ of its group, k = round(rate·U_g): hard r_g = rate (spec §4)."""
    for g, M in enumerate(model.masks):
        s = torch.sort(unit_scores(M)).values
        k = int(round(rate * len(s)))
        if k <= 0:
            th = float(s[0]) - 1e-3
        elif k >= len(s):
            th = float(s[-1])
        else:
            th = 0.5 * float(s[k - 1] + s[k])
        model.xp.theta[g] = min(max(th, 0.0), 1.0)


def _to_parameter(module: nn.Module, name: str) -> None:
    """Turn buffer ``name`` into a trainable parameter (same state-dict key, same value)."""
    if isinstance(getattr(module, name), nn.Parameter):
        return
    value = module._buffers.pop(name).detach().clone()
    setattr(module, name, nn.Parameter(value))


class XPrunerModule(ClassificationModule):
    """X-Pruner stages on top of :class:`~trainers.classification.ClassificationModule` (see module docstring).

    Args (besides the base ones):
        stage: ``masks`` | ``prune`` | ``finetune``.
        lambda_sparse, lambda_smooth: λ_sp, λ_sm of eq. 5.8 (0.1 / 0.1); ``smooth``: ``pred_graph`` | ``none``.
        alpha: target share of prunable cost removed (eq. 5.11); ``rate_weighting``: ``flops`` | ``params``.
        theta_init_rate: hard rate θ starts at (default α: "r_l = α").
        theta_lr, lagrange_lr: lrs of θ and of β/γ (0.02); ``mask_lr``: stage-2 mask lr (default = optimizer lr).
        lagrangian: ``ascent`` (default) | ``descent`` (reproduction 1's bug, for the test) | ``off``.
        keep_stage1_losses: also add L_sparse/L_smooth in stage 2 (eq. 5.12 drops them).
        prune_gate: the gate of stage 2's CE. ``"oracle"``: the ground-truth row of M̂ (the paper's eq. 5.12,
            literal); ``"mean"`` [ours]: the label-free class mean of M̂, i.e. exactly what is folded and deployed,
            so W and θ are trained on the network that is kept; ``"both"``: the mean of the two CEs.
        pruned_path: where stage 2 writes the physically pruned ``.safetensors`` (rank 0).
    """

    extra_scheduler_keys = ("warmup_steps",)  # stage 'prune' cosine warm-up (configure_optimizers)

    def __init__(self, model: str = "xpruner", model_kwargs: Optional[Dict[str, Any]] = None, num_classes: int = 10,
                 multilabel: bool = False, in_chans: Optional[int] = None,
                 optimizer: Optional[Dict[str, Any]] = None, param_groups: Optional[List[Dict[str, Any]]] = None,
                 scheduler: Optional[Dict[str, Any]] = None, freeze: Optional[List[str]] = None,
                 checkpoint_path: Optional[str] = None, reset_head: bool = False, label_smoothing: float = 0.0,
                 stage: str = "masks", lambda_sparse: float = 0.1, lambda_smooth: float = 0.1,
                 smooth: str = "pred_graph", alpha: float = 0.5, rate_weighting: str = "flops",
                 theta_init_rate: Optional[float] = None, theta_lr: float = 0.02, lagrange_lr: float = 0.02,
                 mask_lr: Optional[float] = None, lagrangian: str = "ascent", keep_stage1_losses: bool = False,
                 pruned_path: Optional[str] = None, prune_gate: str = "mean") -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}.")
        if multilabel:
            raise ValueError("X-Pruner's class-wise masks need single-label data (multilabel=False).")
        if smooth not in ("pred_graph", "none"):
            raise ValueError(f"smooth must be 'pred_graph' or 'none', got {smooth!r}.")
        if lagrangian not in ("ascent", "descent", "off"):
            raise ValueError(f"lagrangian must be 'ascent', 'descent' or 'off', got {lagrangian!r}.")
        if prune_gate not in ("oracle", "mean", "both"):
            raise ValueError(f"prune_gate must be 'oracle', 'mean' or 'both', got {prune_gate!r}.")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha (share of prunable cost removed) must be in [0, 1), got {alpha}.")
        if stage == "masks":
            freeze = list(freeze or []) + ["^vit\\."]
            optimizer = optimizer or {"name": "sgd", "lr": 0.01, "momentum": 0.9}
        elif stage == "prune":
            optimizer = optimizer or {"name": "adamw", "lr": 5e-4, "weight_decay": 0.05}
        super().__init__(model, model_kwargs, num_classes, multilabel, in_chans, optimizer, param_groups, scheduler,
                         freeze, checkpoint_path, reset_head, label_smoothing)
        self.stage = stage
        if stage != "finetune" and not (isinstance(self.model, XPruner) and self.model.xp is not None):
            raise TypeError(f"stage {stage!r} needs the masked 'xpruner' model, got {type(self.model).__name__} "
                            "(a pruned model is fine-tuned with stage='finetune').")
        self.lambda_sparse, self.lambda_smooth, self.smooth = float(lambda_sparse), float(lambda_smooth), smooth
        self.alpha, self.rate_weighting = float(alpha), rate_weighting
        self.theta_lr, self.lagrange_lr, self.mask_lr = float(theta_lr), float(lagrange_lr), mask_lr
        self.lagrangian_mode, self.keep_stage1_losses, self.pruned_path = lagrangian, keep_stage1_losses, pruned_path
        self.prune_gate = prune_gate
        if stage == "prune":
            m = self.model
            costs = unit_costs(m, rate_weighting)
            self.register_buffer("group_costs", torch.tensor([c * U for c, U in zip(costs, m.group_sizes)]),
                                 persistent=False)
            with torch.no_grad():
                m.xp.pruning_active.fill_(True)
                init_thresholds(m, self.alpha if theta_init_rate is None else float(theta_init_rate))
            _to_parameter(m.xp, "theta")
            if lagrangian != "off":
                _to_parameter(m.xp, "lagrange_beta")
                _to_parameter(m.xp, "lagrange_gamma")
        self.keep: Optional[List[Tensor]] = None

    # ---- rates -------------------------------------------------------------------------------------------
    def rates(self) -> Dict[str, Tensor]:
        """Soft (differentiable) and hard per-group rates and their accumulated R (eq. 5.10)."""
        m = self.model
        soft = soft_rates(m.masks, m.xp.theta, m.n)
        hard = hard_rates(m.masks, m.xp.theta).detach()
        return {"r": soft, "R": accumulated_rate(soft, self.group_costs),
                "r_hard": hard, "R_hard": accumulated_rate(hard, self.group_costs)}

    # ---- loss --------------------------------------------------------------------------------------------
    def compute_loss(self, batch: Dict[str, Tensor], stage: str) -> Dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        if self.stage == "finetune" or stage != "train":
            logits = self.model(x)  # label-free (gate_mode of the model, "mean" by default)
            return {"loss": self.classification_loss(logits, y), "logits": logits}
        if self.stage == "prune" and self.prune_gate != "oracle":
            logits = self.model(x, mode="mean")  # label-free class mean of M̂: the deployed network
            ce = self.classification_loss(logits, y)
            if self.prune_gate == "both":
                ce = 0.5 * (ce + self.classification_loss(self.model(x, labels=y), y))
        else:
            logits = self.model(x, labels=y)  # oracle gate: the ground-truth row (eqs. 5.4-5.5)
            ce = self.classification_loss(logits, y)
        out = {"logits": logits, "ce": ce.detach()}
        loss = ce
        if self.stage == "masks" or self.keep_stage1_losses:
            masks = self.model.masks
            if self.lambda_sparse > 0:
                l_sp = sparsity_loss(masks)
                loss = loss + self.lambda_sparse * l_sp
                out["sparse"] = l_sp.detach()
            if self.lambda_smooth > 0 and self.smooth == "pred_graph":
                t = F.one_hot(y, self.num_classes).float()
                l_sm = smoothness_loss(masks, t, logits.softmax(1))
                loss = loss + self.lambda_smooth * l_sm
                out["smooth"] = l_sm.detach()
        if self.stage == "prune":
            r = self.rates()
            if self.lagrangian_mode != "off":
                l_r = lagrangian(r["R"], self.alpha, self.model.xp.lagrange_beta, self.model.xp.lagrange_gamma)
                loss = loss + l_r
                out["L_R"] = l_r.detach()
            out.update(R=r["R"].detach(), R_hard=r["R_hard"], beta=self.model.xp.lagrange_beta.detach(),
                       gamma=self.model.xp.lagrange_gamma.detach())
        out["loss"] = loss
        return out

    # ---- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.stage != "prune":
            return super().configure_optimizers()
        cfg = dict(self.optimizer_cfg)
        name = str(cfg.pop("name", "adamw")).lower()
        if name != "adamw":
            raise ValueError("stage 'prune' uses AdamW (spec §4); set optimizer.name: adamw.")
        lr, wd = float(cfg.pop("lr", 5e-4)), float(cfg.pop("weight_decay", 0.05))
        m = self.model
        theta = [m.xp.theta]
        masks = [p for n, p in m.named_parameters() if n.startswith("xp.") and "mask" in n and p.requires_grad]
        decay, no_decay = [], []
        for n, p in m.named_parameters():
            if n.startswith("xp.") or not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or n.endswith(("pos_embed", "cls_token", "dist_token")) else decay).append(p)
        groups = [dict(params=theta, lr=self.theta_lr, weight_decay=0.0, name="theta")]
        if self.lagrangian_mode != "off":
            groups.append(dict(params=[self.model.xp.lagrange_beta, self.model.xp.lagrange_gamma], lr=self.lagrange_lr,
                               weight_decay=0.0, maximize=self.lagrangian_mode == "ascent", name="lagrange"))
        groups += [dict(params=masks, lr=self.mask_lr or lr, weight_decay=0.0, name="masks"),
                   dict(params=decay, lr=lr, weight_decay=wd, name="weights"),
                   dict(params=no_decay, lr=lr, weight_decay=0.0, name="weights_no_decay")]
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.AdamW(groups, lr=lr, **cfg)
        sched_cfg = self.scheduler_cfg
        if not sched_cfg or str(sched_cfg.get("name", "none")).lower() == "none":
            return opt
        if str(sched_cfg["name"]).lower() != "cosine":
            raise ValueError("stage 'prune' supports scheduler cosine or none.")
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warm = int(sched_cfg.get("warmup_steps", 0))

        def cosine(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        lambdas = [(lambda s: 1.0) if g["name"] in ("theta", "lagrange") else cosine for g in groups]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs):
        out = super().optimizer_step(*args, **kwargs)
        self.project_()
        return out

    @torch.no_grad()
    def project_(self) -> None:
        """Masks ≥ 0, θ ∈ [0, 1], β ≥ 0 after every step (spec §3-§4)."""
        m = self.model
        if isinstance(m, XPruner) and m.xp is not None:
            for M in m.masks:
                M.clamp_(min=0.0)
            m.xp.theta.clamp_(0.0, 1.0)
        if self.stage == "prune" and isinstance(self.model.xp.lagrange_beta, nn.Parameter):
            self.model.xp.lagrange_beta.clamp_(min=0.0)

    # ---- logging and the end of stage 2 ------------------------------------------------------------------
    def on_train_epoch_end(self) -> None:
        if self.stage == "prune":
            r = self.rates()
            for g, v in enumerate(r["r_hard"]):
                kind = "attn" if g % 2 == 0 else "mlp"
                self.log(f"rate/{kind}_{g // 2}", v, sync_dist=False)

    def on_fit_end(self) -> None:
        if self.stage != "prune":
            return
        self.keep = xpruner_keep(self.model, self.alpha, self.rate_weighting)
        self.model.set_deploy_keep(self.keep)
        if self.pruned_path and (self._trainer is None or self.trainer.is_global_zero):
            pruned = prune_model(self.model, self.keep)
            save_pruned(pruned, self.pruned_path)
            r = self.rates()
            info = {"alpha": self.alpha, "rate_weighting": self.rate_weighting, "arch": pruned.arch(),
                    "rates_hard_theta": [float(v) for v in r["r_hard"]],
                    "rates_final": [1.0 - float(k.float().mean()) for k in self.keep],
                    "beta": float(self.model.xp.lagrange_beta), "gamma": float(self.model.xp.lagrange_gamma)}
            tmp = self.pruned_path + ".json.tmp"
            with open(tmp, "w") as f:
                json.dump(info, f, indent=2)
            os.replace(tmp, os.path.splitext(self.pruned_path)[0] + ".json")
