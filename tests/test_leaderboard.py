"""experiments/leaderboard.py --quick (issue 14 item 6) and experiments/verdicts.py (item 7): JSON schema, cache
resume, verdicts recomputed from the intervals."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import verdicts as V  # noqa: E402
from experiments.harness import ROW_KEYS  # noqa: E402


def _run(tmp_path, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "leaderboard.py"), "--quick", "--seeds", "0",
           "--mechanisms", "baseline,guided_gradients", "--out", str(tmp_path / "lb"),
           "--cache-dir", str(tmp_path / "cache"), *extra]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "LEADERBOARD_STRICT": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return time.time() - t0


def test_leaderboard_quick_schema_and_cache(tmp_path):
    first = _run(tmp_path)
    with open(tmp_path / "lb.json") as f:
        data = json.load(f)
    rows = data["rows"]
    assert rows and all(set(ROW_KEYS) <= set(r) for r in rows)
    for r in rows:
        assert isinstance(r["control"], bool) and isinstance(r["n_seeds"], int)
        assert r["mean"] is None or isinstance(r["mean"], float)
    keys = {(r["mechanism"], r["explainer"], r["metric"]) for r in rows}
    for mech in ("baseline", "guided_gradients"):
        assert (mech, "-", "acc") in keys and (mech, "-", "train_step_ratio") in keys
        for e in ("intrinsic", "gradcam", "random", "gaussian", "fakecam", "colorcontrast", "edges", "untrained"):
            assert (mech, e, "ag") in keys and (mech, e, "del") in keys and (mech, e, "miou") in keys
    for e in ("ucag:gradcam", "rsp"):  # issue 18's explainers on the baseline, with their paired claim vs Grad-CAM
        assert ("baseline", e, "ag") in keys and ("guided_gradients", e, "ag") not in keys
        assert any(c["explainer"] == e and c["mechanism"] == "baseline" for c in data["claims"])
    ctrl = {r["explainer"] for r in rows if r["control"]}
    assert ctrl == {"random", "gaussian", "fakecam", "colorcontrast", "edges", "untrained", "untrained_intrinsic"}
    base_ratio = [r for r in rows if r["mechanism"] == "baseline" and r["metric"] == "train_step_ratio"][0]
    assert 0.3 < base_ratio["mean"] < 3.0  # the plain backbone against itself
    assert data["claims"] and all(c["verdict"] in ("supported", "contradicted", "inconclusive")
                                  for c in data["claims"])
    assert os.path.exists(tmp_path / "lb.md") and os.path.exists(tmp_path / "lb.png")
    assert "QUICK SMOKE RUN" in open(tmp_path / "lb.md").read()
    assert len(os.listdir(tmp_path / "cache")) >= 2
    second = _run(tmp_path)  # everything cached: no training
    assert second < first


def test_verdicts_recomputed_from_intervals(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    claims = [dict(claim="up", metric="ag", direction=1, mean=1.0, ci95_low=0.5, ci95_high=1.5, n_seeds=3,
                   verdict="inconclusive", primary=True),  # a wrong stored verdict is not trusted
              dict(claim="down", metric="ad", direction=-1, mean=1.0, ci95_low=0.5, ci95_high=1.5, n_seeds=3),
              dict(claim="flat", metric="acc", direction=1, mean=0.1, ci95_low=-0.5, ci95_high=0.7, n_seeds=3),
              dict(claim="one seed", metric="acc", direction=1, mean=0.5, ci95_low=0.2, ci95_high=0.8, n_seeds=1)]
    (res / "picnn.json").write_text(json.dumps({"claims": claims}))
    (res / "other.json").write_text(json.dumps({"rows": []}))
    (res / "smoke.json").write_text(json.dumps({"meta": {"args": {"quick": True}}, "claims": claims}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- verdicts:start -->\nold yes\n<!-- verdicts:end -->\nrest\n")
    md = tmp_path / "verdicts.md"
    args = ["--results", str(res), "--readme", str(readme), "--md", str(md)]
    assert V.main(args + ["--check"]) == 1
    assert V.main(args) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old yes" not in text
    assert "| up | ag | + |" in text and "**supported**" in text
    assert "| down |" not in text  # only primary claims in the README when a source marks some
    full = md.read_text()
    assert "| down | ad | − |" in full and "**contradicted**" in full and full.count("**inconclusive**") == 2
    assert "1 supported, 1 contradicted, 2 inconclusive" in full
    assert "No verdict yet" in full and "CA-Stream" in full and "smoke" not in full
    assert V.main(args + ["--check"]) == 0
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="verdicts:start"):
        V.main(args)


# ---------------------------------------------------------------------------------------------- resume of a baseline
class _Args(Exception):
    """Raised by a stand-in ``get_run`` to hand back the ``args`` that ``leaderboard.main`` parsed."""


def _quick_args(tmp_path, monkeypatch):
    """The ``--quick`` protocol's args exactly as ``main`` builds them (no copy of its defaults), temp cache dir."""
    from experiments import leaderboard as L

    def stop(mech, seed, backbone, args, cache):
        raise _Args(args)

    with monkeypatch.context() as m:
        m.setenv("LEADERBOARD_STRICT", "1")  # main re-raises instead of logging the failure
        m.setattr(L, "get_run", stop)
        with pytest.raises(_Args) as info:
            L.main(["--quick", "--seeds", "0", "--mechanisms", "baseline", "--out", str(tmp_path / "lb"),
                    "--cache-dir", str(tmp_path / "cache")])
    return info.value.args[0]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("one_thread")
def test_baseline_trained_but_not_evaluated_is_evaluated_not_retrained(tmp_path, monkeypatch):
    """``train_and_eval``: a baseline killed after training (weights saved, no cached result) is evaluated from its
    saved weights on the next run -- ``fit`` is not called; without the weights (or with the cache off) it is."""
    from experiments import harness as H
    from experiments import leaderboard as L
    from models.weights import read_state_dict

    args = _quick_args(tmp_path, monkeypatch)
    bb, cache = args.backbone, H.RunCache(args.cache_dir)
    wpath = L.baseline_weights_path(0, bb, args)
    fits, seen = [], {}

    def fake_fit(module, train_set, seed, args_, epochs):  # "training": every float tensor moves, BN buffers too
        fits.append(epochs)
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for v in module.model.state_dict().values():
                if v.is_floating_point():
                    v.add_(torch.randn(v.shape, generator=g))
        seen["trained"] = _state(module.model)
        return 1.5

    def killed(model, *a, **k):
        raise RuntimeError("killed during evaluation")

    def fake_evaluate(model, *a, **k):
        seen["evaluated"] = _state(model)
        seen["model"] = model
        return dict(explain_layer=None, explain_layer_size=[], means={}, per_item={}, maps={}, meta={})

    monkeypatch.setattr(L, "costs", lambda *a, **k: dict(train_step_ratio=1.0, inference_ratio=1.0))
    # 1) no weights file: trained (fit called), weights saved right after training, then the evaluation dies
    monkeypatch.setattr(L, "fit", fake_fit)
    monkeypatch.setattr(L, "evaluate", killed)
    assert not os.path.exists(wpath)
    with pytest.raises(RuntimeError, match="killed"):
        L.get_run("baseline", 0, bb, args, cache)
    assert fits == [L.recipe_for(bb, args)["epochs"]]
    assert os.path.exists(wpath) and cache.get(L.run_config("baseline", 0, bb, args)) is None
    assert _same(read_state_dict(wpath), seen["trained"])
    saved, mtime = open(wpath, "rb").read(), os.stat(wpath).st_mtime_ns

    # 2) re-run: the saved weights are evaluated, fit is never called, the weights file is not rewritten
    monkeypatch.setattr(L, "fit", lambda *a, **k: pytest.fail("the baseline was retrained despite its weights"))
    monkeypatch.setattr(L, "evaluate", fake_evaluate)
    res = L.get_run("baseline", 0, bb, args, cache)
    assert _same(seen["evaluated"], seen["trained"])
    H.seed_everything(0)
    assert not _same(_state(L.build_module("baseline", bb, args).model), seen["trained"])  # init != trained
    _, test_set = L.datasets(args)
    assert res["correct"] == L.accuracy(seen["model"], test_set) and res["train_seconds"] is None
    assert open(wpath, "rb").read() == saved and os.stat(wpath).st_mtime_ns == mtime
    assert cache.get(L.run_config("baseline", 0, bb, args)) is not None

    # 3) cache off (--no-cache): retrained even though the weights exist
    monkeypatch.setattr(L, "fit", fake_fit)
    fits.clear()
    res = L.get_run("baseline", 0, bb, args, H.RunCache(args.cache_dir, enabled=False))
    assert len(fits) == 1 and res["train_seconds"] == 1.5


@pytest.mark.usefixtures("one_thread")
def test_exvit_starts_from_the_trained_vit_baseline(tmp_path, monkeypatch):
    """eX-ViT in the leaderboard is a head on the same seed's ViT baseline: its encoder blocks start from the
    baseline's weights (not a fresh init), and its recipe overrides the ViT recipe's epochs only outside --quick."""
    from experiments import leaderboard as L
    from models.weights import save_weights

    args = _quick_args(tmp_path, monkeypatch)
    base = L.build_module("baseline", L.VIT, args).model
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.5)  # unlike any fresh init
    path = str(tmp_path / "base.safetensors")
    save_weights(base, path)
    ex = L.build_module("exvit", L.VIT, args, checkpoint_path=path).model
    fresh = L.build_module("exvit", L.VIT, args).model
    key = "blocks.0.attn.qkv.weight"
    b = next(v for k, v in base.state_dict().items() if k.endswith(key))
    e = next(v for k, v in ex.state_dict().items() if k.endswith(key))
    f = next(v for k, v in fresh.state_dict().items() if k.endswith(key))
    assert torch.equal(b, e) and not torch.equal(b, f)
    assert L.recipe_for(L.VIT, args, "exvit") == L.recipe_for(L.VIT, args)  # --quick: one recipe for all
    args.quick = False
    assert L.recipe_for(L.VIT, args, "exvit") == dict(L.VIT_RECIPE, **L.SPECS["exvit"]["recipe"])
    assert L.recipe_for(L.VIT, args, "baseline") == L.VIT_RECIPE
    assert L.run_config("exvit", 0, L.VIT, args)["epochs"] == L.SPECS["exvit"]["recipe"]["epochs"]
