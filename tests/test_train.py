"""End to end through the CLI: fit, exact resume, test, eval.py, bad input."""
import json
import os

import pytest
import torch

import eval as eval_script
import export as export_script
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "baseline", "synthetic.yaml")
TINY = ["--data.init_args.train_size=32", "--data.init_args.val_size=16", "--data.init_args.test_size=16",
        "--data.init_args.image_size=32", "--data.init_args.batch_size=16", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1"]


def _fit(root, epochs, *extra):
    return train.main(["fit", "--config", CONFIG, f"--trainer.default_root_dir={root}",
                       f"--trainer.max_epochs={epochs}", *TINY, *extra])


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_fit_resume_is_exact_and_eval(tmp_path, capsys):
    _fit(tmp_path / "a", 2)
    ckpts = tmp_path / "a" / "checkpoints"
    assert (ckpts / "best.ckpt").exists() and (ckpts / "last.ckpt").exists()
    assert (tmp_path / "a" / "logs" / "csv" / "version_0" / "metrics.csv").exists()
    assert any((tmp_path / "a" / "logs" / "tensorboard").rglob("events.out.tfevents*"))
    out = capsys.readouterr().out
    assert "test/acc=" in out

    # the same run interrupted after one epoch (2 steps) and resumed from last.ckpt ends bit-identical
    _fit(tmp_path / "b", 2, "--test_after_fit=false", "--trainer.max_steps=2")
    _fit(tmp_path / "b", 2, "--test_after_fit=false", f"--ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}")
    a, b = _weights(ckpts / "last.ckpt"), _weights(tmp_path / "b" / "checkpoints" / "last.ckpt")
    ca, cb = (torch.load(p, weights_only=True) for p in (ckpts / "last.ckpt", tmp_path / "b" / "checkpoints" / "last.ckpt"))
    assert ca["global_step"] == cb["global_step"] == 4
    for k in a:
        assert torch.equal(a[k], b[k]), k

    res = eval_script.main(["--checkpoint", str(ckpts / "best.ckpt"), "--out", str(tmp_path / "ev")])
    saved = json.load(open(tmp_path / "ev" / "metrics_test.json"))
    assert saved["accuracy"]["num_images"] == 16 and 0 <= saved["accuracy"]["top1"] <= 1
    assert res["accuracy"]["top1"] == saved["accuracy"]["top1"]

    # export with the explanation, then evaluate the exported weights through their model card
    rep = export_script.main(["--checkpoint", str(ckpts / "best.ckpt"), "--out", str(tmp_path / "exp")])
    assert rep["logits_max_abs_diff"] < 1e-4 and rep["saliency_max_abs_diff"] < 1e-4
    res2 = eval_script.main(["--weights", str(tmp_path / "exp" / "model.safetensors"), "--data-config", CONFIG,
                             "--out", str(tmp_path / "ev2"), "--limit-batches", "1"])
    assert res2["accuracy"]["num_images"] > 0


def test_print_config_and_overrides(capsys):
    with pytest.raises(SystemExit):
        train.main(["fit", "--config", CONFIG, "--trainer.max_epochs=3", "--print_config"])
    out = capsys.readouterr().out
    assert "max_epochs: 3" in out and "class_path: trainers.classification.ClassificationModule" in out


def test_eval_bad_inputs(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        eval_script.main(["--checkpoint", str(tmp_path / "none.ckpt")])
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="corrupted"):
        eval_script.main(["--checkpoint", str(tmp_path / "junk.ckpt")])
    with pytest.raises(SystemExit, match="needs --model"):
        eval_script.main(["--weights", str(tmp_path / "w.safetensors")])


@pytest.mark.parametrize("config", sorted(
    os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "configs"))
    for f in fs if f.endswith(".yaml")))
def test_every_config_parses(config, capsys):
    """Every shipped YAML is a valid LightningCLI config (class paths, argument names and types)."""
    with pytest.raises(SystemExit) as e:
        train.main(["fit", "--config", os.path.join(ROOT, config), "--print_config"])
    assert e.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out
