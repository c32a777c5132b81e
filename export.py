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
    args = p.parse_args(argv)

    from models.export import export_onnx, save_model_card, verify_onnx
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
    card = save_model_card(model, args.out, hp.get("model", "baseline"), kwargs,
                           extra={"class_names": list(getattr(dm, "class_names", []) or []), "image_size": size})
    report = {"model_card": card}
    if not args.no_onnx:
        example = torch.rand(2, model.in_chans, *([size] * model.spatial_dims))
        path = export_onnx(model, os.path.join(args.out, "model.onnx"), example)
        report.update(onnx=path, **verify_onnx(path, model, torch.rand_like(example)))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
