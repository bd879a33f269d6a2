"""WebDataset shards from the manifests (``d2v shard``).

``data/shards/<modality>/<split>-%06d.tar`` plus a ``wids`` index ``<split>.json`` per split.
Per sample: images as the source's own JPEG or PNG bytes (``jpg`` / ``png``: ImageNet's JPEGs are
not re-encoded, which would make them ~5x larger and ~3x slower to decode; other formats and the
IDX arrays are encoded as PNG), audio as FLAC, text as the raw line (``txt``) and sentencepiece ids
(``ids.npy``), always a label (``cls``, an index into the sorted label set, -1 when unlabelled)
and JSON metadata. Samples are shuffled with the seed before writing and the tar headers carry a
fixed mtime, so the same inputs and seed give byte-identical shards.

Every file is decoded before it is written: a file that does not decode, or decodes to the
wrong sample rate or channel count, stops the stage with an error naming it (the manifest said
it was good; validation should have caught it), so a shard never holds a sample the loader
cannot read. Shards are written to ``*.tar.tmp`` and renamed when complete.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from d2v.data import transforms
from d2v.data.manifest import SPLITS, manifest_path, raw_dir, read_manifest
from d2v.errors import InputError

FIXED_MTIME = 1_700_000_000  # reproducible tar headers
PASS_THROUGH = {"JPEG": "jpg", "PNG": "png"}  # PIL format -> shard extension, bytes kept as they are
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def shard_dir(root: Path | str, modality: str) -> Path:
    return Path(root) / "shards" / modality


def label_set(root: Path, modality: str) -> list[str]:
    """Sorted non-empty labels over all splits: the ``cls`` index space."""
    labels: set[str] = set()
    for split in SPLITS:
        p = manifest_path(root, modality, split)
        if p.is_file():
            labels |= {x for x in read_manifest(p)["label"].tolist() if x}
    return sorted(labels)


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


class _ImageReader:
    """Reads manifest rows: IDX offsets (memory-mapped once per file) or image files."""

    def __init__(self, base: Path):
        self.base = base
        self._idx: dict[str, np.ndarray] = {}

    def __call__(self, row: dict) -> tuple[str, bytes]:
        """``(shard extension, bytes)`` of the row's image: a JPEG or PNG file's own bytes (decoded
        once here, so a shard never holds a file the loader cannot read), else a PNG encoding."""
        path = self.base / row["path"]
        off = int(row["offset"])
        if off >= 0:
            if row["path"] not in self._idx:
                from d2v.data.sources.image import read_idx_images

                self._idx[row["path"]] = read_idx_images(path)
            arr = self._idx[row["path"]]
            if off >= len(arr):
                raise InputError(f"{path}: offset {off} beyond its {len(arr)} images (key {row['key']})")
            return "png", _png(arr[off])
        from PIL import Image, UnidentifiedImageError

        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.format in PASS_THROUGH:
                    return PASS_THROUGH[im.format], data
                return "png", _png(np.asarray(im.convert(transforms.pil_mode(im.mode))))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise InputError(f"{path}: cannot decode image (key {row['key']}): {e}") from e


def _flac(path: Path, row: dict, sample_rate: int) -> tuple[bytes, float]:
    import soundfile as sf

    try:
        info = sf.info(str(path))
        if info.subtype in ("FLOAT", "DOUBLE"):  # float samples may be NaN/Inf: int16 reading hides them as 0
            wf, _ = sf.read(str(path), dtype="float32", always_2d=True)
            if not np.isfinite(wf).all():
                raise InputError(f"{path}: {int((~np.isfinite(wf)).sum())} NaN/Inf samples (key {row['key']})")
        wav, sr = sf.read(str(path), dtype="int16", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:  # type: ignore[attr-defined]
        raise InputError(f"{path}: cannot decode audio (key {row['key']}): {e}") from e
    if sr != sample_rate:
        raise InputError(f"{path}: sample rate {sr} Hz, expected {sample_rate} Hz (key {row['key']})")
    if wav.shape[1] != 1:
        raise InputError(f"{path}: {wav.shape[1]} channels, expected mono (key {row['key']})")
    if wav.shape[0] == 0:
        raise InputError(f"{path}: no audio frames (key {row['key']})")
    if info.format == "FLAC":
        return path.read_bytes(), wav.shape[0] / sr
    buf = io.BytesIO()
    sf.write(buf, wav[:, 0], sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue(), wav.shape[0] / sr


def _samples(modality: str, root: Path, rows: list[dict], labels: dict[str, int], tokenizer: Any,
             sample_rate: int) -> Iterator[dict]:
    base = raw_dir(root, modality)
    read_image = _ImageReader(base) if modality == "image" else None
    for row in rows:
        rel = Path(str(row["path"]))
        if modality != "text" and (rel.is_absolute() or ".." in rel.parts):
            raise InputError(f"{base / 'manifest'}: key {row['key']}: path {str(rel)!r} leaves {base}")
        meta = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        s: dict[str, Any] = {"__key__": row["key"], "cls": labels.get(row["label"], -1)}
        if modality == "image":
            ext, data = read_image(row)
            s[ext] = data
        elif modality == "speech":
            s["flac"], meta["duration"] = _flac(base / row["path"], row, sample_rate)
        else:
            text = str(row["text"])
            if not text.strip():
                raise InputError(f"{base / 'manifest'}: empty text for key {row['key']}")
            s["txt"] = text
            s["ids.npy"] = np.asarray(tokenizer.encode(text), dtype=np.int32)
        s["json"] = meta
        yield s


def write_shards(modality: str, root: Path | str, seed: int, maxcount: int, min_shards: int,
                 tokenizer_path: Path | None = None, sample_rate: int = 16000, progress: bool = True) -> dict:
    """Write the shards and wids indexes of every split; return counts, sizes and timings."""
    root = Path(root)
    out = shard_dir(root, modality)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.tar")) + list(out.glob("*.json")) + list(out.glob("*.tmp")):
        old.unlink()
    tokenizer = None
    if modality == "text":
        import sentencepiece as spm

        if tokenizer_path is None or not Path(tokenizer_path).is_file():
            raise FileNotFoundError(f"tokenizer model not found: {tokenizer_path} (run `d2v tokenizer` first)")
        tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    labels = {name: i for i, name in enumerate(label_set(root, modality))}
    summary: dict[str, Any] = {"modality": modality, "labels": list(labels), "splits": {}}
    t0 = time.perf_counter()
    for split in SPLITS:
        rows = read_manifest(manifest_path(root, modality, split)).to_dict("records")
        random.Random(f"{seed}-{modality}-{split}").shuffle(rows)
        n = len(rows)
        # Enough shards for ranks x workers: never fewer than min_shards when there are samples.
        per_shard = max(1, min(maxcount, math.ceil(n / max(1, min_shards)))) if n else maxcount
        samples = _samples(modality, root, rows, labels, tokenizer, sample_rate)
        bar = tqdm(samples, total=n, desc=f"shard {modality}/{split}", disable=not progress, unit="sample")
        try:
            written = _write_split(bar, out, split, per_shard)
        except BaseException as e:
            for part in out.glob("*.tmp"):  # never leave half a shard behind
                part.unlink()
            if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:  # disk full, quota, read-only, I/O
                raise OSError(e.errno, f"{out}: could not write the {split} shards of {modality} "
                                       f"({os.strerror(e.errno)}); the partial shard was removed and no "
                                       f"{split}.json index written") from e
            raise
        index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": f"{modality}-{split}",
                 "shardlist": written}
        _write_atomic(out / f"{split}.json", json.dumps(index, indent=1))
        sizes = [(out / w["url"]).stat().st_size for w in written]
        summary["splits"][split] = {"samples": n, "shards": len(written), "bytes": int(sum(sizes)),
                                    "mean_shard_mb": (sum(sizes) / len(sizes) / 2**20) if sizes else 0.0}
    # summary.json is part of the DVC output: no wall time in it, so a re-run on the same inputs leaves
    # the directory's hash unchanged and DVC skips every stage after it (the time is returned instead)
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary | {"seconds": time.perf_counter() - t0}


def _write_atomic(path: Path, text: str) -> None:
    """An index is read as the list of complete shards: written to a temp file, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"{path}: could not write ({e.strerror})") from e
    os.replace(tmp, path)


def _write_split(samples, out: Path, split: str, per_shard: int) -> list[dict]:
    """Write ``samples`` into ``<split>-NNNNNN.tar`` files of ``per_shard`` samples each.

    Each shard is written as ``.tar.tmp`` and renamed only once it is complete.
    """
    import webdataset as wds

    written: list[dict] = []
    sink, tmp, count = None, None, 0

    def finish() -> None:
        nonlocal sink, count
        sink.close()
        final = out / f"{split}-{len(written):06d}.tar"
        os.replace(tmp, final)
        written.append({"url": final.name, "nsamples": count})
        sink, count = None, 0

    try:
        for sample in samples:
            if sink is None:
                tmp = out / f"{split}-{len(written):06d}.tar.tmp"
                sink = wds.TarWriter(str(tmp), mtime=FIXED_MTIME)
            sink.write(sample)
            count += 1
            if count == per_shard:
                finish()
        if sink is not None:
            finish()
    finally:
        if sink is not None:
            sink.close()
    return written


def shard_urls(root: Path | str, modality: str, split: str) -> list[str]:
    """Shard paths of a split, from its wids index."""
    out = shard_dir(root, modality)
    idx = out / f"{split}.json"
    if not idx.is_file():
        raise FileNotFoundError(f"shard index not found: {idx} (run `d2v shard --modality {modality}`)")
    try:
        shards = json.loads(idx.read_text(encoding="utf-8"))["shardlist"]
        urls = [str(out / s["url"]) for s in shards]
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{idx}: not a readable shard index ({type(e).__name__}: {e}); "
                         f"rerun `d2v shard --modality {modality}`") from e
    for u in urls:
        if Path(u).parent != out or not u.endswith(".tar"):
            raise InputError(f"{idx}: shard {u!r} is not a .tar file in {out}")
    return urls
