"""Train / validate / test any model of the zoo from YAML (LightningCLI).

    python train.py fit --config configs/baseline/synthetic.yaml
    python train.py fit --config configs/baseline/synthetic.yaml --trainer.max_epochs=3
    python train.py fit --config configs/baseline/synthetic.yaml --ckpt_path checkpoints/baseline_synthetic/checkpoints/last.ckpt
    python train.py test --config configs/baseline/synthetic.yaml --ckpt_path checkpoints/baseline_synthetic/checkpoints/best.ckpt
    python train.py fit --config configs/baseline/synthetic.yaml --trainer.strategy=ddp --trainer.devices=2
    python train.py fit --print_config --config configs/baseline/synthetic.yaml

After ``fit`` the best checkpoint (selected on validation) is evaluated once on the test split
(``--test_after_fit false`` to skip) and its accuracy is printed.
"""
from __future__ import annotations

import os
import sys
import warnings

from pytorch_lightning.cli import LightningCLI

from trainers.callbacks import ZooCheckpoint
from trainers.classification import ClassificationModule
from trainers.data import ZooDataModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


def _check_bf16(trainer) -> None:
    """``precision: bf16-mixed`` on a CPU without native bf16 (AVX512-BF16 / AMX) is emulated and slower than fp32:
    fall back to 32-bit with a note instead of silently training slower."""
    import torch

    prec = str(trainer.precision or "")
    if not prec.startswith("bf16") or str(trainer.accelerator) not in ("cpu", "auto", "None"):
        return
    if str(trainer.accelerator) == "auto" and torch.cuda.is_available():
        return
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    if not native:
        print(f"note: this CPU has no native bf16 (AVX512-BF16/AMX), where bf16 is emulated and slower than fp32: "
              f"precision {prec} -> 32-true")
        trainer.precision = "32-true"


def _refuse_used_run_folder(root: str) -> None:
    """Documented paths (``<root>/checkpoints/best.ckpt``) must mean the run just made: a new fit does not
    silently mix with an earlier run's checkpoints."""
    folder = os.path.join(root, "checkpoints")
    old = sorted(f for f in os.listdir(folder) if f.endswith(".ckpt")) if os.path.isdir(folder) else []
    if old:
        raise SystemExit(f"error: the run folder {root!r} already holds checkpoints of an earlier run "
                         f"({', '.join(old[:4])}). Resume it with --ckpt_path {os.path.join(folder, 'last.ckpt')}, "
                         "replace it with --overwrite true, or choose another --trainer.default_root_dir.")


class ZooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.multilabel", "model.init_args.multilabel", apply_on="instantiate")
        parser.link_arguments("data.in_chans", "model.init_args.in_chans", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, evaluate the best (validation-selected) checkpoint on the test split")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit into a run folder that already holds checkpoints (they are replaced)")

    def _parse_ckpt_path(self) -> None:
        """Lightning's version re-parses the checkpoint's hyper-parameters over the config: a ``class_path`` read
        from the file is imported, and command-line overrides are silently replaced (issue 13, items 1 and 9).
        Here the model is built from the config and command line only; the checkpoint is read safely and
        checked (allow-listed class, known hyper-parameters, no file-pointing timm kwargs), and a fit that
        resumes with different settings is refused (``trainers/callbacks.py: check_resume``)."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if ckpt_path and os.path.exists(str(ckpt_path)):
            from trainers.classification import check_checkpoint, read_checkpoint

            try:
                check_checkpoint(read_checkpoint(str(ckpt_path)))
            except (FileNotFoundError, RuntimeError, ValueError) as e:
                raise SystemExit(f"error: --ckpt_path {ckpt_path}: {e}") from None

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        if self.subcommand and "weights_only" in cfg and cfg.get("weights_only") is None:
            cfg.weights_only = True  # --ckpt_path is read without unpickling (even if torch's default changes)
        trainer = cfg.trainer
        root = trainer.default_root_dir or "checkpoints/run"
        trainer.default_root_dir = root
        if self.subcommand == "fit" and not cfg.get("ckpt_path") and not cfg.get("overwrite", False):
            _refuse_used_run_folder(root)
        _check_bf16(trainer)
        if trainer.logger in (None, True):  # CSV + TensorBoard by default, next to the checkpoints
            trainer.logger = [
                {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": root, "name": "logs/csv"}},
                {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                 "init_args": {"save_dir": root, "name": "logs/tensorboard"}},
            ]

    def after_fit(self) -> None:
        cfg = self.config.get("fit", self.config)
        if not cfg.get("test_after_fit", True) or self.trainer.fast_dev_run:
            return
        ckpt = self.trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        last = getattr(ckpt, "last_model_path", "") if ckpt is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=True)
        if self.trainer.is_global_zero:
            res = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
            print(f"\nbest checkpoint (selected on validation): {best}")
            print(f"last checkpoint (resume with --ckpt_path): {last}")
            print("test: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(res.items())))
            if best:
                rel = os.path.relpath(best) if not os.path.relpath(best).startswith("..") else best
                print(f"\nexplanations (accuracy, metrics table with controls, picture; ~1 min for 2D images, minutes "
                      f"for 3D volumes; --max-images N for a quicker look):\n"
                      f"  python eval.py --checkpoint {rel}")


_PROJECT = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), d) + os.sep for d in ("models", "trainers"))
_HINT = ("hint: `python train.py fit --config CONFIG --print_config` shows the resolved config; models: "
         "python -c 'import models; print(models.list_models())'.")


def project_error(exc: BaseException):
    """The innermost exception of ``exc``'s chain raised by this project's code (``models/``, ``trainers/``) with a
    message, or ``None``. jsonargparse re-raises an error of ``__init__`` as ~75 lines of union-type output
    ("Does not validate against any of the Union subtypes ... Expected NoneType"); the cause is in the chain."""
    found, seen, e = None, set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if (isinstance(e, (ValueError, KeyError, TypeError, OSError, ArithmeticError, NotImplementedError))
                and tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PROJECT)):
            found = e
        e = e.__cause__ or e.__context__
    return found


def main(args=None) -> ZooCLI:
    """Run the CLI; an error raised by the project's own code is printed as one line plus a hint (exit 1)."""
    try:
        return ZooCLI(ClassificationModule, ZooDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      seed_everything_default=0, save_config_kwargs={"overwrite": True},
                      trainer_defaults={"callbacks": [ZooCheckpoint()]}, args=args)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is one of ours
        own = project_error(e)
        if own is None:
            raise
        msg = own.args[0] if isinstance(own, KeyError) and own.args else str(own)
        raise SystemExit(f"error: {type(own).__name__}: {msg}\n{_HINT}") from None


if __name__ == "__main__":
    main()
