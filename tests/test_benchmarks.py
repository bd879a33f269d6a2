"""The benchmarks run on a tiny budget and write well-formed JSON (their numbers are not tested)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from d2v.config import PROJECT_ROOT


def test_step_time_benchmark_writes_json(tmp_path):
    out = tmp_path / "st.json"
    r = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks/step_time.py"), "experiment=tiny", "data=sample",
         "train.batch_size=2", "--steps", "2", "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert {x["modality"] for x in rep["results"]} == {"image", "speech", "text"}
    for x in rep["results"]:
        assert x["median_step_s"] > 0 and x["samples_per_s"] > 0 and x["visible_per_clone"] < x["tokens_per_sample"]
    assert rep["machine"]["cpu"] and rep["date"] and "step_time.py" in rep["command"]
    assert "median s" in r.stdout  # the printed table


def test_time_to_accuracy_text_writes_json_and_plot(tmp_path):
    """``--modality text`` (data2vec2 vs bert) on tiny text shards built here, as the image smoke
    test in test_baselines.py builds its images: it never depends on the project's data/ folder."""
    pytest.importorskip("sentencepiece", reason="the text shards need the sentencepiece tokenizer")
    from test_shards import make_text_data

    from d2v.data.shards import write_shards
    from d2v.data.tokenizer import train_tokenizer

    root = tmp_path / "data"
    make_text_data(root)  # 2/3 of the lines labelled fresh/rotten, 1/3 unlabelled (cls -1)
    train_tokenizer(root, tmp_path / "tok", vocab_size=40, seed=1)
    write_shards("text", root, seed=0, maxcount=20, min_shards=1, tokenizer_path=tmp_path / "tok/spm.model",
                 progress=False)
    out, png = tmp_path / "tta_text.json", tmp_path / "tta_text.png"
    r = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks/time_to_accuracy.py"), "--modality", "text", "--threads", "1",
         "--root", str(root), "--budget", "0.5", "--probe-every", "0.5", "--batch", "2", "--probe-train", "16",
         "--probe-test", "8", "--out", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["modality"] == "text" and "train.modalities=[text]" in rep["overrides"]
    assert [x["objective"] for x in rep["results"]] == ["data2vec2", "bert"]
    # every training line is read, the unlabelled ones included (50 in make_text_data's train split)
    assert rep["pretrain_lines"] == 50 and rep["pretrain_rows"] > 0 and rep["text_rows"] == "packed"
    assert rep["probe_train"] == 16 and rep["probe_test"] == 8
    for x in rep["results"]:
        assert x["steps"] > 0 and x["steps_per_s"] > 0 and len(x["points"]) >= 2 and x["points"][0]["train_s"] == 0
        assert all(0 <= p["probe_acc"] <= 1 for p in x["points"]) and 0 <= x["best_acc"] <= 1
    assert {x["objective"]: x["masks_per_sample"] for x in rep["results"]}["bert"] == 1
    head = rep["headline_vs_bert"]
    assert head == rep["headline"] and head["baseline"] == "bert" and head["text"] and "ratio" in head
    assert png.stat().st_size > 1000 and "headline" in r.stdout


def test_compile_speedup_benchmark_writes_json(tmp_path):
    """Eager vs compiled on one modality, a few steps; the dynamo-only ``eager`` backend keeps it quick."""
    out = tmp_path / "cs.json"
    r = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks/compile_speedup.py"), "experiment=tiny", "data=sample",
         "--cases", "tiny,d128", "--modalities", "image", "--batch-size", "2", "--steps", "2", "--warmup", "1",
         "--backend", "eager", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert [(x["case"], x["modality"]) for x in rep["results"]] == [("tiny", "image"), ("d128", "image")]
    assert [x["embed_dim"] for x in rep["results"]] == [64, 128]
    for x in rep["results"]:
        assert x["compiled"]["compiled"] and x["compiled"]["fallback"] is None
        for mode in ("eager", "compiled"):
            assert 0 < x[mode]["median_step_s"] <= x[mode]["wall_s"] and x[mode]["first_step_s"] > 0
        assert x["speedup"] > 0 and x["compile_s"] >= 0 and x["wall_ratio"] > 0
    assert rep["machine"]["cpu"] and rep["date"] and "compile_speedup.py" in rep["command"] and rep["seed"] is not None
    assert "break-even" in r.stdout  # the printed table
