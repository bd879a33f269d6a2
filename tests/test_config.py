"""Every config composes, validates and builds; params.yaml is the composition of conf/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from d2v.config import PROJECT_ROOT, from_dict, load_config, to_dict
from d2v.models import ConfigError, Data2Vec2

EXPERIMENTS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "experiment").glob("*.yaml"))


def test_experiments_exist():
    assert {"tiny", "image_base", "image_large", "speech_base", "speech_large", "text_base", "text_large"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(experiment):
    cfg = load_config([f"experiment={experiment}"])
    with torch.device("meta"):  # shapes only: no memory for the large models
        model = Data2Vec2(cfg.model)
    assert set(model.modality_encoders) == set(cfg.model.modalities)
    assert set(cfg.train.modalities) <= set(cfg.model.modalities)
    # round trip through a plain dict (what params.yaml holds) is lossless
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


def test_params_yaml_is_the_pipeline_composition(tmp_path):
    """DVC composes conf/pipeline.yaml into params.yaml on `dvc exp run`; the committed file must match."""
    on_disk = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    stale = "params.yaml is stale: run `d2v compose --config-name pipeline --out params.yaml`"
    dvc_config = (PROJECT_ROOT / ".dvc" / "config").read_text()
    assert "config_name = pipeline" in dvc_config and "config_dir = conf" in dvc_config
    # Exactly what DVC's own Hydra composition writes, so `dvc exp run -S` changes only the key.
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(PROJECT_ROOT / "conf"), None, "pipeline", str(PROJECT_ROOT), [])
    assert on_disk == yaml.safe_load(out.read_text()), stale
    assert to_dict(from_dict(on_disk)) == to_dict(load_config([], config_name="pipeline"))
    assert to_dict(from_dict(on_disk)) == to_dict(load_config(["experiment=tiny"]))  # the same experiment, by name


@pytest.mark.parametrize(
    "name, want",
    [
        ("image_base", dict(embed_dim=768, depth=10, num_heads=12, average_top_k_layers=10, clone_batch=16, norm_eps=1e-6,
                            layer_norm_targets=True, cls_loss=0.01, ema_decay=0.9998, ema_end_decay=0.99999, ema_anneal_end_step=100000)),
        ("image_large", dict(embed_dim=1024, depth=24, num_heads=16, average_top_k_layers=18, ema_anneal_end_step=150000)),
        ("speech_base", dict(embed_dim=768, depth=12, average_top_k_layers=8, clone_batch=8, layerdrop=0.05, ema_decay=0.999,
                             ema_anneal_end_step=75000, min_target_var=0.1, loss_scale=None)),
        ("speech_large", dict(embed_dim=1024, depth=16, average_top_k_layers=16, clone_batch=12, ema_decay=0.9997, ema_end_decay=1.0)),
        ("text_base", dict(embed_dim=768, depth=12, average_top_k_layers=12, clone_batch=8, loss_scale=1.0, ema_decay=0.9999)),
        ("text_large", dict(embed_dim=1024, depth=24, average_top_k_layers=24, layer_norm_target_layer=True,
                            instance_norm_target_layer=False, instance_norm_targets=True)),
    ],
)
def test_released_settings_match_the_spec_tables(name, want):
    m = load_config([f"experiment={name}"]).model
    for k, v in want.items():
        assert getattr(m, k) == v, f"{name}.{k}: {getattr(m, k)} != {v}"


def test_released_decoders_and_masks():
    ib = load_config(["experiment=image_base"]).model.image
    assert (ib.prenet_depth, ib.mask_prob, ib.mask_prob_adjust, ib.mask_length, ib.inverse_mask) == (2, 0.8, 0.07, 3, True)
    assert (ib.decoder.decoder_layers, ib.decoder.decoder_dim, ib.decoder.decoder_kernel, ib.decoder.decoder_groups) == (6, 768, 3, 16)
    sb = load_config(["experiment=speech_base"]).model.speech
    assert (sb.decoder.decoder_layers, sb.decoder.decoder_dim, sb.decoder.decoder_kernel, sb.decoder.input_dropout) == (4, 384, 7, 0.1)
    assert sb.teacher_encoder == "no_local" and sb.mask_length == 5
    sl = load_config(["experiment=speech_large"]).model.speech
    assert sl.prenet_depth == 8 and sl.mask_prob == 0.55
    tb = load_config(["experiment=text_base"]).model.text
    d = tb.decoder
    assert (d.decoder_layers, d.decoder_kernel, d.decoder_groups, d.decoder_residual, d.projection_layers) == (5, 9, 1, False, 2)
    assert tb.teacher_encoder == "none" and tb.mask_prob == 0.48


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.embed_dim=abc", "embed_dim"),
        ("train.lr=-1", "train.lr"),
        ("train.modalities=[video]", "train.modalities"),
        ("train.precision=fp16", "train.precision"),
        ("model.num_heads=5", "embed_dim"),
    ],
)
def test_malformed_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config([override])


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="nonexistent"):
        load_config(["+model.nonexistent=1"])


def test_missing_config_dir(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([], config_dir=tmp_path)


def test_overriding_a_key_the_yaml_does_not_set_explains_the_plus():
    with pytest.raises(ConfigError, match=r"\+model.collapse_check_after"):
        load_config(["model.collapse_check_after=0"])
    assert load_config(["+model.collapse_check_after=7"]).model.collapse_check_after == 7
