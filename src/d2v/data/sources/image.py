"""Image sources for ``d2v download``: Fashion-MNIST (IDX, offline default) and an ImageNet-style folder.

``fashion_mnist``: the four IDX files come from, in this order,

1. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist`` installed),
2. ``<root>/cache/dataset-fashion-mnist`` (the package fetched earlier with ``apt-get download`` and
   unpacked with ``dpkg-deb -x``; fetched now when absent and ``apt-get`` works; no root needed),
3. the official Fashion-MNIST URLs (``d2v.data.download.download_file``).

They are decompressed into ``<root>/raw/image/idx/`` and the MD5 of each decompressed file must equal
the upstream value (the Debian ``.gz`` files are recompressed, the contents are identical). The
manifest rows point into those files: ``path`` = ``idx/<name>``, ``offset`` = the image's index.
``cfg.val_count`` images of the official train split (seeded) form ``val``; ``test`` is the official
test split. :func:`read_idx_images` / :func:`read_idx_labels` are the readers the shard stage uses.

``imagenet_folder``: ``cfg.folder`` holds ``train/<class>/*`` and ``val/<class>/*`` image files. The
folder is linked (symlink) as ``<root>/raw/image/imagenet_folder`` so that manifest paths stay
relative to ``<root>/raw/image``; each image is opened and decoded with PIL (JPEGs in draft mode, which
still reads the whole file) so that unreadable or truncated files go to the quarantine file. The
official val split is halved (seeded) into ``val`` and ``test``.

``image_folder``: your own images, read in place the same way: ``cfg.folder`` holds ``<class>/<file>``
(an ImageFolder tree, labelled by folder) or only ``<file>`` entries (unlabelled, for pretraining);
``val_count`` images each (seeded, at most a fifth each) become ``val`` and ``test``.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from d2v.config import ImageDataConfig
from d2v.data.download import file_digest
from d2v.data.manifest import SPLITS, manifest_path, quarantine_path, raw_dir, write_manifest, write_quarantine
from d2v.errors import ConfigError, InputError

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FMNIST_FILES = {  # decompressed name -> (split, kind, expected count, MD5 of the DECOMPRESSED file)
    "train-images-idx3-ubyte": ("train", "images", 60000, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": ("train", "labels", 60000, "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": ("test", "images", 10000, "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": ("test", "labels", 10000, "15d484375f8d13e6eb1aabb0c3f46965"),
}
# The prefixes published in shared/docs/offline-data.md section 1a (upstream values listed by public loaders).
assert [v[3][:8] for v in FMNIST_FILES.values()] == ["f4a8712d", "9018921c", "8181f547", "15d48437"]
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}.gz"
FMNIST_DEB = "dataset-fashion-mnist"
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_DEB_SUBDIR = Path("usr/share/datasets/fashion-mnist")

IMAGE_EXTS = {".jpg", ".jpeg", ".png"}
IMAGE_FOLDER_LINK = "imagenet_folder"
FOLDER_LINKS = {"imagenet_folder": IMAGE_FOLDER_LINK, "image_folder": "image_folder"}  # names under raw/image

_IDX_UBYTE = 0x08  # IDX type code (third magic byte) of unsigned bytes, the only type MNIST-style files use


# ---------------------------------------------------------------------------------------------- IDX


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_idx(path: Path | str, ndim: int, what: str) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally ``.gz``) with ``ndim`` dimensions; clear errors name the file."""
    path = Path(path)
    try:
        with _open_maybe_gz(path) as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX {what} file not found: {path}") from None
    except (OSError, EOFError) as e:  # gzip errors (bad gzip header, truncated gzip stream) are OSError/EOFError
        raise InputError(f"{path}: cannot read IDX {what} file: {e}") from e
    if len(data) < 4:
        raise InputError(f"{path}: not an IDX {what} file: only {len(data)} bytes, the header alone needs {4 + 4 * ndim}")
    want_magic = (_IDX_UBYTE << 8) | ndim
    got_magic = int.from_bytes(data[:4], "big")
    if got_magic != want_magic:
        raise InputError(
            f"{path}: bad IDX magic number 0x{got_magic:08x} for a {what} file "
            f"(expected 0x{want_magic:08x}: {ndim}-D unsigned bytes)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise InputError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    need = header + int(np.prod(dims, dtype=np.int64))
    if len(data) < need:
        raise InputError(
            f"{path}: truncated IDX {what} file: header says {dims} ({need} bytes), file has {len(data)} bytes"
        )
    if len(data) > need:
        raise InputError(f"{path}: IDX {what} file has {len(data) - need} bytes after the {dims} data the header declares")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_images(path: Path | str) -> np.ndarray:
    """Images of an IDX ``idx3`` file (``.gz`` too) as an array ``(n, rows, cols)`` (read-only view)."""
    return _read_idx(path, 3, "images")


def read_idx_labels(path: Path | str) -> np.ndarray:
    """Labels of an IDX ``idx1`` file (``.gz`` too) as an array ``(n,)`` (read-only view)."""
    return _read_idx(path, 1, "labels")


# --------------------------------------------------------------------------------- fashion_mnist


def _gz_dir_complete(d: Path) -> bool:
    return all((d / f"{n}.gz").is_file() for n in FMNIST_FILES)


def _fetch_fmnist_deb(cache: Path, progress: bool) -> Path:
    """``apt-get download`` + ``dpkg-deb -x`` into ``cache``; return the folder with the ``.gz`` files."""
    out = cache / FMNIST_DEB
    gz_dir = out / FMNIST_DEB_SUBDIR
    if _gz_dir_complete(gz_dir):
        return gz_dir
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found")
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"apt-get download {FMNIST_DEB} -> {debs}", file=sys.stderr)
    r = subprocess.run(["apt-get", "download", FMNIST_DEB], cwd=debs, capture_output=True, text=True, timeout=1800)
    found = sorted(debs.glob(f"{FMNIST_DEB}_*.deb"))
    if r.returncode != 0 or not found:
        raise RuntimeError(f"apt-get download {FMNIST_DEB} failed (rc {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    tmp = cache / f"{FMNIST_DEB}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(tmp)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"dpkg-deb -x {found[-1]} failed: {r.stderr.strip()[-500:]}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if not _gz_dir_complete(gz_dir):
        raise RuntimeError(f"{found[-1].name} does not contain the four IDX files under /{FMNIST_DEB_SUBDIR}")
    return gz_dir


def _fetch_fmnist_official(cache: Path, progress: bool) -> Path:
    from d2v.data.download import download_file  # lazily: needs network, only for this fallback

    d = cache / "fashion-mnist-official"
    d.mkdir(parents=True, exist_ok=True)
    for name in FMNIST_FILES:
        dest = d / f"{name}.gz"
        if not dest.is_file():
            # No sha256 for the .gz: the decompressed file's MD5 is verified afterwards.
            download_file(FMNIST_URL.format(name=name), dest, sha256=None, progress=progress)
    return d


def _locate_fmnist(root: Path, progress: bool) -> tuple[Path, str, list[str]]:
    """The folder holding the four ``.gz`` files, a description of where it came from, and notes."""
    notes: list[str] = []
    if _gz_dir_complete(FMNIST_SYSTEM_DIR):
        return FMNIST_SYSTEM_DIR, f"Debian package {FMNIST_DEB} installed at {FMNIST_SYSTEM_DIR}", notes
    cache = root / "cache"
    try:
        d = _fetch_fmnist_deb(cache, progress)
        debs = sorted((cache / "debs").glob(f"{FMNIST_DEB}_*.deb"))
        deb = debs[-1].name if debs else FMNIST_DEB
        return d, f"Debian package {deb} (apt-get download + dpkg-deb -x into {cache / FMNIST_DEB})", notes
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        notes.append(f"Debian package unavailable ({e}); falling back to the official URLs")
        if progress:
            print(notes[-1], file=sys.stderr)
    try:
        d = _fetch_fmnist_official(cache, progress)
    except (RuntimeError, OSError, ImportError) as e:
        raise RuntimeError(f"Fashion-MNIST unavailable: {notes[-1]}; the official URLs failed too: {e}") from e
    return d, f"official Fashion-MNIST URLs ({FMNIST_URL.format(name='*')}) into {d}", notes


def _decompress_verified(src_gz: Path, dest: Path, md5: str) -> None:
    """Decompress ``src_gz`` to ``dest`` (skipped when ``dest`` already has the right MD5); verify the MD5."""
    if dest.is_file() and file_digest(dest, "md5") == md5:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with gzip.open(src_gz, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
    except (OSError, EOFError) as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{src_gz}: cannot decompress: {e}") from e
    actual = file_digest(tmp, "md5")
    if actual != md5:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"checksum mismatch for {dest.name} (decompressed from {src_gz}): expected md5 {md5}, got {actual}")
    tmp.replace(dest)


def _fmnist_rows(idx_dir: Path, cfg: ImageDataConfig, seed: int) -> tuple[dict[str, list[dict]], list[dict], dict]:
    """Manifest rows per split and quarantine rows from the four decompressed IDX files in ``idx_dir``."""
    arrays: dict[tuple[str, str], np.ndarray] = {}
    for name, (split, kind, count, _) in FMNIST_FILES.items():
        p = idx_dir / name
        a = read_idx_images(p) if kind == "images" else read_idx_labels(p)
        if a.shape[0] != count:
            raise InputError(f"{p}: {a.shape[0]} {kind}, expected {count}")
        if kind == "images" and a.shape[1:] != (28, 28):
            raise InputError(f"{p}: images are {a.shape[1]}x{a.shape[2]}, expected 28x28")
        arrays[(split, kind)] = a
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    quarantine: list[dict] = []
    n_train = arrays[("train", "labels")].shape[0]
    if not 0 <= cfg.val_count < n_train:
        raise ConfigError(f"data.image.val_count={cfg.val_count} must be in [0, {n_train})")
    if cfg.max_train < 0:
        raise ConfigError(f"data.image.max_train={cfg.max_train} must be >= 0 (0: all)")
    perm = np.random.default_rng(seed).permutation(n_train)
    val_idx = set(perm[: cfg.val_count].tolist())
    rest = perm[cfg.val_count :]
    if cfg.max_train > 0:
        rest = rest[: cfg.max_train]
    train_idx = set(rest.tolist())
    for official in ("train", "test"):
        name = f"{'train' if official == 'train' else 't10k'}-images-idx3-ubyte"
        labels = arrays[(official, "labels")]
        for i, y in enumerate(labels.tolist()):
            key = f"fmnist-{official}-{i:05d}"
            if official == "test":
                split = "test"
            elif i in val_idx:
                split = "val"
            elif i in train_idx:
                split = "train"
            else:
                continue  # beyond max_train: not selected (counted in the summary as "unused")
            if not 0 <= y < len(FMNIST_CLASSES):
                quarantine.append({"key": key, "path": f"idx/{name}", "reason": f"label {y} outside 0..9"})
                continue
            rows[split].append(
                {"key": key, "split": split, "label": FMNIST_CLASSES[y], "path": f"idx/{name}",
                 "offset": i, "width": 28, "height": 28}
            )
    info = {"unused_train": n_train - cfg.val_count - len(train_idx)}
    return rows, quarantine, info


def _download_fashion_mnist(cfg: ImageDataConfig, root: Path, seed: int, progress: bool) -> dict:
    gz_dir, source, notes = _locate_fmnist(root, progress)
    idx_dir = raw_dir(root, "image") / "idx"
    for name, (_, _, _, md5) in FMNIST_FILES.items():
        _decompress_verified(gz_dir / f"{name}.gz", idx_dir / name, md5)
    rows, quarantine, info = _fmnist_rows(idx_dir, cfg, seed)
    return {"source": source, "notes": notes, "files": {n: v[3] for n, v in FMNIST_FILES.items()}, **info}, rows, quarantine


# -------------------------------------------------------------------------------- imagenet_folder


_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def _probe_image(path: Path) -> tuple[int, int] | str:
    """``(width, height)`` of a readable image, else the reason it cannot be used."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft(im.mode, (1, 1))  # decode at reduced scale: fast, still reads every byte
            im.load()
        if size[0] <= 0 or size[1] <= 0:
            return f"empty image ({size[0]}x{size[1]})"
        return size
    except UnidentifiedImageError:
        return "unreadable: not a recognised image file"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        msg = str(e)
        return f"truncated: {msg}" if "truncated" in msg.lower() else f"unreadable: {type(e).__name__}: {msg}"


def _link_folder(cfg: ImageDataConfig, root: Path) -> tuple[Path, Path]:
    """The user's folder, checked, and its symlink under ``<root>/raw/image`` (read in place, never copied)."""
    if not cfg.folder:
        raise ConfigError(f"data.image.folder must be set for data.image.dataset={cfg.dataset}")
    folder = Path(cfg.folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder} (data.image.folder)")
    base = raw_dir(root, "image")
    base.mkdir(parents=True, exist_ok=True)
    link = base / FOLDER_LINKS[cfg.dataset]
    if link.is_symlink() or link.exists():
        if link.is_symlink() and link.resolve() == folder:
            pass
        elif link.is_symlink():
            link.unlink()
        else:
            raise FileExistsError(f"{link} exists and is not a symlink; remove it to use data.image.folder={folder}")
    if not link.is_symlink():
        link.symlink_to(folder, target_is_directory=True)
    return folder, link


def _scan(folder: Path, link_name: str, subs: list[str], depth: int, layout: str
          ) -> tuple[list[tuple[str, str, str, Path]], list[dict]]:
    """Image files under ``folder/<sub>`` for each sub ("" = the folder itself) at ``depth`` levels
    (2: ``<class>/<file>``, labelled by the class folder; 1: files directly inside, unlabelled).
    Returns (sub, label, key, path) items and the quarantined entries (links, misplaced, other types)."""
    quarantine: list[dict] = []
    items: list[tuple[str, str, str, Path]] = []
    used_keys: set[str] = set()
    for sub in subs:
        top = folder / sub if sub else folder
        for p in sorted(top.rglob("*")):
            if p.is_dir() and not p.is_symlink():
                continue
            rel = p.relative_to(top)
            stem_key = _KEY_BAD.sub("_", str(rel.with_suffix("")).replace(os.sep, "-"))
            key = f"img-{sub}-{stem_key}" if sub else f"img-{stem_key}"
            k, n = key, 1
            while k in used_keys:
                n += 1
                k = f"{key}-{n}"
            used_keys.add(k)
            relpath = "/".join(x for x in (link_name, sub, rel.as_posix()) if x)
            if p.is_symlink():  # not followed: it may point anywhere (outside the folder, a device ...)
                quarantine.append({"key": k, "path": relpath, "reason": f"symbolic link (to {os.readlink(p)!r}): "
                                   "links in the image folder are not followed; copy the file instead"})
            elif len(rel.parts) != depth:
                quarantine.append({"key": k, "path": relpath, "reason": f"not directly inside a class folder or the folder ({layout})"})
            elif p.suffix.lower() not in IMAGE_EXTS:
                why = f"unsupported file type {p.suffix or '(none)'!r} (JPEG/PNG expected)"
                quarantine.append({"key": k, "path": relpath, "reason": why})
            else:
                items.append((sub, rel.parts[0] if depth == 2 else "", k, p))
    return items, quarantine


def _probe_all(folder: Path, link_name: str, items: list[tuple[str, str, str, Path]], progress: bool,
               quarantine: list[dict]) -> list[dict]:
    """Decode every image (threads); readable ones become manifest rows, the rest are quarantined."""
    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        results = ex.map(lambda it: _probe_image(it[3]), items, chunksize=64)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(items), desc="images", unit="img", file=sys.stderr)
        results = list(results)
    good = []
    for (sub, label, key, p), res in zip(items, results):
        relpath = f"{link_name}/{p.relative_to(folder).as_posix()}"
        if isinstance(res, str):
            quarantine.append({"key": key, "path": relpath, "reason": res})
            continue
        good.append({"key": key, "split": sub, "label": label, "path": relpath, "offset": -1,
                     "width": res[0], "height": res[1]})
    return good


def _download_imagenet_folder(cfg: ImageDataConfig, root: Path, seed: int, progress: bool):
    folder, link = _link_folder(cfg, root)
    for sub in ("train", "val"):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"image folder {folder} has no {sub}/ subfolder (expected {sub}/<class>/*)")
    items, quarantine = _scan(folder, link.name, ["train", "val"], 2, "<split>/<class>/<file>")
    good = _probe_all(folder, link.name, items, progress, quarantine)
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    rows["train"] = [{**r, "split": "train"} for r in good if r["split"] == "train"]
    val = [r for r in good if r["split"] == "val"]
    perm = np.random.default_rng(seed).permutation(len(val))
    n_val = len(val) // 2
    is_val = np.zeros(len(val), dtype=bool)
    is_val[perm[:n_val]] = True
    for r, v in zip(val, is_val.tolist()):
        s = "val" if v else "test"
        rows[s].append({**r, "split": s})
    train_classes = {r["label"] for r in rows["train"]}
    unseen = sorted({r["label"] for r in val} - train_classes)
    info = {
        "source": f"image folder {folder} (linked as {link})",
        "notes": [f"{len(unseen)} val classes have no train images: {unseen[:10]}"] if unseen else [],
        "classes": len(train_classes),
    }
    return info, rows, quarantine


def _download_image_folder(cfg: ImageDataConfig, root: Path, seed: int, progress: bool):
    """Your own images: ``<folder>/<class>/<file>`` (labelled by the class folder; an ImageFolder tree)
    or ``<folder>/<file>`` (unlabelled: pretraining only). ``val_count`` images each (seeded, at most a
    fifth of the folder each) are held out as ``val`` and ``test``."""
    folder, link = _link_folder(cfg, root)
    entries = sorted(folder.iterdir())
    top_files = [p for p in entries if not p.is_dir()]
    class_dirs = [p for p in entries if p.is_dir() and not p.is_symlink()]
    if class_dirs and top_files:
        raise InputError(f"image folder {folder}: has both files ({top_files[0].name}, ...) and subfolders "
                         f"({class_dirs[0].name}/, ...) at the top; use either <class>/<file> (labelled) or "
                         "<file> only (unlabelled)")
    labelled = bool(class_dirs)
    layout = "<class>/<file>" if labelled else "<file>, no subfolders"
    items, quarantine = _scan(folder, link.name, [""], 2 if labelled else 1, layout)
    if not items:
        raise InputError(f"image folder {folder}: no JPEG/PNG images found ({layout}; "
                         f"{len(quarantine)} other entries)")
    good = _probe_all(folder, link.name, items, progress, quarantine)
    n_hold = min(cfg.val_count, len(good) // 5)
    split_of = np.full(len(good), "train", dtype=object)
    perm = np.random.default_rng(seed).permutation(len(good))
    split_of[perm[:n_hold]] = "val"
    split_of[perm[n_hold:2 * n_hold]] = "test"
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for r, s in zip(good, split_of.tolist()):
        rows[s].append({**r, "split": s})
    classes = sorted({r["label"] for r in good})
    notes = [] if labelled else ["unlabelled (no class folders): usable for pretraining, not for the image task"]
    info = {"source": f"image folder {folder} (linked as {link})", "notes": notes,
            "classes": len(classes) if labelled else 0, "labelled": labelled}
    return info, rows, quarantine


# ----------------------------------------------------------------------------------------- entry


def download_image(cfg: ImageDataConfig, root: Path, seed: int, progress: bool = True) -> dict:
    """Fetch/prepare the image data set ``cfg.dataset`` under ``root`` and write the manifests and quarantine file.

    Returns a summary: ``dataset``, ``counts`` per split, ``quarantined``, ``elapsed_s``, ``source``
    (where the files came from), ``notes`` and a few dataset-specific fields.
    """
    t0 = time.perf_counter()
    root = Path(root)
    if cfg.dataset == "fashion_mnist":
        info, rows, quarantine = _download_fashion_mnist(cfg, root, seed, progress)
    elif cfg.dataset == "imagenet_folder":
        info, rows, quarantine = _download_imagenet_folder(cfg, root, seed, progress)
    elif cfg.dataset == "image_folder":
        info, rows, quarantine = _download_image_folder(cfg, root, seed, progress)
    else:
        raise ConfigError(f"data.image.dataset={cfg.dataset!r}: expected fashion_mnist, imagenet_folder or image_folder")
    keys: set[str] = set()
    for s in SPLITS:
        for r in rows[s]:
            if r["key"] in keys:  # a bug guard: keys must be unique across splits
                raise AssertionError(f"duplicate manifest key {r['key']}")
            keys.add(r["key"])
    counts = {s: write_manifest(manifest_path(root, "image", s), "image", rows[s]) for s in SPLITS}
    n_q = write_quarantine(quarantine_path(root, "image"), quarantine)
    return {
        "modality": "image",
        "dataset": cfg.dataset,
        "counts": counts,
        "quarantined": n_q,
        "elapsed_s": round(time.perf_counter() - t0, 3),
        **info,
    }
