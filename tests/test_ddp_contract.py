"""Registry-wide DDP contract (issue 17): every registered model, trained by its own LightningModule, gives the
same parameters with 2 gloo processes x batch b as with 1 process x batch 2b on the same data, and the two ranks
are bit-identical. New mechanisms join by registering (``models.register_model``) and by giving their trainer a
``model`` default (``trainers/<mechanism>.py``); nothing is listed here by hand.

The rules that make "equal to one process" meaningful (docs/DESIGN.md, "DDP"):
* **BatchNorm** normalises with per-rank statistics under DDP (use ``--trainer.sync_batchnorm=true`` on GPUs;
  SyncBatchNorm has no CPU kernel). The contract isolates the gradient all-reduce by running BN layers on their
  running statistics (eval mode, a per-channel affine map); every other layer trains normally.
* **Per-sample noise** (PICNN's Bernoulli/categorical samplers, eX-ViT's two-view augmentation) is drawn with
  ``ClassificationModule.global_batch_noise()``: a function of (seed, step, position in the global batch), so
  2 x b and 1 x 2b draw the same numbers for the same images. Ranks hold global rows [r*b, (r+1)*b), which
  ``_BlockSampler`` reproduces.
* **EMA teachers / Lagrange multipliers** are updated from synchronised quantities, so they must agree too:
  every floating state-dict entry is compared, not only parameters.
"""
import inspect
import os
import pkgutil
import warnings

import pytest
import pytorch_lightning as pl
import torch

import models
import trainers
from models.registry import test_kwargs as registry_test_kwargs
from trainers.classification import ClassificationModule

STEPS, B, WORLD, K = 2, 4, 2, 3
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32 all-reduce vs. single-process summation order

# trainer arguments that switch off what is stochastic *per rank* by design (documented in the module docstring)
CONTRACT_OVERRIDES = {
    "exvit": dict(multilabel=False),
}


def _trainer_classes():
    """{registry name: LightningModule class}, read from each trainer's ``model`` default."""
    for info in pkgutil.iter_modules(trainers.__path__):
        if not info.ispkg:
            __import__(f"trainers.{info.name}")
    found, todo = {}, [ClassificationModule]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not cls.__module__.startswith("trainers."):
            continue
        default = inspect.signature(cls.__init__).parameters.get("model")
        if default is not None and isinstance(default.default, str) and cls is not ClassificationModule:
            found.setdefault(default.default, cls)
    return found


TRAINERS = _trainer_classes()
NAMES = models.list_models()


def _module_for(name):
    kw = registry_test_kwargs(name)
    kw.pop("input_size", None)
    cls = TRAINERS.get(name, ClassificationModule)
    args = dict(model=name, model_kwargs=kw, num_classes=K, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})
    args.update(CONTRACT_OVERRIDES.get(name, {}))
    return cls(**args)


def _input_size(name):
    size = registry_test_kwargs(name).get("input_size")
    return tuple(size) if size else (3, 32, 32)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n, size):
        g = torch.Generator().manual_seed(5)
        self.x = torch.rand(n, *size, generator=g)
        self.y = torch.arange(n) % K

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


class _BlockSampler(torch.utils.data.Sampler):
    """Rank r of w reads, at step s, samples ``s*w*b + r*b + [0, b)``: global row r*b+i, as in one process."""

    def __init__(self, n, b):
        self.n, self.b = n, b

    @staticmethod
    def _rank():
        import torch.distributed as dist

        return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)

    def __iter__(self):
        r, w = self._rank()
        per = self.b * w if w > 1 else self.b  # samples per global step in this run
        lb = per // w
        return iter([s * per + r * lb + i for s in range(self.n // per) for i in range(lb)])

    def __len__(self):
        return self.n // self._rank()[1]


class _BNOnRunningStats(pl.Callback):
    """BatchNorm on running statistics (see module docstring); applied before every training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for m in pl_module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


class _Save(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        sd = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if v.is_floating_point()}
        torch.save(sd, os.path.join(self.path, f"rank{trainer.global_rank}_of{trainer.world_size}.pt"))


def _fit(name, out, devices):
    pl.seed_everything(0)
    module = _module_for(name)
    size = _input_size(name)
    data = _Data(STEPS * B * WORLD, size)
    bs = B if devices > 1 else B * WORLD
    loader = torch.utils.data.DataLoader(data, batch_size=bs, sampler=_BlockSampler(len(data), bs), num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         max_steps=STEPS, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[_BNOnRunningStats(), _Save(str(out))], default_root_dir=str(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    return module


def test_every_trainer_is_discovered():
    """Mechanisms with their own loss have their own trainer; the discovery must find each of them."""
    for name in ("ca_stream", "picnn", "exvit", "guided_gradients"):
        assert name in TRAINERS, f"no trainer found for {name}"


@pytest.mark.parametrize("name", NAMES)
def test_ddp_contract(name, tmp_path):
    init = {k: v.clone() for k, v in _module_for(name).state_dict().items() if v.is_floating_point()}
    _fit(name, tmp_path, devices=1)
    _fit(name, tmp_path, devices=WORLD)
    single = torch.load(tmp_path / "rank0_of1.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"rank{r}_of{WORLD}.pt", weights_only=True) for r in range(WORLD)]
    assert set(single) == set(ranks[0])
    moved = max((single[k] - init[k]).abs().max().item() for k in single if k in init)
    assert moved > 1e-4, "training did not change the parameters"
    for k in single:
        for r in range(1, WORLD):
            assert torch.equal(ranks[0][k], ranks[r][k]), f"{name}: ranks 0 and {r} disagree on {k}"
        torch.testing.assert_close(ranks[0][k], single[k], **TOL, msg=lambda m: f"{name}: DDP != 1 process on {k}: {m}")


# ------------------------------------------------------------------------------------------ mechanism specifics
def test_global_batch_noise_is_split_independent():
    """PICNN / eX-ViT noise rule: rank slices of (seed, step) draws == one process's draws, ranks differ."""
    from models.noise import GlobalBatchNoise

    like = torch.zeros(1)
    one = GlobalBatchNoise(3, 7).uniform((8, 5), like)
    parts = [GlobalBatchNoise(3, 7, rank=r, world_size=2).uniform((4, 5), like) for r in range(2)]
    assert torch.equal(torch.cat(parts), one)
    assert not torch.equal(parts[0], parts[1])                                 # independent across ranks
    assert not torch.equal(GlobalBatchNoise(3, 8).uniform((8, 5), like), one)   # a new step, new draws
    assert torch.equal(GlobalBatchNoise(3, 7).uniform((8, 5), like), one)       # reproducible (exact resume)


def test_picnn_matched_loss_normalised_by_global_count():
    """L_int ('matched') under DDP: per-rank sums over the global matched count == one process's mean."""
    from trainers.picnn import picnn_loss

    g = torch.Generator().manual_seed(0)
    logits, logits_int = torch.randn(8, K, generator=g), torch.randn(8, K, generator=g)
    y = torch.arange(8) % K
    pseudo = torch.tensor([0, 1, 2, 0, 0, 0, 0, 1])  # rank 0 (rows 0-3) matches 4, rank 1 matches 2
    full = picnn_loss({"logits": logits, "logits_int": logits_int, "pseudo_label": pseudo}, y)["l_int"]
    n_global = (pseudo == y).sum().float()
    ranks = [picnn_loss({"logits": logits[s], "logits_int": logits_int[s], "pseudo_label": pseudo[s]}, y[s],
                        matched_norm=n_global / 2)["l_int"] for s in (slice(0, 4), slice(4, 8))]
    assert torch.allclose(sum(ranks) / 2, full)                  # what DDP's gradient averaging computes
    naive = [picnn_loss({"logits": logits[s], "logits_int": logits_int[s], "pseudo_label": pseudo[s]}, y[s])["l_int"]
             for s in (slice(0, 4), slice(4, 8))]
    assert not torch.allclose(sum(naive) / 2, full)              # the per-rank mean would not


def test_ca_stream_frozen_parts_do_not_move_under_ddp(tmp_path):
    """CA-Stream stream mode on 2 ranks with BatchNorm in *train* mode elsewhere: the frozen backbone and
    classifier (weights and BN running statistics) are bit-identical to their initial values on every rank."""
    pl.seed_everything(0)
    init = {k: v.clone() for k, v in _module_for("ca_stream").state_dict().items() if v.is_floating_point()}
    pl.seed_everything(0)
    module = _module_for("ca_stream")
    data = _Data(STEPS * B * WORLD, _input_size("ca_stream"))
    loader = torch.utils.data.DataLoader(data, batch_size=B, sampler=_BlockSampler(len(data), B), num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp_spawn", max_steps=STEPS,
                         limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, callbacks=[_Save(str(tmp_path))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    ranks = [torch.load(tmp_path / f"rank{r}_of{WORLD}.pt", weights_only=True) for r in range(WORLD)]
    frozen = [k for k in init if k.startswith(("model.backbone.", "model.fc."))]
    assert any("running_mean" in k for k in frozen)
    for k in frozen:
        for r in range(WORLD):
            assert torch.equal(ranks[r][k], init[k]), f"frozen {k} moved on rank {r}"
    stream = [k for k in init if k.startswith("model.stream.")]
    assert stream and any(not torch.equal(ranks[0][k], init[k]) for k in stream), "the stream did not train"
    for k in init:
        assert torch.equal(ranks[0][k], ranks[1][k]), k


def test_maxnet_full_loss_ddp_contract(tmp_path, monkeypatch):
    """test_ddp_contract[maxnet] runs the trainer default (20 CE-only epochs), i.e. CE only. The MNI recipe trains
    with CE + 0.6 L_cls + 0.06 L_ctr from epoch 1 (ce_only_epochs 0): the same contract with the full loss, and the
    cluster / contrastive terms must change the result (else this would test CE again)."""
    (tmp_path / "ce").mkdir()
    _fit("maxnet", tmp_path / "ce", devices=1)
    monkeypatch.setitem(CONTRACT_OVERRIDES, "maxnet", dict(ce_only_epochs=0))
    assert _module_for("maxnet").phase() == 2
    test_ddp_contract("maxnet", tmp_path)
    ce = torch.load(tmp_path / "ce" / "rank0_of1.pt", weights_only=True)["model.prototypes"]
    full = torch.load(tmp_path / "rank0_of1.pt", weights_only=True)["model.prototypes"]
    assert (ce - full).abs().max() > 1e-5, "the cluster / contrastive terms did not change the prototypes"


# ------------------------------------------------------------------------------------------ metrics under DDP
def _metrics_worker(rank, world, port, out, n):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = _metrics_run(rank, world, n)
        if rank == 0:
            torch.save(_metrics_summary(res), out)
    finally:
        dist.destroy_process_group()


def _metrics_run(rank, world, n):
    from models.metrics import run_interpretability

    torch.manual_seed(0)
    model = models.create_model("baseline", num_classes=K, backbone="resnet18",
                                backbone_kwargs={"output_stride": 8}).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 48, 48, generator=g)
    mask = torch.zeros(n, 48, 48, dtype=torch.long)
    y = torch.arange(n) % K
    for i in range(n):
        mask[i, 8 + i:24 + i, 10:30] = y[i] + 1
    per = n // world
    sl = slice(rank * per, (rank + 1) * per)
    loader = [{"image": x[sl][j:j + 3], "label": y[sl][j:j + 3], "mask": mask[sl][j:j + 3]} for j in range(0, per, 3)]
    return run_interpretability(model, loader, ["gradcam"], metrics=("ad", "ag", "ai", "ins", "del", "pg", "epg",
                                                                     "miou"), sanity=False, progress=False, steps=8)


def _metrics_summary(res):
    return {"values": {k: v for k, v in res["gradcam"].items() if k not in ("time", "time_batch")},
            "per_item": res.per_item["gradcam"], "curves": res.curves["gradcam"],
            "n": (res.meta["n_images"], res.meta["n_items"])}


def test_interpretability_metrics_equal_single_process_under_ddp(tmp_path):
    """run_interpretability on 2 gloo ranks (each half of the images) == one process on all images: the
    metric values (torchmetrics sync), the per-image values kept for intervals (rank order = item order),
    the mean insertion/deletion curves and the item counts."""
    import socket

    import torch.multiprocessing as mp

    n = 12
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_metrics_worker, args=(2, port, str(tmp_path / "ddp.pt"), n), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = _metrics_summary(_metrics_run(0, 1, n))
    assert ddp["n"] == single["n"] == (n, n)
    assert set(ddp["values"]) == set(single["values"])
    for k, v in single["values"].items():
        assert v == pytest.approx(ddp["values"][k], rel=1e-5, abs=1e-6, nan_ok=True), k
    assert not all(v != v for v in single["values"].values())  # not all NaN
    for k, vals in single["per_item"].items():
        assert len(ddp["per_item"][k]) == len(vals) == n, k
        assert ddp["per_item"][k] == pytest.approx(vals, rel=1e-5, abs=1e-6, nan_ok=True), k
    for k, c in single["curves"].items():
        assert ddp["curves"][k] == pytest.approx(c, rel=1e-5, abs=1e-6), k


# ------------------------------------------------------------------------------------------ multi-node launch
MULTINODE_CONFIG = """
seed_everything: 0
test_after_fit: false
trainer:
  max_epochs: 1
  accelerator: cpu
  devices: 1
  num_nodes: 2
  strategy: ddp
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  default_root_dir: {root}
  callbacks:
    - class_path: trainers.callbacks.DDPConsistencyCheck
model:
  class_path: trainers.classification.ClassificationModule
  init_args:
    model: baseline
    model_kwargs: {{backbone: resnet18}}
    optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}
data:
  class_path: trainers.data.SyntheticShapesDataModule
  init_args: {{num_classes: 3, image_size: 32, train_size: 16, val_size: 8, test_size: 8, batch_size: 4}}
"""


def test_multinode_torchrun_two_nodes(tmp_path):
    """Two torchrun "nodes" on this machine (``--nnodes 2 --nproc-per-node 1``, static rendezvous on localhost)
    run one config with ``trainer.num_nodes: 2``: both exit 0, Lightning sees world size 2 on 2 nodes, and the
    DDPConsistencyCheck callback finds the ranks' weights bit-identical after training."""
    import json
    import socket
    import subprocess
    import sys

    root = tmp_path / "run"
    cfg = tmp_path / "multinode.yaml"
    cfg.write_text(MULTINODE_CONFIG.format(root=root))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "train.py", "fit", "--config", str(cfg)],
                              cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {r} failed:\n{out[-3000:]}"
    info = json.loads((root / "ddp_check.json").read_text())
    assert info["world_size"] == 2 and info["num_nodes"] == 2 and info["global_step"] > 0
