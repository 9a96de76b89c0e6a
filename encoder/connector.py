"""The connector: backbone hidden states + l learned queries -> l attribute tokens and the pooled vector.

Shared by both backends. The backbone sequence (image and attribute-text states) is projected to the
connector width, the l learned queries are appended, and `depth` pre-norm self-attention layers mix them
all, so every query can read any image position in the light of the attribute text. The query positions
then go through one linear layer to the generator's context width; their mean, L2-normalised, is the
vector used for search.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttentionLayer(nn.Module):
    """Pre-norm transformer encoder layer (SDPA attention, GELU MLP) with a key padding mask."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp_in = nn.Linear(width, hidden)
        self.mlp_out = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, length, 3, self.heads, width // self.heads).unbind(2)
        # (B, heads, L, width/heads) each; attention_bias (B, 1, 1, L) is 0 for real keys, -inf for padding.
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attention_bias
        )
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, width))  # (B, L, width)
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x))))  # (B, L, width)


class Connector(nn.Module):
    """`depth` self-attention layers + 1 linear layer reading backbone states with `num_queries` queries."""

    def __init__(
        self,
        input_dim: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        num_queries: int,
        context_dim: int,
    ) -> None:
        super().__init__()
        self.input_proj = nn.Linear(input_dim, width)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.layers = nn.ModuleList(SelfAttentionLayer(width, heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width)
        self.output_proj = nn.Linear(width, context_dim)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states (B, S, input_dim), mask (B, S) true at real positions -> tokens (B, l, d_ctx), pooled."""
        batch = states.shape[0]
        num_queries = self.queries.shape[0]
        x = self.input_proj(states)  # (B, S, width)
        x = torch.cat([x, self.queries.to(x.dtype).expand(batch, -1, -1)], dim=1)  # (B, S + l, width)
        keep = torch.cat([mask.bool(), mask.new_ones(batch, num_queries, dtype=torch.bool)], dim=1)
        attention_bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        attention_bias = attention_bias.masked_fill(~keep, float("-inf"))[:, None, None, :]  # (B, 1, 1, S + l)
        for layer in self.layers:
            x = layer(x, attention_bias)  # (B, S + l, width)
        tokens = self.output_proj(self.final_norm(x[:, -num_queries:]))  # (B, l, d_ctx)
        pooled = F.normalize(tokens.float().mean(dim=1), dim=-1).to(tokens.dtype)  # (B, d_ctx)
        return tokens, pooled
