"""Transformer blocks shared by every modality (fairseq ``AltBlock``/``AltAttention``).

Post-LN blocks that also return the FFN output *before* the residual and the second LayerNorm:
that tensor, not the block output, is what the teacher's targets are built from.
Attention goes through ``F.scaled_dot_product_attention`` with ALiBi and key padding folded
into one additive bias.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DropPath(nn.Module):
    """Stochastic depth per sample (timm semantics)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(n, t, c)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """timm ``Mlp``: fc1 -> exact GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Post-LN block returning ``(x, ffn_out)``; ``ffn_out`` is the target tap."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        mlp_drop: float = 0.0,
        post_mlp_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=mlp_drop)
        self.post_mlp_dropout = nn.Dropout(post_mlp_drop)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.drop_path(self.attn(x, bias))
        r = x = self.norm1(x)
        t = self.mlp(x)
        x = self.norm2(r + self.drop_path(self.post_mlp_dropout(t)))
        return x, t


def attention_bias(
    padding_mask: torch.Tensor | None,
    alibi: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Fold key padding (True = pad) and an ALiBi bias into one additive attention bias."""
    bias = alibi
    if padding_mask is not None:
        pad = torch.zeros(padding_mask.shape, dtype=dtype, device=padding_mask.device)
        pad = pad.masked_fill(padding_mask, float("-inf"))[:, None, None, :]
        bias = pad if bias is None else bias.to(dtype) + pad
    return bias


def run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    layerdrop: float = 0.0,
    collect_from: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``blocks``; return the output and the FFN outputs of blocks ``collect_from..end``.

    Layerdrop is drawn once per forward for the whole batch, in training mode only (fairseq).
    """
    ffn: list[torch.Tensor] = []
    keep = None
    if layerdrop > 0 and len(blocks) and blocks[0].training:
        keep = (torch.rand(len(blocks)) > layerdrop).tolist()
    for i, blk in enumerate(blocks):
        if keep is not None and not keep[i]:
            continue
        x, t = blk(x, bias)
        if collect_from is not None and i >= collect_from:
            ffn.append(t)
    return x, ffn


def make_blocks(
    n: int,
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    norm_eps: float,
    attn_drop: float,
    proj_drop: float,
    mlp_drop: float,
    post_mlp_drop: float,
    drop_path_rates: list[float],
) -> list[Block]:
    return [
        Block(dim, num_heads, mlp_ratio, norm_eps, attn_drop, proj_drop, mlp_drop, post_mlp_drop, drop_path_rates[i])
        for i in range(n)
    ]
