"""The light convolutional decoders (fairseq ``Decoder1d``/``Decoder2d``): the only part that runs on the full length.

Each layer is conv -> (trim for even kernels) -> LayerNorm over channels without affine ->
GELU, with a residual when the shapes match and ``decoder_residual`` is set. The head is one
Linear, or Linear -> GELU -> Linear for text (``projection_layers=2``).
Module indices mirror fairseq (``blocks.<l>.0`` is the conv) so checkpoints map one to one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DecoderConfig


class _SamePad(nn.Module):
    """Drop the extra trailing step(s) that ``padding=k//2`` adds for an even kernel."""

    def __init__(self, kernel: int, dims: int):
        super().__init__()
        self.remove = 1 if kernel % 2 == 0 else 0
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.remove:
            x = x[..., :-1] if self.dims == 1 else x[..., :-1, :-1]
        return x


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over dim 1 (channels) of ``(N, C, ...)``, no affine, eps 1e-5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)
        x = F.layer_norm(x, x.shape[-1:])
        return x.movedim(-1, 1)


def _projection(cfg: DecoderConfig, embed_dim: int) -> nn.Module:
    if cfg.projection_layers <= 1:
        return nn.Linear(cfg.decoder_dim, embed_dim)
    layers: list[nn.Module] = []
    dim = cfg.decoder_dim
    for _ in range(cfg.projection_layers - 1):
        nxt = int(dim * cfg.projection_ratio)
        layers += [nn.Linear(dim, nxt), nn.GELU()]
        dim = nxt
    layers.append(nn.Linear(dim, embed_dim))
    return nn.Sequential(*layers)


class _ConvDecoder(nn.Module):
    conv_cls: type[nn.Module]
    dims: int

    def __init__(self, cfg: DecoderConfig, embed_dim: int):
        super().__init__()
        self.residual = cfg.decoder_residual
        k = cfg.decoder_kernel

        def layer(in_dim: int) -> nn.Sequential:
            # Indices 0..5 as fairseq: conv, SamePad, (transpose), LN, (transpose), GELU.
            return nn.Sequential(
                self.conv_cls(in_dim, cfg.decoder_dim, k, padding=k // 2, groups=cfg.decoder_groups),
                _SamePad(k, self.dims),
                nn.Identity(),
                _ChannelLayerNorm(),
                nn.Identity(),
                nn.GELU(),
            )

        self.blocks = nn.Sequential(
            *[layer(embed_dim if i == 0 else cfg.decoder_dim) for i in range(cfg.decoder_layers)]
        )
        self.proj = _projection(cfg, embed_dim)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        for blk in self.blocks:
            if x.is_cuda:  # cuDNN's grouped convolutions run 11% faster on contiguous NCHW than on the
                x = x.contiguous()  # channels-last views (H200, benchmarks/gpu_decoder.py); same function
            x = blk(x)
            if self.residual and residual.shape[1] == x.shape[1]:
                x = x + residual
            residual = x
        return x


class Decoder1d(_ConvDecoder):
    conv_cls = nn.Conv1d
    dims = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, D) -> (N, T, D)``."""
        x = self._run(x.transpose(1, 2))
        return self.proj(x.transpose(1, 2))


class Decoder2d(_ConvDecoder):
    conv_cls = nn.Conv2d
    dims = 2

    def __init__(self, cfg: DecoderConfig, embed_dim: int, grid: int):
        super().__init__(cfg, embed_dim)
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, D) -> (N, T, D)`` with T = grid², convolved on the patch grid."""
        n, t, c = x.shape
        x = x.transpose(1, 2).reshape(n, c, self.grid, self.grid)
        x = self._run(x)
        x = x.reshape(n, -1, t).transpose(1, 2)
        return self.proj(x)
