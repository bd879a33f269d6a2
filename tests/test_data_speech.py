"""Speech source of ``d2v download``: the espeak-ng spoken-words corpus (small grid), flite (faked),
the LibriSpeech manifest builder and safe tar extraction. Offline; outputs under tmp_path."""

from __future__ import annotations

import csv
import io
import shutil
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from d2v.config import SpeechDataConfig
from d2v.data.manifest import COLUMNS, QUARANTINE_COLUMNS, SPLITS, manifest_path, quarantine_path, raw_dir
from d2v.data.sources import speech as sp

WORDS3 = ["yes", "no", "up"]


def small_cfg(**kw) -> SpeechDataConfig:
    """3 words x 4 voices (2 accents x 2 variants; f3 is a breathy, noise-driven variant) x 1 rate x 1 pitch."""
    base = dict(
        num_words=3, accents=["en-us", "en"], variants=["m1", "f3"], rates=[175], pitches=[50],
        val_voices=["en+m1"], test_voices=["en-us+f3"],
    )
    base.update(kw)
    return SpeechDataConfig(**base)


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def manifests(root: Path) -> dict[str, list[dict]]:
    out = {}
    for s in SPLITS:
        cols, rows = read_rows(manifest_path(root, "speech", s))
        assert cols == COLUMNS["speech"], s
        out[s] = rows
    return out


def audio_bytes(root: Path) -> dict[str, bytes]:
    base = raw_dir(root, "speech") / "audio"
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _no_flite(monkeypatch, tmp_path):
    """Tests do not depend on whether flite happens to be installed on this machine."""
    monkeypatch.setattr(sp, "FLITE", tmp_path / "no-such-flite")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small corpus shared by the read-only checks."""
    root = tmp_path_factory.mktemp("speech")
    mp = pytest.MonkeyPatch()
    mp.setattr(sp, "FLITE", root / "no-such-flite")
    try:
        summary = sp.download_speech(small_cfg(), root, seed=0, progress=False)
    finally:
        mp.undo()
    return root, summary


# ------------------------------------------------------------------------------------------ espeak


def test_small_corpus_manifests_and_audio(built):
    root, summary = built
    m = manifests(root)
    assert summary["counts"] == {"train": 6, "val": 3, "test": 3} == {s: len(m[s]) for s in SPLITS}
    assert summary["quarantined"] == 0 and summary["skipped"] is False
    assert summary["flite"] == "not installed (apt-get install flite)"
    assert summary["seconds"] == pytest.approx(sum(float(r["duration"]) for s in SPLITS for r in m[s]), abs=1e-2)
    assert summary["elapsed"] >= 0

    cols, q = read_rows(quarantine_path(root, "speech"))
    assert cols == QUARANTINE_COLUMNS and q == []  # always written, here empty

    speech_dir = raw_dir(root, "speech")
    for split, rows in m.items():
        for r in rows:
            assert r["split"] == split and r["synth"] == "espeak-ng" and r["label"] in WORDS3
            assert r["key"] in r["path"] and r["path"].startswith(f"audio/{split}/")
            data, sr = sf.read(speech_dir / r["path"], dtype="int16")
            assert sr == 16000 == int(r["sample_rate"]) and data.ndim == 1  # mono
            assert abs(len(data) / sr - float(r["duration"])) <= 1e-3
            assert float(r["duration"]) >= sp.MIN_DURATION
            assert np.abs(data.astype(np.int32)).max() > 1000  # speech, not silence
            info = sf.info(speech_dir / r["path"])
            assert info.format == "FLAC" and info.subtype == "PCM_16"
    # every word in every voice, each once
    assert sorted((r["voice"], r["label"]) for s in SPLITS for r in m[s]) == sorted(
        (f"{a}+{v}", w) for a in ["en-us", "en"] for v in ["m1", "f3"] for w in WORDS3)


def test_held_out_voices_and_keys(built):
    root, _ = built
    m = manifests(root)
    voices = {s: {r["voice"] for r in m[s]} for s in SPLITS}
    assert voices["val"] == {"en+m1"} and voices["test"] == {"en-us+f3"}
    assert voices["train"] == {"en-us+m1", "en+f3"}
    keys = [r["key"] for s in SPLITS for r in m[s]]
    assert len(keys) == len(set(keys))  # no key in two splits (or twice in one)
    assert all(k.startswith("espeak-") and "/" not in k and " " not in k and "+" not in k for k in keys)
    assert "espeak-yes-en-us-f3-r175-p50" in keys


def test_deterministic_and_rerun_skip(built, tmp_path):
    root, _ = built
    again = sp.download_speech(small_cfg(), tmp_path, seed=0, progress=False)
    assert again["skipped"] is False
    for s in SPLITS:  # identical manifests, byte for byte
        assert manifest_path(tmp_path, "speech", s).read_bytes() == manifest_path(root, "speech", s).read_bytes()
    assert audio_bytes(tmp_path) == audio_bytes(root)  # identical audio (f3's breath noise is seeded)

    f = raw_dir(tmp_path, "speech") / "audio" / "test" / "espeak-yes-en-us-f3-r175-p50.flac"
    mtime = f.stat().st_mtime_ns
    skipped = sp.download_speech(small_cfg(), tmp_path, seed=0, progress=False)
    assert skipped["skipped"] is True and skipped["counts"] == again["counts"]
    assert skipped["seconds"] == pytest.approx(again["seconds"], abs=1e-3)
    assert f.stat().st_mtime_ns == mtime  # nothing rewritten
    assert (raw_dir(tmp_path, "speech") / ".config.json").is_file()
    f.unlink()  # a missing audio file is noticed: rebuilt, identically
    assert sp.download_speech(small_cfg(), tmp_path, seed=0, progress=False)["skipped"] is False
    assert audio_bytes(tmp_path) == audio_bytes(root)

    # a different seed rebuilds (and changes the noise of the breathy voice only)
    other = sp.download_speech(small_cfg(), tmp_path, seed=1, progress=False)
    assert other["skipped"] is False
    a, b = audio_bytes(root), audio_bytes(tmp_path)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a if "-m1-" in k)
    assert any(a[k] != b[k] for k in a if "-f3-" in k)

    # a different config rebuilds, and files of the old grid do not linger
    smaller = sp.download_speech(small_cfg(num_words=2), tmp_path, seed=1, progress=False)
    assert smaller["skipped"] is False and smaller["counts"] == {"train": 4, "val": 2, "test": 2}
    names = audio_bytes(tmp_path).keys()
    assert len(names) == 8 and not any("-up-" in n for n in names)


@pytest.mark.parametrize("field,voice", [("val_voices", "en-us+m7"), ("test_voices", "en-gb-scotland+m1")])
def test_held_out_voice_not_in_grid(tmp_path, field, voice):
    with pytest.raises(ValueError, match=voice.replace("+", r"\+")):
        sp.download_speech(small_cfg(**{field: [voice]}), tmp_path, seed=0, progress=False)
    assert not raw_dir(tmp_path, "speech").exists()  # failed before writing anything


@pytest.mark.parametrize("kw,name", [
    (dict(accents=["en-us", "xx-nolang"], val_voices=[], test_voices=[]), "xx-nolang+m1"),
    (dict(variants=["m1", "nosuchvariant"], val_voices=[], test_voices=[]), "nosuchvariant"),
    (dict(rates=[5]), "rate 5"),
    (dict(num_words=99), "num_words"),
    (dict(val_voices=["en+m1"], test_voices=["en+m1"]), "en+m1"),
    (dict(dataset="timit"), "timit"),
])
def test_bad_settings_raise_clear_errors(tmp_path, kw, name):
    with pytest.raises(ValueError, match=name.replace("+", r"\+")):
        sp.download_speech(small_cfg(**kw), tmp_path, seed=0, progress=False)
    assert not manifest_path(tmp_path, "speech", "train").exists()


def test_failed_utterances_are_quarantined(tmp_path, monkeypatch):
    real = sp.espeak_synthesize

    def synth(voice, items):
        rate, out = real(voice, items)
        fake = {"no": (0, np.zeros(0, np.int16)),  # synthesis returned nothing
                "up": (0, np.full(1000, 3000, np.int16))}  # 45 ms: too short
        return rate, [fake.get(it[0], o) for it, o in zip(items, out)]

    monkeypatch.setattr(sp, "espeak_synthesize", synth)
    out = sp.download_speech(small_cfg(), tmp_path, seed=0, progress=False)
    assert out["counts"] == {"train": 2, "val": 1, "test": 1} and out["quarantined"] == 8
    _, q = read_rows(quarantine_path(tmp_path, "speech"))
    reasons = {r["key"]: r["reason"] for r in q}
    assert "no audio" in reasons["espeak-no-en-us-m1-r175-p50"]
    assert "too short" in reasons["espeak-up-en-f3-r175-p50"] and "en+f3" in reasons["espeak-up-en-f3-r175-p50"]
    m = manifests(tmp_path)
    assert {r["label"] for s in SPLITS for r in m[s]} == {"yes"}
    assert not any((raw_dir(tmp_path, "speech") / r["path"]).exists() for r in q)


def test_trim_silence():
    sr = 16000
    x = np.zeros(sr, np.int16)
    x[4000:8000] = (3000 * np.sin(np.arange(4000) / 5)).astype(np.int16)
    y = sp.trim_silence(x, sr)
    pad = int(sp.TRIM_PAD_S * sr)
    assert 4000 <= len(y) <= 4000 + 2 * pad + 2 * int(sp.TRIM_FRAME_S * sr)
    assert sp.trim_silence(np.zeros(100, np.int16), sr).size == 0


# ------------------------------------------------------------------------------------------ flite

FAKE_FLITE = """#!{python}
# stands in for /usr/bin/flite: -voice V -t TEXT -o OUT.wav; voice 'awb' fails
import sys
import numpy as np, soundfile as sf
a = sys.argv[1:]
voice, text, out = a[a.index("-voice") + 1], a[a.index("-t") + 1], a[a.index("-o") + 1]
if voice == "awb":
    sys.stderr.write("flite: voice awb exploded\\n"); sys.exit(3)
sr = 22050  # not 16 kHz, so the resampling is exercised
t = np.arange(int(0.3 * sr)) / sr
tone = 0.3 * np.sin(2 * np.pi * (200 + 50 * len(text)) * t)
sf.write(out, np.concatenate([np.zeros(sr // 5), tone, np.zeros(sr // 5)]), sr, subtype="PCM_16")
"""


def test_flite_voices_go_to_test(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "flite"
    fake.parent.mkdir()
    fake.write_text(FAKE_FLITE.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setattr(sp, "FLITE", fake)
    root = tmp_path / "data"
    out = sp.download_speech(small_cfg(), root, seed=0, progress=False)
    assert "slt" in out["flite"] and "not installed" not in out["flite"]
    assert out["counts"] == {"train": 6, "val": 3, "test": 3 + 2 * 3} and out["quarantined"] == 3
    m = manifests(root)
    fl = [r for r in m["test"] if r["synth"] == "flite"]
    assert {r["voice"] for r in fl} == {"flite-slt", "flite-rms"} and {r["label"] for r in fl} == set(WORDS3)
    assert all(r["synth"] == "espeak-ng" for s in ("train", "val") for r in m[s])
    for r in fl:
        data, sr = sf.read(raw_dir(root, "speech") / r["path"], dtype="int16")
        assert sr == 16000 and abs(len(data) / sr - float(r["duration"])) <= 1e-3
        # 0.2 s of silence either side trimmed down to the kept padding
        assert 0.3 <= len(data) / sr <= 0.3 + 2 * (sp.TRIM_PAD_S + sp.TRIM_FRAME_S) < 0.7
    _, q = read_rows(quarantine_path(root, "speech"))
    assert {r["key"] for r in q} == {f"flite-{w}-awb" for w in WORDS3}
    assert all("exploded" in r["reason"] for r in q)
    # flite turning up (or going away) later changes the corpus: no skip
    monkeypatch.setattr(sp, "FLITE", tmp_path / "gone")
    assert sp.download_speech(small_cfg(), root, seed=0, progress=False)["skipped"] is False


# ------------------------------------------------------------------------------------------ LibriSpeech


def write_flac(path: Path, seconds: float, sr: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(seconds * sr)
    sf.write(path, (2000 * np.sin(np.arange(n) / 7)).astype(np.int16), sr, format="FLAC", subtype="PCM_16")


def fake_librispeech(speech_dir: Path) -> None:
    """LibriSpeech-shaped folders: <subset>/<speaker>/<chapter>/<spk>-<ch>-<utt>.flac + <spk>-<ch>.trans.txt."""
    ls = speech_dir / "LibriSpeech"
    layout = {
        "train-clean-100": {("103", "1240"): ["CHAPTER ONE MISSUS RACHEL LYNDE", "IS SURPRISED"],
                            ("19", "198"): ["NORTHANGER ABBEY"]},
        "dev-clean": {("84", "121123"): ["GO DO YOU HEAR", "BUT IN LESS THAN FIVE MINUTES"]},
        "test-clean": {("1089", "134686"): ["HE HOPED THERE WOULD BE STEW FOR DINNER"]},
    }
    for subset, chapters in layout.items():
        for (spk, ch), texts in chapters.items():
            d = ls / subset / spk / ch
            lines = []
            for i, text in enumerate(texts):
                utt = f"{spk}-{ch}-{i:04d}"
                write_flac(d / f"{utt}.flac", 0.5 + 0.25 * i)
                lines.append(f"{utt} {text}")
            (d / f"{spk}-{ch}.trans.txt").write_text("\n".join(lines) + "\n")
    (ls / "LICENSE.TXT").write_text("CC BY 4.0\n")


def test_librispeech_manifest_builder(tmp_path):
    speech_dir = raw_dir(tmp_path, "speech")
    fake_librispeech(speech_dir)
    d = speech_dir / "LibriSpeech" / "train-clean-100" / "103" / "1240"
    with open(d / "103-1240.trans.txt", "a") as f:
        f.write("103-1240-0009 THIS ONE HAS NO AUDIO\n")
    write_flac(d / "103-1240-0007.flac", 1.0)  # no transcript line
    write_flac(d / "103-1240-0008.flac", 1.0, sr=8000)  # wrong rate
    with open(d / "103-1240.trans.txt", "a") as f:
        f.write("103-1240-0008 WRONG RATE\n")

    out = sp.build_librispeech_manifests(speech_dir, ["train-clean-100", "dev-clean", "test-clean"], 16000)
    assert out["counts"] == {"train": 3, "val": 2, "test": 1} and out["quarantined"] == 3
    m = manifests(tmp_path)
    r = next(r for r in m["train"] if r["key"] == "librispeech-103-1240-0001")
    assert r == {"key": "librispeech-103-1240-0001", "split": "train", "label": "IS SURPRISED",
                 "path": "LibriSpeech/train-clean-100/103/1240/103-1240-0001.flac", "duration": "0.750000",
                 "sample_rate": "16000", "voice": "103", "synth": "human"}
    assert {r["voice"] for r in m["val"]} == {"84"} and {r["voice"] for r in m["test"]} == {"1089"}
    assert m["test"][0]["label"] == "HE HOPED THERE WOULD BE STEW FOR DINNER"
    for s in SPLITS:
        for r in m[s]:
            assert r["synth"] == "human" and (speech_dir / r["path"]).is_file()
            assert sf.info(speech_dir / r["path"]).duration == pytest.approx(float(r["duration"]), abs=1e-3)
    _, q = read_rows(quarantine_path(tmp_path, "speech"))
    reasons = {r["key"]: r["reason"] for r in q}
    assert "missing" in reasons["librispeech-103-1240-0009"]
    assert "8000" in reasons["librispeech-103-1240-0008"]
    assert "no transcript" in reasons["librispeech-103-1240-0007"]
    with pytest.raises(ValueError, match="other-500"):
        sp.build_librispeech_manifests(speech_dir, ["other-500"])


def make_tar(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    """members: (name, data, symlink target); data None + target None = folder."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_safe_extract_refuses_escaping_members(tmp_path):
    dest = tmp_path / "out" / "speech"
    ok = make_tar(tmp_path / "ok.tar.gz", [("LibriSpeech", None, None), ("LibriSpeech/README.TXT", b"hi", None)])
    assert sp.safe_extract(ok, dest) == 2 and (dest / "LibriSpeech" / "README.TXT").read_bytes() == b"hi"

    evil = make_tar(tmp_path / "evil.tar.gz", [("LibriSpeech/a.txt", b"a", None), ("../evil", b"x", None)])
    with pytest.raises(ValueError, match=r"\.\./evil"):
        sp.safe_extract(evil, dest)
    assert not (tmp_path / "out" / "evil").exists()

    deep = make_tar(tmp_path / "deep.tar.gz", [("LibriSpeech/../../escape.txt", b"x", None)])
    with pytest.raises(ValueError, match="escape.txt"):
        sp.safe_extract(deep, dest)
    absolute = make_tar(tmp_path / "abs.tar.gz", [("/tmp/d2v-abs-evil", b"x", None)])
    with pytest.raises(ValueError, match="d2v-abs-evil"):
        sp.safe_extract(absolute, dest)
    link = make_tar(tmp_path / "link.tar.gz", [("LibriSpeech/passwd", None, "/etc/passwd")])
    with pytest.raises(ValueError, match="LibriSpeech/passwd"):
        sp.safe_extract(link, dest)
    assert not (dest / "LibriSpeech" / "passwd").exists()
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="junk.tar.gz"):
        sp.safe_extract(tmp_path / "junk.tar.gz", dest)


def test_librispeech_download_path_with_fake_download(tmp_path, monkeypatch):
    """The whole librispeech branch, with ``download_file`` replaced by a copy from a local tar."""
    src = tmp_path / "src"
    fake_librispeech(src)
    archive = tmp_path / "dev-clean.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "LibriSpeech" / "dev-clean", arcname="LibriSpeech/dev-clean")
        tar.add(src / "LibriSpeech" / "LICENSE.TXT", arcname="LibriSpeech/LICENSE.TXT")
    calls = []

    def download_file(url, dest, sha256=None, progress=True, **kw):
        calls.append((url, sha256))
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(archive, dest)
        return Path(dest)

    monkeypatch.setitem(sys.modules, "d2v.data.download", types.SimpleNamespace(download_file=download_file))
    cfg = SpeechDataConfig(dataset="librispeech", subsets=["dev-clean"])
    root = tmp_path / "data"
    out = sp.download_speech(cfg, root, seed=0, progress=False)
    assert calls == [("https://www.openslr.org/resources/12/dev-clean.tar.gz", sp.LIBRISPEECH_SHA256["dev-clean"])]
    assert out["counts"] == {"train": 0, "val": 2, "test": 0} and out["quarantined"] == 0
    m = manifests(root)
    assert [r["label"] for r in m["val"]] == ["GO DO YOU HEAR", "BUT IN LESS THAN FIVE MINUTES"]
    again = sp.download_speech(cfg, root, seed=0, progress=False)
    assert again["skipped"] is True and len(calls) == 1


def test_an_extracted_librispeech_folder_is_read_in_place(tmp_path, monkeypatch):
    """``data.speech.folder``: a LibriSpeech copy you already have is linked, never downloaded or
    copied; manifest paths keep ``LibriSpeech/<subset>/...`` (so evaluation can tell test-other
    from test-clean); a folder without a requested subset is a clear error naming both."""
    src = tmp_path / "src"
    fake_librispeech(src)
    folder = src / "LibriSpeech"

    def no_download(*a, **kw):
        raise AssertionError("downloaded although data.speech.folder was given")

    monkeypatch.setitem(sys.modules, "d2v.data.download", types.SimpleNamespace(download_file=no_download))
    cfg = SpeechDataConfig(dataset="librispeech", subsets=["train-clean-100", "dev-clean", "test-clean"],
                           folder=str(folder))
    root = tmp_path / "data"
    out = sp.download_speech(cfg, root, seed=0, progress=False)
    assert out["counts"] == {"train": 3, "val": 2, "test": 1}
    link = raw_dir(root, "speech") / "LibriSpeech"
    assert link.is_symlink() and link.resolve() == folder.resolve()
    assert not list(raw_dir(root, "speech").rglob("*.flac"))  # no copies (rglob does not enter the link)
    m = manifests(root)
    assert all(r["path"].startswith("LibriSpeech/test-clean/") for r in m["test"])
    assert not (folder / "dev-clean" / ".extracted").exists()  # nothing written into your folder
    bad = SpeechDataConfig(dataset="librispeech", subsets=["dev-clean", "test-other"], folder=str(folder))
    with pytest.raises(FileNotFoundError, match=r"LibriSpeech folder .*src/LibriSpeech has no test-other subfolder"):
        sp.download_speech(bad, tmp_path / "data2", seed=0, progress=False)
    with pytest.raises(FileNotFoundError, match=r"LibriSpeech folder not found: .*nowhere"):
        sp.download_speech(SpeechDataConfig(dataset="librispeech", subsets=["dev-clean"], folder=str(tmp_path / "nowhere")),
                           tmp_path / "data3", seed=0, progress=False)
