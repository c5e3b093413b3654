"""The mobilenet-v2 tokens (token_version 2, issue 21): shape, groups, the colour statistics
against an independent computation, and head files of the previous tokens refused clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfy_nearid.backbones import MOBILENET_TOKEN_GROUPS, get_backbone_spec
from comfy_nearid.checkpoint import FORMAT_VERSION, HeadMetadata, _atomic_save, read_head_metadata
from comfy_nearid.errors import HeadMismatchError, NearIDError
from comfy_nearid.head import HeadConfig, NearIDHead
from comfy_nearid.model import load_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mobilenet():
    return load_model(backbone="mobilenet-v2", pretrained=False, device="cpu", readout="mean", seed=0)


def test_tokens_have_the_registered_shape_version_and_groups(mobilenet):
    spec = mobilenet.spec
    assert spec.token_version == 2 and spec.embed_dim == sum(width for _, width in MOBILENET_TOKEN_GROUPS) == 294
    assert spec.grid_size == (14, 14) and spec.head.dim % spec.head.num_heads == 0
    pixels = torch.randn(2, 3, 224, 224)
    tokens = mobilenet.backbone(pixels)
    assert tokens.shape == (2, 196, 294)
    # the feature-map groups, recomputed here from torchvision's stages: stride 8 (blocks
    # 0-6), 16 (7-13), 32 (14-16); each layer-normalised on its own (eps 1e-5, no affine)
    feats = mobilenet.backbone.trunk.features
    with torch.no_grad():
        s8 = feats[:7](pixels)
        s16 = feats[7:14](s8)
        s32 = feats[14:17](s16)
    up32 = s32.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest, 7 -> 14
    pool8 = s8.unfold(2, 2, 2).unfold(3, 2, 2).mean(dim=(-1, -2))  # 2x2 mean, 28 -> 14
    start = 0
    for (name, width), fmap in zip(MOBILENET_TOKEN_GROUPS[:-1], (s16, up32, pool8)):
        x = fmap.double().flatten(2).transpose(1, 2)  # [B, 196, C]
        expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        assert width == fmap.shape[1]
        assert torch.allclose(tokens[..., start:start + width].double(), expected, atol=1e-4), name
        start += width
    assert MOBILENET_TOKEN_GROUPS[-1] == ("colour", 6)


def test_batch_norms_are_folded_without_changing_the_network(tmp_path):
    """The registry folds MobileNetV2's batch norms into its convolutions: same maps and pooled
    vector as torchvision's unfolded network with the same weights (non-trivial norm stats)."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(3)
    reference = mobilenet_v2().eval()
    norms = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    weights = tmp_path / "mobilenet_v2.pth"
    torch.save(reference.state_dict(), weights)
    model = load_model(backbone="mobilenet-v2", backbone_weights=weights, device="cpu", readout="mean", seed=0)
    trunk = model.backbone.trunk
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules()) and len(norms) == 52
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens, pooled = model.backbone.tokens_and_pooled(pixels)
        s8 = reference.features[:7](pixels)
        s16 = reference.features[7:14](s8)
        expected_pooled = reference.features[14:](s16).mean(dim=(2, 3))
    x = s16.double().flatten(2).transpose(1, 2)
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(tokens[..., :96].double(), expected, atol=1e-3)
    assert torch.allclose(pooled, expected_pooled, rtol=1e-4, atol=1e-4)


def test_colour_group_is_the_mean_and_std_of_the_pixels_under_each_token(mobilenet):
    spec = mobilenet.spec
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, size=(224, 224, 3))  # RGB in 0..1
    pixels = torch.from_numpy(((image - np.array(spec.mean)) / np.array(spec.std)).transpose(2, 0, 1)).float()[None]
    colour = mobilenet.backbone(pixels)[0, :, -6:].double().numpy()  # [196, 6]
    for row, col in ((0, 0), (3, 11), (13, 13)):
        cell = image[16 * row:16 * (row + 1), 16 * col:16 * (col + 1)].reshape(-1, 3)
        expected = np.concatenate([cell.mean(0), cell.std(0)])
        assert colour[row * 14 + col] == pytest.approx(expected, abs=1e-4)


def test_tokens_of_a_batch_do_not_depend_on_the_batch(mobilenet):
    pixels = torch.randn(3, 3, 224, 224)
    together = mobilenet.backbone(pixels)
    alone = mobilenet.backbone(pixels[1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-4)


def _write_head(path, spec_name: str, config: HeadConfig, *, format_version: int, token_version: int | None):
    spec = get_backbone_spec(spec_name)
    head = NearIDHead(config)
    meta = HeadMetadata.for_backbone(spec, config)
    meta.format_version = format_version
    strings = meta.to_strings()
    if token_version is None:
        del strings["token_version"]  # version 1 files predate the field
    else:
        strings["token_version"] = str(token_version)
    _atomic_save({k: v.contiguous() for k, v in head.state_dict().items()}, strings, path)
    return path


def test_saved_heads_carry_the_format_and_token_version(tmp_path, mobilenet):
    path = mobilenet.save_head(tmp_path / "h.safetensors")
    meta = read_head_metadata(path)
    assert meta.format_version == FORMAT_VERSION == 2 and meta.token_version == 2
    assert load_model(head=path, pretrained=False, device="cpu").spec.name == "mobilenet-v2"


def test_a_head_of_the_previous_mobilenet_tokens_is_refused_clearly(tmp_path):
    # what the library wrote before issue 21: format version 1, 256-d tokens, 4 heads
    old = _write_head(tmp_path / "old.safetensors", "mobilenet-v2", HeadConfig(256, 4, 1024),
                      format_version=1, token_version=None)
    meta = read_head_metadata(old)  # the file itself still reads
    assert meta.format_version == 1 and meta.token_version == 1 and meta.embed_dim == 256
    with pytest.raises(HeadMismatchError) as info:
        load_model(head=old, pretrained=False, device="cpu")
    message = str(info.value)
    assert isinstance(info.value, NearIDError)
    assert "old.safetensors" in message and "version 1 of the mobilenet-v2 tokens" in message
    assert "builds version 2" in message and "retrain" in message


def test_format_version_1_heads_of_unchanged_tokens_still_load(tmp_path):
    spec = get_backbone_spec("tiny-siglip")
    path = _write_head(tmp_path / "v1.safetensors", "tiny-siglip", spec.head, format_version=1, token_version=None)
    model = load_model(head=path, pretrained=False, device="cpu")
    assert model.spec.name == "tiny-siglip" and read_head_metadata(path).token_version == 1


def test_a_version_2_file_without_its_token_version_is_refused(tmp_path):
    spec = get_backbone_spec("tiny-siglip")
    path = _write_head(tmp_path / "bad.safetensors", "tiny-siglip", spec.head, format_version=2, token_version=None)
    with pytest.raises(NearIDError, match="token_version"):
        read_head_metadata(path)


def test_mean_readout_identity_names_the_token_version(mobilenet):
    assert mobilenet.identity.endswith("tokens=v2")
    pooled = load_model(backbone="mobilenet-v2", pretrained=False, device="cpu", readout="pooled", seed=0)
    assert "tokens=" not in pooled.identity  # the backbone's own pooling did not change


def test_feature_cache_identity_names_the_token_version(mobilenet):
    from trainer.feature_cache import CacheIdentity, cache_identity

    identity = cache_identity(mobilenet, "float16")
    assert identity.tokens == 2 and identity.dim == 294
    old = CacheIdentity(**{**identity.__dict__, "tokens": 1, "dim": 256})
    assert any(d.startswith("tokens:") for d in identity.differences(old))


def test_tokens_alone_equal_the_tokens_of_the_joint_pass(mobilenet):
    """forward() skips the layers of the own pooled readout; its tokens are the joint pass's."""
    pixels = torch.randn(2, 3, 224, 224)
    calls = []
    hook = mobilenet.backbone.trunk.features[18].register_forward_hook(lambda *a: calls.append(1))
    try:
        alone = mobilenet.backbone(pixels)
        assert not calls  # the 1x1 convolution to 1280 channels did not run
        joint, pooled = mobilenet.backbone.tokens_and_pooled(pixels)
        assert calls and pooled.shape == (2, 1280)
    finally:
        hook.remove()
    assert torch.equal(alone, joint)


@pytest.mark.parametrize("groups,bias,layout", [(1, True, "nchw"), (8, True, "channels_last"), (1, False, "channels_last")])
def test_fused_convolution_with_relu6_equals_the_two_steps(groups, bias, layout):
    """Conv2dReLU6 (one oneDNN call on CPU) against torch's convolution then clamp to [0, 6]."""
    from comfy_nearid.backbones import Conv2dReLU6

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=groups, bias=bias)
    conv.weight.data.mul_(8.0)  # outputs well past 6 and below 0: both ends of the clamp act
    fused = Conv2dReLU6(8, 16, 3, stride=2, padding=1, groups=groups, bias=bias)
    fused.load_state_dict(conv.state_dict())
    x = torch.randn(3, 8, 20, 20)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv(x).clamp(0.0, 6.0)
        got = fused(x)
    assert (expected == 0).any() and (expected == 6).any()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    # fallbacks: gradients, float64
    xg = x.detach().clone().requires_grad_(True)
    fused(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(fused.double()(x.double()), conv.double()(x.double()).clamp(0, 6))


def test_fusion_keeps_the_state_dict_and_fuses_every_conv_relu6_pair():
    from torchvision.models import mobilenet_v2

    from comfy_nearid.backbones import Conv2dReLU6, fold_batch_norms, fuse_conv_relu6

    torch.manual_seed(1)
    reference = mobilenet_v2().eval()
    for bn in (m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    relu6 = sum(isinstance(m, torch.nn.ReLU6) for m in reference.modules())
    import copy

    trunk = copy.deepcopy(reference)
    fold_batch_norms(trunk)
    keys = {k: v.shape for k, v in trunk.state_dict().items()}
    assert fuse_conv_relu6(trunk) == relu6 == 35
    assert {k: v.shape for k, v in trunk.state_dict().items()} == keys
    assert not any(isinstance(m, torch.nn.ReLU6) for m in trunk.modules())
    assert sum(isinstance(m, Conv2dReLU6) for m in trunk.modules()) == 35
    x = torch.randn(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(trunk.features(x), reference.features(x), atol=1e-4, rtol=1e-4)
