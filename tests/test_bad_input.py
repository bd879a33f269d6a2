"""Bad batches, masks and configs fail early with a d2v error whose message names the problem."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from d2v.models import ConfigError, Data2Vec2, InputError


def test_errors_are_value_errors():
    assert issubclass(InputError, ValueError) and issubclass(ConfigError, ValueError)


@pytest.fixture(scope="module")
def model(tiny_cfg):
    torch.manual_seed(0)
    return Data2Vec2(tiny_cfg("image", "speech", "text", clone_batch=2))


@pytest.fixture(scope="module")
def image_model(tiny_cfg):
    torch.manual_seed(0)
    return Data2Vec2(tiny_cfg("image", clone_batch=2))


# ---------------------------------------------------------------------------------- batches
@pytest.mark.parametrize(
    "source,match",
    [
        (torch.randn(2, 28, 28), r"image batch must have shape \(B, 1, 28, 28\)"),  # no channel dim
        (torch.randn(2, 1, 32, 32), r"image batch must have shape \(B, 1, 28, 28\), got \(2, 1, 32, 32\)"),
        (torch.randn(2, 3, 28, 28), r"image batch must have shape"),  # wrong channel count
        (torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8), r"float tensor.*uint8"),
        (torch.randint(0, 255, (2, 1, 28, 28)), r"float tensor.*int64"),
    ],
    ids=["no_channel", "wrong_size", "wrong_chans", "uint8", "int64"],
)
def test_bad_image_batch(model, source, match):
    with pytest.raises(InputError, match=match):
        model(source, "image")


@pytest.mark.parametrize(
    "source,match",
    [
        (torch.randn(2, 1, 8000), r"speech batch must be a \(B, samples\) waveform.*\(2, 1, 8000\)"),
        (torch.randn(8000), r"speech batch must be a \(B, samples\) waveform"),
        (torch.randn(2, 400), r"400 samples is too short"),
        (torch.randint(-100, 100, (2, 8000)), r"float waveform.*int64"),
    ],
    ids=["3d", "1d", "too_short", "int"],
)
def test_bad_speech_batch(model, source, match):
    with pytest.raises(InputError, match=match):
        model(source, "speech")


@pytest.mark.parametrize(
    "source,match",
    [
        (torch.rand(2, 32) * 50, r"integer token ids.*float32"),
        (torch.full((2, 32), 100), r"token ids must be in \[0, 100\), got range \[100, 100\]"),
        (torch.full((2, 32), -1), r"token ids must be in \[0, 100\)"),
        (torch.randint(4, 100, (2, 65)), r"text length 65 exceeds max_source_positions=64"),
        (torch.randint(4, 100, (2, 3, 32)), r"text batch must be \(B, T\) token ids"),
    ],
    ids=["float", "out_of_vocab", "negative", "too_long", "3d"],
)
def test_bad_text_batch(model, source, match):
    with pytest.raises(InputError, match=match):
        model(source, "text")


def test_text_id_range_is_checked_on_the_cpu_only(model):
    """On an accelerator the id range is not read back (a host sync every step): the callers check
    the CPU batch before the transfer. A meta tensor, whose values cannot be read, stands in for a
    GPU batch; the shape checks still apply to it."""
    enc = model.encoder("text")
    enc.check_input(torch.full((2, 32), 100, device="meta"))  # no value read: no error
    with pytest.raises(InputError, match="exceeds max_source_positions"):
        enc.check_input(torch.zeros(2, 65, dtype=torch.long, device="meta"))
    with pytest.raises(InputError, match=r"token ids must be in \[0, 100\)"):
        enc.check_input(torch.full((2, 32), 100))


def test_empty_batch(model):
    with pytest.raises(InputError, match="empty batch"):
        model(torch.randn(0, 1, 28, 28), "image")


def test_source_not_a_tensor(model):
    with pytest.raises(InputError, match="torch.Tensor"):
        model([[0.0] * 8000], "speech")


# ---------------------------------------------------------------------------------- modality
def test_unknown_modality(model):
    with pytest.raises(InputError, match=r"unknown modality 'video'.*image, speech, text"):
        model(torch.randn(2, 1, 28, 28), "video")


def test_modality_not_built(image_model):
    with pytest.raises(InputError, match=r"no 'text' encoder.*built for image"):
        image_model(torch.randint(4, 100, (2, 32)), "text")
    with pytest.raises(InputError, match="no 'speech' encoder"):
        image_model.make_mask("speech", 2, 24)


def test_modality_required_when_several(model):
    with pytest.raises(InputError, match="modality is required"):
        model(torch.randn(2, 1, 28, 28))


# ---------------------------------------------------------------------------------- masks
def _mask(rows: int, T: int, n_masked: int) -> torch.Tensor:
    m = torch.zeros(rows, T, dtype=torch.bool)
    for r in range(rows):
        m[r, torch.randperm(T)[:n_masked]] = True
    return m


def test_mask_wrong_shape(model):
    src = torch.randn(2, 1, 28, 28)  # B*M = 4 rows of 49 patches
    with pytest.raises(InputError, match=r"mask must have shape \(B\*clone_batch, T\) = \(4, 49\), got \(2, 49\)"):
        model(src, "image", mask=_mask(2, 49, 40))
    with pytest.raises(InputError, match=r"mask must have shape.*got \(4, 48\)"):
        model(src, "image", mask=_mask(4, 48, 40))
    with pytest.raises(InputError, match=r"mask must have shape.*got \(196,\)"):
        model(src, "image", mask=_mask(4, 49, 40).reshape(-1))


def test_mask_unequal_counts(model):
    m = _mask(4, 32, 16)
    m[2, (~m[2]).nonzero()[0]] = True  # row 2 masks 17
    with pytest.raises(InputError, match=r"same number of tokens.*from 16 to 17"):
        model(torch.randint(4, 100, (2, 32)), "text", mask=m)


def test_mask_leaves_nothing_visible(model):
    with pytest.raises(InputError, match=r"no visible token \(24 of 24 masked\)"):
        model(torch.randn(2, 8000), "speech", mask=torch.ones(4, 24, dtype=torch.bool))


def test_mask_masks_nothing(model):
    with pytest.raises(InputError, match="masks nothing"):
        model(torch.randn(2, 8000), "speech", mask=torch.zeros(4, 24, dtype=torch.bool))


def test_float_mask_must_be_binary(model):
    m = _mask(4, 32, 16).float()
    m[0, 0] = 0.5
    with pytest.raises(InputError, match="only 0 and 1"):
        model(torch.randint(4, 100, (2, 32)), "text", mask=m)


def test_float_mask_of_zeros_and_ones_is_accepted(model):
    m = _mask(4, 32, 16)
    out = model(torch.randint(4, 100, (2, 32)), "text", mask=m.float())
    assert torch.equal(out.mask, m)


# ---------------------------------------------------------------------------------- configs
def _id(d: dict) -> str:
    return ",".join(f"{k}.{_id(v)}" if isinstance(v, dict) else f"{k}={v}"[:30] for k, v in d.items())


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(embed_dim=36, num_heads=8), r"model\.embed_dim: embed_dim=36 is not divisible by num_heads=8"),
        (dict(clone_batch=0), r"model\.clone_batch: must be an int >= 1, got 0"),
        (dict(average_top_k_layers=4), r"model\.average_top_k_layers: must be in \[1, depth=3\], got 4"),
        (dict(average_top_k_layers=0), r"model\.average_top_k_layers"),
        (dict(depth=0, average_top_k_layers=1), r"model\.depth"),
        (dict(ema_decay=1.5), r"model\.ema_decay"),
        (dict(encoder_dropout=1.0), r"model\.encoder_dropout"),
        (dict(layer_norm_target_layer=True), r"exclusive"),
        (dict(speech=dict(feature_encoder_spec="[(32, 10)]")), r"model\.speech\.feature_encoder_spec: cannot parse"),
        (dict(speech=dict(feature_encoder_spec="[(32, 10, 5)] + ")), r"model\.speech\.feature_encoder_spec"),
        (dict(speech=dict(feature_encoder_spec="__import__('os').getcwd()")), r"model\.speech\.feature_encoder_spec"),
        (dict(speech=dict(feature_encoder_spec="[]")), r"model\.speech\.feature_encoder_spec: needs at least one"),
        (dict(image=dict(mask_prob=1.0)), r"model\.image\.mask_prob"),
        (dict(text=dict(mask_prob=0.0)), r"model\.text\.mask_prob"),
        (dict(image=dict(input_size=30)), r"model\.image\.input_size: input_size=30 is not a multiple of patch_size=4"),
        (dict(speech=dict(teacher_encoder="half")), r"model\.speech\.teacher_encoder"),
        (dict(speech=dict(conv_pos_groups=3)), r"model\.speech\.conv_pos_groups"),
    ],
    ids=lambda v: _id(v) if isinstance(v, dict) else "",
)
def test_bad_model_config(tiny_cfg, kw, match):
    cfg = tiny_cfg("image", "speech", "text", **kw)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()
    with pytest.raises(ConfigError, match=match):  # the model validates before building anything
        Data2Vec2(cfg)


def test_config_without_modality():
    from d2v.models import ModelConfig

    with pytest.raises(ConfigError, match="at least one modality"):
        ModelConfig(embed_dim=32, depth=2, num_heads=4, average_top_k_layers=2).validate()


def test_good_config_validates(tiny_cfg):
    cfg = tiny_cfg("image", "speech", "text")
    assert cfg.validate() is cfg
    assert dataclasses.replace(cfg, clone_batch=1).validate().clone_batch == 1


# ---------------------------------------------------------------------------------- load_config
@pytest.mark.parametrize(
    "override,match",
    [
        ("model.nonexistent=1", r"model\.nonexistent"),
        ("+model.nonexistent=1", r"model\.nonexistent"),
        ("+model.image.foo=2", r"model\.image\.foo"),
        ("model.embed_dim=abc", r"model\.embed_dim.*abc"),
        ("model.clone_batch=0", r"model\.clone_batch"),
        ("train.batch_size=0", r"train\.batch_size"),
    ],
)
def test_load_config_bad_override(override, match):
    from d2v.config import load_config

    with pytest.raises(ConfigError, match=match):
        load_config([override])


def test_load_config_good_override():
    from d2v.config import load_config

    cfg = load_config(["experiment=tiny", "model.clone_batch=3"])
    assert cfg.model.clone_batch == 3 and cfg.model.embed_dim == 64
    assert cfg.model.modalities == ["image", "speech", "text"]


# ---------------------------------------------------------------------------------- former gaps
# Each of these escaped the d2v error types once (zero divisors, a block mask of length 1, a text
# too short to mask, a float64 batch); they are now refused with a named error.
@pytest.mark.parametrize(
    "kw",
    [
        dict(image=dict(patch_size=0)),
        dict(speech=dict(conv_pos_groups=0)),
        dict(text=dict(decoder=dict(decoder_groups=0))),
    ],
    ids=["patch_size", "conv_pos_groups", "decoder_groups"],
)
def test_zero_divisor_config_is_config_error(tiny_cfg, kw):
    if "text" in kw:
        base = tiny_cfg("text").text.decoder
        kw = dict(text=dict(decoder=dataclasses.replace(base, **kw["text"]["decoder"])))
    cfg = tiny_cfg("image", "speech", "text", **kw)
    with pytest.raises(ConfigError):
        cfg.validate()


def test_image_mask_length_one_rejected_by_validate(tiny_cfg, batch):
    cfg = tiny_cfg("image", image=dict(mask_length=1))
    with pytest.raises(ConfigError, match=r"image\.mask_length"):
        cfg.validate()
        Data2Vec2(cfg)(batch("image"), "image")


def test_text_too_short_to_mask(model):
    with pytest.raises(InputError):
        model(torch.randint(4, 100, (2, 1)), "text")


def test_float64_image_batch(model):
    with pytest.raises(InputError):
        model(torch.randn(2, 1, 28, 28, dtype=torch.float64), "image")


def test_float16_speech_batch(model):
    with pytest.raises(InputError, match="float32"):
        model(torch.randn(2, 8000, dtype=torch.float16), "speech")


def test_integer_mask_with_values_other_than_0_1(model, batch):
    x = batch("image")
    mask = model.make_mask("image", x.shape[0], 49).long()
    mask[0, 0] = 2
    with pytest.raises(InputError, match="only 0 and 1"):
        model(x, "image", mask=mask)


def test_mask_noise_of_the_wrong_shape(model, batch):
    x = batch("image")
    with pytest.raises(InputError, match="mask_noise"):
        model(x, "image", mask_noise=torch.zeros(1, 2, 3))


def test_extract_features_needs_the_modality_on_a_multimodal_model(model, batch):
    with pytest.raises(InputError, match="modality is required"):
        model.extract_features(batch("image"))


def test_image_mask_prob_that_keeps_nothing(tiny_cfg):
    with pytest.raises(ConfigError, match=r"image\.mask_prob"):
        tiny_cfg("image", image=dict(mask_prob=0.99)).validate()
