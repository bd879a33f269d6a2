"""Experiment configuration: typed dataclasses, composed by Hydra from ``conf/``.

``conf/`` is the source of truth (config groups ``model``, ``train``, ``data``, ``experiment``);
``load_config`` composes it with overrides, merges it onto these dataclasses (unknown keys and
wrong types fail with the key's full name) and validates the values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from d2v.models.config import MODALITIES, ConfigError, ModelConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TrainConfig:
    """Optimisation and run control for pretraining (spec §5 for the released values)."""

    modalities: list[str] = field(default_factory=lambda: ["image"])  # trained in turn, one batch each
    # GLOBAL samples per forward pass per modality, summed over all processes: under torchrun each of
    # the WORLD_SIZE processes gets batch_size / WORLD_SIZE (it must divide); one optimizer step
    # sees batch_size x grad_accum samples of one modality.
    batch_size: int = 16
    max_steps: int = 100
    warmup_steps: int = 10
    lr: float = 1e-3
    min_lr: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    clip_norm: float = 0.0  # 0 = no clipping
    grad_accum: int = 1
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    device: str = "auto"
    threads: int = 0  # torch CPU threads, 0 = torch default
    log_every: int = 10
    # also checkpoint every N steps (0: only at the end); shard streams are re-seeded at these
    # boundaries, so a resumed run sees the batches an uninterrupted one would
    ckpt_every: int = 0
    track: bool = True  # log params, per-step metrics and artifacts to MLflow (see d2v.tracking)
    out_dir: str = "models/pretrain"

    def per_rank_batch(self, world_size: int) -> int:
        """``batch_size / world_size``: each process's share of the global batch."""
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        if self.batch_size % world_size != 0:
            near = [n for n in ((self.batch_size // world_size) * world_size, (self.batch_size // world_size + 1) * world_size) if n]
            raise ConfigError(
                f"train.batch_size: {self.batch_size} is the global batch and must be divisible by the world size "
                f"{world_size} (processes); use a multiple of {world_size}, e.g. {' or '.join(map(str, near))}"
            )
        return self.batch_size // world_size


@dataclass
class ImageDataConfig:
    """``fashion_mnist``: Debian's package or the official files (IDX, checksummed);
    ``imagenet_folder``: an ImageNet-style ``<folder>/{train,val}/<class>/*.JPEG`` tree the user provides."""

    dataset: str = "fashion_mnist"
    folder: str = ""  # for imagenet_folder
    val_count: int = 5000  # held out from the official train split (seeded); test = the official test split
    max_train: int = 0  # 0: all


@dataclass
class SpeechDataConfig:
    """``espeak_words``: spoken words synthesised with espeak-ng (no download beyond PyPI);
    ``librispeech``: LibriSpeech subsets from openslr.org (needs internet)."""

    dataset: str = "espeak_words"
    num_words: int = 35  # the Speech Commands v2 vocabulary, first N
    accents: list[str] = field(default_factory=lambda: ["en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc"])
    variants: list[str] = field(default_factory=lambda: ["m1", "m3", "m5", "f1", "f3", "f5", "klatt", "croak"])
    rates: list[int] = field(default_factory=lambda: [140, 200])
    pitches: list[int] = field(default_factory=lambda: [35, 65])
    val_voices: list[str] = field(default_factory=lambda: ["en-029+f3"])  # accent+variant held out for val
    test_voices: list[str] = field(default_factory=lambda: ["en-gb-scotland+m5", "en-us+klatt"])  # held out for test
    sample_rate: int = 16000
    subsets: list[str] = field(default_factory=lambda: ["train-clean-100", "dev-clean", "test-clean"])  # librispeech


@dataclass
class TextDataConfig:
    """``kjv_rt``: KJV Bible + a Wikipedia sample (pretraining) and Rotten-Tomatoes snippets (labelled);
    ``wikitext103``: WikiText-103 raw (needs internet)."""

    dataset: str = "kjv_rt"
    min_chars: int = 8
    max_chars: int = 2000
    val_fraction: float = 0.05
    test_fraction: float = 0.05


@dataclass
class ShardConfig:
    maxcount: int = 2000  # samples per shard
    min_shards: int = 4  # at least ranks x loader workers


@dataclass
class TokenizerConfig:
    vocab_size: int = 4000
    model_type: str = "unigram"
    character_coverage: float = 1.0


@dataclass
class DataConfig:
    """Where pretraining batches come from: ``shards`` (the DVC data stages) or ``sample``
    (small built-in data, no download)."""

    source: str = "sample"
    root: str = "data"
    num_samples: int = 512  # per modality, for the sample source
    audio_seconds: float = 1.0  # crop length for speech batches
    text_length: int = 64  # tokens per text block
    num_workers: int = 0
    image: ImageDataConfig = field(default_factory=ImageDataConfig)
    speech: SpeechDataConfig = field(default_factory=SpeechDataConfig)
    text: TextDataConfig = field(default_factory=TextDataConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class TaskConfig:
    """Fine-tuning, evaluation and linear probing of one downstream task (spec §6 for full scale).

    The same budget (``steps`` x ``batch_size``) fine-tunes the pretrained model and a randomly
    initialised one, so the report shows what pretraining bought."""

    head: str = "classify"  # mean-pooled features -> norm -> Linear (spec §6 image recipe); speech: "ctc" (letters)
    # The norm between the pooled features and the head: "layer" (LayerNorm, MAE/data2vec
    # fine-tuning) or "batch" (BatchNorm without affine: per-feature standardisation, MAE's
    # linear-probe recipe; it helps when a few directions of the pooled features dominate).
    pool_norm: str = "layer"
    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 20
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    layer_decay: float = 0.65  # lr x decay^(depth + 1 - layer): lower blocks move less
    label_smoothing: float = 0.1
    clip_norm: float = 0.0
    freeze_local: bool = False  # keep the local encoder fixed (speech: the CNN, fairseq feature_grad_mult 0)
    max_train: int = 0  # labelled training samples held in memory (0: the whole split)
    max_eval: int = 0  # evaluation samples (0: the whole split)
    eval_split: str = "test"  # reported accuracy; "val" is used during fine-tuning
    audio_seconds: float = 1.0  # speech: clips are centre-cropped / zero-padded to this length
    text_length: int = 64  # text: tokens per line (<s> + ids, padded)
    probe_max_train: int = 10000  # linear probe: training samples for the logistic regression
    probe_c: float = 1.0  # inverse L2 strength of the probe's logistic regression


@dataclass
class FinetuneConfig:
    """Downstream tasks on the pretrained encoder; ``d2v finetune/evaluate --task <modality>``."""

    tasks: list[str] = field(default_factory=lambda: ["image", "speech", "text"])
    image: TaskConfig = field(default_factory=TaskConfig)
    speech: TaskConfig = field(default_factory=TaskConfig)
    text: TaskConfig = field(default_factory=TaskConfig)
    init: str = "models/pretrain/checkpoint.pt"  # the pretrained model (checkpoint or model folder)
    out_dir: str = "models/finetune"
    device: str = "auto"
    threads: int = 0
    track: bool = True
    registry_prefix: str = "d2v"  # registered names: <prefix>-encoder, <prefix>-<task>-classifier


@dataclass
class Config:
    seed: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> "Config":
        self.model.validate()
        t = self.train

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{name}: {msg}")

        need(len(t.modalities) > 0, "train.modalities", "list at least one modality")
        for m in t.modalities:
            need(m in MODALITIES, "train.modalities", f"unknown modality {m!r}; expected {', '.join(MODALITIES)}")
            need(getattr(self.model, m) is not None, "train.modalities", f"{m!r} is trained but model.{m} is not configured")
        need(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
        need(t.ckpt_every >= 0, "train.ckpt_every", f"must be >= 0, got {t.ckpt_every}")
        need(t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
        need(0 <= t.warmup_steps, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
        need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
        need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", f"two values in [0, 1), got {t.betas}")
        need(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
        need(t.precision in ("auto", "fp32", "bf16"), "train.precision", f"auto|fp32|bf16, got {t.precision!r}")
        need(self.data.source in ("sample", "shards"), "data.source", f"unknown source {self.data.source!r}")
        need(self.data.image.dataset in ("fashion_mnist", "imagenet_folder"), "data.image.dataset",
             f"fashion_mnist|imagenet_folder, got {self.data.image.dataset!r}")
        need(self.data.speech.dataset in ("espeak_words", "librispeech"), "data.speech.dataset",
             f"espeak_words|librispeech, got {self.data.speech.dataset!r}")
        need(self.data.text.dataset in ("kjv_rt", "wikitext103"), "data.text.dataset",
             f"kjv_rt|wikitext103, got {self.data.text.dataset!r}")
        need(self.data.shard.maxcount >= 1, "data.shard.maxcount", "must be >= 1")
        need(self.data.tokenizer.vocab_size >= 16, "data.tokenizer.vocab_size", "must be >= 16")
        # ranges that would otherwise fail late (in a data loader, the optimizer) or not at all
        need(t.eps > 0, "train.eps", f"must be > 0, got {t.eps}")
        need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
        need(0 <= t.min_lr <= t.lr, "train.min_lr", f"must be in [0, train.lr={t.lr}], got {t.min_lr}")
        need(t.clip_norm >= 0, "train.clip_norm", f"must be >= 0 (0: no clipping), got {t.clip_norm}")
        need(t.threads >= 0, "train.threads", f"must be >= 0 (0: torch default), got {t.threads}")
        need(t.log_every >= 0, "train.log_every", f"must be >= 0, got {t.log_every}")
        need(t.device == "auto" or t.device.split(":")[0] in ("cpu", "cuda", "mps"), "train.device",
             f"auto, cpu, cuda, cuda:N or mps, got {t.device!r}")
        d = self.data
        need(d.num_samples >= 1, "data.num_samples", f"must be >= 1, got {d.num_samples}")
        need(d.audio_seconds > 0, "data.audio_seconds", f"must be > 0, got {d.audio_seconds}")
        need(d.text_length >= 2, "data.text_length", f"must be >= 2 (<s> + one token), got {d.text_length}")
        need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
        need(d.shard.min_shards >= 1, "data.shard.min_shards", f"must be >= 1, got {d.shard.min_shards}")
        need(d.tokenizer.model_type in ("unigram", "bpe", "char", "word"), "data.tokenizer.model_type",
             f"unigram|bpe|char|word, got {d.tokenizer.model_type!r}")
        need(0 < d.tokenizer.character_coverage <= 1, "data.tokenizer.character_coverage",
             f"must be in (0, 1], got {d.tokenizer.character_coverage}")
        need(d.speech.sample_rate > 0, "data.speech.sample_rate", f"must be > 0 Hz, got {d.speech.sample_rate}")
        need(d.image.val_count >= 0, "data.image.val_count", f"must be >= 0, got {d.image.val_count}")
        need(d.image.max_train >= 0, "data.image.max_train", f"must be >= 0 (0: all), got {d.image.max_train}")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(d.text, name)
            need(0 <= v < 1, f"data.text.{name}", f"must be in [0, 1), got {v}")
        need(0 <= d.text.min_chars <= d.text.max_chars, "data.text.min_chars",
             f"need 0 <= min_chars <= max_chars, got {d.text.min_chars} / {d.text.max_chars}")
        for task in self.finetune.tasks:
            need(task in MODALITIES, "finetune.tasks", f"unknown task {task!r}; expected {', '.join(MODALITIES)}")
        for task in MODALITIES:
            tc: TaskConfig = getattr(self.finetune, task)
            k = f"finetune.{task}"
            need(tc.head in ("classify", "ctc"), f"{k}.head", f"must be 'classify' or 'ctc', got {tc.head!r}")
            need(tc.head != "ctc" or task == "speech", f"{k}.head", "'ctc' (letter targets) is for the speech task only")
            need(tc.pool_norm in ("layer", "batch"), f"{k}.pool_norm", f"must be 'layer' or 'batch', got {tc.pool_norm!r}")
            need(tc.steps >= 1, f"{k}.steps", f"must be >= 1, got {tc.steps}")
            need(tc.batch_size >= 1, f"{k}.batch_size", f"must be >= 1, got {tc.batch_size}")
            need(tc.lr > 0, f"{k}.lr", f"must be > 0, got {tc.lr}")
            need(0 < tc.layer_decay <= 1, f"{k}.layer_decay", f"must be in (0, 1], got {tc.layer_decay}")
            need(0 <= tc.label_smoothing < 1, f"{k}.label_smoothing", f"must be in [0, 1), got {tc.label_smoothing}")
            need(tc.eval_split in ("val", "test"), f"{k}.eval_split", f"val|test, got {tc.eval_split!r}")
            need(tc.audio_seconds > 0, f"{k}.audio_seconds", f"must be > 0, got {tc.audio_seconds}")
            need(tc.text_length >= 2, f"{k}.text_length", f"must be >= 2, got {tc.text_length}")
            need(tc.probe_c > 0, f"{k}.probe_c", f"must be > 0, got {tc.probe_c}")
        return self


def conf_dir() -> Path:
    return Path(os.environ.get("D2V_CONF_DIR", PROJECT_ROOT / "conf"))


def load_config(overrides: Sequence[str] = (), config_name: str = "config", config_dir: Optional[Path] = None) -> Config:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides into a validated ``Config``."""
    return from_dict(compose_dict(overrides, config_name, config_dir))


def compose_dict(overrides: Sequence[str] = (), config_name: str = "config",
                 config_dir: Optional[Path] = None) -> dict[str, Any]:
    """The plain Hydra composition (what DVC writes to params.yaml on `dvc exp run`), not validated."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    cdir = Path(config_dir or conf_dir()).resolve()
    if not (cdir / f"{config_name}.yaml").is_file():
        raise ConfigError(f"config {config_name!r} not found in {cdir}")
    try:
        with initialize_config_dir(config_dir=str(cdir), version_base="1.3"):
            composed = compose(config_name=config_name, overrides=list(overrides))
    except HydraException as e:
        raise ConfigError(f"cannot compose config: {e}") from e
    except yaml.YAMLError as e:  # the message names the file, line and column
        raise ConfigError(f"cannot compose config: a YAML file in {cdir} is not valid: {e}") from e
    except UnicodeDecodeError as e:
        bad = next((str(f) for f in sorted(cdir.rglob("*.y*ml")) if not _is_utf8(f)), f"a file in {cdir}")
        raise ConfigError(f"cannot compose config: {bad} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OmegaConfBaseException as e:  # e.g. overriding a key the YAML files do not set
        key = getattr(e, "full_key", None) or ""
        hint = f" (a field the YAML does not set is added with a leading '+': +{key}=...)" if key else ""
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}{hint}") from e
    return OmegaConf.to_container(composed, resolve=True)  # type: ignore[return-value]


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
        return True
    except (UnicodeDecodeError, OSError):
        return False


def from_dict(d: dict[str, Any]) -> Config:
    """Typed merge of a plain dict (e.g. ``params.yaml``) onto ``Config``; errors name the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), d)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from e
    return cfg.validate()


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
