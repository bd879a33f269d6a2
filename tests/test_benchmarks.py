"""The benchmarks run on a tiny budget and write well-formed JSON (their numbers are not tested)."""

from __future__ import annotations

import json
import os
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
         "--root", str(root), "--budget", "0.5", "--probe-every", "2", "--batch", "2", "--probe-train", "16",
         "--probe-val", "10", "--out", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["modality"] == "text" and "train.modalities=[text]" in rep["overrides"]
    assert [x["objective"] for x in rep["results"]] == ["data2vec2", "bert"]
    assert rep["probe_train"] == 16 and rep["probe_val"] == 10 and rep["recipes"] == {}
    for x in rep["results"]:
        assert x["steps"] > 0 and x["steps_per_s"] > 0 and len(x["points"]) >= 2 and x["points"][0]["step"] == 0
        assert x["points"][-1]["step"] == x["steps"] and x["batch"] == 2
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


def test_gpu_benchmark_smoke_writes_json(tmp_path):
    """``benchmarks/gpu.py --smoke``: the tiny config on the CPU, the GPU run's JSON schema with the
    GPU-only fields null (its numbers are not tested)."""
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks/gpu.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["smoke"] is True and rep["status"] == "done" and rep["date"] and "gpu.py" in rep["command"]
    assert rep["formulas"]["flops_per_sample"] == (
        "flops_per_sample = FlopCounterMode total of one fwd+bwd step / batch_size")
    assert "45% MFU" in rep["goal"]["text"] and rep["peak_tflops_bf16"] is None
    assert [x["modality"] for x in rep["results"]] == ["image", "speech", "text"]
    for x in rep["results"]:
        assert x["flops_per_step"] > 0 and x["flops_per_sample"] == x["flops_per_step"] / x["batch"]
        assert x["flops_formula"] == rep["formulas"]["flops_per_sample"]
        assert 0 < x["visible_per_clone"] < x["tokens_per_sample"] and x["clones"] >= 1
        e = x["runs"]["eager"]
        assert e["status"] == "ok" and e["timed_steps"] >= 1
        for k in ("median_step_s", "samples_per_s", "copies_per_s", "wall_samples_per_s", "achieved_tflops"):
            assert e[k] > 0, k
        assert e["copies_per_s"] == pytest.approx(e["samples_per_s"] * x["clones"])
        assert e["mfu"] is None and e["peak_mem_gb"] is None  # GPU-only
        assert x["runs"]["compiled"]["status"].startswith("skipped")
        assert x["host_syncs"] is None
        lp = x["loss_bf16_vs_fp32"]
        assert lp["loss_fp32"] > 0 and lp["rel_diff"] >= 0
        sd = x["sdpa"]
        assert sd["ran"] and sd["available"] and all(row["math"] == "ok" for row in sd["available"])
    assert rep["ddp"]["status"].startswith("skipped")
    assert "median s" in r.stdout and "MFU" in r.stdout  # the printed table


def test_gpu_benchmark_without_cuda_says_so():
    """The plain command on a machine without CUDA: exit 2 and one clear line pointing at --smoke
    (CUDA is hidden from the child, so this runs on GPU machines too)."""
    r = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks/gpu.py"), "--out", "/dev/null"],
                       capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA device" in lines[0] and "--smoke" in lines[0]


def test_gpu_decoder_variants_compute_the_decoder():
    """Each variant that benchmarks/gpu_decoder.py times computes the model's decoder (forward and
    input gradient), so its timings compare the same function; without CUDA it exits 2 and says so."""
    import copy

    import torch

    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    from gpu_decoder import Im2colConv2d, UnfoldConv2d, forward

    from d2v.config import load_config
    from d2v.models.decoders import Decoder1d, Decoder2d

    mc = load_config(["experiment=image_base"]).model
    torch.manual_seed(0)
    dec = Decoder2d(mc.image.decoder, mc.embed_dim, 14)
    x = torch.randn(2, 196, mc.embed_dim, requires_grad=True)
    ref = dec(x)
    (gref,) = torch.autograd.grad(ref.square().sum(), x)
    for conv_cls, fmt in [(None, None), (None, "contiguous"), (None, torch.channels_last),
                          (UnfoldConv2d, "contiguous"), (Im2colConv2d, None)]:
        d = copy.deepcopy(dec)
        if conv_cls is not None:
            for blk in d.blocks:
                blk[0] = conv_cls(blk[0])
        out = forward(d, x, fmt)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (conv_cls, fmt)
        assert torch.allclose(g, gref, atol=1e-4, rtol=1e-3), (conv_cls, fmt)
    mc = load_config(["experiment=speech_base"]).model
    d1 = Decoder1d(mc.speech.decoder, mc.embed_dim).eval()
    x = torch.randn(2, 50, mc.embed_dim)
    assert torch.allclose(forward(d1, x, "contiguous"), d1(x), atol=1e-5)

    r = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks/gpu_decoder.py"), "--out", "/dev/null"],
                       capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "needs a CUDA device" in r.stderr


def test_downstream_memory_benchmark_writes_json(tmp_path):
    """Two tiny sizes of synthetic image shards, `d2v finetune` and `d2v evaluate` on each (2 steps):
    every size's peak RSS, the per-stage max/min ratios and the printed table (numbers untested)."""
    out = tmp_path / "mem.json"
    r = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks/downstream_memory.py"), "--base", "40", "--sizes", "1,2",
         "--steps", "2", "--val", "20", "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert [x["train_samples"] for x in rep["results"]] == [40, 80]
    for x in rep["results"]:
        assert x["test_samples"] == x["train_samples"] // 6 and x["shard_mib_total"] > 0
        assert x["evaluate"]["eval_samples"] == x["test_samples"]  # the whole test split was scored
        for stage in ("finetune", "evaluate", "control_load_split"):
            assert x[stage]["peak_rss_mib"] >= x[stage]["run_peak_rss_mib"] > 0 and x[stage]["seconds"] > 0
        assert x["finetune"]["samples_per_s"] > 0
    for stage in ("finetune", "evaluate", "control"):
        s = rep["summary"][stage]
        for x in (s, s["run"]):
            assert x["ratio"] >= 1 and x["ratio"] == pytest.approx(x["max_peak_rss_mib"] / x["min_peak_rss_mib"])
        assert stage == "control" or isinstance(s["flat"], bool)
    assert isinstance(rep["summary"]["flat"], bool) and rep["import_floor_rss_mib"] > 0
    assert rep["machine"]["cpu"] and rep["date"] and "downstream_memory.py" in rep["command"] and rep["seed"] == 0
    assert "finetune peak RSS MiB" in r.stdout and "| 80 |" in r.stdout  # the printed table


def test_finetune_loader_benchmark_writes_json(tmp_path):
    """Two small batches of the image recipe on synthetic PNGs and JPEGs: both variants per format,
    the ratio to the stated GPU estimate and its formula, and the printed table (speeds untested)."""
    out = tmp_path / "fl.json"
    r = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks/finetune_loader.py"), "--batches", "1", "--batch-size", "4",
         "--src", "64", "--size", "32", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert [(x["stored"], x["variant"].split()[0]) for x in rep["results"]] == [
        ("PNG", "plain"), ("PNG", "MAE"), ("JPEG", "plain"), ("JPEG", "MAE")]
    assert all(x["stored_kib_per_image"] > 0 for x in rep["results"])
    gpu = rep["gpu_estimate"]["images_per_s"]
    assert gpu == pytest.approx(989e12 * 0.45 / (3 * 2 * 86e6 * 197)) and "989e12" in rep["gpu_estimate"]["formula"]
    for x in rep["results"]:
        assert x["images_per_s_per_worker"] > 0
        assert x["ratio_to_gpu_estimate"] == pytest.approx(x["images_per_s_per_worker"] / gpu)
    assert rep["machine"]["cpu"] and rep["date"] and "finetune_loader.py" in rep["command"]
    assert "images/s per worker" in r.stdout
