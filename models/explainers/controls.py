"""Control explanations (issue 14 item 2): maps that a real explanation must beat, computed through the same
:class:`~models.explainers.base.Explainer` path (input checks, targets, output checks) as every explainer.
Each has ``control = True``; ``random`` and ``fakecam`` (``simple.py``) are controls too.

* ``gaussian``: a centred isotropic Gaussian, ``exp(-|u - c|^2 / (2 (sigma * size)^2))`` with ``sigma=0.25`` of
  each side (the centre bias of object datasets); class- and image-agnostic.
* ``colorcontrast``: training-free saliency ``|| x(u) - mean_u x(u) ||_2`` over channels (distance of each
  pixel's colour to the image's mean colour); class-agnostic.
* ``edges``: training-free edge energy ``sum_c sum_d (d_d x_c(u))^2`` (squared central differences along every
  spatial axis), blurred by a 3-wide box so thin edges become regions; class-agnostic.
* ``untrained``: the same explainer (``base=...``, default Grad-CAM) on a copy of the model whose parameters are
  re-initialised (``reset_parameters`` of every module, seeded; the input normalisation buffers are kept) --
  the model-randomisation sanity check of Adebayo et al. 2018. Targets are those of the trained model.

All maps are min-max normalised per image (``normalize_saliency``); 2D and 3D inputs.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import normalize_saliency
from .base import Explainer

__all__ = ["GaussianMap", "ColorContrast", "EdgeEnergy", "Untrained", "reinitialize"]


class GaussianMap(Explainer):
    name = "gaussian"
    uses_layers = False
    control = True

    def __init__(self, model: nn.Module, target_layers=None, sigma: float = 0.25) -> None:
        super().__init__(model, None)
        if not sigma > 0:
            raise ValueError(f"gaussian: sigma (fraction of the image side) must be > 0, got {sigma}.")
        self.sigma = float(sigma)

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        spatial = x.shape[2:]
        grids = torch.meshgrid(*[(torch.arange(n, device=x.device, dtype=torch.float32) - (n - 1) / 2)
                                 / (self.sigma * n) for n in spatial], indexing="ij")
        g = torch.exp(-0.5 * sum(u ** 2 for u in grids))
        return normalize_saliency(g.expand((x.shape[0],) + tuple(spatial)).contiguous())


class ColorContrast(Explainer):
    name = "colorcontrast"
    uses_layers = False
    control = True

    def __init__(self, model: nn.Module, target_layers=None) -> None:
        super().__init__(model, None)

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        dims = tuple(range(2, x.dim()))
        d = (x - x.mean(dim=dims, keepdim=True)).pow(2).sum(1).sqrt()
        return normalize_saliency(d)


class EdgeEnergy(Explainer):
    name = "edges"
    uses_layers = False
    control = True

    def __init__(self, model: nn.Module, target_layers=None) -> None:
        super().__init__(model, None)

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        sd = x.dim() - 2
        pad = F.pad(x, (1, 1) * sd, mode="replicate")
        e = torch.zeros_like(x)
        for d in range(sd):
            ax = 2 + d
            hi = pad.narrow(ax, 2, x.shape[ax])
            lo = pad.narrow(ax, 0, x.shape[ax])
            for o in range(sd):  # crop the other axes back to the input size
                if o != d:
                    hi, lo = hi.narrow(2 + o, 1, x.shape[2 + o]), lo.narrow(2 + o, 1, x.shape[2 + o])
            e = e + ((hi - lo) / 2).pow(2)
        e = e.sum(1, keepdim=True)
        pool = F.avg_pool2d if sd == 2 else F.avg_pool3d
        e = pool(e, 3, stride=1, padding=1, count_include_pad=False)[:, 0]
        return normalize_saliency(e)


def reinitialize(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with every module's ``reset_parameters()`` called under ``torch.manual_seed(seed)``
    (the caller's RNG state is restored). Buffers that are not parameters (input normalisation) are kept;
    BatchNorm running statistics are reset by ``reset_parameters``."""
    clone = copy.deepcopy(model)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        n = 0
        for m in clone.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
                n += 1
    finally:
        torch.random.set_rng_state(state)
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no module with reset_parameters(); the 'untrained' control "
                         "cannot re-initialise it.")
    return clone


class Untrained(Explainer):
    """``create_explainer("untrained", model, base="gradcam", seed=0, **base_kwargs)``."""

    name = "untrained"
    uses_layers = False
    control = True

    def __init__(self, model: nn.Module, target_layers=None, base: str = "gradcam", seed: int = 0,
                 **base_kwargs) -> None:
        super().__init__(model, None)
        from . import create_explainer

        if str(base).lower() == "untrained":
            raise ValueError("untrained: base must be a real explainer (e.g. 'gradcam', 'intrinsic').")
        self.base, self.seed = str(base), int(seed)
        self.random_model = reinitialize(model, seed)
        names = {id(m): n for n, m in model.named_modules()}
        specs = target_layers if isinstance(target_layers, (list, tuple)) else (
            [] if target_layers is None else [target_layers])
        mapped = []
        for s in specs:  # modules of the trained model -> the same-named modules of the copy
            if isinstance(s, nn.Module):
                if id(s) not in names:
                    raise ValueError("untrained: target layer is not a sub-module of the model.")
                s = names[id(s)]
            mapped.append(s)
        layers = None if target_layers is None else (mapped if isinstance(target_layers, (list, tuple)) else mapped[0])
        self.inner = create_explainer(self.base, self.random_model, target_layers=layers, **base_kwargs)
        self.supports_3d = getattr(self.inner, "supports_3d", True)

    def explain(self, x: Tensor, targets: Tensor) -> Tensor:
        return self.inner(x, targets)
