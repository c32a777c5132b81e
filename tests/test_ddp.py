"""Multi-process DDP on CPU (gloo): ranks agree, and DDP equals one process with the same global batch.

``ddp_spawn`` avoids re-launching pytest. The model is ConvNeXt-atto (LayerNorm, no BatchNorm) so that the
per-rank batch statistics of BN do not make the two runs legitimately differ; augmentation is off. The
single-process sampler (``EpochShuffleSampler``) draws the permutation DistributedSampler draws, so the two
per-rank batches of a step are exactly the single-process batch of that step.
"""
import os

import pytest
import pytorch_lightning as pl
import torch

from trainers.classification import ClassificationModule
from trainers.data import SyntheticShapesDataModule

TOL = 1e-5  # fp32 all-reduce vs. single-process summation order


class SaveParams(pl.Callback):
    def __init__(self, out_dir):
        self.out_dir = str(out_dir)

    def on_train_end(self, trainer, pl_module):
        sd = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(sd, os.path.join(self.out_dir, f"rank{trainer.global_rank}_of{trainer.world_size}.pt"))


def _run(out_dir, devices, batch_size):
    pl.seed_everything(0)
    module = ClassificationModule(model="baseline", model_kwargs={"backbone": "convnext_atto"}, num_classes=3,
                                  optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})
    dm = SyntheticShapesDataModule(num_classes=3, image_size=32, train_size=32, val_size=8, test_size=8,
                                   batch_size=batch_size, augment=False)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[SaveParams(out_dir)])
    trainer.fit(module, dm)


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    _run(tmp_path, devices=2, batch_size=8)   # global batch 16
    _run(tmp_path, devices=1, batch_size=16)
    r0 = torch.load(tmp_path / "rank0_of2.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1_of2.pt", weights_only=True)
    single = torch.load(tmp_path / "rank0_of1.pt", weights_only=True)
    init = ClassificationModule(model="baseline", model_kwargs={"backbone": "convnext_atto"}, num_classes=3)
    moved = False
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
        assert torch.allclose(r0[k], single[k], atol=TOL, rtol=TOL), f"DDP != single process on {k}"
        moved |= not torch.equal(r0[k], init.model.state_dict()[k])
    assert moved, "training did not change the parameters"
