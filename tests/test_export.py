"""Export with the explanation: ONNX (logits, saliency) matches PyTorch; model card round trip."""
import json
import os

import pytest
import torch

import models
from models.export import ExplainedModel, export_onnx, load_model_card, save_model_card, verify_onnx


@pytest.mark.parametrize("backbone,size", [("resnet18", (3, 48, 48)), ("cnn3d", (1, 16, 16, 16))])
def test_onnx_export_returns_logits_and_explanation(tmp_path, backbone, size):
    m = models.create_model("baseline", backbone=backbone, num_classes=3).eval()
    path = export_onnx(m, str(tmp_path / "m.onnx"), torch.rand(2, *size))
    diffs = verify_onnx(path, m, torch.rand(3, *size))  # another batch size: the batch axis is dynamic
    assert diffs["logits_max_abs_diff"] < 1e-4 and diffs["saliency_max_abs_diff"] < 1e-4


def test_model_card_roundtrip(tmp_path):
    m = models.create_model("baseline", num_classes=3, in_chans=1).eval()
    card = save_model_card(m, str(tmp_path), "baseline", {"num_classes": 3, "in_chans": 1})
    assert json.load(open(card))["explanation_kind"] == "cam"
    m2 = load_model_card(card).eval()
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(m(x), m2(x))
    logits, sal = ExplainedModel(m2)(x)
    assert sal.shape == (2, 32, 32)


# ---- issue 15: target input, dynamic sizes, metadata, .pt2, every intrinsic explanation ----------------
_FRESH = r"""
import json, sys
import numpy as np
import onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = sess.get_modelmeta().custom_metadata_map
data = np.load(sys.argv[2])
out = {}
for key in data.files:
    feed = {"image": data[key]}
    if key.endswith("_t0") or key.endswith("_t2"):
        feed["target"] = np.full((data[key].shape[0],), int(key[-1]), dtype=np.int64)
    logits, sal = sess.run(None, feed)
    out[key + "_logits"], out[key + "_sal"] = logits, sal
np.savez(sys.argv[3], **out)
banned = [m for m in ("torch", "models", "trainers") if m in sys.modules]
print(json.dumps({"meta": meta, "banned": banned}))
"""


def test_onnx_runs_without_the_project_two_sizes_two_targets(tmp_path):
    import json as _json
    import subprocess
    import sys

    import numpy as np

    from models.export import read_onnx_metadata

    torch.manual_seed(0)
    m = models.create_model("baseline", backbone="resnet18", num_classes=3).eval()
    path = export_onnx(m, str(tmp_path / "m.onnx"), torch.rand(2, 3, 64, 64),
                       metadata={"classes": ["circle", "square", "star"], "mechanism": "baseline"})
    meta = read_onnx_metadata(path)
    assert meta["dynamic_hw"] is True and meta["classes"] == ["circle", "square", "star"]
    xs = {f"s{s}_{t}": np.random.RandomState(s).rand(2, 3, s, s).astype(np.float32)
          for s in (64, 96) for t in ("pred", "t0", "t2")}
    np.savez(tmp_path / "in.npz", **xs)
    script = tmp_path / "run.py"
    script.write_text(_FRESH)
    res = subprocess.run([sys.executable, str(script), path, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                         capture_output=True, text=True, cwd=str(tmp_path), timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-2000:]
    info = _json.loads(res.stdout.strip().splitlines()[-1])
    assert info["banned"] == [] and _json.loads(info["meta"]["classes"])[2] == "star"
    got = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        for key, x in xs.items():
            target = None if key.endswith("pred") else torch.tensor([int(key[-1])] * 2)
            ref_l, ref_s = m.forward_explain(torch.from_numpy(x), target)
            assert got[key + "_sal"].shape == tuple(ref_s.shape) == (2, x.shape[2], x.shape[3])
            np.testing.assert_allclose(got[key + "_logits"], ref_l.numpy(), atol=1e-4)
            np.testing.assert_allclose(got[key + "_sal"], ref_s.numpy(), atol=1e-4)
    # the two targets really give two different explanations
    assert np.abs(got["s64_t0_sal"] - got["s64_t2_sal"]).max() > 1e-3


@pytest.mark.parametrize("name", ["ca_stream", "picnn", "exvit"])
def test_every_intrinsic_explanation_exports_onnx_and_pt2(tmp_path, name):
    from models.export import export_metadata, export_program, read_onnx_metadata, verify_program
    from models.registry import test_kwargs

    torch.manual_seed(0)
    kw = test_kwargs(name)
    m = models.create_model(name, num_classes=3, **kw).eval()
    size = 64 if name != "exvit" else 32  # the tiny eX-ViT is built for 32 px (position embeddings)
    x = torch.rand(2, 3, size, size)
    path = export_onnx(m, str(tmp_path / "m.onnx"), x, metadata=export_metadata(m))
    meta = read_onnx_metadata(path)
    assert meta["mechanism"] == name and meta["explanation_kind"] == m.explanation_kind
    assert meta["mean"] == [0.0] * 3 and meta["std"] == [1.0] * 3 and meta["input_size"] == [3, size, size]
    assert meta["zoo_version"] and meta["num_classes"] == 3
    assert meta["dynamic_hw"] is (name != "exvit"), meta["dynamic_hw_reason"]
    if name == "exvit":
        assert "fixed input size" in meta["dynamic_hw_reason"]
    for t in (None, torch.tensor([2, 1])):
        d = verify_onnx(path, m, torch.rand(3, 3, size, size), None if t is None else torch.tensor([2, 1, 0]))
        assert d["logits_max_abs_diff"] < 1e-4 and d["saliency_max_abs_diff"] < 1e-3, d
    prog = export_program(m, str(tmp_path / "m.pt2"), x)
    d = verify_program(prog, m, torch.rand(2, 3, size, size), torch.tensor([1, 2]))
    assert d["logits_max_abs_diff"] < 1e-4 and d["saliency_max_abs_diff"] < 1e-4, d


def test_export_cli_refuses_to_overwrite_another_model(tmp_path):
    import export as export_script
    from trainers.classification import ClassificationModule

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        mod = ClassificationModule(num_classes=3)
        ckpt = {"hyper_parameters": dict(mod.hparams), "state_dict": mod.state_dict(),
                "pytorch-lightning_version": "2.6.0"}
        mod.on_save_checkpoint(ckpt)
        paths.append(tmp_path / f"m{seed}.ckpt")
        torch.save(ckpt, paths[-1])
    out = tmp_path / "exp"
    rep = export_script.main(["--checkpoint", str(paths[0]), "--out", str(out), "--image-size", "64"])
    assert rep["pt2_parity"]["logits_max_abs_diff"] < 1e-4 and rep["logits_max_abs_diff"] < 1e-4
    export_script.main(["--checkpoint", str(paths[0]), "--out", str(out), "--image-size", "64", "--no-pt2"])  # same
    with pytest.raises(SystemExit, match="different model.*--overwrite"):
        export_script.main(["--checkpoint", str(paths[1]), "--out", str(out), "--no-onnx", "--no-pt2"])
    export_script.main(["--checkpoint", str(paths[1]), "--out", str(out), "--no-onnx", "--no-pt2", "--overwrite"])


def test_gradient_defined_explanation_is_refused_clearly(tmp_path):
    """MAXNet's HAM needs autograd inside forward_explain: export refuses with the reason, not a tracer error."""
    from models.registry import test_kwargs

    kw = test_kwargs("maxnet")
    size = kw.pop("input_size")
    m = models.create_model("maxnet", num_classes=3, **kw).eval()
    with pytest.raises(ValueError, match="defined by gradients"):
        export_onnx(m, str(tmp_path / "m.onnx"), torch.rand(1, *size))


def test_xpruner_stage2_model_exports_pt2(tmp_path):
    """X-Pruner in stage 2 (pruning_active set) exports as a torch.export program: the stage flag is read
    eagerly (also right after a state-dict load), never from the symbolic buffer during capture."""
    from models.export import export_program, verify_program
    from models.registry import test_kwargs

    kw = test_kwargs("xpruner")
    src = models.create_model("xpruner", num_classes=3, **kw).eval()
    src.xp.pruning_active.fill_(True)
    m = models.create_model("xpruner", num_classes=3, **kw).eval()
    m.load_state_dict(src.state_dict())
    assert m._pruning_active() is True
    x = torch.rand(2, 3, 32, 32)
    path = export_program(m, str(tmp_path / "xp.pt2"), x, dynamic_hw=False)
    diff = verify_program(path, m, x)
    assert max(diff.values()) < 1e-4, diff
