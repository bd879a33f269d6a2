"""Manifests: one CSV per modality and split, the contract between the data stages.

``data/raw/<modality>/manifest/<split>.csv`` (splits ``train``, ``val``, ``test``), written by
``d2v download`` and read by ``d2v validate``, ``d2v tokenizer`` and ``d2v shard``.

Columns (all modalities): ``key`` (unique across splits), ``split``, ``label`` ("" when
unlabelled), ``path`` (relative to ``data/raw/<modality>``), then per modality:

* image:  ``offset`` (index into an IDX file at ``path``, or -1 when ``path`` is an image file),
          ``width``, ``height``
* speech: ``duration`` (seconds), ``sample_rate``, ``voice``, ``synth``
* text:   ``text`` (the line itself; ``path`` names its source file), ``n_chars``, ``source``

Items that could not be read are not dropped silently: they go to
``data/raw/<modality>/quarantine.csv`` (key, path, reason) and are counted in the validation report.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path

SPLITS = ("train", "val", "test")
COMMON = ["key", "split", "label", "path"]
COLUMNS = {
    "image": COMMON + ["offset", "width", "height"],
    "speech": COMMON + ["duration", "sample_rate", "voice", "synth"],
    "text": COMMON + ["text", "n_chars", "source"],
}
QUARANTINE_COLUMNS = ["key", "path", "reason"]


def raw_dir(root: Path | str, modality: str) -> Path:
    return Path(root) / "raw" / modality


def manifest_path(root: Path | str, modality: str, split: str) -> Path:
    return raw_dir(root, modality) / "manifest" / f"{split}.csv"


def quarantine_path(root: Path | str, modality: str) -> Path:
    return raw_dir(root, modality) / "quarantine.csv"


def write_manifest(path: Path, modality: str, rows: Iterable[Mapping[str, object]]) -> int:
    """Write rows (dicts with exactly ``COLUMNS[modality]``) atomically; return the row count."""
    cols = COLUMNS[modality]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    n = 0
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="raise")
        w.writeheader()
        for r in rows:
            missing = [c for c in cols if c not in r]
            if missing:
                raise ValueError(f"{path}: manifest row {r.get('key')!r} lacks columns {missing}")
            w.writerow(r)
            n += 1
    tmp.replace(path)
    return n


def write_quarantine(path: Path, rows: Iterable[Mapping[str, object]]) -> int:
    """Write the quarantine rows atomically (a crash never leaves a half file to be counted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=QUARANTINE_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
    return len(rows)


def read_manifest(path: Path):
    """The manifest as a pandas DataFrame (strings kept as strings, "" not turned into NaN)."""
    import pandas as pd

    from d2v.errors import InputError

    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path} (run `d2v download` first)")
    strings = {c: str for c in ("key", "split", "label", "path", "voice", "synth", "text", "source")}
    try:
        return pd.read_csv(path, dtype=strings, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError as e:
        raise InputError(f"{path}: empty manifest (not even a header line); rerun `d2v download`") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason}); a manifest is a UTF-8 CSV") from e
    except (pd.errors.ParserError, ValueError) as e:
        raise InputError(f"{path}: not a readable manifest CSV: {str(e).strip().splitlines()[0][:200]}") from e
