"""The pretraining loop: loss falls, checkpoints are safe to load, resumption is exact."""

from __future__ import annotations

import math

import pytest
import torch

from d2v.config import load_config
from d2v.train.pretrain import CHECKPOINT, lr_at, pretrain


def tiny(tmp_path, *extra: str):
    return load_config([
        "experiment=tiny", "data=sample", "data.num_samples=64", f"train.out_dir={tmp_path / 'out'}",
        "train.batch_size=8", *extra,
    ])


def test_lr_schedule_warmup_then_cosine():
    base, warm, total = 1e-3, 10, 110
    assert lr_at(0, base, warm, total) == pytest.approx(base / warm)
    assert lr_at(9, base, warm, total) == pytest.approx(base)
    assert lr_at(60, base, warm, total) == pytest.approx(base / 2)  # half way through the cosine
    assert lr_at(110, base, warm, total, min_lr=1e-5) == pytest.approx(1e-5)
    lrs = [lr_at(s, base, warm, total) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("modality", ["image", "speech", "text"])
def test_loss_falls_on_the_sample_data(tmp_path, modality):
    cfg = tiny(tmp_path, f"train.modalities=[{modality}]", "train.max_steps=40", "train.warmup_steps=5")
    res = pretrain(cfg, progress=False)
    assert res.last_loss[modality] < 0.85 * res.first_loss[modality], (res.first_loss, res.last_loss)
    assert math.isfinite(res.last_loss[modality])


def test_checkpoint_loads_weights_only_and_resume_is_exact(tmp_path):
    # with dropout on, exactness also needs the RNG state in the checkpoint
    over = ["train.max_steps=6", "train.modalities=[image,text]", "model.encoder_dropout=0.1", "model.text.dropout=0.1"]
    full = pretrain(tiny(tmp_path / "a", *over), progress=False)
    ref = torch.load(full.checkpoint, weights_only=True)

    cfg_b = tiny(tmp_path / "b", *over)
    part = pretrain(cfg_b, progress=False, stop_after=3)
    assert torch.load(part.checkpoint, weights_only=True)["step"] == 3
    resumed = pretrain(cfg_b, resume=True, progress=False)
    got = torch.load(resumed.checkpoint, weights_only=True)
    assert got["step"] == ref["step"] == 6
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), f"{k} differs after resume"
    # the teacher moved (EMA), so the comparison above covers it too
    assert not torch.equal(ref["model"]["teacher.blocks.0.attn.qkv.weight"], ref["model"]["blocks.0.attn.qkv.weight"])


def test_no_partial_checkpoint_left_behind(tmp_path):
    cfg = tiny(tmp_path, "train.max_steps=2", "train.modalities=[text]")
    pretrain(cfg, progress=False)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert CHECKPOINT in files and not any(f.endswith(".tmp") for f in files)
