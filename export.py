"""Export a trained model with its explanation.

    python export.py --checkpoint checkpoints/baseline_synthetic/checkpoints/best.ckpt --out checkpoints/export/baseline

writes ``model.safetensors`` + ``model.json`` (reload with ``models.export.load_model_card`` or
``python eval.py --weights DIR/model.safetensors``) and ``model.onnx`` whose outputs are
``(logits, saliency)``; the ONNX graph is checked against PyTorch with onnxruntime.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional

import torch


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a Lightning checkpoint written by train.py")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int, default=None, help="example input size (default: the data's)")
    p.add_argument("--no-onnx", action="store_true", help="only write safetensors + model.json")
    p.add_argument("--no-pt2", action="store_true", help="skip the torch.export program (model.pt2)")
    p.add_argument("--fixed-size", action="store_true", help="export a fixed height/width (default: dynamic "
                   "where the model allows it; the outcome is in the ONNX metadata)")
    p.add_argument("--overwrite", action="store_true", help="replace an export of a different model in --out")
    args = p.parse_args(argv)

    from models.export import (export_metadata, export_onnx, export_program, save_model_card, state_fingerprint,
                               verify_onnx, verify_program)
    from trainers.classification import load_datamodule, load_module, read_checkpoint

    try:
        module = load_module(args.checkpoint)
        dm = load_datamodule(args.checkpoint)  # allow-listed class only (issue 13 item 1)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    model = module.model.eval()
    hp = read_checkpoint(args.checkpoint)["hyper_parameters"]
    kwargs = dict(hp.get("model_kwargs") or {})
    kwargs.update(num_classes=hp["num_classes"], pretrained=False)
    kwargs.pop("backbone_weights", None)
    if hp.get("in_chans") is not None:
        kwargs.setdefault("in_chans", hp["in_chans"])
    size = args.image_size or (dm.hparams.get("image_size") if dm is not None else None) or 224
    _refuse_other_model(args.out, state_fingerprint(model), args.overwrite)
    class_names = list(getattr(dm, "class_names", []) or [])
    card = save_model_card(model, args.out, hp.get("model", "baseline"), kwargs,
                           extra={"class_names": class_names, "image_size": size,
                                  "source_checkpoint": os.path.abspath(args.checkpoint)})
    report = {"model_card": card}
    example = torch.rand(2, model.in_chans, *([size] * model.spatial_dims))
    if not args.no_onnx:
        meta = export_metadata(model, class_names or None, name=hp.get("model"))
        path = export_onnx(model, os.path.join(args.out, "model.onnx"), example, metadata=meta,
                           dynamic_hw=False if args.fixed_size else "auto")
        report.update(onnx=path, **verify_onnx(path, model, torch.rand_like(example)))
        last = torch.tensor([model.num_classes - 1] * example.shape[0])
        report["onnx_target_last_class"] = verify_onnx(path, model, torch.rand_like(example), last)
    if not args.no_pt2:
        try:
            prog = export_program(model, os.path.join(args.out, "model.pt2"), example, dynamic_hw=not args.fixed_size)
            report.update(pt2=prog, pt2_parity=verify_program(prog, model, torch.rand_like(example)))
        except Exception as e:  # torch.export is stricter than ONNX tracing: report, keep the other files
            report["pt2_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    print(json.dumps(report, indent=2))
    return report


_OUTPUTS = ("model.json", "model.safetensors", "model.onnx", "model.pt2")


def _refuse_other_model(out: str, fingerprint: str, overwrite: bool) -> None:
    """An export folder holds one model: re-exporting the same weights is fine, another model needs --overwrite."""
    present = [f for f in _OUTPUTS if os.path.exists(os.path.join(out, f))]
    if not present or overwrite:
        return
    card = os.path.join(out, "model.json")
    try:
        with open(card) as f:
            old = json.load(f).get("weights_sha256")
    except (OSError, ValueError):
        old = None
    if old != fingerprint:
        raise SystemExit(f"error: {out!r} already holds an export of a different model ({', '.join(present)}). "
                         "Choose another --out, or pass --overwrite to replace it.")


if __name__ == "__main__":
    main()
