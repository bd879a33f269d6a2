"""Mask generators and each modality's input geometry (token and masked counts). Convention: a bool tensor ``(rows, T)`` with True = masked.

All three give *exactly* the same masked count in every row, which is what lets the student
pack the visible tokens of all clones into one dense ``(B*M, K, D)`` tensor. They are
vectorised over rows (no Python loop), so the data loader can draw ``B*M`` masks at once.

The block generators follow fairseq's ``compute_block_mask_2d``/``compute_block_mask_1d``:
random block centres (with replacement), blocks clamped at the border, then random single
positions are marked or unmarked to hit the exact count. fairseq does that last step with
``torch.multinomial`` row by row; here ``topk`` over ``marked + U(0,1)`` picks the same uniform
subset for all rows at once.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _equalize(marked: torch.Tensor, target: int, generator: torch.Generator | None) -> torch.Tensor:
    """Return a bool mask with exactly ``target`` True per row.

    Rows with too many marks lose a uniformly random subset of them; rows with too few gain a
    uniformly random subset of the unmarked positions.
    """
    score = marked.float() + torch.rand(marked.shape, generator=generator, device=marked.device)
    idx = score.topk(target, dim=1).indices
    out = torch.zeros_like(marked, dtype=torch.bool)
    out.scatter_(1, idx, True)
    return out


def block_mask_2d(
    rows: int,
    num_patches: int,
    mask_prob: float,
    mask_length: int,
    mask_prob_adjust: float = 0.0,
    inverse: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Inverse block masking on a square grid (images). Returns bool ``(rows, L)``, True = masked."""
    side = int(math.isqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"block_mask_2d needs a square number of patches, got {num_patches}")
    if mask_length < 2:
        raise ValueError(f"block_mask_2d needs mask_length >= 2, got {mask_length}")
    p = 1.0 - mask_prob if inverse else mask_prob
    n_centers = int(num_patches * ((p + mask_prob_adjust) / mask_length**2))
    target = int(num_patches * p)
    if target < 1 or target >= num_patches:
        raise ValueError(f"mask_prob={mask_prob} leaves {target} of {num_patches} patches marked")
    centers = torch.randint(0, num_patches, (rows, n_centers), generator=generator, device=device)
    cy, cx = centers // side, centers % side
    off = torch.arange(mask_length, device=device) - mask_length // 2
    ys = (cy[:, :, None, None] + off[None, None, :, None]).clamp_(0, side - 1)
    xs = (cx[:, :, None, None] + off[None, None, None, :]).clamp_(0, side - 1)
    flat = (ys * side + xs).reshape(rows, -1)
    marked = torch.zeros(rows, num_patches, dtype=torch.bool, device=device)
    marked.scatter_(1, flat, True)
    marked = _equalize(marked, target, generator)
    return ~marked if inverse else marked


def block_mask_1d(
    rows: int,
    length: int,
    mask_prob: float,
    mask_length: int,
    mask_prob_adjust: float = 0.0,
    inverse: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Span masking (speech). Returns bool ``(rows, T)`` with exactly ``int(T*mask_prob)`` masked."""
    p = 1.0 - mask_prob if inverse else mask_prob
    n_centers = int(length * ((p + mask_prob_adjust) / mask_length))
    target = int(length * p)
    if target < 1 or target >= length:
        raise ValueError(f"mask_prob={mask_prob} gives {target} masked of {length} frames; need 1..{length - 1}")
    marked = torch.zeros(rows, length, dtype=torch.bool, device=device)
    if n_centers > 0:
        centers = torch.randint(0, length, (rows, n_centers), generator=generator, device=device)
        off = torch.arange(mask_length, device=device) - mask_length // 2
        pos = (centers[:, :, None] + off).clamp_(0, length - 1).reshape(rows, -1)
        marked.scatter_(1, pos, True)
    marked = _equalize(marked, target, generator)
    return ~marked if inverse else marked


def random_mask(
    rows: int,
    length: int,
    mask_prob: float,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """MAE-style random masking (text): keeps ``int(T*(1-mask_prob))`` tokens per row."""
    keep = int(length * (1 - mask_prob))
    if keep < 1 or keep >= length:
        raise ValueError(f"mask_prob={mask_prob} keeps {keep} of {length} tokens; need 1..{length - 1}")
    noise = torch.rand(rows, length, generator=generator, device=device)
    ids_keep = noise.argsort(dim=1)[:, :keep]
    mask = torch.ones(rows, length, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_keep, False)
    return mask


# ------------------------------------------------------------------------------ input geometry
# One owner for "how many tokens does a sample become, and how many of them are masked": the
# encoders and the data loaders (which draw masks in their workers) both call these.
def conv_output_length(spec: list[tuple[int, int, int]], samples: int) -> int:
    """Frames out of the speech CNN for ``samples`` input samples (no padding, as fairseq's
    ``ConvFeatureExtractionModel``; its ``_get_feat_extract_output_lengths``)."""
    for _, kernel, stride in spec:
        samples = (samples - kernel) // stride + 1
    return samples


def num_tokens(modality: str, mcfg: Any, source_shape: tuple[int, ...]) -> int:
    """How many tokens (patches, frames, ids) one sample of ``source_shape`` becomes."""
    if modality == "image":
        return (mcfg.input_size // mcfg.patch_size) ** 2
    if modality == "speech":
        from d2v.models.config import parse_conv_spec

        return conv_output_length(parse_conv_spec(mcfg.feature_encoder_spec), source_shape[-1])
    if modality == "text":
        return source_shape[-1]
    raise ValueError(f"unknown modality {modality!r}")


def num_masked(modality: str, mcfg: Any, length: int) -> int:
    """The exact masked count per row that :func:`make_mask` gives for ``length`` tokens."""
    if modality == "text":
        return length - int(length * (1 - mcfg.mask_prob))
    # the block masks equalise to int(length * p) marked; an inverse mask marks the kept tokens
    p = 1 - mcfg.mask_prob if mcfg.inverse_mask else mcfg.mask_prob
    marked = int(length * p)
    return length - marked if mcfg.inverse_mask else marked


def make_mask(modality: str, mcfg: Any, rows: int, length: int, generator: torch.Generator | None = None,
              device: torch.device | None = None) -> torch.Tensor:
    """Masks of one modality's config (True = masked, the same count in every row): images get
    inverse 2-D block masks, speech 1-D spans, text MAE-style random tokens."""
    if modality == "image":
        return block_mask_2d(rows, length, mcfg.mask_prob, mcfg.mask_length, mcfg.mask_prob_adjust,
                             mcfg.inverse_mask, generator, device)
    if modality == "speech":
        return block_mask_1d(rows, length, mcfg.mask_prob, mcfg.mask_length, mcfg.mask_prob_adjust,
                             mcfg.inverse_mask, generator, device)
    if modality == "text":
        return random_mask(rows, length, mcfg.mask_prob, generator, device)
    raise ValueError(f"unknown modality {modality!r}")
