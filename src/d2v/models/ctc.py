"""Letters for CTC speech recognition: the letter CTC recipe of wav2vec 2.0 / data2vec (fairseq
``examples/wav2vec/config/finetuning/vox_10h.yaml``).

The vocabulary is fairseq's letter dictionary without its special symbols: blank, ``|`` (the word
boundary), the apostrophe and A-Z. Transcripts are upper-cased; other characters are dropped.
Greedy decoding (best path, repeats merged, blanks dropped) gives the transcript. Scores: word
error rate and character error rate (edit distance by ``torchaudio``), over the whole split and,
for LibriSpeech, per evaluation subset (:data:`EVAL_SUBSETS`: a split holds dev-clean and
dev-other, or test-clean and test-other, and papers report each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from d2v.errors import InputError

BLANK = 0
LETTERS = ["<blank>", "|", "'", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
_INDEX = {c: i for i, c in enumerate(LETTERS)}
EVAL_SUBSETS = ("dev-clean", "dev-other", "test-clean", "test-other")  # LibriSpeech's, each scored on its own


def subset_index(path: str) -> int:
    """Index in :data:`EVAL_SUBSETS` of a clip whose path is ``LibriSpeech/<subset>/...``, else -1."""
    parts = str(path).split("/")
    return EVAL_SUBSETS.index(parts[1]) if len(parts) > 2 and parts[0] == "LibriSpeech" and parts[1] in EVAL_SUBSETS else -1


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


def error_counts(hyps: list[str], refs: list[str]) -> tuple[int, int, int, int]:
    """(word edits, reference words, character edits, reference characters): additive over batches."""
    from torchaudio.functional import edit_distance

    w_err = sum(edit_distance(r.split(), h.split()) for h, r in zip(hyps, refs))
    c_err = sum(edit_distance(list(r), list(h)) for h, r in zip(hyps, refs))
    return w_err, sum(len(r.split()) for r in refs), c_err, sum(len(r) for r in refs)


def error_rates(hyps: list[str], refs: list[str]) -> tuple[float, float]:
    """(WER, CER) of hypotheses against references: total edit distance over total reference length."""
    w_err, w_n, c_err, c_n = error_counts(hyps, refs)
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
