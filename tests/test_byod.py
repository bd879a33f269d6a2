"""Bring your own data: ``data.speech.dataset=audio_folder`` and ``data.text.dataset=text_files``.

Real files only: audio written with soundfile at several rates and channel counts (plus corrupt,
empty and too-short files), text and JSON-lines files with bad lines, ``labels.csv`` files. Each
corpus is built by the download function, then checked by the Great Expectations suite of
``d2v validate`` and written to shards (text: after the tokenizer), as the pipeline would.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from d2v.config import SpeechDataConfig, TextDataConfig
from d2v.data.downstream import load_split
from d2v.data.manifest import SPLITS, manifest_path, quarantine_path, raw_dir
from d2v.data.shards import write_shards
from d2v.data.sources import speech as sp
from d2v.data.sources import text as tx
from d2v.data.sources.byod import read_labels_csv, unique_keys
from d2v.data.validation import validate_modality
from d2v.errors import ConfigError, InputError

SR = 16000


def rows_of(root: Path, modality: str) -> dict[str, list[dict]]:
    out = {}
    for s in SPLITS:
        with open(manifest_path(root, modality, s), newline="", encoding="utf-8") as f:
            out[s] = list(csv.DictReader(f))
    return out


def quarantine_rows(root: Path, modality: str) -> list[dict]:
    with open(quarantine_path(root, modality), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime: the user's folder must come out untouched."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tone(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(round(seconds * sr))) / sr)


# ------------------------------------------------------------------------------------- audio_folder

# file -> (sample rate, channels, seconds, tone Hz, label); frames = round(seconds * sample rate)
AUDIO = {
    "spk1/a.wav": (22050, 2, 0.8, 440.0, "yes"),  # stereo: the tone on the left, silence on the right
    "spk1/b.flac": (44100, 1, 0.5, 440.0, "no"),
    "spk2/c.ogg": (8000, 1, 1.2, 300.0, "yes"),
    "spk2/d.mp3": (16000, 1, 0.6, 500.0, "no"),
    "spk2/e.wav": (48000, 3, 0.3, 1000.0, "yes"),  # three channels, the same tone in each
    "f.flac": (16000, 1, 0.4, 700.0, "no"),
}


def make_audio_folder(base: Path, labels: bool = True) -> Path:
    folder = base / "my_audio"
    for rel, (sr, ch, sec, hz, _) in AUDIO.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        x = tone(hz, sec, sr)
        data = np.stack([x, np.zeros_like(x)], axis=1) if rel == "spk1/a.wav" else np.repeat(x[:, None], ch, axis=1)
        sf.write(folder / rel, data, sr)
    (folder / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(64)))  # a header, then junk
    (folder / "empty.flac").write_bytes(b"")
    sf.write(folder / "spk1" / "click.wav", tone(440, 0.05, 16000), 16000)  # 50 ms: too short
    (folder / "notes.txt").write_text("recorded in the kitchen\n")  # not audio: ignored, counted
    if labels:
        lines = ["path,label"] + [f"{rel},{lab}" for rel, (*_, lab) in AUDIO.items()]
        (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def audio_cfg(folder: Path, **kw) -> SpeechDataConfig:
    return SpeechDataConfig(dataset="audio_folder", folder=str(folder), val_fraction=0.2, test_fraction=0.2, **kw)


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """One labelled folder, built once (seed 0) for the read-only checks."""
    base = tmp_path_factory.mktemp("audio")
    folder = make_audio_folder(base)
    before = snapshot(folder)
    summary = sp.download_speech(audio_cfg(folder), base / "data", seed=0, progress=False)
    return folder, base / "data", summary, before


def test_audio_folder_is_resampled_mono_with_durations_kept(audio):
    folder, root, s, before = audio
    m = rows_of(root, "speech")
    assert s["counts"] == {"train": 4, "val": 1, "test": 1} == {k: len(v) for k, v in m.items()}
    assert s["files"] == 9 and s["ignored_files"] == 1 and s["skipped"] is False
    assert s["input_sample_rates"] == {"8000": 1, "16000": 2, "22050": 1, "44100": 1, "48000": 1}
    assert s["input_channels"] == {"1": 4, "2": 1, "3": 1}
    by_src = {}
    for r in (r for split in SPLITS for r in m[split]):
        by_src[next(rel for rel in AUDIO if unique_keys("af", [rel])[0] == r["key"])] = r
    assert sorted(by_src) == sorted(AUDIO)
    for rel, (sr, _, sec, hz, _) in AUDIO.items():
        r = by_src[rel]
        data, got_sr = sf.read(raw_dir(root, "speech") / r["path"], dtype="float64")
        info = sf.info(raw_dir(root, "speech") / r["path"])
        assert got_sr == SR == int(r["sample_rate"]) and data.ndim == 1, rel  # 16 kHz mono
        assert info.format == "FLAC" and info.subtype == "PCM_16"
        # the length the resampling must give, computed independently of the code under test
        assert abs(len(data) - round(sec * sr) * SR / sr) <= 1, rel
        assert float(r["duration"]) == pytest.approx(len(data) / SR, abs=1e-6)
        # the tone is still there, at its frequency (so no rate mix-up), and at its amplitude
        spec = np.abs(np.fft.rfft(data * np.hanning(len(data))))
        peak_hz = np.argmax(spec) * SR / len(data)
        assert abs(peak_hz - hz) <= 2 * SR / len(data), (rel, peak_hz)
        mid = data[len(data) // 4: -len(data) // 4]
        expected = 0.25 if rel == "spk1/a.wav" else 0.5  # stereo (tone, silence) mixed down = half
        lossy = rel.endswith((".mp3", ".ogg"))
        assert np.abs(mid).max() == pytest.approx(expected, rel=0.1 if lossy else 0.01), rel
        assert r["voice"] == (str(Path(rel).parent)) and r["synth"] == "audio_folder"
    assert snapshot(folder) == before  # read in place: nothing written, moved or touched


def test_audio_folder_labels_quarantine_and_report(audio):
    folder, root, s, _ = audio
    m = rows_of(root, "speech")
    labels = {r["key"]: r["label"] for split in SPLITS for r in m[split]}
    assert labels == {unique_keys("af", [rel])[0]: lab for rel, (*_, lab) in AUDIO.items()}
    assert s["labelled"] is True and s["labels_csv"] is True
    q = {r["path"]: r["reason"] for r in quarantine_rows(root, "speech")}
    assert set(q) == {"broken.wav", "empty.flac", "spk1/click.wav"}
    assert q["broken.wav"].startswith("unreadable audio") and "broken.wav" in q["broken.wav"]
    assert q["empty.flac"] == "empty file (0 bytes)"
    assert q["spk1/click.wav"].startswith("too short (0.050 s")
    assert s["quarantined"] == 3 and any(e.startswith("broken.wav: unreadable audio") for e in s["quarantine_examples"])
    assert "notes.txt" in s["notes"][-1]  # the ignored file is named, not silently skipped
    json.dumps(s)  # the report is JSON


def test_audio_folder_splits_are_seeded_and_reruns_skip(audio, tmp_path):
    folder, root, s, _ = audio
    split_of = lambda r: {x["key"]: k for k, v in rows_of(r, "speech").items() for x in v}  # noqa: E731
    again = sp.download_speech(audio_cfg(folder), tmp_path / "same", seed=0, progress=False)
    assert again["counts"] == s["counts"]
    for split in SPLITS:  # the same seed: byte-identical manifests
        assert manifest_path(tmp_path / "same", "speech", split).read_bytes() == manifest_path(root, "speech", split).read_bytes()
    others = []
    for seed in (1, 2, 3):
        sp.download_speech(audio_cfg(folder), tmp_path / f"seed{seed}", seed=seed, progress=False)
        others.append(split_of(tmp_path / f"seed{seed}"))
    assert all(o.keys() == split_of(root).keys() for o in others)
    assert any(o != split_of(root) for o in others)  # another seed, another split

    # a re-run with the same folder does no work; a changed labels.csv rebuilds
    skipped = sp.download_speech(audio_cfg(folder), tmp_path / "same", seed=0, progress=False)
    assert skipped["skipped"] is True and skipped["counts"] == s["counts"] and skipped["labelled"] is True
    copy = shutil.copytree(folder, tmp_path / "copy")
    (copy / "labels.csv").write_text("path,label\nf.flac,maybe\n")
    out = sp.download_speech(audio_cfg(copy), tmp_path / "same", seed=0, progress=False)
    assert out["skipped"] is False and "5 of 6 clips are not labelled" in out["notes"][0]


def test_audio_folder_passes_validation_and_is_sharded(audio):
    _, root, _, _ = audio
    report = validate_modality("speech", root, root / "validation.json", {"sample_rate": SR})
    assert report["success"] is True, report["failed"]
    assert report["rows"]["total"] == 6 and report["quarantined"]["count"] == 3
    sh = write_shards("speech", root, seed=0, maxcount=4, min_shards=1, sample_rate=SR, progress=False)
    assert sh["labels"] == ["no", "yes"] and sum(v["samples"] for v in sh["splits"].values()) == 6
    # and the speech task reads them back: 16 kHz clips with their labels (as the fine-tuning does)
    train = load_split(root, "speech", "train", sample_rate=SR, audio_seconds=1.0)
    labels = {r["key"]: r["label"] for r in rows_of(root, "speech")["train"]}
    assert sorted(train.keys) == sorted(labels) and train.source.shape == (4, SR)
    assert [sh["labels"][c] for c in train.label.tolist()] == [labels[k] for k in train.keys]


def test_unlabelled_audio_folder_is_for_pretraining(tmp_path):
    folder = make_audio_folder(tmp_path, labels=False)
    s = sp.download_speech(audio_cfg(folder), tmp_path / "d", seed=0, progress=False)
    assert s["labelled"] is False and "pretraining" in s["notes"][0] and s["labels_csv"] is False
    assert sum(s["counts"].values()) == 6
    assert all(r["label"] == "" for rows in rows_of(tmp_path / "d", "speech").values() for r in rows)
    report = validate_modality("speech", tmp_path / "d", tmp_path / "v.json", {"sample_rate": SR})
    assert report["success"] is True, report["failed"]
    sh = write_shards("speech", tmp_path / "d", seed=0, maxcount=8, min_shards=1, progress=False)
    assert sh["labels"] == []  # every sample's cls is -1: pretraining only


def test_audio_folder_bad_labels_and_folders_name_the_path(tmp_path):
    folder = tmp_path / "aud"
    folder.mkdir()
    sf.write(folder / "one.wav", tone(440, 0.5, 16000), 16000)
    cfg = audio_cfg(folder)
    labels = folder / "labels.csv"
    labels.write_text("file,class\none.wav,yes\n")
    with pytest.raises(InputError, match=r"aud/labels\.csv:1: the header must name the columns path,label"):
        sp.download_speech(cfg, tmp_path / "d", seed=0, progress=False)
    labels.write_text("path,label\none.wav,yes\nmissing.wav,no\n")
    with pytest.raises(InputError, match=r"labels\.csv:3: 'missing\.wav' does not exist in .*aud"):
        sp.download_speech(cfg, tmp_path / "d", seed=0, progress=False)
    labels.write_text("path,label\n../one.wav,yes\n")
    with pytest.raises(InputError, match=r"labels\.csv:2: path '\.\./one\.wav' must be relative"):
        sp.download_speech(cfg, tmp_path / "d", seed=0, progress=False)
    labels.write_text("path,label\none.wav,yes\n./one.wav,no\n")
    with pytest.raises(InputError, match=r"labels\.csv:3: 'one\.wav' is listed twice \(first on line 2\)"):
        sp.download_speech(cfg, tmp_path / "d", seed=0, progress=False)

    empty = tmp_path / "empty_folder"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("no audio")
    with pytest.raises(InputError, match=r"audio folder .*empty_folder: no \.wav/\.flac/\.ogg/\.mp3 files found"):
        sp.download_speech(audio_cfg(empty), tmp_path / "d", seed=0, progress=False)
    with pytest.raises(InputError, match=r"audio folder not found: .*no_such_folder"):
        sp.download_speech(audio_cfg(tmp_path / "no_such_folder"), tmp_path / "d", seed=0, progress=False)
    with pytest.raises(InputError, match="contains the output folder"):  # it would read its own output
        sp.download_speech(audio_cfg(tmp_path), tmp_path / "d", seed=0, progress=False)
    with pytest.raises(ConfigError, match="data.speech.folder: must be set"):
        SpeechDataConfig(dataset="audio_folder").validate()
    with pytest.raises(ConfigError, match="data.speech.val_fraction"):
        SpeechDataConfig(dataset="audio_folder", folder="x", val_fraction=0.5, test_fraction=0.5).validate()


# --------------------------------------------------------------------------------------- text_files

POS = [f"a warm and funny film number {i}" for i in range(30)]
NEG = [f"a dull and tiresome film number {i}" for i in range(30)]


def make_text_folder(base: Path, labels: bool = True) -> Path:
    folder = base / "my_text"
    (folder / "reviews").mkdir(parents=True)
    # one file per class, labelled by labels.csv; a blank line, a CRLF line and a repeated line
    (folder / "reviews" / "pos.txt").write_text("\n".join(POS[:10]) + "\n\n" + POS[10] + "\r\n" + POS[0] + "\n")
    (folder / "reviews" / "neg.txt").write_bytes(("\n".join(NEG[:11]) + "\n").encode() + b"caf\xe9 latin-1 line\n"
                                                 + b"short\n")
    records = [{"text": t, "label": "pos"} for t in POS[11:30]] + [{"text": t, "label": "neg"} for t in NEG[11:30]]
    lines = [json.dumps(r) for r in records]
    lines[3:3] = ['{"text": "a broken record', '{"label": "pos"}', '["not", "an", "object"]']  # lines 4, 5, 6
    (folder / "more.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "notes.md").write_text("not text data")
    if labels:
        (folder / "labels.csv").write_text("path,label\nreviews/pos.txt,pos\nreviews/neg.txt,neg\n")
    else:
        (folder / "more.jsonl").write_text("\n".join(json.dumps({"text": r["text"]}) for r in records) + "\n")
    return folder


def text_cfg(folder: Path, **kw) -> TextDataConfig:
    return TextDataConfig(dataset="text_files", folder=str(folder), val_fraction=0.1, test_fraction=0.1, **kw)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    base = tmp_path_factory.mktemp("text")
    folder = make_text_folder(base)
    before = snapshot(folder)
    summary = tx.download_text(text_cfg(folder), base / "data", seed=0, progress=False)
    return folder, base / "data", summary, before


def test_text_files_records_labels_and_quarantine(text):
    folder, root, s, before = text
    m = rows_of(root, "text")
    rows = [r for split in SPLITS for r in m[split]]
    assert s["counts"] == {"train": 48, "val": 6, "test": 6} and len(rows) == 60
    assert s["duplicates_removed"] == {"text_files": 1}  # POS[0] twice in pos.txt
    assert sorted(r["text"] for r in rows) == sorted(POS + NEG)  # CRLF and blank lines handled
    assert {r["text"]: r["label"] for r in rows} == {**{t: "pos" for t in POS}, **{t: "neg" for t in NEG}}
    assert s["labelled"] is True and s["labels"] == ["neg", "pos"]
    p = s["parse"]["text_files"]
    assert (p["txt_files"], p["jsonl_files"], p["blank_lines"], p["ignored_files"]) == (2, 1, 1, 1)
    assert "notes.md" in s["notes"][-1]
    q = {(r["path"], r["reason"]) for r in quarantine_rows(root, "text")}
    assert q == {
        ("text_files/reviews/neg.txt", "not valid UTF-8 (line 12)"),
        ("text_files/reviews/neg.txt", "shorter than min_chars (5 < 8) (line 13)"),
        ("text_files/more.jsonl", "bad JSON: Unterminated string starting at (line 4, column 10)"),
        ("text_files/more.jsonl", "no 'text' string field (line 5)"),
        ("text_files/more.jsonl", "not a JSON object (line 6)"),
    }
    assert s["quarantined"] == 5 and s["quarantine_examples"][0].startswith("text_files/")
    # every manifest path names a copy of the file it came from; the user's folder is untouched
    for r in rows:
        assert (raw_dir(root, "text") / r["path"]).read_bytes() == (folder / r["path"].removeprefix("text_files/")).read_bytes()
    assert snapshot(folder) == before


def test_text_files_splits_are_seeded(text, tmp_path):
    folder, root, _, _ = text
    split_of = lambda r: {x["key"]: k for k, v in rows_of(r, "text").items() for x in v}  # noqa: E731
    tx.download_text(text_cfg(folder), tmp_path / "a", seed=0, progress=False)
    tx.download_text(text_cfg(folder), tmp_path / "b", seed=1, progress=False)
    assert split_of(tmp_path / "a") == split_of(root)
    assert split_of(tmp_path / "b") != split_of(root) and split_of(tmp_path / "b").keys() == split_of(root).keys()


def test_text_files_pass_validation_tokenizer_and_shards(text, tmp_path):
    from d2v.cli.validate import main as validate_main
    from d2v.data.tokenizer import train_tokenizer

    folder, root, _, _ = text
    # `d2v validate` as the DVC stage runs it: labels other than kjv_rt's fresh/rotten are accepted
    args = ["--modality", "text", "--report", str(tmp_path / "text.json"), f"data.root={root}",
            "data.text.dataset=text_files", f"data.text.folder={folder}"]
    assert validate_main(args) == 0
    report = json.loads((tmp_path / "text.json").read_text())
    assert report["success"] is True and report["quarantined"]["count"] == 5 and report["rows"]["total"] == 60
    train_tokenizer(root, tmp_path / "tok", vocab_size=60, seed=1)
    sh = write_shards("text", root, seed=0, maxcount=16, min_shards=1, tokenizer_path=tmp_path / "tok/spm.model",
                      progress=False)
    assert sh["labels"] == ["neg", "pos"] and sum(v["samples"] for v in sh["splits"].values()) == 60
    test = load_split(root, "text", "test", text_length=16)  # the text task reads the labelled lines back
    labels = {r["key"]: r["label"] for r in rows_of(root, "text")["test"]}
    assert sorted(test.keys) == sorted(labels) and [sh["labels"][c] for c in test.label.tolist()] == [labels[k] for k in test.keys]


def test_unlabelled_text_files_are_for_pretraining_and_the_task_says_so(tmp_path):
    from d2v.data.tokenizer import train_tokenizer

    folder = make_text_folder(tmp_path, labels=False)
    s = tx.download_text(text_cfg(folder), tmp_path / "d", seed=0, progress=False)
    assert s["labelled"] is False and "pretraining" in s["notes"][0]
    assert all(r["label"] == "" for rows in rows_of(tmp_path / "d", "text").values() for r in rows)
    report = validate_modality("text", tmp_path / "d", tmp_path / "v.json", {"labels": {"text": None}})
    assert report["success"] is True, report["failed"]
    train_tokenizer(tmp_path / "d", tmp_path / "tok", vocab_size=60, seed=1)
    sh = write_shards("text", tmp_path / "d", seed=0, maxcount=64, min_shards=1,
                      tokenizer_path=tmp_path / "tok/spm.model", progress=False)
    assert sh["labels"] == []
    with pytest.raises(InputError, match="split 'train' has no labelled samples"):  # the text task's clear error
        load_split(tmp_path / "d", "text", "train")


def test_text_files_bad_labels_and_folders_name_the_path(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_text("one line of text here\n")
    labels = folder / "labels.csv"
    labels.write_text("path\na.txt\n")
    with pytest.raises(InputError, match=r"txt/labels\.csv:1: the header must name the columns path,label"):
        tx.download_text(text_cfg(folder), tmp_path / "d", seed=0, progress=False)
    labels.write_text("path,label\na.txt,x\nb.txt,y\n")
    with pytest.raises(InputError, match=r"labels\.csv:3: 'b\.txt' does not exist in .*txt"):
        tx.download_text(text_cfg(folder), tmp_path / "d", seed=0, progress=False)
    labels.write_text("path,label\nlabels.csv,x\n")
    with pytest.raises(InputError, match=r"labels\.csv:2: 'labels\.csv' is not a \.jsonl/\.txt file"):
        tx.download_text(text_cfg(folder), tmp_path / "d", seed=0, progress=False)
    labels.write_bytes(b"path,label\na.txt,caf\xe9\n")
    with pytest.raises(InputError, match=r"labels\.csv: not UTF-8"):
        read_labels_csv(folder, [".txt"])
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(InputError, match=r"text folder .*nothing_here: no \.txt or \.jsonl files found"):
        tx.download_text(text_cfg(empty), tmp_path / "d", seed=0, progress=False)
    with pytest.raises(InputError, match=r"text folder not found: .*gone"):
        tx.download_text(text_cfg(tmp_path / "gone"), tmp_path / "d", seed=0, progress=False)
    with pytest.raises(ConfigError, match="data.text.folder: must be set"):
        TextDataConfig(dataset="text_files").validate()


def test_unique_keys_are_unique_for_paths_that_differ_only_in_case():
    keys = unique_keys("af", ["A.wav", "a.wav", "b c.wav", "b_c.wav", "d.wav"])
    assert len(set(keys)) == 5 and keys[4] == "af-d_wav" and all("." not in k for k in keys)  # no dot: WebDataset
    assert keys[0].startswith("af-a_wav-") and keys == unique_keys("af", ["A.wav", "a.wav", "b c.wav", "b_c.wav", "d.wav"])
