"""The NearID head: SigLIP's multi-head attention pooling (MAP), with masks and attention maps.

One learned query (the probe) attends over the backbone's patch tokens with multi-head
attention; the result goes through a LayerNorm + MLP residual and is L2-normalised:

    a = MHA(probe, tokens, tokens)                 # [B, 1, D]
    x = a + MLP(LayerNorm(a))                      # MLP: D -> mlp_dim -> D, GELU (tanh)
    embedding = x[:, 0] / ||x[:, 0]||              # [B, D]

Parameter names follow the reference (Hugging Face ``SiglipMultiheadAttentionPoolingHead``):
``probe``, ``attention.in_proj_weight`` (q, k, v stacked), ``attention.in_proj_bias``,
``attention.out_proj``, ``layernorm``, ``mlp.fc1``, ``mlp.fc2``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError


@dataclass(frozen=True)
class HeadConfig:
    """Shape of a MAP head. ``dim`` is the token width and the embedding size."""

    dim: int
    num_heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise InvalidInputError(f"head dim {self.dim} is not divisible by num_heads {self.num_heads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class NearIDHead(nn.Module):
    """Multi-head attention pooling over patch tokens, returning L2-normalised embeddings."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.probe = nn.Parameter(torch.empty(1, 1, d))
        self.attention = _Attention(d)
        self.layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = _MLP(d, config.mlp_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh initialisation (used when the backbone has no pooling head of its own)."""
        d = self.config.dim
        nn.init.trunc_normal_(self.probe, std=d**-0.5)
        nn.init.xavier_uniform_(self.attention.in_proj_weight)
        nn.init.zeros_(self.attention.in_proj_bias)
        for lin in (self.attention.out_proj, self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def _check(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        if tokens.ndim != 3 or tokens.shape[-1] != self.config.dim:
            raise InvalidInputError(
                f"head expects tokens [B, N, {self.config.dim}], got {tuple(tokens.shape)}"
            )
        if mask is None:
            return None
        if mask.shape != tokens.shape[:2]:
            raise InvalidInputError(
                f"token mask must have shape {tuple(tokens.shape[:2])} (batch, tokens), got {tuple(mask.shape)}"
            )
        mask = mask.to(device=tokens.device, dtype=torch.bool)
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise InvalidInputError(f"token mask selects no token for batch item(s) {empty}")
        return mask

    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_attention: bool = False,
        normalize: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Pool tokens ``[B, N, D]`` into embeddings ``[B, D]``.

        ``mask`` (bool ``[B, N]``, True = attend) restricts the attention to those tokens;
        with ``return_attention`` also returns the attention weights ``[B, heads, N]``.

        Computed in the single-query form (same result as multi-head attention with the
        stacked ``in_proj`` weights, far less work): with one query, head ``h``'s score for
        token ``x`` is ``q_h . (W_k,h x + b_k,h) / sqrt(hd) = x . u_h + const`` with
        ``u_h = W_k,h^T q_h / sqrt(hd)`` (the constant ``q_h . b_k,h`` cancels in the
        softmax), and since the weights sum to one, ``sum_n w_n (W_v,h x_n + b_v,h) =
        W_v,h (sum_n w_n x_n) + b_v,h``. So no key or value is ever computed per token:
        the tokens are scored against ``heads`` vectors, pooled, then projected once.
        """
        mask = self._check(tokens, mask)
        b, n, d = tokens.shape
        h = self.config.num_heads
        hd = d // h
        w, bias = self.attention.in_proj_weight, self.attention.in_proj_bias
        q = F.linear(self.probe.reshape(1, d), w[:d], bias[:d]).reshape(h, hd)
        w_k = w[d : 2 * d].reshape(h, hd, d)
        query = torch.einsum("he,hed->hd", q, w_k) / math.sqrt(hd)  # [h, D]: W_k folded in
        query = query.to(tokens.dtype)
        if return_attention or torch.is_grad_enabled():
            # Explicit softmax (also when training: its backward skips the token gradients
            # that the fused kernel's backward computes whether or not they are needed).
            scores = tokens @ query.T  # [B, N, h]
            if mask is not None:
                scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
            weights = scores.transpose(1, 2).softmax(dim=-1)  # [B, h, N]
            pooled_tokens = weights @ tokens  # [B, h, D]
        else:
            # The heads are the fused kernel's query positions: one softmax over N per head.
            attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, N]
            pooled_tokens = F.scaled_dot_product_attention(
                query.expand(b, 1, h, d), tokens[:, None], tokens[:, None], attn_mask=attn_mask, scale=1.0
            )[:, 0]  # [B, h, D]
        w_v = w[2 * d :].reshape(h, hd, d)
        pooled = torch.einsum("bhd,hed->bhe", pooled_tokens, w_v.to(pooled_tokens.dtype))
        pooled = pooled.reshape(b, 1, d) + bias[2 * d :].to(pooled.dtype)  # [B, 1, D]
        x = self.attention.out_proj(pooled)
        x = x + self.mlp(self.layernorm(x))
        x = x[:, 0]
        if normalize:
            x = F.normalize(x.float(), dim=-1).to(x.dtype)
        if return_attention:
            return x, weights
        return x

    # ----------------------------------------------------------------- conversions
    @staticmethod
    def state_from_timm_attn_pool(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a timm ``AttentionPoolLatent`` state dict (``latent``, ``q``, ``kv``, ``proj``,
        ``norm``, ``mlp.fc1/fc2``) to this head's parameter names."""
        return {
            "probe": sd["latent"],
            "attention.in_proj_weight": torch.cat([sd["q.weight"], sd["kv.weight"]], 0),
            "attention.in_proj_bias": torch.cat([sd["q.bias"], sd["kv.bias"]], 0),
            "attention.out_proj.weight": sd["proj.weight"],
            "attention.out_proj.bias": sd["proj.bias"],
            "layernorm.weight": sd["norm.weight"],
            "layernorm.bias": sd["norm.bias"],
            "mlp.fc1.weight": sd["mlp.fc1.weight"],
            "mlp.fc1.bias": sd["mlp.fc1.bias"],
            "mlp.fc2.weight": sd["mlp.fc2.weight"],
            "mlp.fc2.bias": sd["mlp.fc2.bias"],
        }

    @staticmethod
    def state_to_timm_attn_pool(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`state_from_timm_attn_pool`."""
        d = sd["probe"].shape[-1]
        w, b = sd["attention.in_proj_weight"], sd["attention.in_proj_bias"]
        return {
            "latent": sd["probe"],
            "q.weight": w[:d],
            "q.bias": b[:d],
            "kv.weight": w[d:],
            "kv.bias": b[d:],
            "proj.weight": sd["attention.out_proj.weight"],
            "proj.bias": sd["attention.out_proj.bias"],
            "norm.weight": sd["layernorm.weight"],
            "norm.bias": sd["layernorm.bias"],
            "mlp.fc1.weight": sd["mlp.fc1.weight"],
            "mlp.fc1.bias": sd["mlp.fc1.bias"],
            "mlp.fc2.weight": sd["mlp.fc2.weight"],
            "mlp.fc2.bias": sd["mlp.fc2.bias"],
        }
