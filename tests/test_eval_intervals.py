"""eval.py's intervals (issue 14 item 1): per metric, mean with a 95 % image-bootstrap interval and the paired
difference to the best non-degenerate control (models.metrics.stats.versus_best_control)."""
import json
import math

import numpy as np
import pytest
import torch

from models.metrics.stats import bootstrap_ci, versus_best_control


def test_versus_best_control_picks_the_best_real_control_and_reads_the_paired_interval():
    rng = np.random.default_rng(0)
    n = 200
    base = rng.normal(50, 10, n)  # image difficulty shared by all maps: pairing removes it
    per_item = {
        "good": {"ins": base + 3 + rng.normal(0, 1, n), "del": base - 3 + rng.normal(0, 1, n)},
        "bad": {"ins": base - 3 + rng.normal(0, 1, n), "del": base + 3 + rng.normal(0, 1, n)},
        "same": {"ins": base + rng.normal(0, 1, n), "del": base + rng.normal(0, 1, n)},
        "edges": {"ins": base + rng.normal(0, 1, n), "del": base + rng.normal(0, 1, n)},  # the best real control
        "random": {"ins": base - 10 + rng.normal(0, 1, n), "del": base + 10 + rng.normal(0, 1, n)},
        "fakecam": {"ins": base + 50, "del": base - 50},  # degenerate: better than everything, never the reference
        "constant": {"ins": [float("nan")] * n, "del": [float("nan")] * n},  # not scored
    }
    controls = ["edges", "random", "fakecam", "constant"]
    out = versus_best_control(per_item, controls, {"ins": True, "del": False, "pg": True})
    assert set(out) == {"ins", "del"}  # only the metrics present
    for m in ("ins", "del"):
        assert out[m]["best_control"] == "edges"
        rows = out[m]["explainers"]
        assert [rows[e]["vs_best_control"]["beats"] for e in ("good", "bad", "same")] == ["yes", "no", "unclear"]
        assert all(rows[c]["control"] and rows[c]["vs_best_control"] is None for c in controls)
        d = rows["good"]["vs_best_control"]
        assert d["ci95_low"] <= d["mean"] <= d["ci95_high"]
        assert abs(d["mean"]) == pytest.approx(3, abs=0.3) and d["ci95_high"] - d["ci95_low"] < 1.0  # paired: narrow
        unpaired = rows["good"]["ci95_high"] - rows["good"]["ci95_low"]
        assert unpaired > 3 * (d["ci95_high"] - d["ci95_low"])  # the mean's own interval carries the image spread
        assert rows["constant"]["n"] == 0 and math.isnan(rows["constant"]["mean"])
    # the mean's interval covers the mean of a known distribution at about the nominal rate
    cover = sum(lo <= 0 <= hi for lo, hi in
                ((r["ci95_low"], r["ci95_high"]) for r in (bootstrap_ci(np.random.default_rng(s).normal(0, 1, 50),
                                                                        n_boot=400) for s in range(100))))
    assert 85 <= cover <= 99


def test_eval_prints_and_writes_intervals(tmp_path, capsys):
    import models
    import eval as eval_script

    torch.manual_seed(0)
    w = tmp_path / "tiny.safetensors"
    models.save_weights(models.create_model("baseline", backbone="resnet10t", num_classes=3), w)
    cfg = tmp_path / "data.yaml"
    cfg.write_text("data:\n  class_path: trainers.data.SyntheticShapesDataModule\n  init_args:\n"
                   "    num_classes: 3\n    image_size: 32\n    train_size: 6\n    val_size: 6\n    test_size: 6\n"
                   "    batch_size: 6\n")
    out = tmp_path / "eval"
    eval_script.main(["--weights", str(w), "--model", "baseline", "--model-kwargs", '{"backbone": "resnet10t"}',
                      "--data-config", str(cfg), "--device", "cpu", "--out", str(out), "--explainers", "gradient",
                      "--metrics", "ad,ins", "--steps", "4", "--max-images", "6", "--grid-images", "0"])
    printed = capsys.readouterr().out
    assert "image-level interval only" in printed and "best non-degenerate control" in printed
    js = json.loads((out / "interpretability_test.json").read_text())
    iv = js["intervals"]["metrics"]
    assert iv["ins"]["best_control"] == "random" and iv["ad"]["best_control"] == "random"  # fakecam excluded
    g = iv["ins"]["explainers"]["gradient"]
    assert g["n"] == 6 and g["ci95_low"] <= g["mean"] <= g["ci95_high"]
    assert g["mean"] == pytest.approx(js["results"]["gradient"]["ins"], abs=1e-3)  # same numbers as the table
    assert g["vs_best_control"]["beats"] in ("yes", "no", "unclear")
    full = json.loads((out / "metrics_test.json").read_text())
    assert full["interpretability"]["intervals"]["note"].startswith("image-level interval only")
    assert "| *best control* |" in (out / "interpretability_test.md").read_text()
