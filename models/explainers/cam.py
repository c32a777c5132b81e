"""The CAM family (spec §3.1-3.8; seed 001 eqs 1.3-1.9, seed 002 eqs 2.10-2.19).

Generic CAM (1.3): ``S = n(up(ReLU(sum_k w_k^c A^k)))`` with ``A^k`` the target layer's channels.

* ``gradcam`` (1.4), ``gradcampp`` (1.5 corrected, spec §3.3), ``xgradcam`` (1.8), ``layercam`` (2.19),
  ``hirescam`` (2.10, element-wise): **wrap the maintained ``grad-cam`` package** (pytorch_grad_cam 1.5.7):
  its ``get_cam_weights`` / ``get_cam_image`` compute the maps from the activations and gradients it
  records with its own hooks. Only the resizing is replaced (:class:`_TorchResize`): the package resizes
  with OpenCV in 2D (identical to torch bilinear, ``align_corners=False``) and with cubic-spline
  ``scipy.ndimage.zoom`` in 3D; we use torch (bi/tri)linear in both, so 2D maps equal the package's
  and 3D maps are trilinear like everything else in the zoo. The package's numpy I/O, ``model.eval()``
  and hook lifetime are handled here (hooks released after every call).
* ``scorecam`` (1.6-1.7) and ``ablationcam`` (1.9): the package loops over images with per-sample
  ``.item()`` calls and only handles 2D (``AblationLayer`` indexes 4-D tensors, ``ScoreCAM`` uses
  ``UpsamplingBilinear2d``). Re-implemented here batched over images *and* channels and N-d, with the
  package's exact conventions (logit scores, ``align_corners=True`` mask upsampling and 1e-8 in the mask
  normalisation for Score-CAM); ``tests/test_explainers.py`` checks they equal the package's maps.
  Ablation-CAM zeroes channel k only (spec decision 2), which is also what the package does for
  non-negative layers (its min-1e7 trick for signed layers is not used).
* ``cam`` (1.3 with ``w_k^c = W_fc[c, k]``): only at the layer feeding GAP -> Linear.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Explainer, LayerSpec, capture_outputs, gather_logit, postprocess_layer_maps

__all__ = ["PackageCAM", "CAM", "ScoreCAM", "AblationCAM", "PACKAGE_METHODS"]


def _package_classes():
    try:
        import pytorch_grad_cam as pgc
    except ImportError as e:  # pragma: no cover - dependency
        raise ImportError("The CAM explainers need the 'grad-cam' package (pip install grad-cam==1.5.7).") from e
    return {"gradcam": pgc.GradCAM, "gradcampp": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
            "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM}


#: methods delegated to pytorch_grad_cam
PACKAGE_METHODS = ("gradcam", "gradcampp", "xgradcam", "layercam", "hirescam")


class _TorchResize:
    """Mixin for a pytorch_grad_cam ``BaseCAM`` subclass: return the raw per-layer maps as tensors.

    Replaces ``compute_cam_per_layer`` (which ReLUs, min-maxes and resizes with OpenCV/scipy) and
    ``aggregate_multi_layers``; the aggregation is done by :func:`postprocess_layer_maps` in torch.
    """

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
        acts = [a.cpu().numpy() for a in self.activations_and_grads.activations]
        grads = [g.cpu().numpy() for g in self.activations_and_grads.gradients]
        if len(acts) != len(self.target_layers) or len(grads) != len(self.target_layers):
            raise RuntimeError(
                f"recorded {len(acts)} activations and {len(grads)} gradients for {len(self.target_layers)} target "
                "layers: every target layer must be called exactly once per forward and lie on the path to the "
                "logits (ViT taps other than taps[-1] are side outputs the classifier never reads).")
        out = []
        for i, layer in enumerate(self.target_layers):
            if acts[i].ndim not in (4, 5):
                raise ValueError(f"target layer output has shape {acts[i].shape}; CAMs need (B, C, H, W) or "
                                 "(B, C, D, H, W) maps (for ViTs use the backbone taps, which are already maps, or pass "
                                 "reshape_transform=<tokens -> (B, C, h, w)> to create_explainer).")
            cam = self.get_cam_image(input_tensor, layer, targets, acts[i], grads[i], eigen_smooth)
            out.append(torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32)))
        return out

    def aggregate_multi_layers(self, cam_per_target_layer):
        return cam_per_target_layer


class PackageCAM(Explainer):
    """A pytorch_grad_cam method (gradcam, gradcampp, xgradcam, layercam, hirescam), batched, 2D and 3D."""

    def __init__(self, name: str, model: nn.Module, target_layers: LayerSpec = None) -> None:
        classes = _package_classes()
        if name not in classes:
            raise ValueError(f"unknown package CAM {name!r}; choose from {sorted(classes)}.")
        self.name = name
        super().__init__(model, target_layers)
        self._cls = type(f"_Torch{classes[name].__name__}", (_TorchResize, classes[name]), {})

    def _raw(self, x: Tensor, targets: Tensor):
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        x = x.requires_grad_(True)  # gradients reach the layer even if every parameter is frozen
        cam = self._cls(self.model, target_layers=self.target_layers, reshape_transform=self.reshape_transform)
        try:
            maps = cam(x, targets=[ClassifierOutputTarget(int(c)) for c in targets])
            logits = cam.outputs.detach()
        finally:
            cam.activations_and_grads.release()
        return [m.to(x.device) for m in maps], logits

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        return postprocess_layer_maps(self._raw(x, targets)[0], x.shape[2:])

    def explain_raw(self, x: Tensor, targets: Tensor):
        """``(sum_k w_k A^k before ReLU at layer resolution, logits)`` for one target layer (UCAG protocol)."""
        maps, logits = self._raw(x, targets)
        return _one_layer(maps, self.name), logits


def _one_layer(maps: List[Tensor], name: str) -> Tensor:
    if len(maps) != 1:
        raise ValueError(f"{name}: explain_raw needs exactly one target layer (got {len(maps)}); UCAG over a "
                         "multi-layer explainer uses its normalised maps (patch_maps='normalized').")
    return maps[0]


def _find_classifier(model: nn.Module, classifier: Optional[str]) -> nn.Linear:
    if classifier is not None:
        fc = model.get_submodule(classifier)
    else:
        fc = getattr(model, "fc", None)
        if fc is None and hasattr(model, "get_classifier"):
            fc = model.get_classifier()
    if not isinstance(fc, nn.Linear):
        raise ValueError(f"CAM needs a GAP -> nn.Linear head; {type(model).__name__} has no linear 'fc' "
                         "(pass classifier='<name of the nn.Linear>' or use gradcam, which equals CAM there).")
    return fc


class CAM(Explainer):
    """Plain CAM (Zhou et al.; seed 001 eq. 1.3, spec §3.1): ``w_k^c = W_fc[c, k]``, ``h`` = identity.

    Valid only at the layer feeding GAP -> Linear (for zoo models the default ``backbone.taps[-1]``).
    ``relu=True`` applies the ReLU of the other CAMs (then CAM equals Grad-CAM there, spec §3.1).
    """

    name = "cam"
    single_layer = True

    def __init__(self, model: nn.Module, target_layers: LayerSpec = None, classifier: Optional[str] = None,
                 relu: bool = False) -> None:
        super().__init__(model, target_layers)
        self.fc = _find_classifier(model, classifier)
        self.relu = relu

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        return postprocess_layer_maps([self.explain_raw(x, targets)[0]], x.shape[2:], relu=self.relu)

    def explain_raw(self, x: Tensor, targets: Tensor):
        """``(sum_k W_ck A^k at layer resolution, logits)`` (UCAG protocol)."""
        with torch.no_grad(), capture_outputs(self.target_layers) as cap:
            logits = self.model(x)
        a = self._reshape(cap.last()[0])
        if a.shape[1] != self.fc.in_features:
            raise ValueError(f"CAM: the target layer has {a.shape[1]} channels but the classifier expects "
                             f"{self.fc.in_features} features; CAM is only defined at the layer feeding GAP -> fc.")
        w = self.fc.weight[targets]  # (B, K)
        return torch.einsum("bk...,bk->b...", a.float(), w.float()), logits


class ScoreCAM(Explainer):
    """Score-CAM (seed 001 eqs 1.6-1.7, spec §3.5), batched over images and channels, 2D and 3D.

    ``M_k = n(up(A^k))`` (``align_corners=True``, 1e-8 as in pytorch_grad_cam), ``u_k = f(x * M_k)_c``
    (logit; ``score='prob'`` uses the softmax probability as in the original paper),
    ``w = softmax_k(u)``, ``S = ReLU(sum_k w_k A^k)``. K extra forward passes per image and layer,
    ``batch_size`` masked images per forward.
    """

    name = "scorecam"

    def __init__(self, model: nn.Module, target_layers: LayerSpec = None, batch_size: int = 32,
                 score: str = "logit") -> None:
        super().__init__(model, target_layers)
        if score not in ("logit", "prob"):
            raise ValueError(f"score must be 'logit' or 'prob', got {score!r}.")
        self.batch_size, self.score = int(batch_size), score

    @torch.no_grad()
    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        return postprocess_layer_maps(self._raw(x, targets)[0], x.shape[2:])

    def explain_raw(self, x: Tensor, targets: Tensor):
        """``(sum_k w_k A^k before ReLU at layer resolution, logits)`` for one target layer (UCAG protocol)."""
        maps, logits = self._raw(x, targets)
        return _one_layer(maps, self.name), logits

    @torch.no_grad()
    def _raw(self, x: Tensor, targets: Tensor):
        with capture_outputs(self.target_layers) as cap:
            logits0 = self.model(x)
        acts = [self._reshape(a) for a in cap.last()]
        maps = []
        size = x.shape[2:]
        mode = {2: "bilinear", 3: "trilinear"}[x.dim() - 2]
        for a in acts:
            a = a.float()
            b, k = a.shape[:2]
            img_idx = torch.arange(b, device=x.device).repeat_interleave(k)
            ch_idx = torch.arange(k, device=x.device).repeat(b)
            scores = torch.empty(b * k, device=x.device)
            for s in range(0, b * k, self.batch_size):  # masks built per chunk: memory O(batch_size * H * W)
                sl = slice(s, s + self.batch_size)
                up = F.interpolate(a[img_idx[sl], ch_idx[sl]].unsqueeze(1), size=size, mode=mode, align_corners=True)
                flat = up.flatten(1)
                lo, hi = flat.min(1).values, flat.max(1).values
                shape = (-1,) + (1,) * (up.dim() - 1)
                masks = (up - lo.view(shape)) / (hi - lo + 1e-8).view(shape)
                logits = self.model(x[img_idx[sl]] * masks)
                if self.score == "prob":
                    logits = logits.softmax(1)
                scores[sl] = gather_logit(logits, targets[img_idx[sl]])
            w = scores.view(b, k).softmax(dim=1)
            maps.append(torch.einsum("bk...,bk->b...", a, w))
        return maps, logits0


class AblationCAM(Explainer):
    """Ablation-CAM (seed 001 eq. 1.9, spec §3.8): ``w_k = (y^c - y_k^c) / y^c``, ``S = ReLU(sum w_k A^k)``.

    ``y_k^c`` is the logit with channel k of the target layer replaced by ``ablation_value`` (0, spec
    decision 2), batched over (image, channel) pairs with a forward hook that substitutes the cached
    activations; 2D and 3D. Backbone taps other than the last are side outputs of timm's feature
    extractor, so for them the hook goes on the matching ``backbone.body`` stage module (same tensor).
    """

    name = "ablationcam"

    def __init__(self, model: nn.Module, target_layers: LayerSpec = None, batch_size: int = 32,
                 ablation_value: float = 0.0) -> None:
        super().__init__(model, target_layers)
        self.batch_size, self.ablation_value = int(batch_size), float(ablation_value)

    def _on_path(self, layer: nn.Module, a: Tensor, x: Tensor) -> nn.Module:
        """The module whose output to replace: a backbone tap other than the last is a *side output* (the
        body computes all stages first), so its stage module in ``backbone.body`` is used instead."""
        bb = getattr(self.model, "backbone", None)
        taps = list(getattr(bb, "taps", []))
        idx = next((i for i, tp in enumerate(taps) if tp is layer), None)
        if idx is None or idx == len(taps) - 1:
            return layer
        try:
            stage = bb.body.get_submodule(bb.stage_names[idx])
        except (AttributeError, IndexError):
            stage = None
        if stage is not None:
            with capture_outputs([stage]) as cap:
                self.model(x[:1])
            out = cap.last()[0]
            if torch.is_tensor(out) and out.shape == a[:1].shape and torch.allclose(out, a[:1], atol=1e-5,
                                                                                     rtol=1e-4):
                return stage
        raise ValueError(f"ablationcam: backbone.taps[{idx}] is a side output that the classifier does not read and "
                         "no backbone stage module produces the same map (ViT taps are reshaped tokens); ablate "
                         "the last tap or pass target_layers=<a module on the path to the logits>.")

    def _ablate(self, sub: Tensor, rows: Tensor, channels: Tensor) -> None:
        """Set channel ``channels[i]`` of item ``rows[i]`` to the ablation value, in place in ``sub`` (the layer's own
        layout); with a ``reshape_transform`` through the view it returns (ViT tokens: the channel of every token)."""
        view = self._reshape(sub)
        view[rows, channels] = self.ablation_value
        if self.reshape_transform is not None and not bool((self._reshape(sub)[rows, channels]
                                                            == self.ablation_value).all()):
            raise ValueError("ablationcam: the reshape_transform returns a copy, so a channel cannot be ablated in the "
                             "layer's own output; build it from views (slicing, reshape, transpose/permute) or use "
                             "another explainer.")

    @torch.no_grad()
    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        with capture_outputs(self.target_layers) as cap:
            logits = self.model(x)
        y = gather_logit(logits, targets)
        maps = []
        for layer, raw in zip(self.target_layers, cap.last()):
            layer = self._on_path(layer, raw, x)
            a = self._reshape(raw)  # (B, K, *spatial): channels are ablated in this layout
            b, k = a.shape[:2]
            img_idx = torch.arange(b, device=x.device).repeat_interleave(k)
            ch_idx = torch.arange(k, device=x.device).repeat(b)
            ablated = torch.empty(b * k, device=x.device)
            for s in range(0, b * k, self.batch_size):
                sl = slice(s, s + self.batch_size)
                ii, cc = img_idx[sl], ch_idx[sl]
                sub = raw[ii].clone()
                self._ablate(sub, torch.arange(len(ii), device=x.device), cc)

                def hook(module, inp, out, sub=sub):
                    return sub

                h = layer.register_forward_hook(hook)
                try:
                    ablated[sl] = gather_logit(self.model(x[ii]), targets[ii])
                finally:
                    h.remove()
            w = (y[:, None] - ablated.view(b, k)) / y[:, None]
            maps.append(torch.einsum("bk...,bk->b...", a.float(), w))
        return postprocess_layer_maps(maps, x.shape[2:])
