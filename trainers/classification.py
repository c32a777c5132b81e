"""The base LightningModule: any registered model, trained as a (multi-label) classifier.

Mechanism trainers subclass :class:`ClassificationModule` and override :meth:`compute_loss`.
Optimisers, schedulers, per-parameter-group learning rates and freezing are plain config dicts, so
every recipe of the papers is a YAML file (see ``configs/``)::

    optimizer: {name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 1e-4}
    param_groups: [{params: "^backbone\\.", lr: 5e-5}]      # regex on parameter names
    scheduler: {name: multistep, milestones: [30, 60], gamma: 0.1}
    freeze: ["^backbone\\.", "^fc\\."]                       # frozen (and kept in eval mode)
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from models import create_model
from models.noise import GlobalBatchNoise
from models.weights import load_weights

__all__ = ["ClassificationModule", "build_optimizer", "build_scheduler", "load_module", "load_datamodule", "read_checkpoint",
           "register_trainer_class", "allowed_classes", "resolve_class"]

_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
_SCHEDULERS = ("none", "step", "multistep", "cosine", "poly")
#: keys each scheduler reads (plus the common ones); anything else is a typo and an error (issue 13 item 8)
_SCHEDULER_KEYS = {"none": (), "step": ("step_size", "gamma"), "multistep": ("milestones", "gamma"),
                   "cosine": ("T_max", "eta_min"), "poly": ("total_iters", "power")}
_SCHEDULER_COMMON = ("name", "interval", "warmup", "warmup_start")


def check_keys(what: str, cfg: Dict[str, Any], accepted) -> None:
    """Raise a ValueError naming the unknown keys of ``cfg`` and the accepted ones (a typo is never ignored)."""
    import difflib

    accepted = sorted(set(accepted))
    unknown = sorted(str(k) for k in cfg if k not in accepted)
    if unknown:
        hints = [f"{k!r} -> {m[0]!r}" for k in unknown for m in [difflib.get_close_matches(k, accepted, 1)] if m]
        raise ValueError(f"Unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in {what}; "
                         f"accepted: {', '.join(accepted)}" + (f" (did you mean {'; '.join(hints)}?)" if hints else "") + ".")


def _optimizer_keys(name: str) -> List[str]:
    import inspect

    return [p for p in inspect.signature(_OPTIMIZERS[name]).parameters if p not in ("self", "params")]


def check_optim_config(optimizer: Optional[Dict[str, Any]], param_groups: Optional[List[dict]] = None,
                       scheduler: Optional[Dict[str, Any]] = None, extra_scheduler_keys=()) -> None:
    """Validate the optimizer / param_groups / scheduler dicts (names and every key) before training starts."""
    if optimizer is not None:
        name = str(optimizer.get("name", "sgd")).lower()
        if name not in _OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {name!r}; choose one of {sorted(_OPTIMIZERS)}.")
        keys = _optimizer_keys(name)
        check_keys(f"optimizer ({name})", optimizer, ["name"] + keys)
        for g in param_groups or []:
            check_keys(f"param_groups entry {g}", g, ["params"] + keys)
    if scheduler:
        name = str(scheduler.get("name", "none")).lower()
        if name not in _SCHEDULERS:
            raise ValueError(f"Unknown scheduler {name!r}; choose one of {list(_SCHEDULERS)}.")
        check_keys(f"scheduler ({name})", scheduler, _SCHEDULER_COMMON + _SCHEDULER_KEYS[name] + tuple(extra_scheduler_keys))
        if str(scheduler.get("interval", "epoch")) not in ("epoch", "step"):
            raise ValueError(f"scheduler interval must be 'epoch' or 'step', got {scheduler['interval']!r}.")


def _param_groups(model: nn.Module, groups: List[dict], base: Dict[str, Any]) -> List[dict]:
    """Split trainable parameters into groups by regex (first match wins); the rest use ``base``."""
    buckets: List[List[nn.Parameter]] = [[] for _ in groups]
    rest: List[nn.Parameter] = []
    patterns = []
    for g in groups:
        if "params" not in g:
            raise ValueError(f"param group {g} needs a 'params' regex on parameter names, e.g. '^backbone\\.'.")
        patterns.append(re.compile(g["params"]))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for i, pat in enumerate(patterns):
            if pat.search(name):
                buckets[i].append(p)
                break
        else:
            rest.append(p)
    out = []
    for g, ps in zip(groups, buckets):
        if not ps:
            raise ValueError(f"param group regex {g['params']!r} matches no trainable parameter.")
        out.append({**{k: v for k, v in g.items() if k != "params"}, "params": ps})
    if rest:
        out.append({"params": rest})
    return out


def build_optimizer(model: nn.Module, optimizer: Dict[str, Any], param_groups: Optional[List[dict]] = None):
    check_optim_config(optimizer, param_groups)
    cfg = dict(optimizer)
    name = str(cfg.pop("name", "sgd")).lower()
    if name not in _OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {sorted(_OPTIMIZERS)}.")
    groups = _param_groups(model, list(param_groups or []), cfg)
    if not groups or not any(g["params"] for g in groups):
        raise ValueError("No trainable parameters: check `freeze` (everything is frozen).")
    return _OPTIMIZERS[name](groups, **cfg)


def build_scheduler(optimizer, scheduler: Optional[Dict[str, Any]], max_epochs: int, steps_per_epoch: int,
                    extra_keys=()):
    """LR scheduler from a dict; ``interval`` is ``epoch`` (default) or ``step``. Unknown keys are an error
    (``extra_keys``: keys a subclass reads itself)."""
    if not scheduler:
        return None
    check_optim_config(None, None, scheduler, extra_keys)
    cfg = dict(scheduler)
    name = str(cfg.pop("name", "none")).lower()
    interval = cfg.pop("interval", "epoch")
    warmup = int(cfg.pop("warmup", 0))
    if name not in _SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {list(_SCHEDULERS)}.")
    if name == "none":
        return None
    total = max(1, max_epochs if interval == "epoch" else max_epochs * max(1, steps_per_epoch))
    if name == "step":
        sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.get("step_size", 30), gamma=cfg.get("gamma", 0.1))
    elif name == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.get("milestones", [30, 60, 90]),
                                                     gamma=cfg.get("gamma", 0.1))
    elif name == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.get("T_max", total - warmup),
                                                           eta_min=cfg.get("eta_min", 0.0))
    else:  # polynomial decay (eX-ViT recipe)
        sched = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=cfg.get("total_iters", total - warmup),
                                                      power=cfg.get("power", 0.9))
    if warmup:
        warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=cfg.get("warmup_start", 0.01), total_iters=warmup)
        sched = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, sched], milestones=[warmup])
    return {"scheduler": sched, "interval": interval}


class ClassificationModule(pl.LightningModule):
    """Train any registered model (``models.create_model``) as a classifier.

    Args:
        model: registry name (``models.list_models()``).
        model_kwargs: constructor kwargs (``backbone``, ``pretrained``, ``backbone_weights``, ...).
        num_classes / multilabel / in_chans: linked from the DataModule by ``train.py``.
        optimizer, param_groups, scheduler, freeze: see module docstring.
        checkpoint_path: weights to start from (zoo checkpoint, state dict or safetensors). Loading a
            plain baseline checkpoint into a mechanism is allowed (only the mechanism's keys start
            fresh; everything else must match, and every key is reported).
        reset_head: with ``checkpoint_path``, load everything with the checkpoint's own class count, then
            ``model.reset_classifier(num_classes)`` (:func:`models.finetune.create_finetune_model`): fine-tune
            on new classes. Saved checkpoints are portable: they do not re-read ``checkpoint_path`` /
            ``backbone_weights`` / hub weights when loaded (see :meth:`on_save_checkpoint`).
        label_smoothing: for single-label cross-entropy.
    """

    #: scheduler keys a subclass reads itself (accepted by the key check of ``check_optim_config``)
    extra_scheduler_keys: tuple = ()

    def __init__(self, model: str = "baseline", model_kwargs: Optional[Dict[str, Any]] = None, num_classes: int = 10,
                 multilabel: bool = False, in_chans: Optional[int] = None,
                 optimizer: Optional[Dict[str, Any]] = None, param_groups: Optional[List[Dict[str, Any]]] = None,
                 scheduler: Optional[Dict[str, Any]] = None, freeze: Optional[List[str]] = None,
                 checkpoint_path: Optional[str] = None, reset_head: bool = False,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        kwargs = dict(model_kwargs or {})
        if in_chans is not None:
            kwargs.setdefault("in_chans", in_chans)
        if checkpoint_path and reset_head:
            from models.finetune import create_finetune_model

            self.model = create_finetune_model(model, checkpoint_path, num_classes, **kwargs)
        else:
            self.model = create_model(model, num_classes=num_classes, **kwargs)
            if checkpoint_path:
                load_weights(self.model, checkpoint_path)
        self.num_classes, self.multilabel = num_classes, multilabel
        self.optimizer_cfg = dict(optimizer or {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05})
        self.param_groups_cfg = list(param_groups or [])
        self.scheduler_cfg = dict(scheduler) if scheduler else None
        check_optim_config(self.optimizer_cfg, self.param_groups_cfg, self.scheduler_cfg, self.extra_scheduler_keys)
        self.frozen_modules: List[nn.Module] = []
        self._freeze(freeze or [])
        self.label_smoothing = label_smoothing
        self.train_metrics = self._metrics("train")
        self.val_metrics = self._metrics("val")
        self.test_metrics = self._metrics("test")

    # ---- setup ----------------------------------------------------------------------------
    def _metrics(self, stage: str) -> torchmetrics.MetricCollection:
        k = self.num_classes
        if self.multilabel:
            m = {"mAP": torchmetrics.classification.MultilabelAveragePrecision(num_labels=k, average="macro"),
                 "f1": torchmetrics.classification.MultilabelF1Score(num_labels=k, average="macro")}
        else:
            m = {"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=k, top_k=1, average="micro")}
            if k > 5:
                m["acc_top5"] = torchmetrics.classification.MulticlassAccuracy(num_classes=k, top_k=5, average="micro")
        return torchmetrics.MetricCollection(m, prefix=f"{stage}/")

    def _freeze(self, patterns: List[str]) -> None:
        """Freeze parameters matching any regex; modules whose parameters are all frozen stay in eval()."""
        if not patterns:
            return
        pats = [re.compile(p) for p in patterns]
        hit = set()
        for name, p in self.model.named_parameters():
            if any(pt.search(name) for pt in pats):
                p.requires_grad_(False)
                hit.add(name)
        if not hit:
            raise ValueError(f"freeze patterns {patterns} match no parameter of {type(self.model).__name__}.")
        self.frozen_modules = _fully_frozen_modules(self.model)

    def eval_frozen(self) -> None:
        """Put the frozen sub-modules in eval mode (their BatchNorm statistics must not move)."""
        for m in getattr(self, "frozen_modules", []):
            m.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.eval_frozen()
        return self

    # Lightning >= 2.2 restores per-module training flags instead of calling ``train()``: re-apply.
    def on_fit_start(self) -> None:
        self.eval_frozen()

    def on_train_epoch_start(self) -> None:
        self.eval_frozen()

    def global_batch_noise(self) -> GlobalBatchNoise:
        """Per-sample noise of this training step, independent of the DDP split (``models/noise.py``):
        a function of (``seed_everything`` seed, global step, position in the global batch)."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        t = self._trainer
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        return GlobalBatchNoise(seed, self.global_step, rank, world)

    # ---- steps ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def classification_loss(self, logits: Tensor, label: Tensor) -> Tensor:
        if self.multilabel:
            return F.multilabel_soft_margin_loss(logits, label.float())
        return F.cross_entropy(logits, label, label_smoothing=self.label_smoothing)

    def compute_loss(self, batch: Dict[str, Tensor], stage: str) -> Dict[str, Tensor]:
        """Return at least ``loss`` and ``logits``; other scalar entries are logged. Override me."""
        logits = self.model(batch["image"])
        return {"loss": self.classification_loss(logits, batch["label"]), "logits": logits}

    def _step(self, batch: Dict[str, Tensor], stage: str) -> Tensor:
        out = self.compute_loss(batch, stage)
        metrics = getattr(self, f"{stage}_metrics")
        label = batch["label"]
        logits = out["logits"].detach()
        metrics.update(logits, label.long() if self.multilabel else label)
        bs = label.shape[0]
        self.log(f"{stage}/loss", out["loss"].detach(), prog_bar=stage != "test", sync_dist=stage != "train",
                 batch_size=bs)
        for k, v in out.items():
            if k not in ("loss", "logits") and torch.is_tensor(v) and v.numel() == 1:
                self.log(f"{stage}/{k}", v.detach().float(), sync_dist=stage != "train", batch_size=bs)
        self.log_dict(metrics, prog_bar=True, on_step=False, on_epoch=True, batch_size=bs)
        return out["loss"]

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        self.check_finite_loss(loss)
        return loss

    def check_finite_loss(self, loss: Tensor) -> None:
        """Stop a diverged run at its first non-finite loss (one scalar check per step; under DDP every rank
        stops together). Checkpoints already written hold the finite weights of earlier epochs."""
        finite = bool(torch.isfinite(loss.detach()).all())
        t = self._trainer
        if t is not None and t.world_size > 1:
            finite = bool(t.strategy.reduce_boolean_decision(finite, all=True))
        if not finite:
            from models.base import NonFiniteError

            lr = self.optimizer_cfg.get("lr")
            raise NonFiniteError(
                f"Training diverged: the loss is {float(loss.detach().float().mean())} at epoch {self.current_epoch}, "
                f"step {self.global_step}. Lower the learning rate (optimizer lr={lr}), clip gradients "
                "(--trainer.gradient_clip_val 1.0) or check the data. Checkpoints written so far are from before.")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self.model(batch["image"] if isinstance(batch, dict) else batch)

    # ---- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Make the checkpoint self-describing (``load_module`` / ``eval.py`` rebuild it from the file)."""
        cls = type(self)
        checkpoint["zoo"] = {"module_class": f"{cls.__module__}.{cls.__qualname__}"}
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            dcls = type(dm)
            checkpoint["zoo"]["datamodule_class"] = f"{dcls.__module__}.{dcls.__qualname__}"
            checkpoint["zoo"]["datamodule_hparams"] = {k: v for k, v in dm.hparams.items() if not k.startswith("_")}
        # RNG state, so stochastic mechanisms (PICNN sampling, dropout) resume exactly
        checkpoint["zoo"]["torch_rng_state"] = torch.get_rng_state()
        # portable: the weights are in this file, so loading it (load_from_checkpoint, load_module) must not
        # re-read the files the run started from (parent checkpoint, backbone file) nor the hub
        hp = checkpoint.get("hyper_parameters")
        if isinstance(hp, dict):
            hp = dict(hp)
            mk = dict(hp.get("model_kwargs") or {})
            checkpoint["zoo"]["started_from"] = {"checkpoint_path": hp.get("checkpoint_path"),
                                                 "backbone_weights": mk.get("backbone_weights"),
                                                 "pretrained": mk.get("pretrained")}
            mk.pop("backbone_weights", None)
            if "pretrained" in mk:
                mk["pretrained"] = False
            rebuild = getattr(self.model, "rebuild_kwargs", None)  # e.g. PICNN keeps N filters after a reset
            mk.update(rebuild() if callable(rebuild) else {})
            hp.update(checkpoint_path=None, model_kwargs=mk)
            checkpoint["hyper_parameters"] = hp

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = (checkpoint.get("zoo") or {}).get("torch_rng_state")
        if state is not None:
            torch.set_rng_state(state)

    # ---- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        return self.with_scheduler(build_optimizer(self.model, self.optimizer_cfg, self.param_groups_cfg))

    def with_scheduler(self, opt: torch.optim.Optimizer):
        """Attach the configured scheduler to ``opt`` (for subclasses that build their own optimiser)."""
        trainer = self._trainer
        max_epochs = trainer.max_epochs if trainer is not None and trainer.max_epochs and trainer.max_epochs > 0 else 1
        steps = 1
        if trainer is not None:
            try:
                steps = math.ceil(trainer.estimated_stepping_batches / max_epochs)
            except Exception:  # no dataloader attached yet (e.g. a bare module in a test)
                steps = 1
        sched = build_scheduler(opt, self.scheduler_cfg, max_epochs, steps, self.extra_scheduler_keys)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}


def _fully_frozen_modules(module: nn.Module) -> List[nn.Module]:
    """Largest sub-modules whose parameters are all frozen (and that hold parameters or buffers)."""
    params = list(module.parameters())
    has_state = bool(params) or any(True for _ in module.buffers())
    if has_state and all(not p.requires_grad for p in params):
        return [module]
    return [m for child in module.children() for m in _fully_frozen_modules(child)]


# ---- rebuilding a module / DataModule from a checkpoint: an allow-list, never an import of a stored name ----
#: classes defined outside the ``trainers`` package that were registered with :func:`register_trainer_class`
_EXTRA_CLASSES: Dict[str, type] = {}
_LOAD_FAILURES: List[str] = []


def class_path(cls: type) -> str:
    """``module.QualName`` of a class (what ``on_save_checkpoint`` records)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_trainer_class(cls: type) -> type:
    """Decorator: allow a ``ClassificationModule`` / ``ZooDataModule`` subclass defined *outside* the ``trainers``
    package to be rebuilt from checkpoints. Subclasses defined inside ``trainers/`` are allowed automatically."""
    from trainers.data.datamodules import ZooDataModule

    if not (isinstance(cls, type) and issubclass(cls, (ClassificationModule, ZooDataModule))):
        raise TypeError(f"register_trainer_class accepts ClassificationModule / ZooDataModule subclasses, got {cls!r}.")
    _EXTRA_CLASSES[class_path(cls)] = cls
    return cls


def _ensure_trainers_loaded() -> None:
    """Import every module of the ``trainers`` package once (the list comes from the files on disk, never from a
    checkpoint), so that every project class has joined the allow-list; import failures are remembered."""
    import importlib
    import pkgutil
    import sys

    import trainers

    for info in pkgutil.walk_packages(trainers.__path__, "trainers.", onerror=lambda name: None):
        if info.name in sys.modules or info.name in {f.split(" ")[0] for f in _LOAD_FAILURES}:
            continue
        try:
            importlib.import_module(info.name)
        except Exception as e:  # a broken optional module must not hide the others
            from models.weights import describe_error

            _LOAD_FAILURES.append(f"{info.name} ({describe_error(e)})")


def allowed_classes(base: type) -> Dict[str, type]:
    """The allow-list: ``class path -> class`` for every public subclass of ``base`` (``ClassificationModule`` or
    ``ZooDataModule``) defined in the ``trainers`` package, plus the explicitly registered ones."""
    _ensure_trainers_loaded()
    out, stack = {}, [base]
    while stack:
        c = stack.pop()
        stack.extend(c.__subclasses__())
        if c.__module__.split(".")[0] == "trainers" and not c.__name__.startswith("_"):
            out[class_path(c)] = c
    out.update({k: v for k, v in _EXTRA_CLASSES.items() if issubclass(v, base)})
    return out


def resolve_class(path: Any, base: type, field: str) -> type:
    """Look ``path`` up in the allow-list of ``base`` (re-exports such as ``trainers.data.X`` are accepted);
    anything else is refused with an error naming ``field``. Nothing is imported from ``path``."""
    import sys

    if not isinstance(path, str):
        raise ValueError(f"{field} must be a class path string, got {type(path).__name__}.")
    allowed = allowed_classes(base)
    cls = allowed.get(path)
    if cls is None:  # a re-export of an allowed class by an already-imported module of the package
        mod, _, name = path.rpartition(".")
        owner = sys.modules.get(mod) if mod.split(".")[0] == "trainers" else None
        cand = getattr(owner, name, None) if owner is not None else None
        cls = cand if isinstance(cand, type) and cand in allowed.values() else None
    if cls is None:
        raise ValueError(
            f"{field}={path!r} is not a {base.__name__} of this project; refusing to import it (a checkpoint or "
            f"config can only name the zoo's own classes). Allowed: {', '.join(sorted(allowed))}."
            + (f" Modules that failed to import: {'; '.join(_LOAD_FAILURES)}." if _LOAD_FAILURES else "")
            + f" Classes defined outside trainers/ join with @register_trainer_class.")
    return cls


def accepted_kwargs(cls: type) -> List[str]:
    """Keyword names ``cls(...)`` accepts, following ``**kwargs`` up the MRO to the first closed signature."""
    import inspect

    names: set = set()
    for c in cls.__mro__:
        if "__init__" not in vars(c):
            continue
        params = list(inspect.signature(c.__init__).parameters.values())[1:]
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return sorted(names)


def check_kwargs(cls: type, given: Any, field: str) -> Dict[str, Any]:
    """``given`` must be a dict whose keys ``cls`` accepts; return it without private (``_``) keys."""
    if not isinstance(given, dict):
        raise ValueError(f"{field} must be a dict, got {type(given).__name__}.")
    given = {k: v for k, v in given.items() if not (isinstance(k, str) and k.startswith("_"))}
    ok = accepted_kwargs(cls)
    bad = sorted(str(k) for k in given if k not in ok)
    if bad:
        raise ValueError(f"{field} has unknown keys {bad} for {cls.__name__} (accepted: {', '.join(ok)}). The file "
                         "was written by another version of the zoo or edited; it is not loaded.")
    return given


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Read a Lightning checkpoint safely (``weights_only=True``) with a clear error."""
    import os

    from models.weights import describe_error

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist. Train one first: "
                                "python train.py fit --config configs/baseline/synthetic.yaml")
    if os.path.getsize(path) == 0:
        raise RuntimeError(f"Checkpoint {path!r} is empty (0 bytes): an interrupted copy or save. "
                           "Use another checkpoint of the run (best.ckpt / last.ckpt).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"Could not read checkpoint {path!r} ({describe_error(e)}). "
                           "It is corrupted or truncated, or holds pickled objects that are not loaded for safety.") from None
    if not isinstance(ckpt, dict):
        raise RuntimeError(f"Checkpoint {path!r} is not a Lightning checkpoint (a {type(ckpt).__name__}, not a dict).")
    return ckpt


def module_spec(ckpt: Dict[str, Any], **overrides) -> tuple:
    """``(class, kwargs)`` of the LightningModule of a checkpoint read by :func:`read_checkpoint`, validated:
    the class is on the allow-list, every hyper-parameter is a known argument, and the model kwargs point timm
    at no file. Weights come from the checkpoint, so ``pretrained``/``backbone_weights``/``checkpoint_path``
    of the original run are not re-read."""
    from models.registry import check_model_kwargs

    zoo = ckpt.get("zoo") or {}
    if not isinstance(zoo, dict):
        raise ValueError(f"checkpoint field 'zoo' must be a dict, got {type(zoo).__name__}.")
    cls = resolve_class(zoo.get("module_class", class_path(ClassificationModule)), ClassificationModule,
                        "zoo.module_class")
    hp = check_kwargs(cls, ckpt.get("hyper_parameters") or {}, "hyper_parameters")
    hp.update(overrides)
    hp["checkpoint_path"] = None
    mk = dict(hp.get("model_kwargs") or {})
    check_model_kwargs(mk, "hyper_parameters.model_kwargs")
    mk["pretrained"] = False
    mk.pop("backbone_weights", None)
    hp["model_kwargs"] = mk
    return cls, hp


def check_checkpoint(ckpt: Dict[str, Any]) -> None:
    """Validate all that :func:`load_module` / :func:`load_datamodule` would build from ``ckpt`` (building nothing)."""
    from trainers.data.datamodules import ZooDataModule

    module_spec(ckpt)
    zoo = ckpt.get("zoo") or {}
    if "datamodule_class" in zoo:
        cls = resolve_class(zoo["datamodule_class"], ZooDataModule, "zoo.datamodule_class")
        check_kwargs(cls, zoo.get("datamodule_hparams") or {}, "zoo.datamodule_hparams")


def load_module(path: str, **overrides) -> ClassificationModule:
    """Rebuild the LightningModule of a zoo checkpoint (allowed class + known hyper-parameters) and load its
    weights; every parameter must be in the file (a missing mechanism is an error, not random weights)."""
    ckpt = read_checkpoint(path)
    cls, hp = module_spec(ckpt, **overrides)
    if not isinstance(ckpt.get("state_dict"), dict):
        raise RuntimeError(f"Checkpoint {path!r} has no state_dict (saved with weights of nothing?).")
    module = cls(**hp)
    load_weights(module.model, ckpt["state_dict"], verbose=False, allow_fresh_mechanism=False)
    module.eval()
    return module


def datamodule_from_spec(cls_path: Any, hparams: Any, class_field: str, kwargs_field: str, **overrides):
    """Build an allowed ``ZooDataModule`` from a class path and keyword arguments (checkpoint or YAML)."""
    from trainers.data.datamodules import ZooDataModule

    cls = resolve_class(cls_path, ZooDataModule, class_field)
    hp = check_kwargs(cls, hparams if hparams is not None else {}, kwargs_field)
    return cls(**{**hp, **overrides})


def load_datamodule(path: str, **overrides):
    """Rebuild the DataModule a checkpoint was trained with (``None`` if not recorded); allow-listed classes only."""
    zoo = read_checkpoint(path).get("zoo") or {}
    if not isinstance(zoo, dict) or "datamodule_class" not in zoo:
        return None
    return datamodule_from_spec(zoo["datamodule_class"], zoo.get("datamodule_hparams") or {}, "zoo.datamodule_class",
                                "zoo.datamodule_hparams", **overrides)
