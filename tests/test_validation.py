"""validate_modality: good manifests pass; each kind of bad manifest fails with a named expectation."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import pytest

from d2v.data import validation as val
from d2v.data.manifest import SPLITS, manifest_path, quarantine_path, raw_dir, write_manifest, write_quarantine
from d2v.data.validation import summarize, validate_modality
from d2v.errors import ConfigError

N = {"train": 4, "val": 2, "test": 2}


def _wav(path: Path, seconds: float, sr: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(b"\x00\x00" * int(seconds * sr))


def good_rows(root: Path, modality: str) -> dict[str, list[dict]]:
    """Small valid manifests (rows per split as in N) with the files they reference created."""
    base = raw_dir(root, modality)
    base.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {}
    if modality == "image":
        (base / "images.idx").write_bytes(b"\x00" * 64)
        (base / "extra.png").write_bytes(b"\x89PNG")
    if modality == "text":
        (base / "rt.txt").write_text("x\n")
    for split in SPLITS:
        rows[split] = []
        for i in range(N[split]):
            key = f"{modality[:2]}-{split}-{i}"
            r = {"key": key, "split": split}
            if modality == "image":
                r |= {"label": str(i % 10), "path": "extra.png" if i == 0 else "images.idx",
                      "offset": -1 if i == 0 else i, "width": 28, "height": 28}
            elif modality == "speech":
                path = f"wav/{key}.wav"
                _wav(base / path, 0.25)
                r |= {"label": "yes", "path": path, "duration": 0.6, "sample_rate": 16000,
                      "voice": "en-us+m1", "synth": "rate=140,pitch=35"}
            else:
                text = f"line {i} of {split}, quite good"
                r |= {"label": ["", "fresh", "rotten"][i % 3], "path": "rt.txt", "text": text,
                      "n_chars": len(text), "source": "rt"}
            rows[split].append(r)
    return rows


def write_all(root: Path, modality: str, rows: dict[str, list[dict]]) -> None:
    for split in SPLITS:
        write_manifest(manifest_path(root, modality, split), modality, rows[split])


def run(tmp_path: Path, modality: str, mutate=None, limits=None) -> dict:
    root = tmp_path / "data"
    rows = good_rows(root, modality)
    if mutate:
        mutate(rows, root)
    write_all(root, modality, rows)
    return validate_modality(modality, root, tmp_path / "reports" / f"{modality}.json", limits=limits)


def failed(report: dict) -> dict[str, dict]:
    return {x["name"]: x for x in report["expectations"] if not x["success"]}


# ------------------------------------------------------------------------------------ good


@pytest.mark.parametrize("modality", ["image", "speech", "text"])
def test_good_manifests_pass_and_write_report(tmp_path, modality):
    rep = run(tmp_path, modality)
    assert rep["success"] is True, summarize(rep)
    assert rep["failed"] == []
    assert rep["rows"] == {**N, "total": sum(N.values())}
    assert rep["quarantined"] == {"count": 0, "reasons": {}}
    on_disk = json.loads((tmp_path / "reports" / f"{modality}.json").read_text())
    assert on_disk == rep
    names = {x["name"] for x in rep["expectations"]}
    assert {"key_unique", "key_in_one_split", "split_in_set", "path_exists", "rows_per_split",
            "path_not_empty"} <= names
    expected = {"image": {"width_range", "height_range", "offset_range"},
                "speech": {"duration_range", "sample_rate", "voice_not_empty"},
                "text": {"n_chars_range", "text_not_empty", "text_len_equals_n_chars", "label_in_set"}}[modality]
    assert expected <= names
    for x in rep["expectations"]:
        assert set(x) >= {"name", "column", "success", "unexpected_count"}
    assert "validation passed" in summarize(rep)


# ------------------------------------------------------------------------------------ bad


def test_duplicate_key_within_split(tmp_path):
    def m(rows, root):
        rows["train"][1]["key"] = rows["train"][0]["key"]

    rep = run(tmp_path, "speech", m)
    f = failed(rep)
    assert rep["success"] is False and set(f) == {"key_unique"}
    assert "sp-train-0" in f["key_unique"]["message"] and "within a split" in f["key_unique"]["message"]
    assert f["key_unique"]["unexpected_count"] == 2
    assert f["key_unique"]["unexpected_values"] == ["sp-train-0", "sp-train-0"]


def test_same_key_in_two_splits(tmp_path):
    def m(rows, root):
        rows["val"][0]["key"] = rows["train"][2]["key"]

    rep = run(tmp_path, "image", m)
    f = failed(rep)
    assert rep["success"] is False and {"key_unique", "key_in_one_split"} <= set(f)
    msg = f["key_in_one_split"]["message"]
    assert "'im-train-2' (train+val)" in msg and "more than one split" in msg
    assert "im-train-2" in f["key_unique"]["message"]
    assert "FAILED key_in_one_split" in summarize(rep)


@pytest.mark.parametrize("bad_path", ["", "   "])
def test_empty_path(tmp_path, bad_path):
    def m(rows, root):
        rows["val"][1]["path"] = bad_path

    rep = run(tmp_path, "text", m)
    f = failed(rep)
    assert rep["success"] is False and {"path_not_empty", "path_exists"} <= set(f)
    assert f["path_not_empty"]["unexpected_count"] == 1
    assert f["path_not_empty"]["examples"][0]["key"] == "te-val-1"


def test_null_path(tmp_path, monkeypatch):
    orig = val.read_manifest

    def read_with_null(path):
        df = orig(path)
        if path.stem == "test":
            df["path"] = df["path"].astype(object)
            df.loc[0, "path"] = None
        return df

    monkeypatch.setattr(val, "read_manifest", read_with_null)
    rep = run(tmp_path, "image")
    f = failed(rep)
    assert rep["success"] is False and {"path_not_null", "path_exists"} <= set(f)
    assert f["path_not_null"]["unexpected_count"] == 1


def test_missing_file(tmp_path):
    def m(rows, root):
        (raw_dir(root, "speech") / rows["test"][1]["path"]).unlink()

    rep = run(tmp_path, "speech", m)
    f = failed(rep)
    assert rep["success"] is False and set(f) == {"path_exists"}
    assert "wav/sp-test-1.wav" in f["path_exists"]["message"] and "1 referenced file" in f["path_exists"]["message"]
    assert f["path_exists"]["examples"][0]["path"] == "wav/sp-test-1.wav"


@pytest.mark.parametrize("dur", [45.0, 0.05])
def test_speech_duration_out_of_range(tmp_path, dur):
    def m(rows, root):
        rows["train"][3]["duration"] = dur

    rep = run(tmp_path, "speech", m)
    f = failed(rep)
    assert rep["success"] is False and set(f) == {"duration_range"}
    assert f["duration_range"]["unexpected_values"] == [dur]
    assert "duration in [0.1, 30.0] s" in f["duration_range"]["message"]


def test_speech_duration_limits_are_configurable(tmp_path):
    rep = run(tmp_path, "speech", limits={"speech_min_s": 0.5, "speech_max_s": 0.55})
    assert set(failed(rep)) == {"duration_range"}
    assert rep["limits"]["speech_max_s"] == 0.55


def test_speech_duration_not_a_number(tmp_path):
    def m(rows, root):
        rows["val"][0]["duration"] = "abc"

    rep = run(tmp_path, "speech", m)
    assert set(failed(rep)) == {"duration_numeric"}


def test_wrong_sample_rate(tmp_path):
    def m(rows, root):
        rows["val"][0]["sample_rate"] = 8000

    rep = run(tmp_path, "speech", m)
    f = failed(rep)
    assert rep["success"] is False and set(f) == {"sample_rate"}
    assert f["sample_rate"]["unexpected_values"] == [8000]


def test_empty_voice(tmp_path):
    def m(rows, root):
        rows["train"][0]["voice"] = ""

    assert set(failed(run(tmp_path, "speech", m))) == {"voice_not_empty"}


def test_image_size_out_of_range(tmp_path):
    def m(rows, root):
        rows["train"][1]["width"] = 4
        rows["test"][0]["height"] = 5000
        rows["val"][0]["offset"] = -2

    rep = run(tmp_path, "image", m)
    f = failed(rep)
    assert rep["success"] is False and set(f) == {"width_range", "height_range", "offset_range"}
    assert f["width_range"]["unexpected_values"] == [4]
    assert f["height_range"]["unexpected_values"] == [5000]
    assert f["height_range"]["examples"][0]["key"] == "im-test-0"


def test_empty_text(tmp_path):
    def m(rows, root):
        rows["train"][2]["text"] = ""
        rows["train"][2]["n_chars"] = 0

    rep = run(tmp_path, "text", m)
    f = failed(rep)
    assert rep["success"] is False and {"text_not_empty", "n_chars_range"} <= set(f)
    assert f["text_not_empty"]["examples"][0]["key"] == "te-train-2"


def test_text_length_differs_from_n_chars(tmp_path):
    def m(rows, root):
        rows["test"][1]["n_chars"] += 3

    rep = run(tmp_path, "text", m)
    assert set(failed(rep)) == {"text_len_equals_n_chars"}


def test_label_outside_set(tmp_path):
    def m(rows, root):
        rows["val"][1]["label"] = "meh"

    rep = run(tmp_path, "text", m)
    f = failed(rep)
    assert rep["success"] is False and set(f) == {"label_in_set"}
    assert f["label_in_set"]["unexpected_values"] == ["meh"]
    assert "'meh'" in f["label_in_set"]["message"]


def test_label_set_is_configurable_per_modality(tmp_path):
    rep = run(tmp_path, "image", limits={"labels": {"image": ["0", "1"]}})
    assert set(failed(rep)) == {"label_in_set"}  # labels 2, 3 occur
    rep = run(tmp_path / "b", "image", limits={"labels": [str(i) for i in range(10)]})
    assert rep["success"] is True and rep["limits"]["labels"] == [str(i) for i in range(10)]


def test_empty_split(tmp_path):
    def m(rows, root):
        rows["test"] = []

    rep = run(tmp_path, "speech", m)
    f = failed(rep)
    assert rep["success"] is False and set(f) == {"rows_per_split"}
    assert rep["rows"]["test"] == 0
    assert "split 'test' has 0 rows (min 1)" in f["rows_per_split"]["message"]
    assert "split 'test' has 0 rows" in summarize(rep)


def test_min_rows_per_split_from_limits(tmp_path):
    rep = run(tmp_path, "text", limits={"min_rows_per_split": {"train": 5}})
    assert "split 'train' has 4 rows (min 5)" in failed(rep)["rows_per_split"]["message"]


def test_all_digit_text_keeps_its_spelling(tmp_path):
    def m(rows, root):
        for split in SPLITS:
            for i, r in enumerate(rows[split]):
                r["text"] = f"00{i}"
                r["n_chars"] = len(r["text"])

    rep = run(tmp_path, "text", m)
    assert rep["success"] is True, summarize(rep)


def test_split_column_must_match_file(tmp_path):
    def m(rows, root):
        rows["train"][0]["split"] = "val"

    assert set(failed(run(tmp_path, "image", m))) == {"split_matches_file"}


def test_split_outside_set(tmp_path):
    def m(rows, root):
        rows["train"][0]["split"] = "dev"

    assert {"split_in_set", "split_matches_file"} == set(failed(run(tmp_path, "image", m)))


def test_quarantine_is_counted_not_failed(tmp_path):
    def m(rows, root):
        write_quarantine(quarantine_path(root, "speech"), [
            {"key": "q1", "path": "wav/q1.wav", "reason": "decode error"},
            {"key": "q2", "path": "wav/q2.wav", "reason": "too short"},
            {"key": "q3", "path": "wav/q3.wav", "reason": "decode error"},
        ])

    rep = run(tmp_path, "speech", m)
    assert rep["success"] is True
    assert rep["quarantined"] == {"count": 3, "reasons": {"decode error": 2, "too short": 1}}
    assert "quarantined: 3 (decode error: 2, too short: 1)" in summarize(rep)


def test_missing_column_is_a_failure_not_a_crash(tmp_path, monkeypatch):
    orig = val.read_manifest
    monkeypatch.setattr(val, "read_manifest", lambda p: orig(p).drop(columns=["sample_rate"]))
    rep = run(tmp_path, "speech")
    f = failed(rep)
    assert set(f) == {"columns"} and "sample_rate" in f["columns"]["message"]


def test_bad_limits_and_missing_manifest(tmp_path):
    with pytest.raises(ConfigError, match="speech_min"):
        run(tmp_path, "speech", limits={"speech_min": 1})
    with pytest.raises(FileNotFoundError, match="d2v download"):
        validate_modality("text", tmp_path / "nothing", tmp_path / "r.json")


def test_gx_internal_error_becomes_runtime_error(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyError("kaputt")

    import great_expectations as gx

    monkeypatch.setattr(gx, "get_context", boom)
    with pytest.raises(RuntimeError, match="Great Expectations failed while validating the text manifests.*kaputt"):
        run(tmp_path, "text")


def test_the_printed_summary_counts_quarantine_reasons_by_kind():
    """Reasons that differ only in their numbers ("(5 < 8)", "(6 < 8)") are one line item when
    printed; the report keeps every exact reason."""
    rep = {"modality": "text", "success": True, "rows": {"train": 3}, "expectations": [],
           "quarantined": {"count": 10, "reasons": {"shorter than min_chars (5 < 8)": 4,
                                                    "shorter than min_chars (6 < 8)": 3,
                                                    "longer than max_chars (2387 > 2000)": 2,
                                                    "not UTF-8": 1}}}
    line = next(x for x in summarize(rep).splitlines() if "quarantined" in x)
    assert line == "  quarantined: 10 (shorter than min_chars: 7, longer than max_chars: 2, not UTF-8: 1)"
