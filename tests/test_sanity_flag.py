"""The sanity-check flag rule (issue 18 decision, models/metrics/sanity.py): a map that survives the randomisation
of the top layer (the classifier head) is flagged; the old rule (similarity averaged over the cascade >= 0.5) is
shown to miss such a map."""
import pytest
import torch
import torch.nn.functional as F

import models
from models.metrics.sanity import FLAG_STEP, FLAG_THRESHOLD, cascading_randomization, sanity_flag


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.create_model("baseline", backbone="resnet10t", num_classes=5).eval()


def _energy_of(stage: str):
    """A class-agnostic map: the activation energy sum_k A_k^2 of a backbone stage (ignores the classifier head and
    the target class, depends on every weight below the stage)."""
    def factory(m):
        def explain(x, t):
            feats = {}
            h = m.backbone.body.get_submodule(stage).register_forward_hook(lambda mod, i, o: feats.update(a=o))
            try:
                with torch.no_grad():
                    m(x)
            finally:
                h.remove()
            e = feats["a"].pow(2).sum(1, keepdim=True)
            return F.interpolate(e, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return explain
    return factory


def test_flag_rule_on_constructed_similarity_curves():
    # rows: trained, head, layer4, ...; columns: images
    keeps_top = torch.tensor([[1.0, 1.0], [0.95, 0.85], [0.1, 0.0], [0.0, 0.1], [0.0, 0.0]])
    changes_top = torch.tensor([[1.0, 1.0], [0.3, 0.5], [0.9, 0.9], [0.9, 0.9], [0.9, 0.9]])
    assert sanity_flag(keeps_top)["flagged"] and not sanity_flag(changes_top)["flagged"]
    # the old rule (mean over the steps after 0 >= 0.5) gets both wrong
    assert keeps_top[1:].mean() < 0.5 and changes_top[1:].mean() >= 0.5
    r = sanity_flag(keeps_top)
    assert r["flag_step"] == FLAG_STEP == 1 and r["flag_threshold"] == FLAG_THRESHOLD == 0.8
    assert r["flag_similarity"] == pytest.approx(0.9) and r["flag_ci95"][0] <= 0.9 <= r["flag_ci95"][1]
    edge = torch.tensor([[1.0], [0.8], [0.0]])
    assert sanity_flag(edge)["flagged"]  # >= threshold counts
    with pytest.raises(ValueError, match="flag_step"):
        sanity_flag(keeps_top, flag_step=0)


def test_head_independent_map_flagged_weight_sensitive_not(net):
    x, t = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2])
    blind = cascading_randomization(net, _energy_of("layer4"), x, t)
    # the map ignores the head: unchanged after step 1, then it changes with every stage below
    assert blind["mean_spearman"][1] == pytest.approx(1.0, abs=1e-4) and blind["flagged"]
    assert blind["mean_over_steps"] < 0.5  # the old rule (averaged over the cascade) missed it
    grad = cascading_randomization(net, "gradcam", x, t, target_layers=2)
    assert grad["flag_similarity"] < FLAG_THRESHOLD and not grad["flagged"]
    edges = cascading_randomization(net, "edges", x, t)  # a weight-free control
    assert min(edges["mean_spearman"]) == pytest.approx(1.0, abs=1e-4) and edges["flagged"]
