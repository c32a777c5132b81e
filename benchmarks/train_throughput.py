"""train.py's training throughput as a fraction of a raw PyTorch loop (same model, data, precision, batch).

    python benchmarks/train_throughput.py                                   # the main job's config
    python benchmarks/train_throughput.py --config configs/baseline/synthetic.yaml --steps 60 --repeats 2

Both sides build the model and the DataModule from the same YAML (``model.init_args`` / ``data.init_args``),
read batches from the same DataLoader, and run forward + cross-entropy + backward + optimiser step with the
config's precision (``bf16-mixed`` -> ``torch.autocast("cpu", torch.bfloat16)``):

* **train.py**: ``pytorch_lightning.Trainer`` with the ``ClassificationModule`` (its logging, torchmetrics
  accuracy, scheduler, the augmentation hook), no validation, no checkpointing;
* **raw loop**: the same ``models.create_model(...)`` and optimiser in a plain ``for`` loop.

Images per second are measured after ``--warmup`` steps, the two sides alternate ``--repeats`` times (machine
load hits both) and the medians are compared. Goal (issue 16): ratio >= 0.85.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

warnings.filterwarnings("ignore")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "baseline", "synthetic.yaml"))
    p.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--train-size", type=int, default=2400, help="images generated for the benchmark")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--goal", type=float, default=0.85)
    return p.parse_args(argv)


def _config(path):
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def _datamodule(cfg, train_size):
    from trainers.classification import resolve_class
    from trainers.data import ZooDataModule

    d = cfg["data"]
    kw = dict(d.get("init_args") or {})
    kw["train_size"] = train_size
    dm = resolve_class(d["class_path"], ZooDataModule, "data.class_path")(**kw)
    dm.setup("fit")
    return dm


def _module(cfg, dm):
    from trainers.classification import ClassificationModule, resolve_class

    m = cfg["model"]
    kw = dict(m.get("init_args") or {})
    kw.update(num_classes=dm.num_classes, multilabel=dm.multilabel, in_chans=dm.in_chans)
    return resolve_class(m["class_path"], ClassificationModule, "model.class_path")(**kw)


def _autocast(precision: str):
    if str(precision).startswith("bf16"):
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def raw_loop(cfg, dm, steps: int, warmup: int) -> float:
    """Images/s of a plain PyTorch loop over the same loader, model and optimiser."""
    from trainers.classification import build_optimizer

    torch.manual_seed(0)
    module = _module(cfg, dm)
    model = module.model.train()
    opt = build_optimizer(model, module.optimizer_cfg, module.param_groups_cfg)
    ctx = _autocast((cfg.get("trainer") or {}).get("precision", "32"))
    n, t0, step = 0, None, 0
    while step < warmup + steps:
        for batch in dm.train_dataloader():
            if step == warmup:
                t0 = time.perf_counter()
            with ctx():
                loss = F.cross_entropy(model(batch["image"]), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step >= warmup:
                n += batch["image"].shape[0]
            step += 1
            if step >= warmup + steps:
                break
    return n / (time.perf_counter() - t0)


def lightning(cfg, dm, steps: int, warmup: int) -> float:
    """Images/s of train.py's Trainer + ClassificationModule (no validation, no checkpoints)."""
    import pytorch_lightning as pl

    class Clock(pl.Callback):
        def __init__(self):
            self.t0, self.n = None, 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == warmup:
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if self.t0 is not None:
                self.n += batch["image"].shape[0]

        def on_train_end(self, trainer, module):
            self.t1 = time.perf_counter()

    torch.manual_seed(0)
    module = _module(cfg, dm)
    clock = Clock()
    prec = (cfg.get("trainer") or {}).get("precision", "32-true")
    trainer = pl.Trainer(max_steps=warmup + steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, precision=prec, accelerator="cpu",
                         devices=1, callbacks=[clock], num_sanity_val_steps=0, log_every_n_steps=10)
    trainer.fit(module, datamodule=dm)
    return clock.n / (clock.t1 - clock.t0)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = _config(args.config)
    dm = _datamodule(cfg, args.train_size)
    raw, lit = [], []
    raw_loop(cfg, dm, 10, 2)  # untimed: the first bf16 steps of a process build oneDNN kernels (slow)
    for _ in range(args.repeats):
        raw.append(raw_loop(cfg, dm, args.steps, args.warmup))
        lit.append(lightning(cfg, dm, args.steps, args.warmup))
    r, l = statistics.median(raw), statistics.median(lit)
    prec = (cfg.get("trainer") or {}).get("precision", "32")
    print(f"config {os.path.relpath(args.config, ROOT)} (precision {prec}, batch {dm.batch_size}, {args.steps} steps "
          f"x {args.repeats} alternating repeats)")
    print(f"raw PyTorch loop : {r:7.1f} img/s  ({', '.join(f'{v:.0f}' for v in raw)})")
    print(f"train.py (Lightning): {l:7.1f} img/s  ({', '.join(f'{v:.0f}' for v in lit)})")
    ratio = l / r
    pairs = ", ".join(f"{a / b:.2f}" for a, b in zip(lit, raw))
    print(f"ratio train.py / raw = {ratio:.3f} of the medians (per repeat: {pairs}; goal >= {args.goal}) -> "
          f"{'OK' if ratio >= args.goal else 'BELOW GOAL'}")
    return ratio


if __name__ == "__main__":
    main()
