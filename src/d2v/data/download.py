"""Robust downloads and safe tar extraction, standard library (urllib, tarfile) + tqdm only.

``download_file`` streams into ``<dest>.part``, resumes an interrupted transfer with an HTTP
``Range`` request (restarting when the server answers 200 instead of 206), never accepts a
transfer shorter than ``Content-Length``, verifies the checksum(s) *before* the ``.part`` file is
moved into place with an atomic ``os.replace``, and is a no-op when ``dest`` already exists with the
right checksum. Failures name the URL: ``ValueError`` for a checksum mismatch, ``RuntimeError`` for
an HTTP error or a connection that keeps failing after the retries.

``safe_extract_tar`` refuses (``ValueError``, nothing written) archives with absolute member paths,
``..`` escapes, links or device files.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "d2v-downloader/0.1 (+urllib)"
# Seconds to wait before retry k (k = 1, 2, ...): BACKOFF_S * 2**(k-1), at most BACKOFF_MAX_S.
# Module-level so that tests can set it to 0.
BACKOFF_S = 1.0
BACKOFF_MAX_S = 15.0
# HTTP statuses worth retrying; any other 4xx/5xx fails at once.
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


class _Retry(Exception):
    """An attempt failed in a way that another attempt may fix (the .part file is kept)."""


def _file_digests(path: Path, algos: dict[str, str]) -> dict[str, str]:
    hashers = {name: hashlib.new(name) for name in algos}
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            for h in hashers.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashers.items()}


def file_digest(path: Path, algo: str) -> str:
    """Hex digest (``md5``, ``sha256``, ...) of a file, read in chunks."""
    return _file_digests(path, {algo: ""})[algo]


def verify_checksum(path: Path, algo: str, expected: str) -> None:
    """Raise ``ValueError`` naming the file and both digests unless ``path`` has ``expected``."""
    actual = file_digest(path, algo)
    if actual != expected:
        raise ValueError(f"checksum mismatch for {path}: expected {algo} {expected}, got {actual}")


def _mismatches(path: Path, expected: dict[str, str]) -> list[tuple[str, str, str]]:
    """(algo, expected, actual) for every expected digest that ``path`` does not match."""
    if not expected:
        return []
    actual = _file_digests(path, expected)
    return [(a, expected[a], actual[a]) for a in expected if actual[a] != expected[a]]


def _content_range_total(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``Content-Range: bytes a-b/total`` (either may be None)."""
    if not value:
        return None, None
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*$", value)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _attempt(url: str, part: Path, timeout: float, progress: bool, desc: str) -> None:
    """One HTTP request that appends to (206) or rewrites (200) ``part``; returns when complete.

    Raises ``_Retry`` for anything that a later attempt may fix, ``RuntimeError`` for a final HTTP
    error.
    """
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:
            # Range not satisfiable: the .part file already holds the whole file (we stopped
            # before renaming it) or is longer than the remote file.
            _, total = _content_range_total(e.headers.get("Content-Range") if e.headers else None)
            if total is not None and total == have:
                return
            log.warning("%s: server refused to resume at byte %d; restarting", url, have)
            part.unlink(missing_ok=True)
            raise _Retry(f"HTTP 416 when resuming at byte {have}") from e
        if e.code in RETRY_STATUSES:
            raise _Retry(f"HTTP {e.code} {e.reason}") from e
        raise RuntimeError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise _Retry(f"{type(e).__name__}: {getattr(e, 'reason', None) or e}") from e

    with resp:
        status = getattr(resp, "status", None) or resp.getcode() or 200
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.strip().isdigit() else None
        if have and status == 206:
            start, total = _content_range_total(resp.headers.get("Content-Range"))
            if start is not None and start != have:
                part.unlink(missing_ok=True)
                raise _Retry(f"server resumed at byte {start}, asked for {have}; restarting")
            mode = "ab"
            expected = total if total is not None else (have + length if length is not None else None)
        else:
            if have:
                log.info("%s: server does not support resuming (HTTP %s); restarting", url, status)
            have, mode = 0, "wb"
            expected = length
        got = have
        try:
            with open(part, mode) as f, _bar(expected, have, progress, desc) as bar:
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
        except (http.client.HTTPException, OSError) as e:  # IncompleteRead, reset, timeout ...
            raise _Retry(f"transfer interrupted after {got} bytes ({type(e).__name__}: {e})") from e
    if expected is not None and got < expected:
        raise _Retry(f"truncated transfer: {got} of {expected} bytes")
    if expected is not None and got > expected:
        part.unlink(missing_ok=True)
        raise _Retry(f"received {got} bytes, more than the announced {expected}; restarting")


def _bar(total: int | None, initial: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


def download_file(
    url: str,
    dest: Path,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 30,
) -> Path:
    """Download ``url`` to ``dest`` (atomically) and return ``dest``.

    * ``dest`` already present: returned at once if it matches the given checksum(s) (or if no
      checksum is given: only complete files are ever renamed into place); re-downloaded otherwise.
    * Streams into ``dest`` + ``.part``; an existing ``.part`` (an earlier interrupted run) is
      resumed with ``Range: bytes=N-``; a 200 answer instead of 206 restarts from zero.
    * ``retries``: further attempts after the first one, for connection errors, time-outs,
      truncated transfers (fewer bytes than ``Content-Length``) and HTTP 408/429/5xx; each retry
      resumes where the last one stopped. Other HTTP errors (404 ...) fail at once.
    * Given ``sha256`` and/or ``md5`` (hex, case-insensitive), the ``.part`` file is verified before
      it is renamed; on a mismatch it is deleted and ``ValueError`` names the URL and both digests.

    Raises ``RuntimeError`` (naming the URL and the cause) when the download cannot be completed.
    """
    dest = Path(dest)
    expected = {k: v.strip().lower() for k, v in (("sha256", sha256), ("md5", md5)) if v}
    if dest.is_file():
        bad = _mismatches(dest, expected)
        if not bad:
            log.debug("%s already present", dest)
            return dest
        log.warning("%s exists but its %s does not match; downloading again", dest, bad[0][0])
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")

    attempts = max(0, int(retries)) + 1
    last: Exception | None = None
    for i in range(attempts):
        if i:
            wait = min(BACKOFF_S * 2 ** (i - 1), BACKOFF_MAX_S)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.1f s", url, i, attempts, last, wait)
            if wait > 0:
                time.sleep(wait)
        try:
            _attempt(url, part, timeout, progress, dest.name)
            break
        except _Retry as e:
            last = e
    else:
        raise RuntimeError(
            f"download of {url} failed after {attempts} attempt(s): {last}"
            + (f" (partial data kept in {part}; a new run resumes it)" if part.exists() else "")
        ) from (last.__cause__ or last)

    bad = _mismatches(part, expected)
    if bad:
        part.unlink(missing_ok=True)
        algo, exp, act = bad[0]
        raise ValueError(f"checksum mismatch for {url}: expected {algo} {exp}, got {act} (deleted {part})")
    os.replace(part, dest)
    return dest


def safe_extract_tar(tar_path: Path, dest: Path) -> list[Path]:
    """Extract the regular files and directories of ``tar_path`` into ``dest``; return the files.

    Every member is checked before anything is written: an absolute path, a path that resolves
    outside ``dest`` (``..``, or through an existing symlink), a symlink or hardlink, or a device /
    FIFO member raises ``ValueError`` naming the member and the archive. Extracted files get mode
    0644 (0755 if executable by the owner) and the archive's mtime.
    """
    tar_path, dest = Path(tar_path), Path(dest)
    root = dest.resolve()
    out: list[tuple[tarfile.TarInfo, Path]] = []
    with tarfile.open(tar_path, "r:*") as tf:
        members = tf.getmembers()
        for m in members:
            def refuse(why: str, member: tarfile.TarInfo = m) -> ValueError:
                return ValueError(f"refusing to extract {tar_path}: member {member.name!r} {why}")

            name = m.name
            if name.startswith(("/", "\\")) or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name):
                raise refuse("has an absolute path")
            if m.issym() or m.islnk():
                raise refuse(f"is a {'symlink' if m.issym() else 'hardlink'} (to {m.linkname!r})")
            if m.isdev():
                raise refuse("is a device file or FIFO")
            if not (m.isreg() or m.isdir()):
                raise refuse(f"has an unsupported type {m.type!r}")
            target = (root / name).resolve()
            if target != root and root not in target.parents:
                raise refuse("escapes the destination directory")
            if m.isreg() and target == root:
                raise refuse("is a file at the archive root path")
            out.append((m, target))

        root.mkdir(parents=True, exist_ok=True)
        files: list[Path] = []
        for m, target in out:
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            assert src is not None  # regular file
            tmp = target.with_name(target.name + ".extracting")
            with src, open(tmp, "wb") as f:
                shutil.copyfileobj(src, f, CHUNK)
            os.chmod(tmp, 0o755 if m.mode & 0o100 else 0o644)
            os.utime(tmp, (m.mtime, m.mtime))
            os.replace(tmp, target)
            files.append(target)
    return files


__all__ = ["download_file", "file_digest", "safe_extract_tar", "verify_checksum"]
