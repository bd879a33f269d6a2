"""Text line -> token ids, for each tokenizer a model folder can name (``config.json["tokenizer"]``).

* ``spm``: the project's sentencepiece model (``<s>``=0 pad=1 ``</s>``=2 unk=3); a row is
  ``<s> ids...`` as in the pretraining/eval loaders.
* ``bytes``: the built-in byte-level ids of ``data.source=sample`` (byte b -> b + 4).
* ``fairseq_dict``: a fairseq ``dict.txt`` (converted text models). With ``bpe: gpt2`` (the
  released ``nlp_base.pt`` needs ``encoder.json`` + ``vocab.bpe``) the line is GPT-2 BPE encoded
  first, as fairseq's ``multiprocessing_bpe_encoder`` does; otherwise split on whitespace. A row is
  ``<s> ids... </s>`` as fairseq's ``encode_line`` + ``<s>`` prepending.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from d2v.errors import InputError

BOS, PAD, EOS, UNK = 0, 1, 2, 3
BYTE_OFFSET = 4


class TextTokenizer:
    """``tok(line) -> list[int]`` (the full row, specials included, not yet truncated)."""

    def __init__(self, encode: Callable[[str], list[int]], vocab_size: int, name: str, append_eos: bool):
        self._encode, self.vocab_size, self.name, self.append_eos = encode, vocab_size, name, append_eos

    def __call__(self, line: str) -> list[int]:
        ids = [BOS] + self._encode(line)
        return ids + [EOS] if self.append_eos else ids


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class GPT2BPE:
    """GPT-2 byte-level BPE (what fairseq's ``gpt2_bpe_utils.Encoder`` does), ids as in encoder.json."""

    PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, encoder_json: Path, vocab_bpe: Path):
        import regex

        try:
            self.encoder: dict[str, int] = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
            merges = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{encoder_json.parent}: cannot read the GPT-2 BPE files: {e}") from e
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges) if len(m.split()) == 2}
        self.byte_encoder = _bytes_to_unicode()
        self.pat = regex.compile(self.PAT)
        self.bpe = lru_cache(maxsize=65536)(self._bpe)

    def _bpe(self, token: str) -> tuple[str, ...]:
        word = tuple(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            first, second = best
            out: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    out.append(first + second)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for tok in self.pat.findall(text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(tok))
        return ids


def load_tokenizer(entry: Mapping[str, Any] | None, vocab_size: int, where: str) -> TextTokenizer:
    """The tokenizer named by a model's ``info["tokenizer"]``; ids are checked against ``vocab_size``."""
    if entry is None:
        raise InputError(f"{where}: the model has no text tokenizer; pass one with tokenizer= / --tokenizer "
                         "(an spm.model, a fairseq dict.txt, or 'bytes')")
    kind = entry.get("type")
    if kind == "bytes":
        if vocab_size < 256 + BYTE_OFFSET:
            raise InputError(f"{where}: byte-level text needs vocab_size >= 260, the model has {vocab_size}")
        return TextTokenizer(lambda s: [b + BYTE_OFFSET for b in s.encode("utf-8")], 256 + BYTE_OFFSET, "bytes", False)
    path = Path(str(entry.get("path") or entry.get("file") or ""))
    if not path.is_file():
        raise InputError(f"{path}: tokenizer file not found ({where})")
    if kind == "spm":
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise InputError(f"{path}: not a sentencepiece model: {e}") from e
        n = sp.get_piece_size()
        if n > vocab_size:
            raise InputError(f"{path}: tokenizer has {n} pieces but the model's vocabulary is {vocab_size}")
        if (sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id()) != (BOS, PAD, EOS, UNK):
            raise InputError(f"{path}: special ids must be <s>=0 <pad>=1 </s>=2 <unk>=3")
        return TextTokenizer(lambda s: list(sp.encode(s)), n, "spm", False)
    if kind == "fairseq_dict":
        from d2v.models.fairseq_compat import read_fairseq_dictionary

        syms = read_fairseq_dictionary(path)
        if len(syms) != vocab_size:
            raise InputError(f"{path}: {len(syms)} symbols but the model's vocabulary is {vocab_size}")
        index = {s: i for i, s in enumerate(syms)}
        if entry.get("bpe") == "gpt2":
            bpe = GPT2BPE(path.parent / "encoder.json", path.parent / "vocab.bpe")
            return TextTokenizer(lambda s: [index.get(str(t), UNK) for t in bpe.encode(s)], len(syms), "gpt2+dict", True)
        return TextTokenizer(lambda s: [index.get(t, UNK) for t in s.split()], len(syms), "dict", True)
    raise InputError(f"{where}: unknown tokenizer type {kind!r}")


def tokenizer_entry_from_arg(arg: str) -> dict[str, Any]:
    """``--tokenizer`` value -> an ``info["tokenizer"]`` entry: ``bytes``, ``*.model`` or ``*.txt``."""
    if arg == "bytes":
        return {"type": "bytes"}
    p = Path(arg)
    if not p.is_file():
        raise InputError(f"{p}: tokenizer file not found")
    if p.suffix == ".txt":
        e: dict[str, Any] = {"type": "fairseq_dict", "path": str(p.resolve())}
        if (p.parent / "encoder.json").is_file() and (p.parent / "vocab.bpe").is_file():
            e["bpe"] = "gpt2"
        return e
    return {"type": "spm", "path": str(p.resolve())}
