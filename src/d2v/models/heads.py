"""Downstream heads on a data2vec 2.0 encoder, each with its loss and its scores.

* ``Classifier``: the student's encoder path of one modality (local encoder, context encoder,
  shared blocks; decoder and teacher dropped), mean-pooled over the real tokens (extra tokens and
  padding excluded), then LayerNorm(eps 1e-6) and a Linear head (trunc-normal 0.02, zero bias):
  fairseq ``MaeImageClassificationModel``'s head, used for all three modalities. ``pool_norm="batch"`` swaps the
  LayerNorm for a BatchNorm without affine (per-feature standardisation, as MAE's linear probe).
  Loss: cross-entropy with label smoothing; score: accuracy.
* ``CTCRecognizer``: the speech path without the pooling; each 20 ms frame goes to a Linear layer
  over letters (fairseq's ``final_proj``, ``d2v.models.ctc``). Loss: CTC; scores: WER, CER and
  word accuracy ``1 - WER`` (the task's ``accuracy``).

Token features come from ``encoder_features``, the body of ``Data2Vec2.features``.

Fine-tuning-time masking (speech; fairseq's vox recipes, ``FrameMasking``): in training mode
only, spans of frames of the projected CNN features are replaced by N(0, mask_noise_std²) noise
and whole feature channels are zeroed, before the positional and context encoders; eval mode
(``predict``, ``tally``, ``score``, feature extraction) never masks. Masks are drawn per sample
on the CPU from a generator seeded by (seed, step, sample key) (``frame_mask_seeds``), so both
inits, every world size and a resumed run draw the same masks.

A head trains on and scores batches: any object with ``source``, ``lengths``, ``label`` and
``keys`` (CTC: also ``texts``, ``split``, ``modality``, ``cropped``), e.g.
``d2v.data.downstream.LabelledSplit``. Scoring is a stream of batches: each batch gives additive
counts (``tally``: a confusion matrix; CTC: edit distances and lengths), summed over batches and,
under DDP, over ranks (``reduce``), then turned into scores, so a split of any size is scored in
constant memory and W processes score exactly what one does. ``HEADS`` maps
``finetune.<task>.head`` to the class.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2v.errors import ConfigError, InputError

from .ctc import EVAL_SUBSETS, LETTERS, ctc_loss, decode_letters, error_counts, reference
from .data2vec2 import Data2Vec2, encoder_features


class LabelledData(Protocol):
    """What a head reads from a labelled batch (``d2v.data.downstream.LabelledSplit``)."""

    modality: str
    split: str
    source: torch.Tensor
    label: torch.Tensor
    keys: list[str]
    lengths: torch.Tensor | None
    texts: list[str] | None
    cropped: int

    def __len__(self) -> int: ...


def _add_tally(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Sum tensors, concatenate lists (at most ``EXAMPLES`` items kept)."""
    for k, v in part.items():
        if isinstance(v, torch.Tensor):
            total[k] = total[k] + v
        else:
            total[k] = (total[k] + list(v))[:EXAMPLES]


EXAMPLES = 3  # transcripts a CTC score keeps to show


# ---------------------------------------------------------------------------------------------
# Fine-tuning-time time and channel masking (speech)
# ---------------------------------------------------------------------------------------------
def span_mask(size: int, prob: float, span: int, min_spans: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted positions (long) masked in one row of ``size`` valid positions: fairseq's
    ``compute_mask_indices`` (``fairseq/data/data_utils.py``) for one row with its defaults
    (``mask_type="static"``, ``no_overlap=False``, ``num_mask_ver=2``, ``idc_select_ver=1``).

    ``max(min_spans, int(prob * size / span + U[0, 1)))`` span starts, drawn without replacement
    from ``0 .. size - span - 1`` (so the last position is never covered, as in fairseq), each
    masking ``span`` positions; spans may overlap, so fewer than ``prob * size`` positions are
    masked. Deviations, only where fairseq raises: a row of under 2 positions is never masked, and
    a draw that would mask every position leaves one random position unmasked.
    """
    if size < 2 or prob <= 0:
        return torch.empty(0, dtype=torch.long)
    num = max(min_spans, int(prob * size / span + float(torch.rand((), generator=generator))))
    if num <= 0:
        return torch.empty(0, dtype=torch.long)
    min_len = span
    if size - min_len <= num:
        min_len = size - num - 1
    starts = torch.randperm(size - min_len, generator=generator)[:num]  # rng.choice(size - min_len, num, replace=False)
    idx = (starts[:, None] + torch.arange(span)).flatten()
    idx = torch.unique(idx[idx < size])
    if idx.numel() >= size:  # fairseq: ValueError("the entire sequence is masked")
        idx = idx[idx != int(torch.randint(size, (), generator=generator))]
    return idx


def frame_mask_seeds(seed: int, step: int, keys: Sequence[str]) -> list[int]:
    """One mask seed per sample from the run's seed, the step and the sample's key (crc32, stable
    across processes): the same for both inits, any world size and a resumed run."""
    base = zlib.crc32(f"frame-mask {step}".encode(), seed & 0xFFFFFFFF)
    return [zlib.crc32(str(k).encode("utf-8"), base) for k in keys]


@dataclass(frozen=True)
class FrameMasks:
    """One batch's fine-tuning masks, drawn on the CPU (``FrameMasking.draw``)."""

    time: torch.Tensor  # (B, T) bool: True = frame replaced by noise
    channel: torch.Tensor  # (B, D) bool: True = channel zeroed at every frame of the sample
    seeds: tuple[int, ...] = ()  # per sample: the seed of its noise
    noise_std: float = 0.01

    def noise(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The replacement frames ``(time.sum(), D)`` in row-major order of ``time``: N(0, noise_std²),
        drawn on ``device`` (no host-to-device copy of a 35 s clip's noise) from a generator seeded
        per sample, so they too are the same for both inits and after a resume."""
        d, parts = self.channel.shape[1], []
        for n, seed in zip(self.time.sum(1).tolist(), self.seeds):
            if n:
                g = torch.Generator(device=device).manual_seed(_noise_seed(seed))
                parts.append(torch.randn(n, d, generator=g, device=device))
        return (torch.cat(parts) * self.noise_std if parts else torch.zeros(0, d, device=device)).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Mask the local features ``x`` (B, T, D) (out of place): fairseq
        ``ModalitySpecificEncoder.apply_mask`` with ``encoder_zero_mask=False`` (fine-tuning's
        ``zero_mask`` default): masked frames become noise, then the masked channels are zeroed
        over the whole sample (the noise frames too, as there)."""
        if bool(self.time.any()):
            x = x.index_put((self.time.to(x.device),), self.noise(x.device, x.dtype))
        if bool(self.channel.any()):
            x = x.masked_fill(self.channel.to(x.device).unsqueeze(1), 0.0)
        return x


def _noise_seed(seed: int) -> int:
    return (int(seed) * 0x9E3779B1 + 0x5EED) & 0xFFFFFFFFFFFF  # another stream than the mask's own generator


@dataclass(frozen=True)
class FrameMasking:
    """fairseq's fine-tuning masks of the vox recipes (``Wav2VecEncoder`` passes ``mask_prob``,
    ``mask_length``, ``mask_channel_prob``, ``mask_channel_length`` into the audio encoder's
    config; ``extract_features(mask=self.apply_mask and self.training)``): time spans of
    ``mask_length`` frames (``compute_mask(..., min_masks=1)``) and channel spans of
    ``mask_channel_length`` channels (``apply_mask``), probabilities 0 = off.

    Deviation from fairseq: each sample keeps its own masked count. fairseq's
    ``require_same_masks=True`` trims every row to the batch's smallest count, which only matters
    when masked tokens are dropped (pretraining); fine-tuning keeps them, and our batches are
    padded to ``audio_seconds`` rather than bucketed by length as fairseq's, so trimming would cut
    a long clip's masking to the shortest clip's count. Per-sample masks also make a sample's
    mask independent of its batch (and of the world size)."""

    mask_prob: float = 0.0
    mask_length: int = 10
    mask_channel_prob: float = 0.0
    mask_channel_length: int = 64

    @property
    def active(self) -> bool:
        return self.mask_prob > 0 or self.mask_channel_prob > 0

    def draw(self, valid: Sequence[int], frames: int, dim: int, seeds: Sequence[int],
             noise_std: float = 0.01) -> FrameMasks:
        """Masks of a batch of ``len(valid)`` samples of ``frames`` frames (``valid[i]`` of them
        real, the rest padding, never masked) and ``dim`` channels; ``seeds``: one per sample."""
        if len(seeds) != len(valid):
            raise InputError(f"need one mask seed per sample: {len(valid)} samples, {len(seeds)} seeds")
        time = torch.zeros(len(valid), frames, dtype=torch.bool)
        channel = torch.zeros(len(valid), dim, dtype=torch.bool)
        for i, (n, seed) in enumerate(zip(valid, seeds)):
            g = torch.Generator().manual_seed(int(seed))
            if self.mask_prob > 0:
                time[i, span_mask(min(max(int(n), 0), frames), self.mask_prob, self.mask_length, 1, g)] = True
            if self.mask_channel_prob > 0:
                channel[i, span_mask(dim, self.mask_channel_prob, self.mask_channel_length, 0, g)] = True
        return FrameMasks(time, channel, tuple(int(x) for x in seeds), noise_std)


class Classifier(nn.Module):
    """``model(source, lengths=None) -> logits``; ``features(...)`` gives the pooled vector."""

    head_kind = "classify"

    def __init__(self, backbone: Data2Vec2, modality: str, num_classes: int, freeze_local: bool = False,
                 pool_norm: str = "layer"):
        super().__init__()
        if modality not in backbone.modality_encoders:
            raise InputError(f"the model has no {modality!r} encoder (it has {', '.join(backbone.modality_encoders)})")
        self.modality = modality
        self.model_cfg = backbone.cfg
        self.encoder = backbone.modality_encoders[modality]
        self.encoder.decoder = None  # the pretraining decoder is not part of the classifier
        if freeze_local:  # no gradient, so no backward pass through the (speech CNN) local encoder
            self.encoder.local_encoder.requires_grad_(False)
        self.blocks = backbone.blocks
        self.layerdrop = backbone.cfg.layerdrop
        d = backbone.cfg.embed_dim
        if pool_norm not in ("layer", "batch"):
            raise InputError(f"pool_norm must be 'layer' or 'batch', got {pool_norm!r}")
        self.pool_norm = pool_norm
        self.fc_norm = nn.LayerNorm(d, eps=1e-6) if pool_norm == "layer" else nn.BatchNorm1d(d, affine=False)
        self.head = nn.Linear(d, num_classes)
        self.freeze_encoder = False  # True: features without gradient, only the head learns (freeze_finetune_updates)
        self.masking = FrameMasking()  # fine-tuning-time time/channel masking (speech, training mode only): off
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    # -- building and saving --------------------------------------------------------------------
    @classmethod
    def build(cls, backbone: Data2Vec2, modality: str, num_classes: int, freeze_local: bool = False,
              pool_norm: str = "layer") -> Classifier:
        """The head of a task config (``make_head``)."""
        return cls(backbone, modality, num_classes, freeze_local=freeze_local, pool_norm=pool_norm)

    def head_config(self) -> dict[str, Any]:
        """What a classifier folder's ``config.json`` records to rebuild this head."""
        return {"modality": self.modality, "num_classes": self.head.out_features, "pool_norm": self.pool_norm,
                "head": self.head_kind}

    @classmethod
    def from_config(cls, backbone: Data2Vec2, meta: dict[str, Any]) -> Classifier:
        return cls(backbone, meta["modality"], int(meta["num_classes"]), pool_norm=meta.get("pool_norm", "layer"))

    def set_masking(self, masking: FrameMasking, where: str = "finetune.speech") -> None:
        """Turn fine-tuning-time masking on (or off); ``where`` names the config section in errors."""
        if masking.active and self.modality != "speech":
            raise ConfigError(f"{where}.mask_prob / mask_channel_prob: time and channel masking is for speech only, "
                              f"not {self.modality}")
        d = self.model_cfg.embed_dim
        if masking.mask_channel_prob > 0 and not 1 <= masking.mask_channel_length < d:
            raise ConfigError(f"{where}.mask_channel_length: must be in [1, embed_dim={d}) (a span of channels), "
                              f"got {masking.mask_channel_length}")
        if masking.mask_prob > 0 and masking.mask_length < 1:
            raise ConfigError(f"{where}.mask_length: must be >= 1, got {masking.mask_length}")
        self.masking = masking

    def draw_masks(self, source: torch.Tensor, padding: torch.Tensor | None,
                   mask_seeds: Sequence[int] | None) -> FrameMasks:
        """This batch's masks; ``padding`` (B, T) True = pad, on the CPU. Without ``mask_seeds``
        (a direct call, not the training loop) the seeds come from the global torch RNG."""
        b, t = source.shape[0], self.encoder.num_tokens(tuple(source.shape))
        valid = [t] * b if padding is None else (~padding).sum(1).tolist()
        if mask_seeds is None:
            mask_seeds = torch.randint(0, 2**31 - 1, (b,)).tolist()
        return self.masking.draw(valid, t, self.model_cfg.embed_dim, mask_seeds, self.encoder.mcfg.mask_noise_std)

    # -- features -------------------------------------------------------------------------------
    def token_padding(self, source: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor | None:
        """Token-level padding (True = pad) from per-sample lengths (speech samples, text tokens)."""
        if lengths is None:
            return None
        if self.modality == "speech":
            frames = torch.tensor([self.encoder.local_encoder.output_length(int(n)) for n in lengths])
            t = self.encoder.num_tokens(tuple(source.shape))
        else:
            frames, t = lengths.cpu(), source.shape[1]
        return torch.arange(t).unsqueeze(0) >= frames.unsqueeze(1)

    def token_features(self, source: torch.Tensor, lengths: torch.Tensor | None = None,
                       mask_seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last-block output per token (extra tokens dropped), (B, T, D), and the padding mask.

        In training mode with ``masking`` on, the local features are masked first (``FrameMasks``);
        ``mask_seeds``: one per sample (``frame_mask_seeds``)."""
        masked = self.training and self.masking.active
        if lengths is not None or masked:
            self.encoder.check_input(source)  # before the lengths are read against its shape
        padding = self.token_padding(source, lengths)
        local_mask = self.draw_masks(source, padding, mask_seeds).apply if masked else None
        with torch.no_grad() if self.freeze_encoder else contextlib.nullcontext():  # fairseq Wav2VecEncoder.forward
            f = encoder_features(self.encoder, self.blocks, source, padding, layerdrop=self.layerdrop,
                                 local_mask=local_mask)
        return f.x, f.padding_mask

    def features(self, source: torch.Tensor, lengths: torch.Tensor | None = None,
                 mask_seeds: Sequence[int] | None = None) -> torch.Tensor:
        x, pad = self.token_features(source, lengths, mask_seeds)
        if pad is None:
            return x.mean(1)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp_min(1)

    def forward(self, source: torch.Tensor, lengths: torch.Tensor | None = None,
                mask_seeds: Sequence[int] | None = None) -> torch.Tensor:
        return self.head(self.fc_norm(self.features(source, lengths, mask_seeds)))

    # -- training -------------------------------------------------------------------------------
    def check_data(self, data: LabelledData) -> None:
        """Refuse a batch this head cannot learn or score (nothing to check for classes)."""

    def targets(self, data: LabelledData) -> Any:
        """The targets of the batch ``data``, as ``loss`` takes them: class ids, or the soft
        targets of a MixUp / CutMix batch."""
        soft = getattr(data, "soft_label", None)
        return data.label if soft is None else soft

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy of ``logits`` (B, C) against class ids ``targets`` (B,) or soft targets
        (B, C); label smoothing mixes soft targets with the uniform distribution, as for ids (timm's
        ``SoftTargetCrossEntropy`` after ``Mixup(label_smoothing=...)``)."""
        targets = targets.to(logits.device)
        if targets.is_floating_point():
            t = targets * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
            return -(t * logits.log_softmax(-1)).sum(-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

    def layer_param_groups(self, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
        """AdamW groups with lr x layer_decay^(depth + 1 - layer); no decay on 1-D/bias tensors."""
        depth = len(self.blocks)
        groups: dict[tuple[int, bool], dict] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("blocks."):
                layer = int(name.split(".")[1]) + 1
            elif name.startswith(("fc_norm.", "head.")):
                layer = depth + 1
            else:
                layer = 0
            no_wd = p.ndim <= 1 or name.endswith(".bias") or "alibi_scale" in name
            g = groups.setdefault((layer, no_wd), {
                "params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                "lr_scale": layer_decay ** (depth + 1 - layer), "layer": layer,
            })
            g["params"].append(p)
        return list(groups.values())

    # -- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, data: LabelledData, device: torch.device) -> torch.Tensor:
        """Predicted class per sample of the batch ``data`` (eval mode), on the CPU."""
        self.to(device).eval()
        return self(data.source.to(device), data.lengths).argmax(-1).cpu()

    def zero_tally(self) -> dict[str, Any]:
        n = self.head.out_features
        return {"confusion": torch.zeros(n, n, dtype=torch.long)}

    def tally(self, data: LabelledData, device: torch.device) -> dict[str, Any]:
        """The batch's confusion matrix (rows: true class, columns: predicted)."""
        pred, n = self.predict(data, device), self.head.out_features
        return {"confusion": torch.bincount(data.label * n + pred, minlength=n * n).view(n, n)}

    def scores(self, totals: dict[str, Any]) -> dict[str, Any]:
        conf = totals["confusion"]
        n = int(conf.sum())
        return {"accuracy": float(conf.trace()) / max(1, n), "samples": n, "confusion": conf.numpy()}

    def score(self, batches: Iterable[LabelledData], device: torch.device,
              reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: Any = None) -> dict[str, Any]:
        """Scores of a stream of batches (``{"accuracy", ...}``); ``reduce`` sums a tensor over
        DDP ranks (each rank passing its own batches); ``progress`` is told each batch's size."""
        self.to(device).eval()
        total = self.zero_tally()
        for data in batches:
            self.check_data(data)
            _add_tally(total, self.tally(data, device))
            if progress is not None:
                progress.update(len(data))
        if reduce is not None:
            total = {k: reduce(v) if isinstance(v, torch.Tensor) else v for k, v in total.items()}
        return self.scores(total)

    def describe(self, scores: dict[str, Any]) -> str:
        return f"accuracy {scores['accuracy']:.4f} ({scores['samples']} samples)"


class CTCRecognizer(Classifier):
    """``model(source, lengths) -> (B, T, V)`` per-frame log-probabilities over ``LETTERS``.

    The speech path of a ``Classifier`` (same layer-wise lr groups, same padding), without the
    pooling: each frame goes straight to the letter layer, as fairseq's ``final_proj``."""

    head_kind = "ctc"

    def __init__(self, backbone: Data2Vec2, freeze_local: bool = True):
        super().__init__(backbone, "speech", len(LETTERS), freeze_local=freeze_local)
        self.fc_norm = nn.Identity()

    @classmethod
    def build(cls, backbone: Data2Vec2, modality: str, num_classes: int, freeze_local: bool = True,
              pool_norm: str = "layer") -> CTCRecognizer:
        if modality != "speech":
            raise InputError(f"the CTC head (letter targets) is for speech only, not {modality}")
        return cls(backbone, freeze_local=freeze_local)

    @classmethod
    def from_config(cls, backbone: Data2Vec2, meta: dict[str, Any]) -> CTCRecognizer:
        return cls(backbone)

    def forward(self, source: torch.Tensor, lengths: torch.Tensor | None = None,
                mask_seeds: Sequence[int] | None = None) -> torch.Tensor:
        return self.head(self.token_features(source, lengths, mask_seeds)[0]).log_softmax(-1)

    def _frames(self, t: int, batch: int, lengths: torch.Tensor | None) -> torch.Tensor:
        if lengths is None:
            return torch.full((batch,), t, dtype=torch.long)
        return torch.tensor([min(t, self.encoder.local_encoder.output_length(int(n))) for n in lengths])

    def frames(self, source: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """Valid frames per clip, (B,)."""
        return self._frames(self.encoder.num_tokens(tuple(source.shape)), source.shape[0], lengths)

    @torch.no_grad()
    def transcribe(self, source: torch.Tensor, lengths: torch.Tensor | None = None) -> list[str]:
        best = self(source, lengths).argmax(-1).cpu()
        return [decode_letters(row[:n].tolist()) for row, n in zip(best, self.frames(source, lengths).tolist())]

    # -- training -------------------------------------------------------------------------------
    def check_data(self, data: LabelledData) -> None:
        """CTC needs each clip's transcript and the whole clip: a cropped clip no longer says it."""
        if data.texts is None:
            raise InputError(f"{data.modality} split {data.split!r} has no transcripts: CTC needs speech metadata labels")
        if data.cropped:
            raise InputError(f"speech split {data.split!r}: a batch holds {data.cropped} clip(s) longer than "
                             f"finetune.speech.audio_seconds (e.g. among {', '.join(data.keys[:3])}), cropped, so their "
                             f"transcripts no longer match; "
                             f"raise finetune.speech.audio_seconds for CTC")

    def targets(self, data: LabelledData) -> Any:
        """(transcripts, keys, lengths) of the batch."""
        assert data.texts is not None
        return data.texts, data.keys, data.lengths

    def loss(self, log_probs: torch.Tensor, targets: Any, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean CTC loss of ``log_probs`` (B, T, V) against ``targets`` from ``targets()``
        (label smoothing does not apply)."""
        texts, keys, lengths = targets
        return ctc_loss(log_probs, self._frames(log_probs.shape[1], log_probs.shape[0], lengths), texts, keys)

    # -- scoring --------------------------------------------------------------------------------
    def zero_tally(self) -> dict[str, Any]:
        return {"edits": torch.zeros(5, dtype=torch.float64),
                "subset_edits": torch.zeros(len(EVAL_SUBSETS), 5, dtype=torch.float64), "examples": []}

    @torch.no_grad()
    def tally(self, data: LabelledData, device: torch.device) -> dict[str, Any]:
        """Word and character edit distances, reference lengths and clips, over the batch and per
        LibriSpeech evaluation subset (``data.subset``, -1: none); the first transcripts."""
        self.eval()
        hyps = self.transcribe(data.source.to(device), data.lengths)
        assert data.texts is not None
        refs = [reference(t, k) for t, k in zip(data.texts, data.keys)]
        per_subset = torch.zeros(len(EVAL_SUBSETS), 5, dtype=torch.float64)
        subset = getattr(data, "subset", None)
        if subset is not None:
            for i in sorted(set(subset.tolist()) - {-1}):
                rows = [j for j, s in enumerate(subset.tolist()) if s == i]
                per_subset[i] = torch.tensor([*error_counts([hyps[j] for j in rows], [refs[j] for j in rows]),
                                              len(rows)], dtype=torch.float64)
        return {"edits": torch.tensor([*error_counts(hyps, refs), len(refs)], dtype=torch.float64),
                "subset_edits": per_subset, "examples": list(zip(refs, hyps))[:EXAMPLES]}

    def scores(self, totals: dict[str, Any]) -> dict[str, Any]:
        """``{"accuracy": 1 - WER, "wer", "cer", "examples"}`` (greedy transcripts), and
        ``wer_<subset>`` / ``cer_<subset>`` (e.g. ``wer_test_other``) for each LibriSpeech evaluation
        subset the split holds."""
        w_err, w_n, c_err, c_n, clips = totals["edits"].tolist()
        wer = w_err / max(1.0, w_n)
        out = {"accuracy": 1.0 - wer, "wer": wer, "cer": c_err / max(1.0, c_n), "samples": int(clips),
               "examples": totals["examples"]}
        for name, (sw, sw_n, sc, sc_n, s_clips) in zip(EVAL_SUBSETS, totals["subset_edits"].tolist()):
            if s_clips:
                tag = name.replace("-", "_")
                out[f"wer_{tag}"], out[f"cer_{tag}"] = sw / max(1.0, sw_n), sc / max(1.0, sc_n)
        return out

    def describe(self, scores: dict[str, Any]) -> str:
        subsets = "".join(f", {n} {scores['wer_' + n.replace('-', '_')]:.4f}" for n in EVAL_SUBSETS
                          if "wer_" + n.replace("-", "_") in scores)
        return (f"WER {scores['wer']:.4f}{subsets}, CER {scores['cer']:.4f}; e.g. "
                + "; ".join(f"{r!r} -> {h!r}" for r, h in scores["examples"]))


HEADS: dict[str, type[Classifier]] = {"classify": Classifier, "ctc": CTCRecognizer}


def head_class(kind: str) -> type[Classifier]:
    if kind not in HEADS:
        raise InputError(f"unknown head {kind!r}; expected one of {', '.join(HEADS)}")
    return HEADS[kind]


def make_head(kind: str, backbone: Data2Vec2, modality: str, num_classes: int, freeze_local: bool = False,
              pool_norm: str = "layer") -> Classifier:
    """The fine-tuning model of ``finetune.<task>.head``: a ``Classifier`` or a ``CTCRecognizer``."""
    return head_class(kind).build(backbone, modality, num_classes, freeze_local=freeze_local, pool_norm=pool_norm)
