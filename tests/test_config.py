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
    # the same experiment, by name; only where it writes differs (conf/config.yaml: runs/, never the DVC
    # outputs), and the pipeline's online probe (conf/pipeline.yaml)
    pipeline_paths = ["train.out_dir=models/pretrain", "finetune.init=models/pretrain/checkpoint.pt",
                      "finetune.out_dir=models/finetune", "train.probe_every=300", "train.probe_train=300",
                      "train.probe_val=200"]
    assert to_dict(from_dict(on_disk)) == to_dict(load_config(["experiment=tiny", *pipeline_paths]))


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


def test_every_dataclass_field_overrides_without_a_plus(tmp_path):
    """A field the YAML leaves at its default is set like any other (the README's
    `train.track=false`); the result is what `dvc exp run -S +key=value` writes, nothing more."""
    cfg = load_config(["model.collapse_check_after=0", "train.track=false", "train.threads=2",
                       "model.image.inverse_mask=false", "model.speech.decoder.projection_ratio=3.0"])
    assert (cfg.model.collapse_check_after, cfg.train.track, cfg.train.threads) == (0, False, 2)
    assert cfg.model.image.inverse_mask is False and cfg.model.speech.decoder.projection_ratio == 3.0
    assert load_config(["+model.collapse_check_after=7"]).model.collapse_check_after == 7  # the explicit form still works
    from dvc.utils.hydra import compose_and_dump

    from d2v.config import compose_dict

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(PROJECT_ROOT / "conf"), None, "pipeline", str(PROJECT_ROOT), ["+train.track=false"])
    assert compose_dict(["train.track=false"], config_name="pipeline") == yaml.safe_load(out.read_text())


def test_an_override_that_is_no_field_or_has_no_section_is_refused():
    with pytest.raises(ConfigError, match=r"train\.made_up is not a config field"):
        load_config(["train.made_up=1"])
    # speech_base has no image encoder: setting model.image.* must not quietly configure one
    with pytest.raises(ConfigError, match=r"model\.image is not configured"):
        load_config(["experiment=speech_base", "model.image.mask_prob=0.5"])


def test_each_section_validates_itself():
    import dataclasses

    from d2v.config import Config, DataConfig, FinetuneConfig, TaskConfig, TrainConfig
    from d2v.models.config import DecoderConfig, ImageConfig, ModelConfig, SpeechConfig, TextConfig

    def sections(cls):
        yield cls
        for f in dataclasses.fields(cls):
            t = cls.__dataclass_fields__[f.name].default_factory if f.default_factory is not dataclasses.MISSING else None
            if isinstance(t, type) and dataclasses.is_dataclass(t):
                yield from sections(t)

    for cls in [*sections(Config), ImageConfig, SpeechConfig, TextConfig, DecoderConfig]:
        assert "validate" in vars(cls) or cls in (SpeechConfig, TextConfig), f"{cls.__name__} has no validate()"
    cases = [
        (lambda: TrainConfig(lr=-1).validate(), "train.lr"),
        (lambda: TrainConfig(modalities=["video"]).validate(), "train.modalities"),
        (lambda: DataConfig(source="web").validate(), "data.source"),
        (lambda: DataConfig().validate() and DataConfig(shard=dataclasses.replace(DataConfig().shard, maxcount=0)).validate(),
         "data.shard.maxcount"),
        (lambda: TaskConfig(head="ctc").validate("image"), "finetune.image.head"),
        (lambda: TaskConfig(probe_c=0).validate("text"), "finetune.text.probe_c"),
        (lambda: FinetuneConfig(tasks=["video"]).validate(), "finetune.tasks"),
        (lambda: ModelConfig(image=ImageConfig(patch_size=5)).validate(), "model.image.input_size"),
        (lambda: ModelConfig(text=TextConfig(decoder=DecoderConfig(decoder_groups=5))).validate(), "model.text.decoder.decoder_groups"),
    ]
    for fn, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            fn()
    # the one check across sections: a trained modality needs its encoder
    with pytest.raises(ConfigError, match=r"train\.modalities: 'speech' is trained but model\.speech is not configured"):
        load_config(["experiment=image_base", "train.modalities=[speech]"])


def _pretrain_stage_outputs() -> dict[str, list[str]]:
    stage = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["pretrain"]
    names = lambda items: [next(iter(i)) if isinstance(i, dict) else i for i in items]  # noqa: E731
    return {k: names(stage.get(k, [])) for k in ("outs", "metrics", "plots")}


def test_a_bare_pretrain_writes_under_runs_and_the_stage_writes_the_dvc_outputs(tmp_path, monkeypatch):
    """`d2v pretrain` with no arguments must not overwrite the pipeline's DVC outputs; with
    --params (what the stage runs) it writes exactly them."""
    import subprocess

    from d2v.cli.pretrain import main, report_paths

    stage = _pretrain_stage_outputs()
    dvc_outs = [*stage["outs"], *stage["metrics"], *stage["plots"]]
    assert {"models/pretrain", "reports/metrics/pretrain.json", "reports/plots/pretrain_loss.tsv"} <= set(dvc_outs)
    bare = load_config()
    written = [bare.train.out_dir, *map(str, report_paths(bare, False, None, None))]
    assert all(Path(p).parts[0] == "runs" for p in written), written
    assert not any(Path(w).is_relative_to(o) or Path(o).is_relative_to(w) for w in written for o in dvc_outs)
    assert subprocess.run(["git", "check-ignore", "-q", "runs/pretrain/checkpoint.pt"], cwd=PROJECT_ROOT).returncode == 0
    staged = from_dict(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()))
    assert staged.train.out_dir in stage["outs"]
    assert [str(p) for p in report_paths(staged, True, None, None)] == [*stage["metrics"], *stage["plots"]]
    # and for real, from a project-like folder: only runs/ appears
    monkeypatch.chdir(tmp_path)
    assert main(["train.max_steps=1", "train.modalities=[image]", "train.track=false", "train.batch_size=4",
                 "data.num_samples=8", "--no-progress"]) == 0
    assert {p.name for p in (tmp_path / "runs/pretrain").iterdir()} >= {"checkpoint.pt", "metrics.json", "loss.tsv",
                                                                        "probe.tsv"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_reports_of_a_quick_finetune_go_beside_its_models_not_over_the_pipeline_reports():
    """`d2v finetune/evaluate/register` without --params write runs/reports/...; with params.yaml
    (models/finetune) they write the reports/ files the DVC stages declare."""
    from d2v.cli.common import reports_root

    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    declared = {next(iter(m)) for m in stages["finetune"]["do"]["metrics"]}
    assert declared == {"reports/metrics/finetune_${item}.json"}
    staged = from_dict(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()))
    assert reports_root(staged.finetune.out_dir) / "metrics/finetune_${item}.json" == Path(next(iter(declared)))
    bare = load_config()
    assert reports_root(bare.finetune.out_dir) == Path("runs/reports")
    assert reports_root("/tmp/exp1/finetune") == Path("/tmp/exp1/reports")


@pytest.mark.parametrize("name", ["config", "pipeline"])
def test_finetuning_starts_from_the_checkpoint_its_pretraining_writes(name):
    """finetune.init follows train.out_dir (moving the pretraining output moves what fine-tuning loads),
    with or without a train group that sets it; an explicit finetune.init still wins."""
    default = load_config([], config_name=name)
    assert default.finetune.init == f"{default.train.out_dir}/checkpoint.pt"
    for extra in ([], ["experiment=speech_base"]):
        moved = load_config([*extra, "train.out_dir=/elsewhere/pre"], config_name=name)
        assert moved.finetune.init == "/elsewhere/pre/checkpoint.pt", extra
    assert load_config(["finetune.init=/x.pt"], config_name=name).finetune.init == "/x.pt"
