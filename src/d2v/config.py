"""Experiment configuration: typed dataclasses, composed by Hydra from ``conf/``.

``conf/`` is the source of truth (config groups ``model``, ``train``, ``data``, ``experiment``);
``load_config`` composes it with overrides, merges it onto these dataclasses (unknown keys and
wrong types fail with the key's full name) and validates the values.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from d2v.models.config import MODALITIES, OBJECTIVES, ConfigError, ModelConfig
from d2v.models.config import need as _need

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TrainConfig:
    """Optimisation and run control for pretraining (the released values: fairseq ``examples/data2vec/config/v2/*.yaml``)."""

    # data2vec2 (this project's model) | data2vec1 | mae (image only) | bert (text only): the
    # baselines of d2v.models.baselines, trained by the same loop, loaders, DDP and checkpoints
    objective: str = "data2vec2"
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
    # torch.compile the data2vec2 step (student forward + backward, teacher forward; d2v.train.compile);
    # eager, with one warning, where compiling fails. auto | true | false; auto = on CUDA only: on an
    # H200 it makes the base steps 1.34-1.49x faster for 45-86 s of compiling, on the 2-core CPU it
    # costs more than it saves (BENCHMARKS.md, "GPU benchmark" and "torch.compile")
    compile: str = "auto"
    log_every: int = 10
    # also checkpoint every N steps (0: only at the end); shard streams are re-seeded at these
    # boundaries, so a resumed run sees the batches an uninterrupted one would
    ckpt_every: int = 0
    track: bool = True  # log params, per-step metrics and artifacts to MLflow (see d2v.tracking)
    out_dir: str = "models/pretrain"
    # also keep every Nth step's checkpoint as checkpoint_<step>.pt (0: only the one checkpoint.pt)
    keep_every: int = 0
    # a wall-clock budget of training minutes (probes excluded): the lr schedule runs over it and the
    # run stops when it is spent (or at max_steps). 0: steps only.
    max_minutes: float = 0.0
    # online evaluation: every N steps (and at the end), a linear probe of frozen mean-pooled features
    # per trained modality with labels, fit on probe_train labelled training samples and scored on
    # probe_val samples of probe_split (shards only; 0 samples: the whole split); 0: off
    probe_every: int = 0
    probe_train: int = 1000
    probe_val: int = 500
    # also probe each time this many more training minutes have passed (0: off): a time-to-accuracy
    # curve on a fixed time grid, whatever the step rate (benchmarks/vs_mae.py)
    probe_every_minutes: float = 0.0
    # the split the probe is scored on: val, or test for a benchmark's final figures only (never
    # choose settings on it)
    probe_split: str = "val"

    def validate(self) -> TrainConfig:
        _need(len(self.modalities) > 0, "train.modalities", "list at least one modality")
        for m in self.modalities:
            _need(m in MODALITIES, "train.modalities", f"unknown modality {m!r}; expected {', '.join(MODALITIES)}")
        _need(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _need(self.ckpt_every >= 0, "train.ckpt_every", f"must be >= 0, got {self.ckpt_every}")
        _need(self.max_steps >= 1, "train.max_steps", f"must be >= 1, got {self.max_steps}")
        _need(0 <= self.warmup_steps, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _need(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
              f"two values in [0, 1), got {self.betas}")
        _need(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _need(self.precision in ("auto", "fp32", "bf16"), "train.precision", f"auto|fp32|bf16, got {self.precision!r}")
        self.compile = str(self.compile).lower()  # YAML's true/false arrive as "True"/"False"
        _need(self.compile in ("auto", "true", "false"), "train.compile", f"auto|true|false, got {self.compile!r}")
        # ranges that would otherwise fail late (in a data loader, the optimizer) or not at all
        _need(self.eps > 0, "train.eps", f"must be > 0, got {self.eps}")
        _need(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _need(0 <= self.min_lr <= self.lr, "train.min_lr", f"must be in [0, train.lr={self.lr}], got {self.min_lr}")
        _need(self.clip_norm >= 0, "train.clip_norm", f"must be >= 0 (0: no clipping), got {self.clip_norm}")
        _need(self.threads >= 0, "train.threads", f"must be >= 0 (0: torch default), got {self.threads}")
        _need(self.log_every >= 0, "train.log_every", f"must be >= 0, got {self.log_every}")
        _need(self.objective in OBJECTIVES, "train.objective",
              f"unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        _need(self.keep_every >= 0, "train.keep_every", f"must be >= 0 (0: keep only checkpoint.pt), got {self.keep_every}")
        _need(self.max_minutes >= 0, "train.max_minutes", f"must be >= 0 (0: no time budget), got {self.max_minutes}")
        _need(self.probe_every >= 0, "train.probe_every", f"must be >= 0 (0: no online probe), got {self.probe_every}")
        _need(all(n == 0 or n >= 10 for n in (self.probe_train, self.probe_val)), "train.probe_train/probe_val",
              f"need at least 10 samples each (0: the whole split), got {self.probe_train} / {self.probe_val}")
        _need(self.probe_every_minutes >= 0, "train.probe_every_minutes",
              f"must be >= 0 (0: step-based probes only), got {self.probe_every_minutes}")
        _need(self.probe_split in ("val", "test"), "train.probe_split", f"val or test, got {self.probe_split!r}")
        _need(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "train.device",
              f"auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        return self

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
    ``imagenet_folder``: an ImageNet-style ``<folder>/{train,val}/<class>/*.JPEG`` tree the user provides;
    ``image_folder``: your own ``<folder>/<class>/*`` (labelled) or ``<folder>/*`` (unlabelled) images."""

    dataset: str = "fashion_mnist"
    folder: str = ""  # for imagenet_folder and image_folder
    val_count: int = 5000  # held out from the official train split (seeded); test = the official test split
    max_train: int = 0  # 0: all

    def validate(self) -> ImageDataConfig:
        _need(self.dataset in ("fashion_mnist", "imagenet_folder", "image_folder"), "data.image.dataset",
              f"fashion_mnist|imagenet_folder|image_folder, got {self.dataset!r}")
        _need(self.val_count >= 0, "data.image.val_count", f"must be >= 0, got {self.val_count}")
        _need(self.max_train >= 0, "data.image.max_train", f"must be >= 0 (0: all), got {self.max_train}")
        return self


def _check_fractions(prefix: str, val_fraction: float, test_fraction: float) -> None:
    """Held-out fractions: each in [0, 1), and something left for train."""
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        _need(0 <= v < 1, f"{prefix}.{name}", f"must be in [0, 1), got {v}")
    _need(val_fraction + test_fraction < 1, f"{prefix}.val_fraction + {prefix}.test_fraction",
          f"must be < 1 (something must be left for train), got {val_fraction + test_fraction}")


@dataclass
class SpeechDataConfig:
    """``espeak_words``: spoken words synthesised with espeak-ng (no download beyond PyPI);
    ``librispeech``: LibriSpeech subsets from openslr.org (needs internet), or read in place from
    ``folder`` when you have them extracted (the ``LibriSpeech/`` folder holding ``<subset>/``);
    ``audio_folder``: your own audio files under ``folder`` (optional ``labels.csv``)."""

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
    folder: str = ""  # audio_folder: .wav/.flac/.ogg/.mp3 files under it (recursive), optional labels.csv;
    # librispeech: your extracted LibriSpeech/ folder (read in place, nothing downloaded)
    val_fraction: float = 0.1  # audio_folder: files held out (seeded) for val ...
    test_fraction: float = 0.1  # ... and for test

    def validate(self) -> SpeechDataConfig:
        _need(self.dataset in ("espeak_words", "librispeech", "audio_folder"), "data.speech.dataset",
              f"espeak_words|librispeech|audio_folder, got {self.dataset!r}")
        _need(self.sample_rate > 0, "data.speech.sample_rate", f"must be > 0 Hz, got {self.sample_rate}")
        _need(self.dataset != "audio_folder" or bool(self.folder), "data.speech.folder",
              "must be set (the folder holding your audio files) for data.speech.dataset=audio_folder")
        _check_fractions("data.speech", self.val_fraction, self.test_fraction)
        return self


@dataclass
class TextDataConfig:
    """``kjv_rt``: KJV Bible + a Wikipedia sample (pretraining) and Rotten-Tomatoes snippets (labelled);
    ``wikitext103``: WikiText-103 raw (needs internet);
    ``text_files``: your own ``.txt`` / ``.jsonl`` files under ``folder`` (optional ``labels.csv``)."""

    dataset: str = "kjv_rt"
    min_chars: int = 8
    max_chars: int = 2000
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    folder: str = ""  # text_files: .txt (a record per line) and .jsonl ({"text", "label"}) files under it

    def validate(self) -> TextDataConfig:
        _need(self.dataset in ("kjv_rt", "wikitext103", "text_files"), "data.text.dataset",
              f"kjv_rt|wikitext103|text_files, got {self.dataset!r}")
        _need(self.dataset != "text_files" or bool(self.folder), "data.text.folder",
              "must be set (the folder holding your .txt/.jsonl files) for data.text.dataset=text_files")
        _check_fractions("data.text", self.val_fraction, self.test_fraction)
        _need(0 <= self.min_chars <= self.max_chars, "data.text.min_chars",
              f"need 0 <= min_chars <= max_chars, got {self.min_chars} / {self.max_chars}")
        return self


@dataclass
class ShardConfig:
    maxcount: int = 2000  # samples per shard
    min_shards: int = 4  # at least ranks x loader workers

    def validate(self) -> ShardConfig:
        _need(self.maxcount >= 1, "data.shard.maxcount", "must be >= 1")
        _need(self.min_shards >= 1, "data.shard.min_shards", f"must be >= 1, got {self.min_shards}")
        return self


@dataclass
class TokenizerConfig:
    vocab_size: int = 4000
    model_type: str = "unigram"
    character_coverage: float = 1.0

    def validate(self) -> TokenizerConfig:
        _need(self.vocab_size >= 16, "data.tokenizer.vocab_size", "must be >= 16")
        _need(self.model_type in ("unigram", "bpe", "char", "word"), "data.tokenizer.model_type",
              f"unigram|bpe|char|word, got {self.model_type!r}")
        _need(0 < self.character_coverage <= 1, "data.tokenizer.character_coverage",
              f"must be in (0, 1], got {self.character_coverage}")
        return self


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

    def validate(self) -> DataConfig:
        _need(self.source in ("sample", "shards"), "data.source", f"unknown source {self.source!r}")
        _need(self.num_samples >= 1, "data.num_samples", f"must be >= 1, got {self.num_samples}")
        _need(self.audio_seconds > 0, "data.audio_seconds", f"must be > 0, got {self.audio_seconds}")
        _need(self.text_length >= 2, "data.text_length", f"must be >= 2 (<s> + one token), got {self.text_length}")
        _need(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        for section in (self.image, self.speech, self.text, self.shard, self.tokenizer):
            section.validate()
        return self


@dataclass
class TaskConfig:
    """Fine-tuning, evaluation and linear probing of one downstream task (full scale: fairseq's
    ``mae_imagenet_clean`` / ``vox_10h`` / RoBERTa GLUE recipes).

    The same budget (``steps`` x ``batch_size``) fine-tunes the pretrained model and a randomly
    initialised one, so the report shows what pretraining bought."""

    head: str = "classify"  # mean-pooled features -> norm -> Linear (fairseq ``MaeImageClassificationModel``); speech: "ctc" (letters)
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
    max_eval: int = 0  # evaluation samples: the first max_eval labelled ones (0: the whole split)
    eval_batch_size: int = 256  # evaluation and probe feature extraction, per process
    # Image training augmentation (MAE / timm fine-tuning recipe, torchvision.transforms.v2); 0: off
    random_resized_crop: float = 0.0  # min crop scale of RandomResizedCrop (bicubic) + horizontal flip (MAE: 0.08)
    rand_augment: int = 0  # RandAugment ops per image (MAE's rand-m9: 2)
    rand_augment_magnitude: int = 9
    random_erasing: float = 0.0  # probability, after normalisation (MAE: 0.25)
    mixup: float = 0.0  # MixUp alpha (MAE: 0.8); with cutmix, one of the two per batch
    cutmix: float = 0.0  # CutMix alpha (MAE: 1.0)
    drop_path: float = 0.0  # stochastic depth, rising linearly over the blocks to this rate (0: the model's own)
    schedule: str = "cosine"  # cosine (warmup_steps, then to min_lr) | tri_stage (fairseq: phase_ratio, to min_lr)
    phase_ratio: list[float] = field(default_factory=lambda: [0.1, 0.4, 0.5])  # tri_stage: warm-up, hold, decay
    freeze_updates: int = 0  # the encoder is frozen (only the head trains) for these first steps (fairseq freeze_finetune_updates)
    eval_split: str = "test"  # reported accuracy; "val" is used during fine-tuning
    # Speech fine-tuning-time masking of the CNN features, training only (fairseq vox_10h: 0.75 / 10,
    # channels 0.25 / 64; d2v.models.heads.FrameMasking); probabilities 0 = off
    mask_prob: float = 0.0  # time: span starts ~ mask_prob * frames / mask_length; masked frames become N(0, 0.01²) noise
    mask_length: int = 10  # frames per time span
    mask_channel_prob: float = 0.0  # channels: span starts ~ mask_channel_prob * D / mask_channel_length; zeroed over time
    mask_channel_length: int = 64  # channels per channel span (< the model's embed_dim)
    audio_seconds: float = 1.0  # speech: clips are centre-cropped / zero-padded to this length
    text_length: int = 64  # text: tokens per line (<s> + ids, padded)
    probe_max_train: int = 10000  # linear probe: training samples for the logistic regression
    probe_c: float = 1.0  # inverse L2 strength of the probe's logistic regression

    def validate(self, task: str) -> TaskConfig:
        """``task`` is the section's name (``finetune.<task>``): ``ctc`` is for speech only."""
        k = f"finetune.{task}"
        _need(self.head in ("classify", "ctc"), f"{k}.head", f"must be 'classify' or 'ctc', got {self.head!r}")
        _need(self.head != "ctc" or task == "speech", f"{k}.head", "'ctc' (letter targets) is for the speech task only")
        _need(self.pool_norm in ("layer", "batch"), f"{k}.pool_norm", f"must be 'layer' or 'batch', got {self.pool_norm!r}")
        _need(self.steps >= 1, f"{k}.steps", f"must be >= 1, got {self.steps}")
        _need(self.batch_size >= 1, f"{k}.batch_size", f"must be >= 1, got {self.batch_size}")
        _need(self.lr > 0, f"{k}.lr", f"must be > 0, got {self.lr}")
        _need(0 < self.layer_decay <= 1, f"{k}.layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        _need(0 <= self.label_smoothing < 1, f"{k}.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        _need(self.eval_split in ("val", "test"), f"{k}.eval_split", f"val|test, got {self.eval_split!r}")
        _need(self.audio_seconds > 0, f"{k}.audio_seconds", f"must be > 0, got {self.audio_seconds}")
        _need(self.text_length >= 2, f"{k}.text_length", f"must be >= 2, got {self.text_length}")
        _need(self.probe_c > 0, f"{k}.probe_c", f"must be > 0, got {self.probe_c}")
        _need(self.eval_batch_size >= 1, f"{k}.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _need(self.max_eval >= 0, f"{k}.max_eval", f"must be >= 0 (0: the whole split), got {self.max_eval}")
        _need(0 <= self.random_resized_crop <= 1, f"{k}.random_resized_crop", f"a scale in [0, 1], got {self.random_resized_crop}")
        _need(self.rand_augment >= 0 and 0 <= self.rand_augment_magnitude <= 30, f"{k}.rand_augment",
              f"ops >= 0 and magnitude in [0, 30], got {self.rand_augment}, {self.rand_augment_magnitude}")
        _need(0 <= self.random_erasing <= 1, f"{k}.random_erasing", f"a probability, got {self.random_erasing}")
        _need(self.mixup >= 0 and self.cutmix >= 0, f"{k}.mixup", f"alphas must be >= 0, got {self.mixup}, {self.cutmix}")
        _need(0 <= self.drop_path < 1, f"{k}.drop_path", f"must be in [0, 1), got {self.drop_path}")
        _need(self.schedule in ("cosine", "tri_stage"), f"{k}.schedule", f"cosine|tri_stage, got {self.schedule!r}")
        _need(self.schedule != "tri_stage" or 0 < self.min_lr < self.lr, f"{k}.min_lr",
              f"tri_stage decays exponentially to min_lr: it must be in (0, lr), got {self.min_lr}")
        _need(len(self.phase_ratio) == 3 and all(r >= 0 for r in self.phase_ratio) and abs(sum(self.phase_ratio) - 1) < 1e-6,
              f"{k}.phase_ratio", f"three shares (warm-up, hold, decay) summing to 1, got {self.phase_ratio}")
        _need(0 <= self.freeze_updates < self.steps, f"{k}.freeze_updates",
              f"must be in [0, steps={self.steps}), got {self.freeze_updates}")
        augments = self.random_resized_crop or self.rand_augment or self.random_erasing or self.mixup or self.cutmix
        _need(task == "image" or not augments, f"{k}", "image augmentations (random_resized_crop, rand_augment, "
              "random_erasing, mixup, cutmix) are for the image task only")
        _need(self.head != "ctc" or not (self.mixup or self.cutmix), f"{k}.mixup", "mixing needs class labels")
        for key, span in (("mask_prob", "mask_length"), ("mask_channel_prob", "mask_channel_length")):
            prob, length = getattr(self, key), getattr(self, span)
            _need(0 <= prob <= 1, f"{k}.{key}", f"a probability in [0, 1] (0: off), got {prob}")
            _need(prob == 0 or task == "speech", f"{k}.{key}",
                  "time and channel masking (fairseq's vox fine-tuning) is for the speech task only; set it to 0")
            _need(isinstance(length, int) and length >= 1, f"{k}.{span}", f"must be an integer >= 1, got {length!r}")
        return self


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
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    ckpt_every: int = 0  # a resumable checkpoint per init every N steps (0: none; --resume needs them)

    def validate(self) -> FinetuneConfig:
        _need(self.precision in ("auto", "fp32", "bf16"), "finetune.precision", f"auto|fp32|bf16, got {self.precision!r}")
        _need(self.ckpt_every >= 0, "finetune.ckpt_every", f"must be >= 0 (0: no checkpoints), got {self.ckpt_every}")
        for task in self.tasks:
            _need(task in MODALITIES, "finetune.tasks", f"unknown task {task!r}; expected {', '.join(MODALITIES)}")
        for task in MODALITIES:  # every section, listed in tasks or not: a bad value fails now, not later
            getattr(self, task).validate(task)
        return self


@dataclass
class Config:
    seed: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> Config:
        """Each section checks its own fields (the message names the key); only the checks that
        span sections are made here."""
        self.model.validate()
        self.train.validate()
        for m in self.train.modalities:
            _need(getattr(self.model, m) is not None, "train.modalities", f"{m!r} is trained but model.{m} is not configured")
        only = {"mae": "image", "bert": "text"}.get(self.train.objective)
        _need(only is None or self.train.modalities == [only], "train.objective",
              f"{self.train.objective} is a {only}-only objective; train.modalities must be [{only}], "
              f"got {self.train.modalities}")
        _need(not ((self.train.probe_every or self.train.probe_every_minutes) and self.data.source != "shards"),
              "train.probe_every",
              "the online probe reads the labelled shards: it needs data.source=shards (the pipeline's data)")
        self.data.validate()
        self.finetune.validate()
        sp = self.finetune.speech
        _need(sp.mask_channel_prob == 0 or self.model.speech is None or sp.mask_channel_length < self.model.embed_dim,
              "finetune.speech.mask_channel_length", f"a span of channels: must be < model.embed_dim="
              f"{self.model.embed_dim}, got {sp.mask_channel_length}")
        return self


def conf_dir() -> Path:
    return Path(os.environ.get("D2V_CONF_DIR", PROJECT_ROOT / "conf"))


def load_config(overrides: Sequence[str] = (), config_name: str = "config", config_dir: Path | None = None) -> Config:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides into a validated ``Config``."""
    return from_dict(compose_dict(overrides, config_name, config_dir))


def compose_dict(overrides: Sequence[str] = (), config_name: str = "config",
                 config_dir: Path | None = None) -> dict[str, Any]:
    """The plain Hydra composition (what DVC writes to params.yaml on `dvc exp run`), not validated.

    Every field of the dataclasses can be overridden, also one the YAML files leave at its default
    (``train.track=false``): such an override is added as Hydra's ``+key=value`` would add it, so the
    result is what ``dvc exp run -S +key=value`` writes. A key that is no field stays an error, and so
    does a key inside a model section the composed config does not configure (``model.image.*``
    without an image encoder): adding it would configure that modality behind the user's back."""
    import yaml
    from hydra.errors import HydraException

    cdir = Path(config_dir or conf_dir()).resolve()
    if not (cdir / f"{config_name}.yaml").is_file():
        raise ConfigError(f"config {config_name!r} not found in {cdir}")
    overrides, why = list(overrides), ""
    try:
        try:
            composed = _hydra_compose(cdir, config_name, overrides)
        except HydraException:
            added, why = _add_omitted_fields(cdir, config_name, overrides)
            if added == overrides:
                raise
            composed = _hydra_compose(cdir, config_name, added)
    except HydraException as e:
        raise ConfigError(f"cannot compose config: {e}{why}") from e
    except yaml.YAMLError as e:  # the message names the file, line and column
        raise ConfigError(f"cannot compose config: a YAML file in {cdir} is not valid: {e}") from e
    except UnicodeDecodeError as e:
        bad = next((str(f) for f in sorted(cdir.rglob("*.y*ml")) if not _is_utf8(f)), f"a file in {cdir}")
        raise ConfigError(f"cannot compose config: {bad} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        hint = f" (a field the YAML does not set is added with a leading '+': +{key}=...)" if key else ""
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}{hint}") from e
    return OmegaConf.to_container(composed, resolve=True)  # type: ignore[return-value]


def _hydra_compose(cdir: Path, config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(cdir), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _schema_path(key: str) -> list[bool] | None:
    """If the dotted ``key`` names a field of ``Config``, for each part of its path whether it is an
    optional section (``model.image``: absent unless configured); None if it names no field."""
    import dataclasses
    import types
    import typing

    cls: Any = Config
    optional: list[bool] = []
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            return None
        tp = typing.get_type_hints(cls)[part]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional.append(typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1)
        cls = args[0] if optional[-1] else tp
    return optional


def _add_omitted_fields(cdir: Path, config_name: str, overrides: list[str]) -> tuple[list[str], str]:
    """The overrides with ``key=value`` made ``+key=value`` where the key is a dataclass field the
    YAML leaves out, in a section the composition has (see ``compose_dict``); and, where one cannot
    apply, why: no such field, or a section that is not configured (then the overrides unchanged)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - a syntax error: the composition reports it
        return overrides, ""
    values = {i: o.key_or_group for i, o in enumerate(parsed)  # key=value on a value, not a group choice
              if o.type is OverrideType.CHANGE and o.package is None and not (cdir / o.key_or_group.replace(".", "/")).is_dir()}
    unknown = [k for k in values.values() if _schema_path(k) is None]
    if unknown:
        return overrides, f"\n({unknown[0]} is not a config field, nor a config group in {cdir}; check the spelling)"
    try:  # the group choices alone: the nodes the values apply to
        base = OmegaConf.to_container(_hydra_compose(cdir, config_name, [o for i, o in enumerate(overrides) if i not in values]))
    except Exception:  # noqa: BLE001 - the full composition reports it
        return overrides, ""
    out = list(overrides)
    for i, key in values.items():
        node: Any = base
        parts, at = key.split("."), None
        for j, part in enumerate(parts):  # the first part the composition lacks
            if not isinstance(node, dict) or part not in node:
                at = j
                break
            node = node[part]
        if at is None:
            continue
        if any((_schema_path(key) or [])[at:-1]):  # model.image.x without an image encoder: do not add one
            section = ".".join(parts[: at + 1])
            return overrides, (f"\n({section} is not configured in this composition, so {key} has nothing to change; "
                               "choose a config that has it, e.g. model=tiny)")
        out[i] = "+" + overrides[i].lstrip()
    return out, ""


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
