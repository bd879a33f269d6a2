"""Speech fine-tuning-time time and channel masking (fairseq's vox recipes, ``d2v.models.heads.FrameMasking``):
the span statistics of fairseq's ``compute_mask_indices``, what the masks do to the local features,
eval mode untouched, reproducible per-sample draws, padding never masked, the config checks and
the training loop handing both inits the same masks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SPEECH_SAMPLES, build_cfg

from d2v.config import Config, DataConfig, FinetuneConfig, TaskConfig, TrainConfig
from d2v.data.downstream import LabelledSplit
from d2v.errors import ConfigError
from d2v.models import Data2Vec2
from d2v.models.data2vec2 import encoder_features
from d2v.models.heads import Classifier, CTCRecognizer, FrameMasking, frame_mask_seeds, span_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = 32  # build_cfg's embed_dim; 8000 samples -> 24 frames


def expected_fraction(n: int, span: int, k: int) -> float:
    """Exact expected masked fraction of ``k`` distinct span starts drawn uniformly from ``0..n-span-1``."""
    starts = n - span
    total = 0.0
    for t in range(n):
        covering = max(0, min(t, starts - 1) - max(0, t - span + 1) + 1)
        total += 1 - math.comb(starts - covering, k) / math.comb(starts, k)
    return total / n


def _model(seed: int = 0, masking: FrameMasking | None = None) -> CTCRecognizer:
    torch.manual_seed(seed)
    model = CTCRecognizer(Data2Vec2(build_cfg("speech")), freeze_local=False)
    if masking is not None:
        model.set_masking(masking)
    return model


def test_span_masks_follow_fairseqs_span_formula():
    g = torch.Generator().manual_seed(0)
    n, span = 200, 10  # 0.75 * 200 / 10 = 15 spans exactly (no random rounding)
    fractions = []
    for _ in range(1000):
        idx = span_mask(n, 0.75, span, 1, g)
        row = torch.zeros(n, dtype=torch.bool)
        row[idx] = True
        assert not row[-1]  # starts stop at n - span - 1, so the last frame is never covered (as fairseq)
        # every masked run is a union of whole spans: at least `span` frames long, never clipped
        edges = torch.diff(torch.cat([torch.tensor([0]), row.int(), torch.tensor([0])]))
        runs = torch.nonzero(edges == -1).flatten() - torch.nonzero(edges == 1).flatten()
        assert bool((runs >= span).all()) and 1 <= len(runs) <= 15
        fractions.append(row.float().mean().item())
    want = expected_fraction(n, span, 15)  # ~0.52: overlapping spans mask less than 0.75
    assert 0.45 < want < 0.6
    assert sum(fractions) / len(fractions) == pytest.approx(want, abs=0.01)
    # the random rounding of prob * size / span: 0.3 * 50 / 10 = 1.5 spans -> 1 or 2, about half each
    counts = [span_mask(50, 0.3, 10, 1, g).numel() for _ in range(400)]
    assert {10} < set(counts) and 0.35 < sum(c == 10 for c in counts) / 400 < 0.65
    # too short to mask: nothing (fairseq would raise); a draw covering everything keeps one frame
    assert span_mask(1, 0.75, 10, 1, g).numel() == 0
    assert all(span_mask(3, 1.0, 5, 1, g).numel() < 3 for _ in range(50))


def test_time_mask_turns_masked_frames_into_noise_before_the_context_encoder():
    """Masked frames of the local features become N(0, 0.01²) noise; the others are untouched; the
    conv positions and blocks see the masked features; the fraction follows the span formula."""
    model = _model(masking=FrameMasking(mask_prob=0.75, mask_length=10)).train()
    wav = torch.randn(64, SPEECH_SAMPLES, generator=torch.Generator().manual_seed(1))
    seeds = list(range(64))
    enc = model.encoder
    seen = []
    original = enc.contextualize
    enc.contextualize = lambda local, **kw: seen.append(local) or original(local, **kw)
    try:
        out = model(wav, None, mask_seeds=seeds)
    finally:
        del enc.contextualize
    masks = model.draw_masks(wav, None, seeds)
    local = enc.local_features(wav)
    (x,) = seen
    t = masks.time
    assert torch.equal(x[~t], local[~t])  # unmasked frames unchanged
    noise = masks.noise()
    assert torch.equal(x[t], noise) and (x[t] - local[t]).abs().mean() > 0.1  # masked frames: noise
    assert noise.shape == (int(t.sum()), D) and noise.std().item() == pytest.approx(0.01, rel=0.1)
    assert not masks.channel.any()
    # 24 frames: int(0.75 * 24 / 10 + U) = 1 or 2 spans from 14 starts
    want = 0.2 * expected_fraction(24, 10, 1) + 0.8 * expected_fraction(24, 10, 2)
    assert t.float().mean().item() == pytest.approx(want, abs=0.05)
    # the same forward by hand: masked local features through the unmasked feature path
    f = encoder_features(enc, model.blocks, wav, local_mask=masks.apply)
    assert torch.allclose(out, model.head(f.x).log_softmax(-1), atol=1e-6)


def test_channel_mask_zeroes_whole_channels_of_each_sample():
    model = _model(masking=FrameMasking(mask_prob=0.75, mask_channel_prob=0.25, mask_channel_length=4)).train()
    wav = torch.randn(8, SPEECH_SAMPLES, generator=torch.Generator().manual_seed(2))
    masks = model.draw_masks(wav, None, list(range(8)))
    x = masks.apply(model.encoder.local_features(wav))
    ch = masks.channel  # (B, D)
    for i in range(8):
        assert bool((x[i][:, ch[i]] == 0).all())  # every frame, the noise frames too (applied after)
        assert bool((x[i][:, ~ch[i]] != 0).all())
        # int(0.25 * 32 / 4 + U) = 2 spans of 4: 5 to 8 channels, differing between samples
        assert 5 <= int(ch[i].sum()) <= 8 and not ch[i, -1]
    assert len({tuple(r.tolist()) for r in ch}) > 1
    # the mean count over many samples is the span formula's
    many = FrameMasking(mask_channel_prob=0.25, mask_channel_length=4).draw([24] * 500, 24, D, list(range(500)))
    assert many.channel.sum(1).float().mean().item() == pytest.approx(D * expected_fraction(D, 4, 2), abs=0.15)
    assert not many.time.any() and many.noise().numel() == 0


def test_eval_mode_and_masking_off_give_the_unmasked_outputs():
    wav = torch.randn(3, SPEECH_SAMPLES, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([SPEECH_SAMPLES, 6000, 4000])
    plain = _model()
    masked = _model(masking=FrameMasking(0.75, 10, 0.25, 4))
    assert not plain.masking.active and masked.masking.active
    with torch.no_grad():
        for m in (plain, masked):
            m.eval()
        want = plain(wav, lengths)
        assert torch.equal(masked(wav, lengths, mask_seeds=[1, 2, 3]), want)  # eval: never masked
        assert masked.transcribe(wav, lengths) == plain.transcribe(wav, lengths)
        plain.train()  # no dropout in the tiny config: train mode without masking is the eval path
        assert torch.equal(plain(wav, lengths, mask_seeds=[1, 2, 3]), want)
        f = encoder_features(plain.encoder, plain.blocks, wav, plain.token_padding(wav, lengths))
        assert torch.equal(plain.head(f.x).log_softmax(-1), want)  # the code path before masking existed
        masked.train()
        assert not torch.allclose(masked(wav, lengths, mask_seeds=[1, 2, 3]), want, atol=1e-3)


def test_the_same_seed_and_sample_give_the_same_mask():
    keys = ["clip-a", "clip-b", "clip-c"]
    seeds = frame_mask_seeds(7, 12, keys)
    assert seeds == frame_mask_seeds(7, 12, keys)
    assert frame_mask_seeds(7, 12, keys[::-1]) == seeds[::-1]  # per sample: not the batch's order
    assert frame_mask_seeds(7, 13, keys) != seeds and frame_mask_seeds(8, 12, keys) != seeds
    fm = FrameMasking(0.75, 10, 0.25, 4)
    a, b = fm.draw([24] * 3, 24, D, seeds), fm.draw([24] * 3, 24, D, seeds)
    assert torch.equal(a.time, b.time) and torch.equal(a.channel, b.channel) and torch.equal(a.noise(), b.noise())
    alone = fm.draw([24], 24, D, seeds[1:2])  # a sample's mask does not depend on its batch
    assert torch.equal(alone.time[0], a.time[1]) and torch.equal(alone.channel[0], a.channel[1])
    n0, n1 = a.time.sum(1).tolist()[:2]
    assert torch.equal(alone.noise(), a.noise()[n0 : n0 + n1])  # its noise too
    model = _model(masking=fm).train()
    wav = torch.randn(3, SPEECH_SAMPLES, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(wav, mask_seeds=seeds), model(wav, mask_seeds=seeds))
        assert not torch.equal(model(wav, mask_seeds=seeds), model(wav, mask_seeds=frame_mask_seeds(7, 13, keys)))


def test_padding_frames_are_never_masked():
    model = _model(masking=FrameMasking(mask_prob=0.75, mask_length=3)).train()
    wav = torch.randn(4, SPEECH_SAMPLES, generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([SPEECH_SAMPLES, 5000, 2000, 500])
    pad = model.token_padding(wav, lengths)
    valid = (~pad).sum(1).tolist()
    assert valid[0] == 24 and valid[3] < 2
    for seed in range(30):
        masks = model.draw_masks(wav, pad, [seed * 4 + i for i in range(4)])
        assert not (masks.time & pad).any()
        assert all(int(masks.time[i].sum()) >= 1 for i in range(3)) and not masks.time[3].any()
    assert model(wav, lengths, mask_seeds=[1, 2, 3, 4]).isfinite().all()


@pytest.mark.parametrize("fields, task, key", [
    ({"mask_prob": 1.5}, "speech", "finetune.speech.mask_prob"),
    ({"mask_channel_prob": -0.1}, "speech", "finetune.speech.mask_channel_prob"),
    ({"mask_prob": 0.5, "mask_length": 0}, "speech", "finetune.speech.mask_length"),
    ({"mask_channel_length": 0}, "speech", "finetune.speech.mask_channel_length"),
    ({"mask_prob": 0.5}, "image", "finetune.image.mask_prob"),
    ({"mask_channel_prob": 0.5}, "text", "finetune.text.mask_channel_prob"),
])
def test_bad_masking_config_names_the_key(fields, task, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        TaskConfig(**fields).validate(task)


def test_channel_span_must_fit_the_model():
    cfg = Config(model=build_cfg("speech"), train=TrainConfig(modalities=["speech"]), finetune=FinetuneConfig(
        tasks=["speech"], speech=TaskConfig(mask_channel_prob=0.25, mask_channel_length=64)))
    with pytest.raises(ConfigError, match=r"finetune\.speech\.mask_channel_length.*embed_dim=32"):
        cfg.validate()
    with pytest.raises(ConfigError, match=r"finetune\.speech\.mask_channel_length"):
        _model(masking=FrameMasking(mask_channel_prob=0.25, mask_channel_length=64))
    with pytest.raises(ConfigError, match=r"finetune\.image\.mask_prob.*speech only"):
        Classifier(Data2Vec2(build_cfg("image")), "image", 2).set_masking(FrameMasking(mask_prob=0.5), "finetune.image")


def test_training_loop_gives_both_inits_the_same_masks(monkeypatch, tmp_path):
    """``train_classifier`` seeds each sample's mask by (seed, step, key): two inits see the same
    masks, each step new ones; with masking off nothing is drawn."""
    import d2v.train.finetune as finetune
    from d2v.train.distributed import DistInfo

    def fake_batches(root, inputs, batch_size, n, seed, rank, world, workers):
        g = torch.Generator().manual_seed(seed)
        for step in range(n):
            keys = [f"clip-{step}-{i}" for i in range(batch_size)]
            lengths = torch.randint(3000, SPEECH_SAMPLES + 1, (batch_size,), generator=g)
            src = torch.randn(batch_size, SPEECH_SAMPLES, generator=g) * (torch.arange(SPEECH_SAMPLES) < lengths[:, None])
            yield LabelledSplit("speech", "train", src, torch.arange(batch_size) % 2, keys, lengths)

    monkeypatch.setattr(finetune, "train_batches", fake_batches)
    drawn: list = []
    draw = FrameMasking.draw
    monkeypatch.setattr(FrameMasking, "draw", lambda self, *a, **kw: drawn.append(draw(self, *a, **kw)) or drawn[-1])
    task = TaskConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, mask_prob=0.5, mask_length=3,
                      mask_channel_prob=0.25, mask_channel_length=4)
    cfg = Config(seed=3, model=build_cfg("speech"), train=TrainConfig(modalities=["speech"]), data=DataConfig(root=str(tmp_path)),
                 finetune=FinetuneConfig(tasks=["speech"], speech=task, threads=1, track=False)).validate()
    runs = []
    for init_seed in (0, 1):  # two different inits (as pretrained vs random)
        torch.manual_seed(init_seed)
        clf = finetune.make_model(Data2Vec2(cfg.model), "speech", task, 2)
        losses = finetune.train_classifier(clf, cfg, "speech", DistInfo(), progress=False)
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
        runs.append(drawn[:])
        drawn.clear()
    a, b = runs
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert torch.equal(x.time, y.time) and torch.equal(x.channel, y.channel) and torch.equal(x.noise(), y.noise())
    assert a[0].time.any() and a[0].channel.any() and not torch.equal(a[0].channel, a[1].channel)
    cfg.finetune.speech = TaskConfig(steps=2, batch_size=4, warmup_steps=1)
    clf = finetune.make_model(Data2Vec2(cfg.model), "speech", cfg.finetune.speech, 2)
    finetune.train_classifier(clf, cfg, "speech", DistInfo(), progress=False)
    assert drawn == []
