"""Callbacks shared by every run."""
from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.callbacks import ModelCheckpoint

from models.weights import atomic_write

__all__ = ["ZooCheckpoint", "AtomicCheckpointIO", "check_resume", "ORPHAN_PATTERN", "DDPConsistencyCheck"]

#: temp files left by a save that was killed (``atomic_write``: ``.<name>.<random>.tmp`` next to the target)
ORPHAN_PATTERN = re.compile(r"^\..+\.ckpt\.[A-Za-z0-9_]+\.tmp$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with truly atomic local saves.

    Lightning writes through ``fsspec``'s transaction, whose temp file lives in ``$TMPDIR``: when that is another
    filesystem (tmpfs, a cluster's node-local disk) the final "rename" is a copy over the target, and a SIGKILL
    during it leaves ``best.ckpt`` truncated. Here the temp file is in the checkpoint's own folder and
    ``os.replace`` swaps it in (``models.weights.atomic_write``), so the previous file survives any kill.
    Remote paths (``s3://``...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(path) as f:
            torch.save(checkpoint, f)


def _install_atomic_io(trainer: "pl.Trainer") -> None:
    """Swap the strategy's plain ``TorchCheckpointIO`` (also inside a wrapping IO) for :class:`AtomicCheckpointIO`."""
    strategy = trainer.strategy
    io = strategy.checkpoint_io
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    elif type(getattr(io, "checkpoint_io", None)) is TorchCheckpointIO:
        io.checkpoint_io = AtomicCheckpointIO()


def remove_orphans(folder: str) -> List[str]:
    """Delete temp files of killed saves (:data:`ORPHAN_PATTERN`) in ``folder``; return their names."""
    gone = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if ORPHAN_PATTERN.match(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                    gone.append(name)
    return gone


def _plain(v: Any) -> Any:
    """Comparable form of a hyper-parameter value (tuples -> lists, mappings -> dicts, tensors -> lists)."""
    if isinstance(v, dict) or hasattr(v, "items"):
        return {str(k): _plain(x) for k, x in dict(v.items()).items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if torch.is_tensor(v):
        return v.tolist()
    return v


#: DataModule settings that may change when resuming (they do not change what is computed)
RESUME_FREE_DATA_KEYS = ("num_workers",)


def check_resume(checkpoint: Dict[str, Any], pl_module: "pl.LightningModule",
                 datamodule: Optional["pl.LightningDataModule"] = None) -> None:
    """Refuse to resume (``fit --ckpt_path``) with settings that differ from the checkpoint's.

    Resuming continues the same run: weights, optimizer and scheduler state (learning rates included) and the
    epoch come from the file. A changed ``lr`` or ``label_smoothing`` on the command line would be silently
    replaced (optimizer state) or silently mix two recipes in one run, so the difference is an error listing every
    changed setting, with the two ways out.
    """
    from trainers.classification import class_path

    diffs = []
    zoo = checkpoint.get("zoo") or {}
    saved_cls, now_cls = zoo.get("module_class"), class_path(type(pl_module))
    if saved_cls is not None and saved_cls != now_cls:
        diffs.append(f"model class: checkpoint {saved_cls}, now {now_cls}")
    saved = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not str(k).startswith("_")}
    now = {k: v for k, v in dict(getattr(pl_module, "hparams", {}) or {}).items() if not str(k).startswith("_")}
    for k in sorted(set(saved) | set(now)):
        a, b = _plain(saved.get(k)), _plain(now.get(k))
        if a != b:
            diffs.append(f"model.{k}: checkpoint {a!r}, now {b!r}")
    dm_saved = zoo.get("datamodule_hparams")
    if datamodule is not None and isinstance(dm_saved, dict):
        dm_now = dict(getattr(datamodule, "hparams", {}) or {})
        for k in sorted(set(dm_saved) | set(dm_now)):
            if str(k).startswith("_") or k in RESUME_FREE_DATA_KEYS:
                continue
            a, b = _plain(dm_saved.get(k)), _plain(dm_now.get(k))
            if a != b:
                diffs.append(f"data.{k}: checkpoint {a!r}, now {b!r}")
    if diffs:
        raise SystemExit(
            "error: --ckpt_path resumes the run exactly (weights, optimizer and scheduler state, epoch), but these "
            "settings differ from the checkpoint's and would be silently replaced or mixed:\n  "
            + "\n  ".join(diffs)
            + "\nRemove these overrides to resume (use the run's own config: <run>/logs/csv/version_*/config.yaml or "
            "the original --config), or start a NEW run from these weights with "
            "--model.init_args.checkpoint_path=CKPT (new optimizer and schedule) instead of --ckpt_path.")


class ZooCheckpoint(ModelCheckpoint):
    """``best.ckpt`` selected on the **validation** split + ``last.ckpt`` for exact resumption.

    ``monitor="auto"`` picks ``val/acc`` (single-label) or ``val/mAP`` (multi-label) from the module.
    Checkpoints go to ``<trainer.default_root_dir>/checkpoints/`` (a stable place, so
    ``--ckpt_path last`` finds the previous run's ``last.ckpt``).

    * ``last.ckpt`` is rewritten after **every** epoch (Lightning 2.6 rewrites it only when ``best`` improves),
      so it always holds the last epoch.
    * Saves are atomic (:class:`AtomicCheckpointIO`: temp file in the same folder + ``os.replace``); temp files
      of a killed save are removed at the next start.
    * ``fit --ckpt_path`` with settings that differ from the checkpoint's is refused (:func:`check_resume`).
    """

    def __init__(self, monitor: Optional[str] = "auto", mode: str = "max", filename: str = "best",
                 save_last: bool = True, dirpath: Optional[str] = None, **kwargs) -> None:
        if save_last == "link":
            raise ValueError("ZooCheckpoint(save_last='link') would make last.ckpt a link to best.ckpt (a stale "
                             "epoch); use save_last=True (a full last.ckpt written every epoch).")
        self._auto = monitor == "auto"
        self._last_written_step = -1
        kwargs.setdefault("enable_version_counter", False)  # best.ckpt, never best-v1.ckpt (documented paths stay true)
        super().__init__(monitor=None if self._auto else monitor, mode=mode, filename=filename, save_last=save_last,
                         dirpath=dirpath, auto_insert_metric_name=False, save_top_k=1, **kwargs)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._auto:
            self.monitor = "val/mAP" if getattr(pl_module, "multilabel", False) else "val/acc"
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        _install_atomic_io(trainer)
        if trainer.is_global_zero and _is_local_file_protocol(self.dirpath):
            gone = remove_orphans(self.dirpath)
            if gone:
                print(f"[checkpoint] removed {len(gone)} temp file(s) of an interrupted save: {', '.join(gone)}")
        super().setup(trainer, pl_module, stage)

    # ---- last.ckpt: the last epoch, always --------------------------------------------------------------
    def _save_last_checkpoint(self, trainer: "pl.Trainer", monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _ensure_last(self, trainer: "pl.Trainer", at_train_epoch_end: bool) -> None:
        from pytorch_lightning.trainer.states import TrainerFn

        if (not self.save_last or trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING
                or trainer.sanity_checking or self._should_save_on_train_epoch_end(trainer) != at_train_epoch_end
                or self._last_written_step == trainer.global_step):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._ensure_last(trainer, at_train_epoch_end=True)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_validation_end(trainer, pl_module)
        self._ensure_last(trainer, at_train_epoch_end=False)

    # ---- resume ------------------------------------------------------------------------------------------
    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        from pytorch_lightning.trainer.states import TrainerFn

        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if trainer.state.fn == TrainerFn.FITTING:
            check_resume(checkpoint, pl_module, getattr(trainer, "datamodule", None))


class DDPConsistencyCheck(pl.Callback):
    """Guard for multi-GPU / multi-node runs: all ranks must hold bit-identical parameters and buffers.

    At the end of training (and every ``every_n_steps`` optimizer steps if > 0) each rank hashes its
    ``state_dict`` (SHA-256 of the raw bytes) and the hashes are all-gathered; a mismatch raises naming the ranks.
    Rank 0 writes ``<default_root_dir>/ddp_check.json`` (world size, number of nodes, hash) atomically.
    ``python train.py fit ... --trainer.callbacks+=trainers.callbacks.DDPConsistencyCheck``.
    """

    def __init__(self, every_n_steps: int = 0) -> None:
        self.every_n_steps = int(every_n_steps)

    @staticmethod
    def _digest(pl_module: "pl.LightningModule") -> str:
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(pl_module.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def _check(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> str:
        digest = self._digest(pl_module)
        if trainer.world_size > 1:
            import torch.distributed as dist

            all_digests = [None] * trainer.world_size
            dist.all_gather_object(all_digests, digest)
            bad = [r for r, d in enumerate(all_digests) if d != all_digests[0]]
            if bad:
                raise RuntimeError(f"DDP ranks diverged at step {trainer.global_step}: ranks {bad} differ from rank 0. "
                                   "A mechanism updates state from rank-local quantities; see docs/DESIGN.md (DDP).")
        return digest

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._check(trainer, pl_module)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        import json
        import tempfile

        digest = self._check(trainer, pl_module)
        if trainer.is_global_zero:
            root = trainer.default_root_dir
            os.makedirs(root, exist_ok=True)
            info = {"world_size": trainer.world_size, "num_nodes": trainer.num_nodes, "global_step": trainer.global_step,
                    "sha256": digest}
            fd, tmp = tempfile.mkstemp(dir=root, prefix=".ddp_check.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(info, f, indent=1)
            os.replace(tmp, os.path.join(root, "ddp_check.json"))
