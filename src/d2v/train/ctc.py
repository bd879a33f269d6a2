"""Speech recognition with CTC on letter targets (spec §6: the LibriSpeech recipe of wav2vec 2.0 /
data2vec; ``finetune.speech.head=ctc``).

The speech encoder path of the pretrained (or a random) model gives one vector per 20 ms frame; a
Linear layer maps each frame to the letter vocabulary (fairseq's ``final_proj``), trained with the
CTC loss; greedy decoding (best path, repeats merged, blanks dropped) gives the transcript. The
vocabulary is fairseq's letter dictionary without its special symbols: blank, ``|`` (the word
boundary), the apostrophe and A-Z. Transcripts come from the shards' metadata (``label``: the word
of the espeak corpus, the sentence of LibriSpeech); other characters are dropped and counted.

Scores: word error rate and character error rate (edit distance by ``torchaudio``), and word
accuracy ``1 - WER``, which the reports and the registry use as the task's ``accuracy``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2v.errors import InputError
from d2v.models import Data2Vec2
from d2v.train.downstream_data import LabelledSplit
from d2v.train.finetune import Classifier

BLANK = 0
LETTERS = ["<blank>", "|", "'", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
_INDEX = {c: i for i, c in enumerate(LETTERS)}


def encode_letters(text: str, key: str = "?") -> list[int]:
    """Letter ids of a transcript: upper-cased, runs of spaces -> one ``|``, other characters dropped."""
    words = "".join(c for c in text.upper() if c in _INDEX or c.isspace()).split()
    if not words:
        raise InputError(f"{key}: transcript {text!r} has no letters to train CTC on")
    return [_INDEX[c] for c in "|".join(words)]


def decode_letters(ids: list[int]) -> str:
    """Best-path decoding of one frame sequence: merge repeats, drop blanks, ``|`` -> space."""
    out, prev = [], None
    for i in ids:
        if i != prev and i != BLANK:
            out.append(LETTERS[i])
        prev = i
    return " ".join("".join(out).replace("|", " ").split())


def error_rates(hyps: list[str], refs: list[str]) -> tuple[float, float]:
    """(WER, CER) of hypotheses against references: total edit distance over total reference length."""
    from torchaudio.functional import edit_distance

    w_err = sum(edit_distance(r.split(), h.split()) for h, r in zip(hyps, refs))
    c_err = sum(edit_distance(list(r), list(h)) for h, r in zip(hyps, refs))
    w_n = sum(len(r.split()) for r in refs)
    c_n = sum(len(r) for r in refs)
    return w_err / max(1, w_n), c_err / max(1, c_n)


def reference(text: str, key: str = "?") -> str:
    """A transcript as the decoder can write it (upper case, letters, apostrophes, single spaces)."""
    return decode_letters(encode_letters(text, key))


def ctc_loss(log_probs: torch.Tensor, frames: torch.Tensor, texts: list[str], keys: list[str]) -> torch.Tensor:
    """Mean CTC loss of a batch: ``log_probs`` (B, T, V), ``frames`` (B,) valid frames per clip."""
    targets = [torch.tensor(encode_letters(t, k)) for t, k in zip(texts, keys)]
    too_long = [k for k, tg, n in zip(keys, targets, frames.tolist()) if len(tg) > n]
    if too_long:
        raise InputError(f"{too_long[0]}: transcript longer than the clip's {int(frames.min())} frames "
                         f"({len(too_long)} clip(s) in this batch); raise finetune.speech.audio_seconds")
    return F.ctc_loss(log_probs.transpose(0, 1).float(), torch.cat(targets), frames,
                      torch.tensor([len(t) for t in targets]), blank=BLANK, reduction="mean", zero_infinity=True)


class CTCRecognizer(Classifier):
    """``model(source, lengths) -> (B, T, V)`` per-frame log-probabilities over ``LETTERS``.

    The speech path of a ``Classifier`` (same layer-wise lr groups, same padding), without the
    pooling: each frame goes straight to the letter layer, as fairseq's ``final_proj``."""

    head_kind = "ctc"

    def __init__(self, backbone: Data2Vec2, freeze_local: bool = True):
        super().__init__(backbone, "speech", len(LETTERS), freeze_local=freeze_local)
        self.fc_norm = nn.Identity()

    def forward(self, source: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.token_features(source, lengths)[0]).log_softmax(-1)

    def frames(self, source: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        """Valid frames per clip, (B,)."""
        t = self.encoder.num_tokens(tuple(source.shape))
        if lengths is None:
            return torch.full((source.shape[0],), t, dtype=torch.long)
        return torch.tensor([min(t, self.encoder.local_encoder.output_length(int(n))) for n in lengths])

    @torch.no_grad()
    def transcribe(self, source: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> list[str]:
        best = self(source, lengths).argmax(-1).cpu()
        return [decode_letters(row[:n].tolist()) for row, n in zip(best, self.frames(source, lengths).tolist())]


def check_split(data: LabelledSplit) -> None:
    """CTC needs each clip's transcript and the whole clip: a cropped clip no longer says it."""
    if data.texts is None:
        raise InputError(f"{data.modality} split {data.split!r} has no transcripts: CTC needs speech metadata labels")
    if data.cropped:
        raise InputError(f"speech split {data.split!r}: {data.cropped} clip(s) are longer than "
                         f"finetune.speech.audio_seconds and were cropped, so their transcripts no longer match; "
                         f"raise finetune.speech.audio_seconds for CTC")


@torch.no_grad()
def transcribe_split(model: CTCRecognizer, data: LabelledSplit, batch_size: int, device: torch.device) -> dict:
    """Greedy transcripts of a split and their scores: ``{"wer", "cer", "hyps", "refs"}``."""
    check_split(data)
    model.to(device).eval()
    hyps: list[str] = []
    for i in range(0, len(data), batch_size):
        lengths = data.lengths[i : i + batch_size] if data.lengths is not None else None
        hyps += model.transcribe(data.source[i : i + batch_size].to(device), lengths)
    refs = [reference(t, k) for t, k in zip(data.texts, data.keys)]
    wer, cer = error_rates(hyps, refs)
    return {"wer": wer, "cer": cer, "hyps": hyps, "refs": refs}
