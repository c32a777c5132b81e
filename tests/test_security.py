"""Issue 13 (hardening), items 1, 2, 3, 4, 9, 10, 18, 19: no code runs from a checkpoint, no file is lost or
overwritten, no wrong result passes silently. See docs/reliability.md."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval as eval_script
import export as export_script
import models
import train
from models.weights import WeightLoadError, describe_error, load_weights, read_state_dict, save_weights
from trainers.callbacks import ORPHAN_PATTERN, remove_orphans
from trainers.classification import (ClassificationModule, allowed_classes, load_module, read_checkpoint,
                                     register_trainer_class, resolve_class)
from trainers.data.datamodules import ZooDataModule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "baseline", "synthetic.yaml")
TINY = ["--data.init_args.train_size=32", "--data.init_args.val_size=16", "--data.init_args.test_size=16",
        "--data.init_args.image_size=32", "--data.init_args.batch_size=16", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1", "--test_after_fit=false"]
# lr 0: weights never change, so val/acc never improves after epoch 0 (best.ckpt stays at epoch 0)
FROZEN = ['--model.init_args.optimizer={"name": "sgd", "lr": 0.0}']


class _Evil:
    """Unpickling this runs a shell command (what a malicious pickle does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 3-epoch CLI run on tiny data with lr 0 (~5 s)."""
    root = tmp_path_factory.mktemp("run")
    train.main(["fit", "--config", CONFIG, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=3",
                *TINY, *FROZEN])
    return root


def _ckpt(run):
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _mk(run):
    """The run's model kwargs (the shipped config's backbone may change)."""
    return {k: v for k, v in _ckpt(run)["hyper_parameters"]["model_kwargs"].items() if k != "pretrained"}


# ---------------------------------------------------------------------------------------------------------------
# item 4: last.ckpt is the last epoch, always
# ---------------------------------------------------------------------------------------------------------------
def test_last_ckpt_is_the_last_epoch(run):
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    last = _ckpt(run)
    assert best["epoch"] == 0  # lr 0: the metric never improves after the first epoch
    assert last["epoch"] == 2 and last["global_step"] == 3 * 2  # 32 images / batch 16 = 2 steps per epoch


# ---------------------------------------------------------------------------------------------------------------
# item 1: planted checkpoints run nothing, in every entry point
# ---------------------------------------------------------------------------------------------------------------
def _plant(run, tmp_path, variant):
    """A copy of the run's real last.ckpt with one malicious edit; returns (path, marker, field named in the error)."""
    marker = tmp_path / f"PWNED_{variant}"
    ck = _ckpt(run)
    zoo, hp = ck["zoo"], ck["hyper_parameters"]
    if variant == "module_os_system":
        zoo["module_class"], ck["hyper_parameters"] = "os.system", {"command": f"touch {marker}"}
        field = "zoo.module_class"
    elif variant == "datamodule_os_system":
        zoo["datamodule_class"], zoo["datamodule_hparams"] = "os.system", {"command": f"touch {marker}"}
        field = "zoo.datamodule_class"
    elif variant == "torch_hub_load":
        hub = tmp_path / "hub"
        hub.mkdir(exist_ok=True)
        (hub / "hubconf.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                        "def evil(**kw):\n    return None\n")
        zoo["module_class"] = "torch.hub.load"
        ck["hyper_parameters"] = {"repo_or_dir": str(hub), "model": "evil", "source": "local"}
        field = "zoo.module_class"
    elif variant in ("timm_checkpoint_path", "timm_cfg_overlay"):
        pickle_path = tmp_path / "evil.pth"
        torch.save({"state_dict": _Evil(marker)}, pickle_path)
        key = "checkpoint_path" if variant == "timm_checkpoint_path" else "pretrained_cfg_overlay"
        value = str(pickle_path) if key == "checkpoint_path" else {"file": str(pickle_path)}
        hp["model_kwargs"] = {**hp["model_kwargs"],
                              "backbone_kwargs": {**(hp["model_kwargs"].get("backbone_kwargs") or {}), key: value}}
        field = f"backbone_kwargs.{key}"
    elif variant == "unknown_hparam":
        hp["command"] = f"touch {marker}"
        field = "command"
    else:
        raise AssertionError(variant)
    path = tmp_path / f"{variant}.ckpt"
    torch.save(ck, path)
    return path, marker, field


VARIANTS = ["module_os_system", "datamodule_os_system", "torch_hub_load", "timm_checkpoint_path", "timm_cfg_overlay",
            "unknown_hparam"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_planted_checkpoint_runs_nothing(run, tmp_path, variant):
    path, marker, field = _plant(run, tmp_path, variant)
    entry_points = {
        "eval.py": lambda: eval_script.main(["--checkpoint", str(path), "--explainers", "none",
                                             "--out", str(tmp_path / "ev")]),
        "export.py": lambda: export_script.main(["--checkpoint", str(path), "--out", str(tmp_path / "exp"),
                                                 "--no-onnx"]),
    }
    if variant in ("datamodule_os_system", "torch_hub_load", "timm_checkpoint_path"):  # the CLI costs ~1 s each
        entry_points["train.py fit --ckpt_path"] = lambda: train.main(
            ["fit", "--config", CONFIG, f"--trainer.default_root_dir={tmp_path / 'tr'}", *TINY,
             f"--ckpt_path={path}"])
    for name, call in entry_points.items():
        with pytest.raises(SystemExit) as e:
            call()
        assert field in str(e.value), (name, str(e.value))
        assert not marker.exists(), f"{name} ran code from the checkpoint ({variant})"
    # the weights-only doors read the state dict and nothing else
    ClassificationModule(model="baseline", model_kwargs=_mk(run), num_classes=6, checkpoint_path=str(path))
    models.create_model("baseline", num_classes=6, checkpoint_path=str(path), **_mk(run))
    assert not marker.exists()


def test_pickle_checkpoint_refused_even_if_torch_default_is_unsafe(tmp_path, monkeypatch):
    """A real pickle never loads, through any door, even with torch's weights_only default forced off."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(1)}, "hyper_parameters": {}, "evil": _Evil(marker)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SystemExit):
        train.main(["fit", "--config", CONFIG, f"--trainer.default_root_dir={tmp_path / 'tr'}", *TINY,
                    f"--ckpt_path={path}"])
    with pytest.raises(SystemExit):
        eval_script.main(["--checkpoint", str(path), "--explainers", "none", "--out", str(tmp_path / "ev")])
    with pytest.raises(SystemExit):
        export_script.main(["--checkpoint", str(path), "--out", str(tmp_path / "exp"), "--no-onnx"])
    with pytest.raises(WeightLoadError):
        models.create_model("baseline", backbone="resnet18", num_classes=6, checkpoint_path=str(path))
    with pytest.raises(WeightLoadError):
        ClassificationModule(model="baseline", model_kwargs={"backbone": "resnet18"}, num_classes=6,
                             checkpoint_path=str(path))
    assert not marker.exists()


def test_model_kwargs_pointing_timm_at_a_file_are_refused(tmp_path):
    for kw in ({"checkpoint_path": str(tmp_path / "x.pth")}, {"pretrained_cfg_overlay": {"file": "x.pth"}}):
        with pytest.raises(ValueError, match=f"backbone_kwargs.{next(iter(kw))} is refused"):
            models.create_model("baseline", backbone="resnet18", backbone_kwargs=kw)


def test_allow_list_joins_project_classes_automatically():
    """Every ClassificationModule / ZooDataModule subclass of the trainers package is allowed without edits;
    a class defined elsewhere needs @register_trainer_class; other names are never imported."""
    mods = allowed_classes(ClassificationModule)
    assert "trainers.classification.ClassificationModule" in mods and "trainers.picnn.PICNNModule" in mods
    assert "trainers.data.datamodules.SyntheticShapesDataModule" in allowed_classes(ZooDataModule)
    assert resolve_class("trainers.data.SyntheticShapesDataModule", ZooDataModule, "f").__name__ == \
        "SyntheticShapesDataModule"  # re-export used by configs
    inside = type("NewMechanismModule", (ClassificationModule,), {"__module__": "trainers.new_mechanism"})
    assert resolve_class("trainers.new_mechanism.NewMechanismModule", ClassificationModule, "f") is inside
    outside = type("UserModule", (ClassificationModule,), {"__module__": "user_code"})
    with pytest.raises(ValueError, match="not a ClassificationModule of this project"):
        resolve_class("user_code.UserModule", ClassificationModule, "zoo.module_class")
    register_trainer_class(outside)
    assert resolve_class("user_code.UserModule", ClassificationModule, "f") is outside
    for bad in ("os.system", "torch.hub.load", "trainers.classification.torch", "builtins.eval", 3):
        with pytest.raises(ValueError, match="zoo.module_class"):
            resolve_class(bad, ClassificationModule, "zoo.module_class")


# ---------------------------------------------------------------------------------------------------------------
# item 2: a SIGKILL during a checkpoint save leaves the previous file intact
# ---------------------------------------------------------------------------------------------------------------
_KILL_CHILD = r'''
import builtins, errno, os, shutil, sys, time
ckdir, blocked = sys.argv[1], sys.argv[2]
import pytorch_lightning as pl, torch
from trainers.callbacks import ZooCheckpoint
from trainers.classification import ClassificationModule

module = ClassificationModule(model="baseline", model_kwargs={"backbone": "resnet18"}, num_classes=3)
cb = ZooCheckpoint(dirpath=ckdir)
trainer = pl.Trainer(callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False)
cb.setup(trainer, module, "fit")
io = trainer.strategy.checkpoint_io
best = os.path.join(ckdir, "best.ckpt")
io.save_checkpoint({"state_dict": {"w": torch.arange(10.0)}, "epoch": 0}, best)  # the previous best.ckpt

# $TMPDIR on another filesystem: a rename between two folders fails with EXDEV (shutil then copies)
_rename, _replace = os.rename, os.replace
def _cross(real):
    def f(src, dst, *a, **k):
        if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
            raise OSError(errno.EXDEV, "Invalid cross-device link", src)
        return real(src, dst, *a, **k)
    return f
os.rename, os.replace = _cross(_rename), _cross(_replace)
shutil._USE_CP_SENDFILE = False

# any file written in the checkpoint folder stalls after 1 MB (then the parent SIGKILLs us)
_open, LIMIT = builtins.open, 1 << 20
class Stall:
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, b):
        b = memoryview(b).cast("B")
        if self.n + len(b) > LIMIT:
            self.f.write(b[: LIMIT - self.n]); self.f.flush(); os.fsync(self.f.fileno())
            with _open(blocked, "w") as m:
                m.write(self.f.name)
            time.sleep(120)
        self.n += len(b)
        return self.f.write(b)
    def __getattr__(self, k):
        return getattr(self.f, k)
    def __enter__(self):
        return self
    def __exit__(self, *a):
        return self.f.__exit__(*a)
def _stalling_open(file, mode="r", *a, **k):
    f = _open(file, mode, *a, **k)
    if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax") and \
            os.path.dirname(os.path.abspath(file)) == os.path.abspath(ckdir):
        return Stall(f)
    return f
builtins.open = _stalling_open
io.save_checkpoint({"state_dict": {"w": torch.randn(2_000_000)}, "epoch": 1}, best)  # 8 MB
print("NOT BLOCKED")
'''


def test_kill_during_checkpoint_save_keeps_previous_best(tmp_path):
    ckdir, other_fs, blocked = tmp_path / "checkpoints", tmp_path / "node_local_tmp", tmp_path / "blocked"
    ckdir.mkdir()
    other_fs.mkdir()
    env = {**os.environ, "TMPDIR": str(other_fs), "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(ckdir), str(blocked)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while not blocked.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert blocked.exists(), proc.communicate(timeout=5) if proc.poll() is not None else "child never blocked"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    best = ckdir / "best.ckpt"
    ck = torch.load(best, weights_only=True)  # intact: loads, and is the previous checkpoint
    assert ck["epoch"] == 0 and torch.equal(ck["state_dict"]["w"], torch.arange(10.0))
    assert list(other_fs.iterdir()) == [], "orphan temp file left on the other filesystem"
    leftovers = sorted(p.name for p in ckdir.iterdir() if p.name != "best.ckpt")
    assert all(ORPHAN_PATTERN.match(n) for n in leftovers), leftovers
    assert sorted(remove_orphans(str(ckdir))) == leftovers and [p.name for p in ckdir.iterdir()] == ["best.ckpt"]


def test_save_weights_is_atomic(tmp_path, monkeypatch):
    """An error half-way through save_weights keeps the previous file and leaves no temp file."""
    m = models.create_model("baseline", backbone="resnet18", num_classes=3)
    path = tmp_path / "model.safetensors"
    save_weights(m, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    import safetensors.torch

    def interrupted_save_file(sd, filename, *a, **k):  # a writer killed half-way through its output file
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    def interrupted_save(sd, *a, **k):  # killed half-way through serialising
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted_save_file)
    monkeypatch.setattr(safetensors.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_weights(models.create_model("baseline", backbone="resnet18", num_classes=3), path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before and os.listdir(tmp_path) == ["model.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# item 9: resuming with changed settings is refused, not silently replaced
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,named", [
    ("--model.init_args.label_smoothing=0.1", "model.label_smoothing"),
    ('--model.init_args.optimizer={"name": "sgd", "lr": 0.5}', "model.optimizer"),
])
def test_resume_refuses_changed_settings(run, override, named):
    last = run / "checkpoints" / "last.ckpt"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    with pytest.raises(SystemExit) as e:
        train.main(["fit", "--config", CONFIG, f"--trainer.default_root_dir={run}", "--trainer.max_epochs=4", *TINY,
                    *FROZEN, override, f"--ckpt_path={last}"])
    assert named in str(e.value) and "checkpoint_path" in str(e.value)
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before


# ---------------------------------------------------------------------------------------------------------------
# item 3: results named after their source; item 10: missing mechanism weights are an error
# ---------------------------------------------------------------------------------------------------------------
def _data_config(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("data:\n  class_path: trainers.data.SyntheticShapesDataModule\n  init_args:\n"
                    "    num_classes: 6\n    image_size: 32\n    train_size: 16\n    val_size: 16\n    test_size: 16\n"
                    "    batch_size: 16\n")
    return str(path)


def test_eval_results_are_named_after_their_source(run, tmp_path):
    ck = run / "checkpoints"
    for name in ("best", "last"):
        eval_script.main(["--checkpoint", str(ck / f"{name}.ckpt"), "--explainers", "none", "--limit-batches", "1"])
    for name in ("best", "last"):
        saved = json.load(open(run / "eval" / name / "metrics_test.json"))
        assert saved["source"] == str(ck / f"{name}.ckpt")
    assert not (run / "eval" / "metrics_test.json").exists()
    # an explicit --out holding another source's results is not replaced without --overwrite
    with pytest.raises(SystemExit, match="refusing to replace"):
        eval_script.main(["--checkpoint", str(ck / "last.ckpt"), "--explainers", "none", "--limit-batches", "1",
                          "--out", str(run / "eval" / "best")])
    assert json.load(open(run / "eval" / "best" / "metrics_test.json"))["source"] == str(ck / "best.ckpt")
    eval_script.main(["--checkpoint", str(ck / "last.ckpt"), "--explainers", "none", "--limit-batches", "1",
                      "--out", str(run / "eval" / "best"), "--overwrite"])
    assert json.load(open(run / "eval" / "best" / "metrics_test.json"))["source"] == str(ck / "last.ckpt")

    # sibling exports: each one's results stay in its own folder
    module = load_module(str(ck / "best.ckpt"))
    for d in ("a", "b"):
        from models.export import save_model_card

        save_model_card(module.model, str(tmp_path / "exports" / d), "baseline",
                        {**_mk(run), "num_classes": 6, "pretrained": False})
        eval_script.main(["--weights", str(tmp_path / "exports" / d / "model.safetensors"), "--explainers", "none",
                          "--data-config", _data_config(tmp_path), "--limit-batches", "1"])
    for d in ("a", "b"):
        saved = json.load(open(tmp_path / "exports" / d / "eval" / "model" / "metrics_test.json"))
        assert saved["source"] == str(tmp_path / "exports" / d / "model.safetensors")
    assert not (tmp_path / "exports" / "eval").exists()


def test_eval_refuses_missing_mechanism_weights(run, tmp_path):
    """A baseline checkpoint evaluated as CA-Stream would have random stream weights: an error naming them."""
    with pytest.raises(SystemExit, match=r"no weights for the mechanism's own parameters \(stream\.\)"):
        eval_script.main(["--weights", str(run / "checkpoints" / "best.ckpt"), "--model", "ca_stream",
                          "--model-kwargs", json.dumps(_mk(run)), "--data-config", _data_config(tmp_path),
                          "--explainers", "none", "--out", str(tmp_path / "ev")])
    assert not (tmp_path / "ev" / "metrics_test.json").exists()
    # the same file is fine to *train* from (the mechanism starts fresh, reported)
    rep = load_weights(models.create_model("ca_stream", num_classes=6, **_mk(run)),
                       str(run / "checkpoints" / "best.ckpt"))
    assert rep.new_mechanism_keys and all(k.startswith("stream.") for k in rep.new_mechanism_keys)


# ---------------------------------------------------------------------------------------------------------------
# items 18, 19: errors name the real problem, and never crash themselves
# ---------------------------------------------------------------------------------------------------------------
def test_picnn_weights_into_another_mechanism_name_the_real_mismatch(tmp_path):
    save_weights(models.create_model("picnn", backbone="resnet18", num_classes=6), tmp_path / "picnn.safetensors")
    for name in ("ca_stream", "baseline"):
        with pytest.raises(WeightLoadError) as e:
            load_weights(models.create_model(name, backbone="resnet18", num_classes=6), tmp_path / "picnn.safetensors")
        msg = str(e.value)
        assert "number of classes" not in msg and "reset_head" not in msg, msg
        assert "Both classifiers have 6 classes" in msg and "'picnn' model" in msg, msg
    # a real class-count mismatch still says so
    save_weights(models.create_model("baseline", backbone="resnet18", num_classes=4), tmp_path / "b4.safetensors")
    with pytest.raises(WeightLoadError,
                       match=r"different number of classes \(4 in the file, 6 in the model\).*reset_head"):
        load_weights(models.create_model("baseline", backbone="resnet18", num_classes=6), tmp_path / "b4.safetensors")


def test_empty_checkpoint_file_gives_a_clear_error(tmp_path):
    empty = tmp_path / "best.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(WeightLoadError, match="empty"):
        read_state_dict(empty)
    with pytest.raises(WeightLoadError, match="empty"):
        models.create_model("baseline", backbone="resnet18", num_classes=3, checkpoint_path=str(empty))
    with pytest.raises(RuntimeError, match="empty"):
        read_checkpoint(str(empty))
    with pytest.raises(SystemExit, match="empty"):
        eval_script.main(["--checkpoint", str(empty), "--explainers", "none"])
    # the error formatter survives exceptions without a message (the IndexError of issue 13 item 19)
    assert describe_error(EOFError()) == "EOFError (no message)"
    (tmp_path / "x.pt").write_bytes(b"\x80")  # truncated pickle: an error whose message may be empty
    with pytest.raises(WeightLoadError, match="Could not read weights"):
        read_state_dict(tmp_path / "x.pt")
