"""The optional convolutional ViT stem (models/vit_stem.py, zoo kwarg ``conv_stem``): same token grid and blocks as
the plain timm ViT, local tokens, timm's padding rules, weights round trip, clear errors."""
import pytest
import torch

from models.backbones import Backbone, create_timm_vit, vit_stem_kwargs
from models.vit_stem import ConvStemPatchEmbed

VIT = "deit_tiny_patch16_224"
KW = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3, depth=2, num_classes=5)


def _vit(**extra):
    return create_timm_vit(VIT, False, None, dict(KW, **extra), "test", VIT)


def test_same_grid_and_blocks_as_plain_vit():
    plain, stem = _vit(), _vit(conv_stem=[8, 16, 24])
    assert isinstance(stem.patch_embed, ConvStemPatchEmbed)
    assert stem.patch_embed.grid_size == plain.patch_embed.grid_size == (4, 4)
    assert stem.pos_embed.shape == plain.pos_embed.shape
    outside = lambda m: {k: v.shape for k, v in m.state_dict().items() if not k.startswith("patch_embed.")}  # noqa
    assert outside(stem) == outside(plain)  # blocks, norms, head: unchanged
    x = torch.rand(2, 3, 32, 32)
    assert stem.patch_embed(x).shape == plain.patch_embed(x).shape == (2, 16, 48)
    assert stem(x).shape == (2, 5)
    # three stride-2 convs for patch 8, then a 1x1 projection (Xiao et al. 2021)
    convs = [m for m in stem.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 and stem.patch_embed.proj.kernel_size == (1, 1)


def test_tokens_are_local():
    """Token (0, 0) sees a 15-px receptive field only (3x3/s2 three times): a far pixel cannot change it."""
    pe = _vit(conv_stem=[8, 16, 24]).patch_embed.eval()
    x = torch.rand(1, 3, 32, 32)
    y = x.clone()
    y[..., 24:, 24:] = 1 - y[..., 24:, 24:]
    a, b = pe(x), pe(y)
    assert torch.equal(a[0, 0], b[0, 0])
    assert not torch.allclose(a[0, -1], b[0, -1])


def test_dynamic_padding_and_backbone_and_exvit():
    v = _vit(conv_stem=[8, 16, 24], dynamic_img_size=True, dynamic_img_pad=True, num_classes=0)
    assert v.forward_features(torch.rand(1, 3, 28, 40)).shape == (1, 1 + 4 * 5, 48)
    b = Backbone(VIT, out_indices=[1], **{k: v for k, v in KW.items() if k != "num_classes"}, conv_stem=[8, 16, 24])
    assert [f.shape for f in b(torch.rand(2, 3, 32, 32))] == [(2, 48, 4, 4)]
    from models import create_model

    m = create_model("exvit", num_classes=3, backbone=VIT, attr_channels=8, num_attributes=2, attr_hidden=16,
                     fuse_layers=2, backbone_kwargs=dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3,
                                                         depth=2, conv_stem=[8, 16, 24]))
    assert isinstance(m.encoder.patch_embed, ConvStemPatchEmbed)
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_weights_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    a = _vit(conv_stem=[8, 16, 24]).eval()
    a.patch_embed.stem[1].running_mean.uniform_()  # BN statistics must travel with the weights
    path = str(tmp_path / "vit.safetensors")
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, path)
    b = create_timm_vit(VIT, False, path, dict(KW, conv_stem=[8, 16, 24]), "test", VIT).eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(a.forward_features(x), b.forward_features(x), atol=1e-6)


@pytest.mark.parametrize("kw, msg", [
    (dict(conv_stem=[8, 16]), "log2"),                       # patch 8 needs 3 stride-2 convs
    (dict(conv_stem=[8, 16, 24], patch_size=6), "power-of-two"),
    (dict(conv_stem="conv"), "list of stem widths"),
    (dict(conv_stem=[8, 16, 24], embed_layer=ConvStemPatchEmbed), "not both"),
])
def test_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _vit(**kw)


def test_refused_on_non_vit():
    with pytest.raises(ValueError, match="VisionTransformer"):
        vit_stem_kwargs("resnet18", dict(conv_stem=[8, 16]))
    assert vit_stem_kwargs("resnet18", dict(output_stride=8)) == dict(output_stride=8)
