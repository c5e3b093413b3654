"""The single-query head against the multi-head attention form it replaces.

``MHAReferenceHead`` below is the head as it was computed before (and as the reference
``SiglipMultiheadAttentionPoolingHead`` computes it): ``torch.nn.MultiheadAttention`` over
keys and values projected per token. It loads the same state dict (same key names), so every
comparison runs both on identical weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfy_nearid.head import HeadConfig, NearIDHead


class MHAReferenceHead(nn.Module):
    """MAP head written with ``nn.MultiheadAttention``; state dict keys as in head files."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        d = config.dim
        self.probe = nn.Parameter(torch.zeros(1, 1, d))
        self.attention = nn.MultiheadAttention(d, config.num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(d, config.mlp_dim)
        self.mlp.fc2 = nn.Linear(config.mlp_dim, d)

    def forward(self, tokens, mask=None, normalize=True):
        b = tokens.shape[0]
        a, weights = self.attention(
            self.probe.expand(b, 1, -1), tokens, tokens,
            key_padding_mask=None if mask is None else ~mask,
            need_weights=True, average_attn_weights=False,
        )  # a [B, 1, D], weights [B, h, 1, N]
        x = a + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layernorm(a)), approximate="tanh"))
        x = x[:, 0]
        return (F.normalize(x, dim=-1) if normalize else x), weights[:, :, 0]


def _pair(cfg: HeadConfig, seed: int) -> tuple[NearIDHead, MHAReferenceHead]:
    torch.manual_seed(seed)
    head = NearIDHead(cfg)
    with torch.no_grad():  # non-zero biases everywhere, so the folded key bias really cancels
        for p in head.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.5)
    ref = MHAReferenceHead(cfg)
    ref.load_state_dict(head.state_dict(), strict=True)  # same keys, same tensors
    return head, ref


def _mask(b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, n, generator=g) < 0.4
    mask[0] = True  # one row unmasked
    mask[1] = False
    mask[1, n - 1] = True  # one row with a single token
    return mask


CONFIGS = [
    pytest.param(HeadConfig(dim=48, num_heads=4, mlp_dim=80), 37, id="small"),
    pytest.param(HeadConfig(dim=1152, num_heads=16, mlp_dim=512), 729, id="so400m-width"),
]


@pytest.mark.parametrize("cfg,n", CONFIGS)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_head_equals_multihead_attention_form(cfg, n, masked):
    head, ref = _pair(cfg, seed=n)
    tokens = torch.randn(3, n, cfg.dim, generator=torch.Generator().manual_seed(1))
    mask = _mask(3, n, seed=2) if masked else None
    with torch.no_grad():
        want_raw, want_attn = ref(tokens, mask, normalize=False)
        want = F.normalize(want_raw, dim=-1)
        # fused (SDPA) path, explicit-attention path, with and without normalisation
        torch.testing.assert_close(head(tokens, mask=mask), want, atol=1e-6, rtol=0)
        scale = want_raw.norm(dim=-1, keepdim=True)  # 1e-6 relative to each output's length
        raw = head(tokens, mask=mask, normalize=False)
        torch.testing.assert_close(raw / scale, want_raw / scale, atol=1e-6, rtol=0)
        emb, attn = head(tokens, mask=mask, return_attention=True)
    torch.testing.assert_close(emb, want, atol=1e-6, rtol=0)
    assert attn.shape == (3, cfg.num_heads, n)
    torch.testing.assert_close(attn, want_attn, atol=1e-6, rtol=0)
    if masked:
        assert float(attn[~mask[:, None, :].expand_as(attn)].abs().max()) == 0.0


def test_head_gradients_equal_multihead_attention_form():
    """Training sees the same loss surface: parameter gradients agree with the MHA form."""
    cfg = HeadConfig(dim=64, num_heads=4, mlp_dim=96)
    head, ref = _pair(cfg, seed=5)
    tokens = torch.randn(6, 50, 64, generator=torch.Generator().manual_seed(6))
    mask = _mask(6, 50, seed=7)
    target = torch.randn(6, 64, generator=torch.Generator().manual_seed(8))
    (head(tokens, mask=mask) * target).sum().backward()
    (ref(tokens, mask)[0] * target).sum().backward()
    ours = dict(head.named_parameters())
    for name, p in ref.named_parameters():
        g = ours[name].grad if ours[name].grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_key_bias_has_no_effect():
    """The key bias adds a per-head constant to every score, which the softmax cancels."""
    cfg = HeadConfig(dim=32, num_heads=4, mlp_dim=40)
    head, _ = _pair(cfg, seed=9)
    tokens = torch.randn(2, 11, 32)
    with torch.no_grad():
        before = head(tokens)
        head.attention.in_proj_bias[32:64].add_(3.0)
        torch.testing.assert_close(head(tokens), before, atol=1e-6, rtol=0)
        head.attention.in_proj_bias[64:].add_(0.5)  # the value bias does change the output
        assert float((head(tokens) - before).abs().max()) > 1e-3


def test_head_state_dict_keys_are_the_head_file_keys():
    head = NearIDHead(HeadConfig(dim=16, num_heads=2, mlp_dim=24))
    assert sorted(head.state_dict()) == sorted(MHAReferenceHead(head.config).state_dict())
    assert set(head.state_dict()) == {
        "probe", "attention.in_proj_weight", "attention.in_proj_bias",
        "attention.out_proj.weight", "attention.out_proj.bias", "layernorm.weight", "layernorm.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    }
