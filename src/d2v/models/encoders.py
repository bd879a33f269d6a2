"""Modality encoders: image patches, speech waveform CNN, text tokens (fairseq ``ImageEncoder``,
``AudioEncoder``, ``TextEncoder`` over ``ModalitySpecificEncoder``).

Each encoder turns a raw batch into local features ``(B, T, D)`` (``local_features``) and then
into the input of the shared blocks (``contextualize``): positions, clone x M, drop the masked
tokens, prepend extra tokens, run the context encoder (input LayerNorm, dropout, prenet).
It also owns its decoder and knows how to draw its own masks.

Submodule names mirror fairseq's ``ModalitySpecificEncoder`` so that converted checkpoints map
key for key (the only renames: ``fixed_positional_encoder.positions`` is the buffer
``pos_embed``; the modality keys are lower case).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from d2v.errors import InputError

from . import masking
from .blocks import attention_bias, make_blocks, run_blocks
from .config import ImageConfig, ModalityConfig, ModelConfig, SpeechConfig, TextConfig, parse_conv_spec
from .decoders import Decoder1d, Decoder2d, _ChannelLayerNorm, _SamePad


@dataclass
class Contextualized:
    x: torch.Tensor  # (N, E + K, D): input of the shared blocks
    bias: torch.Tensor | None  # additive attention bias for the shared blocks
    padding_mask: torch.Tensor | None  # (N, E + K) True = pad, or None


class ContextEncoder(nn.Module):
    """fairseq ``BlockEncoder`` (post-LN): LayerNorm on the *input*, dropout, prenet blocks."""

    def __init__(self, cfg: ModelConfig, mcfg: ModalityConfig, use_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if use_norm else None
        self.dropout = nn.Dropout(mcfg.prenet_dropout)
        n = mcfg.prenet_depth
        blocks = make_blocks(
            n, cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps,
            cfg.attention_dropout, cfg.encoder_dropout, cfg.activation_dropout, cfg.post_mlp_drop, [0.0] * n,
        )
        self.blocks = nn.ModuleList(blocks)
        self.layerdrop = mcfg.prenet_layerdrop

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        x = self.dropout(x)
        if len(self.blocks):
            x, _ = run_blocks(self.blocks, x, bias, self.layerdrop)
        return x


def _check_float(source: torch.Tensor, want: torch.dtype, what: str) -> None:
    if source.dtype != want:
        raise InputError(f"{what} must be a {want} tensor (the weights' dtype), got {source.dtype}; convert it first")


class _GradMultiply(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` backward (fairseq's ``GradMultiply``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class ModalityEncoder(nn.Module):
    modality: str = ""

    def __init__(self, cfg: ModelConfig, mcfg: ModalityConfig, use_context_norm: bool):
        super().__init__()
        self.cfg = cfg
        self.mcfg = mcfg
        self.context_encoder = ContextEncoder(cfg, mcfg, use_context_norm)
        self.num_extra_tokens = mcfg.num_extra_tokens
        if self.num_extra_tokens > 0:
            self.extra_tokens = nn.Parameter(torch.zeros(1, self.num_extra_tokens, cfg.embed_dim))
        else:
            self.extra_tokens = None

    # -- per-modality hooks -------------------------------------------------------------------
    def check_input(self, source: torch.Tensor) -> None:
        raise NotImplementedError

    def local_features(self, source: torch.Tensor) -> torch.Tensor:
        """The local encoder's features of ``source``, ``(B, T, D)``: ``project_local(local_encoder(source))``."""
        return self.project_local(self._run_local(source))

    def project_local(self, local_out: torch.Tensor) -> torch.Tensor:
        """``local_encoder``'s raw output -> ``(B, T, D)`` (the identity but for speech)."""
        return local_out

    def _run_local(self, source: torch.Tensor) -> torch.Tensor:
        """``local_encoder(source)`` with its gradient scaled by ``local_grad_mult`` (fairseq)."""
        mult = self.mcfg.local_grad_mult
        if mult == 1.0 or not torch.is_grad_enabled():
            return self.local_encoder(source)
        if mult == 0.0:
            with torch.no_grad():
                return self.local_encoder(source)
        return _GradMultiply.apply(self.local_encoder(source), mult)

    def make_mask(self, rows: int, length: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return masking.make_mask(self.modality, self.mcfg, rows, length, generator, device)

    def num_masked(self, length: int) -> int:
        """The exact masked count per row that ``make_mask`` gives for ``length`` tokens."""
        return masking.num_masked(self.modality, self.mcfg, length)

    def num_tokens(self, source_shape: tuple[int, ...]) -> int:
        """How many tokens (patches, frames, ids) a sample of this shape becomes."""
        return masking.num_tokens(self.modality, self.mcfg, source_shape)

    def _positions(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Full-length positional term added before tokens are dropped (fixed or conv)."""
        return x

    def _alibi(self, keep_idx: torch.Tensor | None, n: int, length: int, device, dtype) -> torch.Tensor | None:
        return None

    def padding_from_source(self, source: torch.Tensor) -> torch.Tensor | None:
        return None

    # -- shared path --------------------------------------------------------------------------
    def contextualize(
        self,
        local: torch.Tensor,
        clones: int = 1,
        mask: torch.Tensor | None = None,
        keep_idx: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> Contextualized:
        """Local features ``(B, T, D)`` -> block input for ``B*clones`` rows, visible tokens only."""
        x = local
        if clones > 1:
            x = x.repeat_interleave(clones, 0)
            if padding_mask is not None:
                padding_mask = padding_mask.repeat_interleave(clones, 0)
        x = self._positions(x, mask)
        if keep_idx is not None:
            x = _gather_tokens(x, keep_idx)
            if padding_mask is not None:
                padding_mask = padding_mask.gather(1, keep_idx)
        n, length = x.shape[0], local.shape[1]
        alibi = self._alibi(keep_idx, n, length, x.device, x.dtype)
        if self.extra_tokens is not None:
            x = torch.cat([self.extra_tokens.expand(n, -1, -1).to(x.dtype), x], dim=1)
            if padding_mask is not None:
                padding_mask = F.pad(padding_mask, (self.num_extra_tokens, 0), value=False)
        bias = attention_bias(padding_mask, alibi, x.dtype if x.dtype != torch.bfloat16 else torch.float32)
        x = self.context_encoder(x, bias)
        return Contextualized(x, bias, padding_mask)

    def reset_parameters(self) -> None:
        """Re-initialise what fairseq re-initialises after BERT init (fairseq ``Data2VecMultiModel.__init__``)."""
        if self.extra_tokens is not None:
            nn.init.normal_(self.extra_tokens)


# ---------------------------------------------------------------------------------------------
# Image
# ---------------------------------------------------------------------------------------------
def sincos_2d(embed_dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table ``(1, grid*grid, D)``, computed in float64 like numpy there."""

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.arange(grid, dtype=np.float32)
    gw, gh = np.meshgrid(g, g)  # w first, as MAE
    emb = np.concatenate([one_d(embed_dim // 2, gw), one_d(embed_dim // 2, gh)], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ImageEncoder(ModalityEncoder):
    modality = "image"

    def __init__(self, cfg: ModelConfig, mcfg: ImageConfig):
        super().__init__(cfg, mcfg, use_context_norm=True)
        self.grid = mcfg.input_size // mcfg.patch_size
        self.local_encoder = PatchEmbed(mcfg.patch_size, mcfg.in_chans, cfg.embed_dim)
        w = self.local_encoder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        # A buffer, not a parameter: it is never trained, and the EMA copies buffers.
        self.register_buffer("pos_embed", sincos_2d(cfg.embed_dim, self.grid), persistent=True)
        self.decoder = Decoder2d(mcfg.decoder, cfg.embed_dim, self.grid)

    def check_input(self, source: torch.Tensor) -> None:
        m: ImageConfig = self.mcfg  # type: ignore[assignment]
        want = (m.in_chans, m.input_size, m.input_size)
        if source.ndim != 4 or tuple(source.shape[1:]) != want:
            raise InputError(f"image batch must have shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(source.shape)}")
        _check_float(source, self.local_encoder.proj.weight.dtype, "image batch: a float tensor of normalised pixels")

    def contextualize(self, local, clones=1, mask=None, keep_idx=None, padding_mask=None) -> Contextualized:
        # Positions go on before cloning (same result, M times less work).
        x = local + self.pos_embed.to(local.dtype)
        if clones > 1:
            x = x.repeat_interleave(clones, 0)
        if keep_idx is not None:
            x = _gather_tokens(x, keep_idx)
        x = torch.cat([self.extra_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return Contextualized(self.context_encoder(x, None), None, None)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for mod in self.decoder.proj.modules():
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()


# ---------------------------------------------------------------------------------------------
# Speech
# ---------------------------------------------------------------------------------------------
class Fp32LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.type_as(x)


class _Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-2, -1)


class _ChannelFp32LayerNorm(nn.Module):
    """``Sequential(TransposeLast, Fp32LayerNorm, TransposeLast)`` of fairseq, same key layout."""

    def __init__(self, dim: int):
        super().__init__()
        self.add_module("0", _Transpose())
        self.add_module("1", Fp32LayerNorm(dim, elementwise_affine=True))
        self.add_module("2", _Transpose())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, "1")(x.transpose(-2, -1)).transpose(-2, -1)


class ConvFeatureExtractor(nn.Module):
    """wav2vec 2.0 waveform CNN in ``layer_norm`` mode: bias-free convs, fp32 LN, GELU."""

    def __init__(self, spec: list[tuple[int, int, int]]):
        super().__init__()
        layers = []
        in_d = 1
        for dim, k, stride in spec:
            conv = nn.Conv1d(in_d, dim, k, stride=stride, bias=False)
            nn.init.kaiming_normal_(conv.weight)
            layers.append(nn.Sequential(conv, nn.Dropout(0.0), _ChannelFp32LayerNorm(dim), nn.GELU()))
            in_d = dim
        self.conv_layers = nn.ModuleList(layers)
        self.spec = spec

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav.unsqueeze(1)
        for layer in self.conv_layers:
            x = layer(x)
        return x  # (B, C, T)

    def output_length(self, samples: int) -> int:
        return masking.conv_output_length(self.spec, samples)


def alibi_slopes(heads: int) -> list[float]:
    """Press et al. ALiBi slopes, as fairseq's ``get_alibi``."""

    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return pow2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return pow2(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


class SpeechEncoder(ModalityEncoder):
    modality = "speech"

    def __init__(self, cfg: ModelConfig, mcfg: SpeechConfig):
        super().__init__(cfg, mcfg, use_context_norm=True)
        spec = parse_conv_spec(mcfg.feature_encoder_spec)
        self.local_encoder = ConvFeatureExtractor(spec)
        c = spec[-1][0]
        self.project_features = nn.Sequential(_Transpose(), nn.LayerNorm(c), nn.Linear(c, cfg.embed_dim))
        k = max(3, mcfg.conv_pos_width // mcfg.conv_pos_depth)
        d = cfg.embed_dim
        self.relative_positional_encoder = nn.Sequential(
            _Transpose(),
            *[
                nn.Sequential(
                    nn.Conv1d(d, d, k, padding=k // 2, groups=mcfg.conv_pos_groups),
                    _SamePad(k, 1), nn.Identity(), _ChannelLayerNorm(), nn.Identity(), nn.GELU(),
                )
                for _ in range(mcfg.conv_pos_depth)
            ],
            _Transpose(),
        )
        if mcfg.use_alibi:
            self.register_buffer("slopes", torch.tensor(alibi_slopes(cfg.num_heads)), persistent=False)
            self.alibi_scale = nn.Parameter(torch.ones(1, 1, cfg.num_heads, 1, 1), requires_grad=mcfg.learned_alibi_scale)
        else:
            self.alibi_scale = None
        self.decoder = Decoder1d(mcfg.decoder, cfg.embed_dim)

    def check_input(self, source: torch.Tensor) -> None:
        if source.ndim != 2:
            raise InputError(f"speech batch must be a (B, samples) waveform tensor, got shape {tuple(source.shape)}")
        _check_float(source, self.project_features[2].weight.dtype, "speech batch: a float waveform")
        if self.local_encoder.output_length(source.shape[1]) < 2:
            raise InputError(f"speech clip of {source.shape[1]} samples is too short for the feature extractor")

    def project_local(self, local_out: torch.Tensor) -> torch.Tensor:
        return self.project_features(local_out)  # (B, C, frames) -> LayerNorm, Linear -> (B, frames, D)

    def _positions(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # Masked frames are zeroed before the conv positional net sees the full length (fairseq
        # ``ModalitySpecificEncoder.contextualized_features``).
        x0 = x if mask is None or not self.mcfg.encoder_zero_mask else x * (~mask).unsqueeze(-1).to(x.dtype)
        return x + self.relative_positional_encoder(x0)

    def _alibi(self, keep_idx, n, length, device, dtype) -> torch.Tensor | None:
        if self.alibi_scale is None:
            return None
        # Build the bias straight from kept positions: same values as gathering rows and columns
        # of the (T, T) table, without materialising it.
        pos = keep_idx if keep_idx is not None else torch.arange(length, device=device).expand(n, -1)
        pos = pos.float()
        dist = -(pos[:, :, None] - pos[:, None, :]).abs()
        bias = self.slopes.view(1, -1, 1, 1) * dist[:, None]
        return bias * self.alibi_scale.clamp_min(0).view(1, -1, 1, 1)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.alibi_scale is not None:
            self.alibi_scale.data.fill_(1.0)
        for mod in self.project_features.children():
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()
        for mod in self.decoder.proj.modules():
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------
class TextLocalEncoder(nn.Module):
    """Token + learned (pad-offset) position embeddings, embedding LayerNorm, dropout."""

    def __init__(self, cfg: ModelConfig, mcfg: TextConfig):
        super().__init__()
        self.pad_idx = mcfg.pad_idx
        self.embed_tokens = nn.Embedding(mcfg.vocab_size, cfg.embed_dim, padding_idx=mcfg.pad_idx)
        self.embed_positions = nn.Embedding(mcfg.max_source_positions + mcfg.pad_idx + 1, cfg.embed_dim, padding_idx=mcfg.pad_idx)
        self.layernorm_embedding = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(mcfg.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        not_pad = tokens.ne(self.pad_idx).int()
        positions = (torch.cumsum(not_pad, dim=1) * not_pad).long() + self.pad_idx
        x = self.embed_tokens(tokens) + self.embed_positions(positions)
        return self.dropout(self.layernorm_embedding(x))


class TextEncoder(ModalityEncoder):
    modality = "text"

    def __init__(self, cfg: ModelConfig, mcfg: TextConfig):
        super().__init__(cfg, mcfg, use_context_norm=mcfg.prenet_depth > 0)
        self.local_encoder = TextLocalEncoder(cfg, mcfg)
        self.decoder = Decoder1d(mcfg.decoder, cfg.embed_dim)

    def check_input(self, source: torch.Tensor) -> None:
        """Shape and dtype always; the id range only for a batch on the CPU: on a GPU, reading
        min/max back would stall the host every step, so the callers check the CPU batch before
        the transfer (``d2v.train.pretrain.train_step``, ``finetune``, ``evaluate``,
        ``d2v.inference.encode``)."""
        m: TextConfig = self.mcfg  # type: ignore[assignment]
        if source.ndim != 2:
            raise InputError(f"text batch must be (B, T) token ids, got shape {tuple(source.shape)}")
        if source.dtype not in (torch.int64, torch.int32):
            raise InputError(f"text batch must hold integer token ids, got dtype {source.dtype}")
        if source.shape[1] > m.max_source_positions:
            raise InputError(f"text length {source.shape[1]} exceeds max_source_positions={m.max_source_positions}")
        if source.device.type == "cpu" and source.numel() and (int(source.min()) < 0 or int(source.max()) >= m.vocab_size):
            raise InputError(f"token ids must be in [0, {m.vocab_size}), got range [{int(source.min())}, {int(source.max())}]")

    def padding_from_source(self, source: torch.Tensor) -> torch.Tensor | None:
        pad = source.eq(self.mcfg.pad_idx)  # type: ignore[attr-defined]
        return pad



ENCODERS = {"image": ImageEncoder, "speech": SpeechEncoder, "text": TextEncoder}
