"""Bring your own data: what the folder sources (``audio_folder``, ``text_files``) share.

* :func:`resolve_folder`: the user's folder, checked (it exists, holds no output and is not inside one);
* :func:`scan_folder`: every file under it, recursively, in a fixed (sorted) order; symbolic links are
  listed apart (never followed: they may point anywhere) and files of other types are counted;
* :func:`read_labels_csv`: the optional ``labels.csv`` at the folder root (``path,label``; path relative
  to the folder), checked line by line: a bad header, a missing file, a path leaving the folder or a
  path listed twice is an :class:`~d2v.errors.InputError` naming the file and the line;
* :func:`split_names`: the seeded held-out rule of the text sources (about ``val_fraction`` /
  ``test_fraction`` of the items, at least one each from three items on);
* :func:`unique_keys` and :func:`fingerprint`.

The user's files are only read: nothing here writes into the folder, moves or deletes anything in it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from d2v.errors import ConfigError, InputError

LABELS_CSV = "labels.csv"
SPLIT_NAMES = ("train", "val", "test")

# No '.': WebDataset splits a tar member's name at its first dot into key and field, so a key with a
# dot would lose its fields (a sample without ``cls``) in the shards.
_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def resolve_folder(folder: str, key: str, kind: str, output_dir: Path) -> Path:
    """``folder`` as an absolute path; ``InputError`` naming it unless it is an existing folder.

    Refused too when it holds ``output_dir`` (the download would read its own output) or lies inside
    it (a rebuild clears that folder).
    """
    if not folder:
        raise ConfigError(f"{key} must be set (the folder holding your {kind} files)")
    path = Path(folder).expanduser().resolve()
    if not path.exists():
        raise InputError(f"{kind} folder not found: {path} ({key})")
    if not path.is_dir():
        raise InputError(f"{kind} folder {path} ({key}) is not a folder")
    out = Path(output_dir).resolve()
    if out == path or path in out.parents:
        raise InputError(f"{kind} folder {path} ({key}) contains the output folder {out}: "
                         "use a folder outside the data root")
    if out in path.parents:
        raise InputError(f"{kind} folder {path} ({key}) is inside the output folder {out}, "
                         "which a download clears: move your files elsewhere")
    return path


@dataclass
class FolderScan:
    """What :func:`scan_folder` found, each list sorted by path relative to the folder."""

    files: list[Path] = field(default_factory=list)  # regular files with a wanted suffix
    links: list[Path] = field(default_factory=list)  # symbolic links (files or folders), not followed
    ignored: list[Path] = field(default_factory=list)  # other files (labels.csv at the root not counted)


def scan_folder(folder: Path, suffixes: Iterable[str]) -> FolderScan:
    """Every file under ``folder`` (recursive, links not followed), sorted; suffixes match case-insensitively."""
    wanted = {s.lower() for s in suffixes}
    scan = FolderScan()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        for d in dirnames:
            if (here / d).is_symlink():
                scan.links.append(here / d)
        for name in filenames:
            p = here / name
            if p.is_symlink():
                scan.links.append(p)
            elif p.suffix.lower() in wanted:
                scan.files.append(p)
            elif not (here == folder and name == LABELS_CSV):
                scan.ignored.append(p)
    for lst in (scan.files, scan.links, scan.ignored):
        lst.sort(key=lambda p: p.relative_to(folder).as_posix())
    return scan


def read_labels_csv(folder: Path, suffixes: Iterable[str]) -> dict[str, str] | None:
    """``{path relative to folder (posix): label}`` from ``folder/labels.csv``, or None when there is none.

    The header must name the columns ``path`` and ``label`` (others are ignored). Every path must
    be relative, stay inside the folder, name an existing file with one of ``suffixes`` and occur
    once; a label may be empty (that file is then unlabelled).
    """
    path = folder / LABELS_CSV
    if not path.exists():
        return None
    wanted = {s.lower() for s in suffixes}
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Excel's UTF-8 CSV) is not part of the header
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e}") from e
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        if "path" not in header or "label" not in header or len(set(header)) != len(header):
            raise InputError(f"{path}:1: the header must name the columns path,label (once each), got {header}")
        i_path, i_label = header.index("path"), header.index("label")
        labels: dict[str, str] = {}
        first_line: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue  # blank line
            if len(row) != len(header):
                raise InputError(f"{path}:{line}: {len(row)} fields, the header has {len(header)} ({','.join(header)})")
            raw = row[i_path].strip()
            rel = PurePosixPath(raw.replace("\\", "/"))
            if not raw or rel.is_absolute() or ".." in rel.parts:
                raise InputError(f"{path}:{line}: path {raw!r} must be relative to {folder} and stay inside it")
            name = rel.as_posix()
            target = folder / name
            if not target.is_file():
                raise InputError(f"{path}:{line}: {name!r} does not exist in {folder}")
            if target.suffix.lower() not in wanted:
                raise InputError(f"{path}:{line}: {name!r} is not a {'/'.join(sorted(wanted))} file")
            if name in labels:
                raise InputError(f"{path}:{line}: {name!r} is listed twice (first on line {first_line[name]})")
            labels[name] = row[i_label].strip()
            first_line[name] = line
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: not a readable CSV line: {e}") from e
    return labels


def source_rng(seed: int, name: str) -> np.random.Generator:
    """A generator for one source: a function of (seed, name) only."""
    return np.random.default_rng([int(seed), int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")])


def split_names(n: int, val_fraction: float, test_fraction: float, rng: np.random.Generator) -> list[str]:
    """Seeded split of ``n`` items: about ``val_fraction`` / ``test_fraction`` to val / test.

    At least one each when the fraction is > 0 and there are at least three items (validation
    wants every split non-empty); one ``rng.permutation(n)`` draw.
    """
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    if n >= 3:
        n_val = max(n_val, 1) if val_fraction > 0 else 0
        n_test = max(n_test, 1) if test_fraction > 0 else 0
    n_val, n_test = min(n_val, n), min(n_test, max(n - n_val, 0))
    perm = rng.permutation(n)
    split_of = np.zeros(n, dtype=np.int8)  # 0 train, 1 val, 2 test
    split_of[perm[:n_val]] = 1
    split_of[perm[n_val : n_val + n_test]] = 2
    return [SPLIT_NAMES[i] for i in split_of]


def unique_keys(prefix: str, rel_paths: Sequence[str]) -> list[str]:
    """Manifest keys ``<prefix>-<path>`` (lower-case, [a-z0-9_-]: '/' and '.' -> '_'), one per path.

    Paths that only differ in case or in other characters would share a key: those get the first 8
    hex digits of the exact path's sha256 appended, so a key never depends on which other files exist.
    """
    base = [f"{prefix}-{_UNSAFE.sub('_', p.lower()).strip('_') or '_'}" for p in rel_paths]
    seen: dict[str, int] = {}
    for b in base:
        seen[b] = seen.get(b, 0) + 1
    return [b if seen[b] == 1 else f"{b}-{hashlib.sha256(p.encode()).hexdigest()[:8]}" for b, p in zip(base, rel_paths)]


def fingerprint(folder: Path, scan: FolderScan) -> str:
    """sha256 over what a folder build reads: each entry's path, size and mtime, links' targets, labels.csv."""
    h = hashlib.sha256()
    for p in scan.files:
        st = p.stat()
        h.update(f"f\0{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for p in scan.links:
        h.update(f"l\0{p.relative_to(folder).as_posix()}\0{os.readlink(p)}\n".encode())
    labels = folder / LABELS_CSV
    h.update(labels.read_bytes() if labels.is_file() else b"\0no labels.csv")
    return h.hexdigest()


def examples(rows: Sequence[dict], k: int = 10) -> list[str]:
    """The first ``k`` quarantine rows as ``"path: reason"`` lines, for the download report."""
    return [f"{r['path']}: {r['reason']}" for r in rows[:k]]


__all__ = ["LABELS_CSV", "FolderScan", "resolve_folder", "scan_folder", "read_labels_csv", "source_rng",
           "split_names", "unique_keys", "fingerprint", "examples"]
