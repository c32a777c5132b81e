"""experiments/leaderboard.py --quick (issue 14 item 6) and experiments/verdicts.py (item 7): JSON schema, cache
resume, verdicts recomputed from the intervals."""
import json
import os
import subprocess
import sys
import time

import pytest

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
