"""Mask generators (fairseq ``compute_block_mask_2d``/``compute_block_mask_1d``, ``random_masking``) against the
statistics of fairseq's own generators.

``tests/fixtures/fairseq/mask_stats.json`` holds 2000-row statistics of
``compute_block_mask_2d``/``compute_block_mask_1d`` with the released image/audio settings.
Exact per-row counts must match exactly; everything else within sampling error.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from d2v.models import Data2Vec2
from d2v.models.masking import block_mask_1d, block_mask_2d, random_mask

STATS = json.loads((Path(__file__).parent / "fixtures" / "fairseq" / "mask_stats.json").read_text())
ROWS = 2000


# ---------------------------------------------------------------------------------- helpers
def components_4conn(grid: list[list[bool]]) -> int:
    """Number of 4-connected components of True cells (plain flood fill)."""
    h, w = len(grid), len(grid[0])
    seen = [[False] * w for _ in range(h)]
    n = 0
    for i in range(h):
        for j in range(w):
            if grid[i][j] and not seen[i][j]:
                n += 1
                stack = [(i, j)]
                seen[i][j] = True
                while stack:
                    a, b = stack.pop()
                    for x, y in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                        if 0 <= x < h and 0 <= y < w and grid[x][y] and not seen[x][y]:
                            seen[x][y] = True
                            stack.append((x, y))
    return n


def run_lengths(row: list[bool]) -> list[int]:
    """Lengths of the maximal runs of True."""
    runs, cur = [], 0
    for v in row:
        if v:
            cur += 1
        elif cur:
            runs.append(cur)
            cur = 0
    if cur:
        runs.append(cur)
    return runs


def border_mask(side: int) -> torch.Tensor:
    b = torch.ones(side, side, dtype=torch.bool)
    b[1:-1, 1:-1] = False
    return b.reshape(-1)


def assert_freq_close(ours: float, ref: float, n_positions: int) -> None:
    """Mean of per-position frequencies over ``n_positions`` cells, 2000 rows each, both sides."""
    se = math.sqrt(2 * ref * (1 - ref) / (ROWS * n_positions))
    assert abs(ours - ref) <= max(4 * se, 0.03), f"{ours:.4f} vs fairseq {ref:.4f} (4 se = {4 * se:.4f})"


# ---------------------------------------------------------------------------------- 2-D (images)
@pytest.fixture(scope="module")
def image_masks() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return block_mask_2d(ROWS, 196, 0.8, 3, 0.07, inverse=True, generator=g)


def test_block_mask_2d_exact_counts(image_masks):
    assert image_masks.dtype == torch.bool
    assert image_masks.shape == (ROWS, 196)
    ref = STATS["compute_block_mask_2d"]
    assert ref["masked_count_hist"] == {"157": ROWS}
    masked = image_masks.sum(1)
    assert bool((masked == 157).all())
    assert bool(((~image_masks).sum(1) == 39).all())


def test_block_mask_2d_kept_tokens_form_blocks(image_masks):
    ref = STATS["compute_block_mask_2d"]["mean_num_kept_components_per_row"]  # 5.41
    kept = (~image_masks).reshape(ROWS, 14, 14).tolist()
    ours = sum(components_4conn(g) for g in kept) / ROWS
    assert abs(ours - ref) <= 0.1 * ref, f"{ours:.3f} kept components per row vs fairseq {ref:.3f}"
    # 39 uniformly scattered kept patches would form ~30 components: blocks make far fewer.
    scattered = random_mask(200, 196, 157 / 196)
    assert bool(((~scattered).sum(1) == 39).all())
    n_scattered = sum(components_4conn(g) for g in (~scattered).reshape(200, 14, 14).tolist()) / 200
    assert n_scattered > 3 * ours


def test_block_mask_2d_position_frequency(image_masks):
    ref = torch.tensor(STATS["compute_block_mask_2d"]["per_position_mask_frequency"])
    freq = image_masks.float().mean(0)
    border = border_mask(14)
    # fairseq: border ~0.85 (blocks are clamped at the edge), interior ~0.78
    assert_freq_close(float(freq[border].mean()), float(ref[border].mean()), int(border.sum()))
    assert_freq_close(float(freq[~border].mean()), float(ref[~border].mean()), int((~border).sum()))
    assert float(freq[border].mean()) > float(freq[~border].mean()) + 0.04
    # every single position within sampling error (se ~0.013 for two 2000-row estimates)
    assert float((freq - ref).abs().max()) < 0.07


def test_block_mask_2d_rows_independent(image_masks):
    a, b = image_masks[0::2], image_masks[1::2]
    same = (a == b).all(1).float().mean()
    assert float(same) < 0.01
    # and two calls do not repeat each other
    again = block_mask_2d(ROWS, 196, 0.8, 3, 0.07, inverse=True)
    assert float((again == image_masks).all(1).float().mean()) < 0.01


def test_block_mask_2d_not_inverse_marks_masked_blocks():
    m = block_mask_2d(500, 196, 0.3, 3, 0.0, inverse=False)
    assert bool((m.sum(1) == int(196 * 0.3)).all())
    # now the blocks are the masked tokens: few masked components
    n = sum(components_4conn(g) for g in m.reshape(500, 14, 14).tolist()) / 500
    assert n < 15


# ---------------------------------------------------------------------------------- 1-D (speech)
@pytest.fixture(scope="module")
def audio_masks() -> torch.Tensor:
    g = torch.Generator().manual_seed(4321)
    return block_mask_1d(ROWS, 250, 0.5, 5, 0.05, inverse=False, generator=g)


def test_block_mask_1d_exact_counts(audio_masks):
    assert audio_masks.dtype == torch.bool
    assert audio_masks.shape == (ROWS, 250)
    assert bool((audio_masks.sum(1) == 125).all())


def test_block_mask_1d_run_lengths(audio_masks):
    ref = {int(k): v for k, v in STATS["compute_block_mask_1d"]["masked_run_length_hist"].items()}
    ref_total = sum(ref.values())
    ours = Counter(r for row in audio_masks.tolist() for r in run_lengths(row))
    total = sum(ours.values())
    for length in (1, 5):
        p_ref, p_ours = ref[length] / ref_total, ours[length] / total
        assert abs(p_ours - p_ref) < 0.03, f"runs of {length}: {p_ours:.3f} vs fairseq {p_ref:.3f}"
    ref_runs = STATS["compute_block_mask_1d"]["mean_num_masked_runs_per_row"]  # 28.96
    assert abs(total / ROWS - ref_runs) < 0.05 * ref_runs


def test_block_mask_1d_position_frequency(audio_masks):
    ref = torch.tensor(STATS["compute_block_mask_1d"]["per_position_mask_frequency"])
    freq = audio_masks.float().mean(0)
    se = math.sqrt(2 * 0.25 / ROWS)  # ~0.016
    assert abs(float(freq[0]) - float(ref[0])) < 4 * se  # ~0.37: the first span is clamped
    assert abs(float(freq[-1]) - float(ref[-1])) < 4 * se
    assert abs(float(freq[20:230].mean()) - 0.5) < 0.01


# ---------------------------------------------------------------------------------- random (text)
def test_random_mask_counts_and_uniformity():
    m = random_mask(4000, 32, 0.48)
    assert m.dtype == torch.bool
    assert bool(((~m).sum(1) == int(32 * (1 - 0.48))).all())
    assert bool((m.sum(1) == 16).all())
    freq = m.float().mean(0)
    se = math.sqrt(0.25 / 4000)
    assert float((freq - 0.5).abs().max()) < 4.5 * se
    # 512 tokens at 0.48: 266 kept (fairseq ``random_masking``)
    assert bool(((~random_mask(3, 512, 0.48)).sum(1) == 266).all())


def test_random_mask_no_spans():
    """Unlike the block masks, random masking has no spatial structure: runs are short."""
    m = random_mask(500, 250, 0.5)
    runs = [r for row in m.tolist() for r in run_lengths(row)]
    assert sum(runs) / len(runs) < 2.5  # geometric-like, mean ~2


# ---------------------------------------------------------------------------------- determinism & errors
@pytest.mark.parametrize(
    "fn",
    [
        lambda g: block_mask_2d(8, 196, 0.8, 3, 0.07, True, generator=g),
        lambda g: block_mask_1d(8, 250, 0.5, 5, 0.05, generator=g),
        lambda g: random_mask(8, 32, 0.48, generator=g),
    ],
    ids=["2d", "1d", "random"],
)
def test_generator_determinism(fn):
    a = fn(torch.Generator().manual_seed(7))
    torch.rand(100)  # the global RNG must not matter
    b = fn(torch.Generator().manual_seed(7))
    c = fn(torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "call",
    [
        lambda: block_mask_2d(2, 196, 1.0, 3, 0.0, True),  # nothing kept
        lambda: block_mask_2d(2, 196, 0.0, 3, 0.0, True),  # nothing masked
        lambda: block_mask_2d(2, 195, 0.8, 3, 0.0, True),  # not a square grid
        lambda: block_mask_2d(2, 196, 0.8, 1, 0.0, True),  # blocks need length >= 2
        lambda: block_mask_1d(2, 250, 0.0, 5),
        lambda: block_mask_1d(2, 250, 1.0, 5),
        lambda: block_mask_1d(2, 10, 0.05, 5),  # int(10*0.05) = 0 masked
        lambda: random_mask(2, 32, 0.0),
        lambda: random_mask(2, 32, 1.0),
        lambda: random_mask(2, 32, 0.99),  # keeps int(0.32) = 0
    ],
)
def test_degenerate_parameters_raise(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------------------------- model.make_mask
def test_model_make_mask_clones_differ(tiny_cfg):
    cfg = tiny_cfg("image", clone_batch=4)
    model = Data2Vec2(cfg)
    B, T = 3, 49
    m = model.make_mask("image", B, T)
    assert m.shape == (B * 4, T) and m.dtype == torch.bool
    assert bool((m.sum(1) == T - int(T * 0.2)).all())  # 9 kept of 49
    clones = m.view(B, 4, T)
    for b in range(B):
        distinct = {tuple(r.tolist()) for r in clones[b]}
        assert len(distinct) == 4, "every clone of a sample needs its own mask"
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(model.make_mask("image", B, T, generator=g1), model.make_mask("image", B, T, generator=g2))


@pytest.mark.parametrize("modality,T,masked", [("speech", 24, 12), ("text", 32, 16)])
def test_model_make_mask_counts(tiny_cfg, modality, T, masked):
    model = Data2Vec2(tiny_cfg(modality, clone_batch=3))
    m = model.make_mask(modality, 2, T)
    assert m.shape == (6, T)
    assert bool((m.sum(1) == masked).all())
    assert model.modality_encoders[modality].num_masked(T) == masked
