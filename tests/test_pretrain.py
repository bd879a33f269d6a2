"""The pretraining loop: loss falls, checkpoints are safe to load and checked, resumption is exact
(from the sample source and from shard streams)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from d2v.config import load_config
from d2v.errors import ConfigError, InputError
from d2v.train.checkpoint import CHECKPOINT
from d2v.train.pretrain import pretrain
from d2v.train.schedule import lr_at


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


# ------------------------------------------------------------------------------ shard streams
@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    """Tiny train/val/test shards of all three modalities, written by the project's shard writer."""
    from test_shards import make_image_data, make_speech_data, make_text_data

    from d2v.data.shards import write_shards
    from d2v.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("shards")
    make_image_data(root)
    make_speech_data(root)
    make_text_data(root)
    train_tokenizer(root, root / "tok", vocab_size=40, seed=1)
    write_shards("image", root, seed=0, maxcount=3, min_shards=2, progress=False)
    write_shards("speech", root, seed=0, maxcount=3, min_shards=2, progress=False)
    write_shards("text", root, seed=0, maxcount=20, min_shards=2, tokenizer_path=root / "tok/spm.model", progress=False)
    return root


def tiny_shards(tmp_path, root, *extra: str):
    return load_config([
        "experiment=tiny", f"data.root={root}", "data.audio_seconds=0.5", "data.text_length=16",
        "data.tokenizer.vocab_size=40", "train.batch_size=4", "train.modalities=[image,speech,text]",
        "+train.track=false", f"train.out_dir={tmp_path / 'out'}", *extra,
    ])


def test_resume_from_shards_is_exact(tmp_path, shard_root):
    # 7 steps (image speech text image | speech text image), checkpoint segments [0,4) [4,7);
    # interrupted mid-segment after step 2, so the resumed run re-creates segment 0's image stream
    # at step 3 and skips the batch step 0 consumed, then crosses the boundary at 4. Speech and
    # text decoders use dropout (0.1), so the RNG states in the checkpoint matter too.
    over = ["train.max_steps=7", "train.ckpt_every=4", "train.warmup_steps=2"]
    full = pretrain(tiny_shards(tmp_path / "a", shard_root, *over), progress=False)
    ref = torch.load(full.checkpoint, weights_only=True)

    cfg_b = tiny_shards(tmp_path / "b", shard_root, *over)
    part = pretrain(cfg_b, progress=False, stop_after=2)
    mid = torch.load(part.checkpoint, weights_only=True)
    assert mid["step"] == 2
    assert mid["data"]["segment_start"] == 0
    assert mid["data"]["segment_batches_consumed"] == mid["data"]["batches_consumed"] == {"image": 1, "speech": 1, "text": 0}
    assert len(mid["data"]["stream_seeds"]["image"]) == 1  # one rank

    resumed = pretrain(cfg_b, resume=True, progress=False)
    got = torch.load(resumed.checkpoint, weights_only=True)
    assert got["step"] == ref["step"] == 7
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), f"{k} differs after resume"
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history[2:]]


def test_shard_stream_is_a_function_of_its_seed(shard_root):
    # with two loader workers too: the same seed gives the same batches and masks, another seed others
    from d2v.data.loaders import make_train_loader

    cfg = tiny_shards(shard_root, shard_root, "data.num_workers=2")

    def take(seed):
        return [(b.source, b.mask) for b in make_train_loader(cfg, "image", 4, 4, seed)]

    a, b, c = take(5), take(5), take(6)
    assert len(a) == 4
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    assert not torch.equal(a[0][1], a[1][1])  # the two workers draw different masks


# ------------------------------------------------------------------------------ bad checkpoints
@pytest.fixture(scope="module")
def one_step_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    cfg = tiny(d, "train.max_steps=1", "train.modalities=[image]", "+train.track=false")
    return Path(pretrain(cfg, progress=False).checkpoint)


def resume_cfg(tmp_path, *extra):
    return tiny(tmp_path, "train.max_steps=2", "train.modalities=[image]", "+train.track=false", *extra)


def test_corrupt_or_truncated_checkpoint_is_a_clear_error(tmp_path, one_step_checkpoint):
    cfg = resume_cfg(tmp_path)
    ckpt = tmp_path / "out" / CHECKPOINT
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(InputError, match=r"checkpoint\.pt: corrupt or truncated checkpoint"):
        pretrain(cfg, resume=True, progress=False)
    data = one_step_checkpoint.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"checkpoint\.pt: corrupt or truncated checkpoint"):
        pretrain(cfg, resume=True, progress=False)
    ckpt.write_bytes(b"")
    with pytest.raises(InputError, match=r"checkpoint\.pt: corrupt or truncated"):
        pretrain(cfg, resume=True, progress=False)


def test_checkpoint_of_another_model_config_lists_the_keys(tmp_path, one_step_checkpoint):
    cfg = resume_cfg(tmp_path, "model.depth=3", "model.image.patch_size=7")
    with pytest.raises(ConfigError, match=r"different model configuration.*model\.depth \(checkpoint 4, now 3\)") as e:
        pretrain(cfg, resume=one_step_checkpoint, progress=False)
    assert str(one_step_checkpoint) in str(e.value) and "model.image.patch_size (checkpoint 4, now 7)" in str(e.value)


class NotAllowed:  # a pickled object that weights-only loading refuses
    pass


def test_a_file_that_is_not_a_d2v_checkpoint(tmp_path):
    cfg = resume_cfg(tmp_path)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(InputError, match=r"other\.pt: not a d2v pretraining checkpoint \(expected the keys"):
        pretrain(cfg, resume=other, progress=False)
    torch.save({"model": NotAllowed()}, other)
    with pytest.raises(InputError, match=r"other\.pt: not a d2v checkpoint: it holds objects"):
        pretrain(cfg, resume=other, progress=False)


def test_missing_checkpoint(tmp_path, capsys):
    # --resume without a checkpoint: starts from step 0 and says so; an explicit path must exist
    cfg = resume_cfg(tmp_path)
    with pytest.raises(InputError, match=r"nope\.pt: checkpoint not found"):
        pretrain(cfg, resume=tmp_path / "nope.pt", progress=False)
    res = pretrain(cfg, resume=True, progress=False)
    assert "no checkpoint at" in capsys.readouterr().out and res.history[0]["step"] == 1

    from d2v.cli.pretrain import main

    rc = main(["experiment=tiny", "data=sample", "train.modalities=[image]", "+train.track=false",
               f"train.out_dir={tmp_path / 'cli'}", "--resume-from", str(tmp_path / "nope.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "nope.pt: checkpoint not found" in err
