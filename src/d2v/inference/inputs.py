"""What to encode: files, folders and manifests turned into a list of keyed ``Item``s.

* an image file (``.png .jpg .jpeg .bmp .gif .webp .tif .tiff .ppm .pgm``): one item, key = file name;
* an audio file (``.flac .wav .ogg .oga .aiff .aif .mp3``): one item;
* a text file (``.txt``): one item per non-empty line, key = ``<file>:<line number>``;
* an IDX image file (``*-idx3-ubyte``, Fashion-MNIST's format): one item per image, key ``<file>:<index>``;
* a manifest CSV (``key`` column plus ``path`` [+ ``offset``] or ``text``; the project's
  ``data/raw/<modality>/manifest/<split>.csv``): one item per row, key = the row's key; relative
  paths are resolved against the folder above ``manifest/`` (else the CSV's folder);
* a folder: every file of the chosen modality below it (sorted; other files are ignored and
  counted), key = the path relative to the folder.

The modality of a file comes from its extension, and its first bytes are checked against it, so a
FLAC file named ``x.png`` is reported as audio, not "a corrupt image". A file of the wrong
modality, an unreadable file, or an empty input is an ``InputError`` naming the file.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2v.errors import InputError

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
AUDIO_EXT = {".flac", ".wav", ".ogg", ".oga", ".aiff", ".aif", ".mp3"}
TEXT_EXT = {".txt"}
MANIFEST_EXT = {".csv"}
MODALITIES = ("image", "speech", "text")
NAMES = {"image": "an image", "speech": "audio", "text": "text"}


@dataclass
class Item:
    """One thing to embed. ``data``: encoded file bytes, a uint8 array (IDX image) or a text line."""

    key: str
    modality: str
    path: Path | None = None
    data: Any = None
    offset: int = -1

    @property
    def where(self) -> str:
        if self.path is None:
            return f"item {self.key}"
        return f"{self.path}" + (f" (key {self.key})" if self.key not in (self.path.name, str(self.path)) else "")


# ------------------------------------------------------------------------------------ sniffing
def sniff_bytes(head: bytes) -> str | None:
    """Modality from a file's first bytes, or None when they say nothing we know."""
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff") or head[:6] in (b"GIF87a", b"GIF89a") \
            or head.startswith(b"BM") or head[:4] in (b"II*\x00", b"MM\x00*") \
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or head[:2] in (b"P5", b"P6"):
        return "image"
    if head.startswith(b"fLaC") or head.startswith(b"OggS") or head.startswith(b"ID3") \
            or (head[:4] == b"RIFF" and head[8:12] == b"WAVE") or head[:4] == b"FORM" \
            or (len(head) > 1 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0):
        return "audio"
    return None


def _is_idx(path: Path) -> bool:
    n = path.name
    return n.endswith("-idx3-ubyte") or n.endswith("-idx3-ubyte.gz")


def modality_of(path: Path) -> str | None:
    """``image``/``speech``/``text``/``manifest``/``idx`` from the extension, else None."""
    ext = path.suffix.lower()
    if ext in IMAGE_EXT:
        return "image"
    if ext in AUDIO_EXT:
        return "speech"
    if ext in TEXT_EXT:
        return "text"
    if ext in MANIFEST_EXT:
        return "manifest"
    if _is_idx(path):
        return "idx"
    return None


def check_content(path: Path, modality: str) -> None:
    """Refuse a file whose bytes say it is another modality than its name does."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e}") from e
    if not head:
        raise InputError(f"{path}: empty file")
    got = sniff_bytes(head)
    if modality == "image" and got == "audio":
        raise InputError(f"{path}: holds audio, not an image")
    if modality == "speech" and got == "image":
        raise InputError(f"{path}: holds an image, not audio")
    if modality == "text" and got is not None:
        raise InputError(f"{path}: holds {'an image' if got == 'image' else 'audio'}, not text")


# ------------------------------------------------------------------------------------ readers
def _text_items(path: Path, key_prefix: str) -> list[Item]:
    check_content(path, "text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e}") from e
    return [Item(f"{key_prefix}:{i}", "text", path, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _read_idx(path: Path):
    from d2v.data.sources.image import read_idx_images

    try:
        return read_idx_images(path)
    except Exception as e:  # noqa: BLE001 - malformed IDX files raise several types
        raise InputError(f"{path}: cannot read IDX images: {e}") from e


def _idx_items(path: Path, key_prefix: str) -> list[Item]:
    """One item per image; ``data`` is the whole (memory-mapped) array, ``offset`` the index."""
    arr = _read_idx(path)
    return [Item(f"{key_prefix}:{i}", "image", path, arr, offset=i) for i in range(len(arr))]


def _manifest_modality(cols: Sequence[str], first_path: str) -> str:
    if "text" in cols:
        return "text"
    if "offset" in cols:
        return "image"
    if "sample_rate" in cols or "duration" in cols:
        return "speech"
    m = modality_of(Path(first_path)) if first_path else None
    if m in ("image", "speech", "text"):
        return m
    raise InputError("cannot tell the modality of its rows (no text/offset/sample_rate column, unknown path extension)")


def _manifest_items(path: Path) -> tuple[str, list[Item]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            cols = list(rows[0].keys()) if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: cannot read the manifest: {e}") from e
    if not rows:
        raise InputError(f"{path}: the manifest has no rows")
    if "key" not in cols or not ("path" in cols or "text" in cols):
        raise InputError(f"{path}: not a manifest (needs a 'key' column and 'path' or 'text'; has {cols})")
    try:
        modality = _manifest_modality(cols, rows[0].get("path", ""))
    except InputError as e:
        raise InputError(f"{path}: {e}") from e
    base = path.parent.parent if path.parent.name == "manifest" else path.parent
    items: list[Item] = []
    idx_cache: dict[Path, Any] = {}
    for i, r in enumerate(rows, 2):
        key = r["key"]
        if modality == "text":
            items.append(Item(key, "text", path, r["text"]))
            continue
        rel = r.get("path") or ""
        if not rel:
            raise InputError(f"{path}:{i}: empty path for key {key}")
        p = Path(rel)
        if not p.is_absolute():
            p = base / p if (base / p).exists() or not (path.parent / p).exists() else path.parent / p
        off = int(r.get("offset") or -1) if modality == "image" else -1
        if off >= 0:
            if p not in idx_cache:
                if not p.is_file():
                    raise InputError(f"{p}: no such file (manifest {path}, key {key})")
                idx_cache[p] = _read_idx(p)
            arr = idx_cache[p]
            if off >= len(arr):
                raise InputError(f"{p}: offset {off} beyond its {len(arr)} images (manifest {path}, key {key})")
            items.append(Item(key, "image", p, arr, offset=off))
        else:
            items.append(Item(key, modality, p))
    return modality, items


# ------------------------------------------------------------------------------------ collect
def _pick(modality: str | None, available: Iterable[str], where: str) -> str:
    avail = [m for m in MODALITIES if m in set(available)]
    if modality is not None:
        return modality
    if len(avail) == 1:
        return avail[0]
    if not avail:
        raise InputError(f"{where}: no image, audio or text files found")
    raise InputError(f"{where}: holds {', '.join(avail)} files; choose one with modality= / --modality")


def collect_inputs(inputs: str | Path | Sequence[str | Path], modality: str | None = None,
                   allowed: Sequence[str] | None = None, limit: int | None = None) -> tuple[str, list[Item]]:
    """Files / folders / manifests -> ``(modality, items)``; every item has that modality.

    ``modality``: forced (``image``/``speech``/``text``); otherwise the one the inputs hold (or
    the only one in ``allowed``, the model's modalities). ``limit``: keep the first N items.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if modality is not None and modality not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    if not inputs:
        raise InputError("nothing to encode: no inputs given")
    if modality is None and allowed is not None and len(allowed) == 1:
        modality = allowed[0]
    chosen = modality
    items: list[Item] = []
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise InputError(f"{p}: no such file or folder")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            by_mod: dict[str, list[Path]] = {}
            for f in files:
                m = modality_of(f)
                if m == "idx":
                    m = "image"
                if m in MODALITIES:
                    by_mod.setdefault(m, []).append(f)
            m = _pick(chosen, by_mod, str(p))
            if not by_mod.get(m):
                found = ", ".join(f"{len(v)} {k}" for k, v in by_mod.items()) or "none"
                raise InputError(f"{p}: no {m} files in this folder (found: {found})")
            for f in by_mod[m]:
                rel = str(f.relative_to(p))
                if _is_idx(f):
                    items += _idx_items(f, rel)
                elif m == "text":
                    items += _text_items(f, rel)
                else:
                    items.append(Item(rel, m, f))
        else:
            kind = modality_of(p)
            if kind == "manifest":
                m, its = _manifest_items(p)
            elif kind == "idx":
                m, its = "image", _idx_items(p, p.name)
            elif kind == "text":
                m, its = "text", _text_items(p, p.name)
            elif kind in ("image", "speech"):
                check_content(p, kind)
                m, its = kind, [Item(p.name, kind, p)]
            else:
                with open(p, "rb") as f:
                    got = sniff_bytes(f.read(16))
                if got is None:
                    raise InputError(f"{p}: unknown file type (expected an image, audio, .txt or manifest .csv file)")
                m = "image" if got == "image" else "speech"
                its = [Item(p.name, m, p)]
            if chosen is not None and m != chosen:
                raise InputError(f"{p}: holds {NAMES[m]} input, but {chosen} was asked for"
                                 + (" (the model encodes " + ", ".join(allowed) + ")" if allowed else ""))
            items += its
        if chosen is None and items:
            chosen = items[0].modality
        if limit is not None and len(items) >= limit:
            break
    if chosen is None or not items:
        raise InputError(f"{', '.join(map(str, inputs))}: nothing to encode (no items found)")
    if allowed is not None and chosen not in allowed:
        first = items[0].path or items[0].key
        raise InputError(f"{first}: holds {NAMES[chosen]} input, but the model encodes only {', '.join(allowed)}")
    items = items[:limit] if limit is not None else items
    seen: set[str] = set()
    for it in items:
        if it.key in seen:
            raise InputError(f"duplicate key {it.key!r} among the inputs ({it.where}): keys must be unique")
        seen.add(it.key)
    return chosen, items
