"""Sentencepiece tokenizer (``d2v tokenizer``), trained on the text *training* split only.

Special ids follow fairseq's dictionary, which the text encoder assumes:
``<s>`` = 0 (bos), ``<pad>`` = 1, ``</s>`` = 2 (eos), ``<unk>`` = 3.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from d2v.data.manifest import manifest_path, read_manifest
from d2v.errors import InputError
from d2v.tokens import BOS, EOS, PAD, UNK  # one owner: the models use them too


def train_tokenizer(root: Path | str, out_dir: Path | str, vocab_size: int, model_type: str = "unigram",
                    character_coverage: float = 1.0, seed: int = 1) -> dict:
    import sentencepiece as spm

    root, out_dir = Path(root), Path(out_dir)
    df = read_manifest(manifest_path(root, "text", "train"))
    lines = [t for t in df["text"].astype(str).tolist() if t.strip()]
    if not lines:
        raise InputError(f"{manifest_path(root, 'text', 'train')}: no text to train the tokenizer on")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out_dir / "spm"),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        bos_id=BOS, pad_id=PAD, eos_id=EOS, unk_id=UNK,
        hard_vocab_limit=False,  # small corpora cannot always fill the vocabulary
        input_sentence_size=2_000_000, shuffle_input_sentence=False,  # deterministic
        num_threads=2, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "spm.model"))
    info = {
        "vocab_size": sp.get_piece_size(), "requested_vocab_size": vocab_size, "model_type": model_type,
        "train_lines": len(lines),
        "ids": {"bos": sp.bos_id(), "pad": sp.pad_id(), "eos": sp.eos_id(), "unk": sp.unk_id()},
    }
    # no wall time in the DVC output (the same inputs give the same bytes); the caller reports it
    (out_dir / "tokenizer.json").write_text(json.dumps(info, indent=2))
    return info | {"seconds": time.perf_counter() - t0}
