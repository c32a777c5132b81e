"""experiments/picnn.py: the per-image evaluation against naive reference loops (spec §6).

Official stochastic ACC2: pseudo-label ~ Cat(softmax(y1)), mask ~ Ber(P[pseudo-label]), prediction from the masked
maps (= ``forward_train``). Official stochastic ACC3: mask ~ Ber(P[y]) of the *true* class, prediction from the
*complementary* filters. Mean over seeded draws, per image.
"""
import argparse

import numpy as np
import pytest
import torch

from experiments.picnn import per_image_eval
from models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")
K = 3


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = create_model("picnn", num_classes=K, backbone="resnet10t",
                         backbone_kwargs={"out_indices": [1, 2, 3], "output_stride": 8}).eval()
    with torch.no_grad():
        model.p_logits.normal_(0.0, 3.0)  # a clearly non-uniform P: which row and which complement matter
        model.fc.weight.normal_(0.0, 10.0)  # strong, varied class weights: which filters are kept changes the
        model.fc.bias.zero_()               # prediction, so the draws differ (checked below)
    g = torch.Generator().manual_seed(3)
    loader = [{"image": torch.rand(6, 3, 32, 32, generator=g), "label": torch.randint(0, K, (6,), generator=g)}
              for _ in range(2)]
    return model, loader


def reference(model, loader, draws, seed):
    """Naive: ACC2 through ``forward_train``; ACC3 with an independent Bernoulli draw and hand-written GAP + fc."""
    gens = [torch.Generator().manual_seed(seed * 1000 + d) for d in range(draws)]
    acc2, acc3 = [], []
    with torch.no_grad():
        for b in loader:
            x, y = b["image"], b["label"]
            h = model.features(x)
            c2, c3 = torch.zeros(len(y)), torch.zeros(len(y))
            for g in gens:
                c2 += (model.forward_train(x, generator=g)["logits_int"].argmax(1) == y).float()
                p = model.P[y]                                      # (B, N): row of the TRUE class
                z = (torch.rand(p.shape, generator=g) <= p).float()  # z_i ~ Ber(p_i)
                logits = h.mean(dim=(2, 3)) * (1 - z) @ model.fc.weight.T + model.fc.bias
                c3 += (logits.argmax(1) == y).float()
            acc2 += (100 * c2 / draws).tolist()
            acc3 += (100 * c3 / draws).tolist()
    return acc2, acc3


def test_sampled_acc2_acc3_match_reference(setup):
    model, loader = setup
    args = argparse.Namespace(draws=4, num_classes=K)
    out = per_image_eval(model, loader, args, seed=1)
    ref2, ref3 = reference(model, loader, draws=4, seed=1)
    assert len(out["acc2_sampled"]) == len(out["acc3_sampled"]) == 12
    np.testing.assert_allclose(out["acc2_sampled"], ref2, atol=1e-4)
    np.testing.assert_allclose(out["acc3_sampled"], ref3, atol=1e-4)
    # the draws matter (the per-image means are not all 0 / 100), so the test can tell the masks apart
    assert any(0 < v < 100 for v in out["acc3_sampled"] + out["acc2_sampled"])
    # deterministic ACC1 is the argmax of the plain forward
    with torch.no_grad():
        acc1 = [100.0 * float(v) for b in loader for v in (model(b["image"]).argmax(1) == b["label"])]
    assert out["acc1"] == acc1
    assert 0.0 <= out["mis"] <= np.log(2) and 0.0 <= out["mis_pred"] <= np.log(2)
