"""Baseline objectives (data2vec 1.0-style, MAE) and the efficiency benchmarks' smoke runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import build_cfg, make_batch

from d2v.config import PROJECT_ROOT
from d2v.errors import InputError
from d2v.models import Data2Vec2
from d2v.models.baselines import MAE, Data2Vec1Style, backbone_of, objective, patchify


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a loaded 2-core machine, two threads can be many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    return calls


@pytest.mark.parametrize("modality", ["image", "speech", "text"])
def test_data2vec1_full_length_and_one_teacher_pass_per_copy(modality):
    M, B = 3, 2
    cfg = build_cfg(modality, clone_batch=M)
    model = Data2Vec1Style(cfg).train()
    bb = model.backbone
    student_calls, teacher_calls = _count_calls(bb.blocks[0]), _count_calls(bb.teacher.blocks[0])
    src = make_batch(modality, B)
    enc = bb.encoder(modality)
    T = enc.num_tokens(tuple(src.shape))
    out = model(src, modality)
    e = enc.num_extra_tokens
    assert student_calls == [(B * M, T + e, cfg.embed_dim)]  # every token of every copy: no dropping
    assert len(teacher_calls) == M and model.teacher_passes == M  # the teacher runs once per copy
    n_masked = int(out.mask[0].sum())
    assert out.pred.shape == out.target.shape == (B * M * n_masked, cfg.embed_dim)
    out.loss.backward()
    assert model.mask_emb.grad is not None and model.heads[modality].weight.grad is not None
    assert all(p.grad is None for p in bb.teacher.parameters())

    # data2vec 2.0 on the same config: one teacher pass for all M copies, visible tokens only
    d2 = Data2Vec2(cfg).train()
    s2, t2 = _count_calls(d2.blocks[0]), _count_calls(d2.teacher.blocks[0])
    d2(src, modality)
    assert len(t2) == 1 and s2[0][1] == T - n_masked + e


def test_mae_shapes_and_loss_only_on_masked_patches():
    cfg = build_cfg("image")
    model = MAE(cfg, decoder_dim=32, decoder_depth=2).train()
    src = make_batch("image", 3)
    out = model(src)
    assert out.pred.shape == (3, 49, 16) and out.mask.shape == (3, 49)
    assert int(out.mask[0].sum()) == 49 - int(49 * 0.25)
    out.pred.retain_grad()
    out.loss.backward()
    g = out.pred.grad.abs().sum(-1)
    assert bool((g[~out.mask] == 0).all()) and bool((g[out.mask] > 0).all())
    # the target is per-patch normalised pixels of the input
    t = patchify(src, 4)
    assert torch.allclose(out.target, (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5)
    assert torch.equal(patchify(torch.arange(16.0).reshape(1, 1, 4, 4), 2)[0, 0], torch.tensor([0.0, 1, 4, 5]))


@pytest.mark.parametrize("name", ["data2vec1", "mae"])
def test_loss_falls_on_a_fixed_batch(name):
    cfg = build_cfg("image")
    model = objective(name, cfg).train()
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=2e-3)
    src = make_batch("image", 4)
    bb = backbone_of(model)
    mask = (model.make_mask(4, 49) if name == "mae" else bb.make_mask("image", 4, 49))
    losses = []
    for step in range(15):
        out = model(src, "image", mask=mask)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.95 * losses[0] and losses[-1] == min(losses[-3:]), losses


def test_objective_names():
    cfg = build_cfg("image")
    assert isinstance(objective("data2vec2", cfg), Data2Vec2)
    with pytest.raises(InputError, match="unknown objective"):
        objective("bert", cfg)
    with pytest.raises(InputError, match="image"):
        MAE(build_cfg("text"))


def _run(args, timeout=300):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_step_throughput_benchmark_writes_json(tmp_path):
    out = tmp_path / "tp.json"
    r = _run([str(PROJECT_ROOT / "benchmarks/step_throughput.py"), "experiment=tiny", "data=sample",
              "--batch", "2", "--clones", "1", "2", "--modalities", "image", "text",
              "--steps", "1", "--warmup", "1", "--out", str(out)])
    rep = json.loads(out.read_text())
    rows = rep["results"]
    assert {(x["modality"], x["objective"], x["clones"]) for x in rows} == {
        (m, o, c) for m in ("image", "text") for o in ("data2vec2", "data2vec1") for c in (1, 2)}
    for x in rows:
        assert x["copies_per_s"] == pytest.approx(x["samples_per_s"] * x["clones"]) and x["peak_rss_mb"] > 0
        if x["objective"] == "data2vec2":
            assert x["speedup_same_m"] > 0 and x["speedup_vs_v1_m1"] > 0
    assert rep["machine"]["cpu"] and rep["date"] and "step_throughput.py" in rep["command"]
    assert "copies/s" in r.stdout


def test_time_to_accuracy_benchmark_writes_json_and_plot(tmp_path):
    from test_shards import make_image_data

    from d2v.data.shards import write_shards

    root = tmp_path / "data"
    make_image_data(root)
    write_shards("image", root, seed=0, maxcount=3, min_shards=2, progress=False)
    out, png = tmp_path / "tta.json", tmp_path / "tta.png"
    r = _run([str(PROJECT_ROOT / "benchmarks/time_to_accuracy.py"), "--root", str(root), "--budget", "0.5",
              "--probe-every", "0.5", "--batch", "2", "--pretrain-n", "8", "--probe-train", "8", "--probe-test", "8",
              "--out", str(out), "--plot", str(png)])
    rep = json.loads(out.read_text())
    assert [x["objective"] for x in rep["results"]] == ["data2vec2", "mae", "data2vec1"]
    for x in rep["results"]:
        assert x["steps"] > 0 and len(x["points"]) >= 2 and x["points"][0]["train_s"] == 0
        assert all(0 <= p["probe_acc"] <= 1 for p in x["points"])
    assert rep["headline_vs_mae"]["text"] and png.stat().st_size > 1000
    assert "headline" in r.stdout
