"""Labelled data for the downstream tasks, streamed from the shards: host memory does not grow
with the split (ImageNet, LibriSpeech 960 h fine-tune as the embedded default does).

Three readers over the WebDataset shards that ``d2v shard`` writes (unlabelled samples, ``cls`` <
0, are dropped before anything of them is decoded):

* :func:`train_batches`: fine-tuning's stream. Shards resampled with replacement and samples
  shuffled, both seeded, so the stream is a pure function of its seed: the pretrained and the
  random-init classifier see the same batches, and a resumed run re-creates its stream. Under
  DDP every rank reads the same *global* batches and decodes only its own rows
  ``[rank*b, (rank+1)*b)``, so W processes train on exactly what one process does.
* :func:`eval_batches`: one exact pass, in shard order, cut into batches of ``batch_size``;
  batch ``i`` is decoded by rank ``i % W`` only. Batches are the same whatever the world size,
  so scores summed over ranks equal a single process's.
* :func:`load_split`: a small split decoded into memory (the online probe, tests), capped by ``max_n``.

Decoding and normalisation are :mod:`d2v.data.transforms`, as in pretraining and ``d2v encode``:

* image: JPEG/PNG -> [0, 1] -> the model's input size (photos: the shorter side to size / 0.875,
  the centre crop, as MAE evaluates; Fashion-MNIST: resized whole) -> normalised as in pretraining;
* speech: FLAC -> per-utterance standardised waveform; clips longer than ``audio_seconds`` are
  centre-cropped (counted: CTC refuses them); zero-padded to ``audio_seconds`` (training: a fixed
  shape) or to the batch's longest clip (evaluation, as fairseq's collater); ``lengths`` keep
  the true sample counts (padding masks are built from them);
* text: ``<s>`` + sentencepiece ids, cut at ``text_length``, right-padded with ``<pad>``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from d2v.data import transforms
from d2v.data.augment import ImageAugment
from d2v.data.loaders import SeededShuffle, check_key, decode_sample, maybe_labelled, shard_error, worker_index
from d2v.data.shards import shard_dir, shard_urls
from d2v.errors import InputError
from d2v.models.ctc import subset_index


@dataclass
class LabelledSplit:
    """Labelled samples as tensors: one batch of a stream, or a small split held in memory."""

    modality: str
    split: str
    source: torch.Tensor  # (N, C, H, W) float | (N, L) float | (N, T) long
    label: torch.Tensor  # (N,) long
    keys: list[str]
    lengths: torch.Tensor | None = None  # speech: true samples per clip; text: tokens per row
    texts: list[str] | None = None  # speech: the transcript (metadata ``label``), the CTC target
    cropped: int = 0  # speech: clips longer than ``audio_seconds``, centre-cropped (CTC refuses them)
    soft_label: torch.Tensor | None = None  # (N, classes): MixUp / CutMix targets of an augmented batch
    subset: torch.Tensor | None = None  # speech: (N,) index in d2v.models.ctc.EVAL_SUBSETS (LibriSpeech), -1: none

    def __len__(self) -> int:
        return int(self.label.numel())


def label_names(root: str | Path, modality: str) -> list[str]:
    """The class names in ``cls`` order, from the shard stage's summary."""
    path = shard_dir(root, modality) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"shard summary not found: {path} (run `d2v shard --modality {modality}`)")
    return list(json.loads(path.read_text())["labels"])


def split_size(root: str | Path, modality: str, split: str) -> int | None:
    """Samples in ``split`` (labelled or not) from the shard summary; None when unknown."""
    try:
        return int(json.loads((shard_dir(root, modality) / "summary.json").read_text())["splits"][split]["samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------ decoding
@dataclass(frozen=True)
class TaskInputs:
    """How one task's shard samples become a :class:`LabelledSplit` (picklable: loader workers use it)."""

    modality: str
    image_size: int = 28
    in_chans: int = 1
    sample_rate: int = 16000
    audio_seconds: float = 1.0
    text_length: int = 64
    pad_to_longest: bool = False  # speech: pad to the batch's longest clip, not to ``audio_seconds``
    augment: ImageAugment | None = None  # image training: the fine-tuning recipe's augmentation
    image_mean: tuple[float, ...] = (transforms.IMAGE_MEAN,)  # image: transforms.image_stats(data.image.dataset)
    image_std: tuple[float, ...] = (transforms.IMAGE_STD,)
    image_crop: float = 1.0  # image without augmentation: transforms.image_eval_crop(data.image.dataset)

    @property
    def max_samples(self) -> int:
        return int(round(self.audio_seconds * self.sample_rate))

    def collate(self, samples: list[dict], split: str = "") -> LabelledSplit:
        keys = [s["__key__"] for s in samples]
        labels = torch.tensor([int(s["cls"]) for s in samples], dtype=torch.long)
        if self.modality == "image":
            images = [transforms.decode_image_uint8(transforms.image_bytes(s), f"sample {k}") for s, k in zip(samples, keys)]
            if self.augment is not None:  # augments uint8, as timm's recipe does
                src, soft = self.augment(images, labels, keys)
                return LabelledSplit("image", split, src, labels, keys, soft_label=soft)
            if self.image_crop < 1.0:
                images = [transforms.resize_center_crop(x, self.image_size, self.image_crop) for x in images]
            images = [x.float().div_(255) for x in images]
            src = torch.stack([transforms.image_tensor(x, self.image_size, self.in_chans, self.image_mean, self.image_std)
                               for x in images])
            return LabelledSplit("image", split, src, labels, keys)
        if self.modality == "speech":
            target, wavs, cropped = self.max_samples, [], 0
            for s, k in zip(samples, keys):
                w = transforms.decode_audio(s["flac"], f"sample {k}", self.sample_rate)
                if w.numel() > target:  # centre crop: the word sits in the middle of its clip
                    start = (w.numel() - target) // 2
                    w, cropped = w[start : start + target], cropped + 1
                wavs.append(w)
            lengths = torch.tensor([w.numel() for w in wavs], dtype=torch.long)
            width = int(lengths.max()) if self.pad_to_longest else target
            src = torch.stack([F.pad(w, (0, width - w.numel())) for w in wavs])
            metas = [_meta(s, k) for s, k in zip(samples, keys)]
            return LabelledSplit("speech", split, src, labels, keys, lengths, [_transcript(m, k) for m, k in zip(metas, keys)],
                                 cropped, subset=torch.tensor([subset_index(str(m.get("path", ""))) for m in metas]))
        ids = [transforms.text_ids(s["ids.npy"], self.text_length) for s in samples]
        return LabelledSplit("text", split, transforms.pad_rows(ids, self.text_length), labels, keys,
                             torch.tensor([len(i) for i in ids], dtype=torch.long))


def _meta(sample: dict, key: str) -> dict:
    """A sample's JSON metadata (the manifest row)."""
    try:
        meta = sample["json"]
        meta = meta if isinstance(meta, dict) else json.loads(meta)
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"{key}: shard sample has no readable JSON metadata ({e})") from e
    if not isinstance(meta, dict):
        raise InputError(f"{key}: shard sample's JSON metadata is a {type(meta).__name__}, not an object")
    return meta


def _transcript(meta: dict, key: str) -> str:
    """The clip's transcript: the ``label`` of its JSON metadata (the word, or the LibriSpeech sentence)."""
    if "label" not in meta:
        raise InputError(f"{key}: shard sample has no readable JSON 'label' for its transcript (keys {sorted(meta)})")
    return str(meta["label"])


def task_inputs(cfg: Any, task: str, pad_to_longest: bool = False, train: bool = False) -> TaskInputs:
    """The decoding of ``task`` for ``cfg.model`` (sizes, sample rate, text length) and ``cfg.finetune.<task>``;
    ``train``: with the task's training augmentation (image: :mod:`d2v.data.augment`)."""
    tc = getattr(cfg.finetune, task)
    m = cfg.model
    if getattr(m, task, None) is None:
        raise InputError(f"model.{task} is not configured: cannot run the {task} task")
    if task == "image":
        mean, std = transforms.image_stats(cfg.data.image.dataset)
        aug = None
        if train and (tc.random_resized_crop or tc.rand_augment or tc.random_erasing or tc.mixup or tc.cutmix):
            aug = ImageAugment(m.image.input_size, m.image.in_chans, tc.random_resized_crop, tc.rand_augment,
                               tc.rand_augment_magnitude, tc.random_erasing, tc.mixup, tc.cutmix,
                               len(label_names(cfg.data.root, "image")), cfg.seed, mean, std)
        return TaskInputs("image", image_size=m.image.input_size, in_chans=m.image.in_chans, augment=aug,
                          image_mean=mean, image_std=std, image_crop=transforms.image_eval_crop(cfg.data.image.dataset))
    if task == "speech":
        return TaskInputs("speech", sample_rate=m.speech.sample_rate, audio_seconds=tc.audio_seconds,
                          pad_to_longest=pad_to_longest)
    return TaskInputs("text", text_length=min(tc.text_length, m.text.max_source_positions))


# ------------------------------------------------------------------------------ readers
def _rank_rows(samples: list[dict], inputs: TaskInputs, split: str, rank: int, per_rank: int) -> LabelledSplit:
    """This rank's rows of a global batch, decoded (the other ranks' rows are never decoded here)."""
    return inputs.collate(samples[rank * per_rank : (rank + 1) * per_rank], split)


def train_batches(root: str | Path, inputs: TaskInputs, global_batch: int, n_batches: int, seed: int,
                  rank: int = 0, world_size: int = 1, num_workers: int = 0,
                  shuffle_buffer: int = 1000) -> Iterator[LabelledSplit]:
    """``n_batches`` of this rank's rows of the global training batches of the stream seeded by ``seed``.

    Every rank builds the same stream (shards drawn by ``ResampledShards(deterministic=True)``
    from (seed, loader worker), samples shuffled by (seed, worker), the workers' batches returned
    round robin), so the global batches do not depend on the world size.
    """
    import webdataset as wds

    if global_batch % world_size:
        raise InputError(f"batch size {global_batch} does not split over {world_size} processes")
    urls = shard_urls(root, inputs.modality, "train")
    per_rank = global_batch // world_size
    collate = functools.partial(_rank_rows, inputs=inputs, split="train", rank=rank, per_rank=per_rank)
    ds = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=worker_index, deterministic=True),
        wds.tarfile_to_samples(handler=shard_error),
        wds.map(check_key),
        wds.select(maybe_labelled),  # before the shuffle: the text split is mostly unlabelled lines
        SeededShuffle(shuffle_buffer, seed),
        wds.map(decode_sample),
        wds.batched(global_batch, collation_fn=collate, partial=False),
    )
    loader = wds.WebLoader(ds, batch_size=None, num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    return iter(loader.with_epoch(n_batches))


def _raw_labelled(urls: list[str]) -> Iterator[dict]:
    import webdataset as wds

    # No node or worker splitting: every rank walks the same sequence and decodes its own batches.
    return iter(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=shard_error),
                                 wds.map(check_key), wds.select(maybe_labelled), wds.map(decode_sample)))


def eval_batches(root: str | Path, inputs: TaskInputs, split: str, batch_size: int, max_n: int = 0,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, LabelledSplit]]:
    """``(i, batch)`` for this rank's batches (``i % world_size == rank``) of one pass over the first
    ``max_n`` labelled samples of ``split`` (all when 0), in shard order."""
    urls = shard_urls(root, inputs.modality, split)
    chunk: list[dict] = []
    index = seen = 0
    for s in _raw_labelled(urls):
        chunk.append(s)
        seen += 1
        last = bool(max_n) and seen >= max_n
        if len(chunk) == batch_size or last:
            if index % world_size == rank:
                yield index, inputs.collate(chunk, split)
            index, chunk = index + 1, []
        if last:
            return
    if chunk and index % world_size == rank:
        yield index, inputs.collate(chunk, split)
    if index == 0 and not chunk:
        raise InputError(f"{shard_dir(root, inputs.modality)}: split {split!r} has no labelled samples")


def concat(batches: list[LabelledSplit]) -> LabelledSplit:
    """One split of several batches (speech: padded to the longest batch)."""
    if not batches:
        raise InputError("no labelled samples")
    first = batches[0]
    srcs = [b.source for b in batches]
    if first.modality == "speech":
        width = max(s.shape[1] for s in srcs)
        srcs = [F.pad(s, (0, width - s.shape[1])) for s in srcs]
    return replace(
        first, source=torch.cat(srcs), label=torch.cat([b.label for b in batches]),
        keys=[k for b in batches for k in b.keys],
        lengths=None if first.lengths is None else torch.cat([b.lengths for b in batches]),
        texts=None if first.texts is None else [t for b in batches for t in b.texts],
        cropped=sum(b.cropped for b in batches),
        subset=None if first.subset is None else torch.cat([b.subset for b in batches]))


def load_split(root: str | Path, modality: str, split: str, max_n: int = 0, *, image_size: int = 28,
               in_chans: int = 1, sample_rate: int = 16000, audio_seconds: float = 1.0,
               text_length: int = 64) -> LabelledSplit:
    """Decode the first ``max_n`` labelled samples of ``split`` (all when 0) into memory."""
    inputs = TaskInputs(modality, image_size, in_chans, sample_rate, audio_seconds, text_length)
    return concat([b for _, b in eval_batches(root, inputs, split, 256, max_n)])


def load_task_data(cfg: Any, task: str, split: str, max_n: int) -> LabelledSplit:
    """The first ``max_n`` labelled samples of ``split`` of ``task``, decoded into memory for ``cfg.model``."""
    inputs = task_inputs(cfg, task)
    return concat([b for _, b in eval_batches(cfg.data.root, inputs, split, 256, max_n)])
