"""Baseline objectives (data2vec 1.0-style, MAE, BERT-style) and the efficiency benchmarks' smoke runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, build_cfg, make_batch

from d2v.config import PROJECT_ROOT
from d2v.data.tokenizer import BOS, PAD, UNK
from d2v.errors import InputError
from d2v.models import Data2Vec2
from d2v.models.baselines import MAE, BERTStyle, Data2Vec1Style, backbone_of, objective, patchify

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: 1 thread on a loaded 2-core box


def fit(opt: torch.optim.Optimizer, loss_fn, steps: int) -> list[float]:
    """``steps`` optimizer steps on ``loss_fn()``; the loss before each step."""
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


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
    losses = fit(opt, lambda: model(src, "image", mask=mask).loss, 15)
    assert losses[-1] < 0.95 * losses[0] and losses[-1] == min(losses[-3:]), losses


def test_objective_names():
    cfg = build_cfg("image")
    assert isinstance(objective("data2vec2", cfg), Data2Vec2)
    with pytest.raises(InputError, match="unknown objective"):
        objective("nope", cfg)
    with pytest.raises(InputError, match="image"):
        MAE(build_cfg("text"))


def _text_rows(batch_size: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    """<s> + ordinary ids (never <unk>), each row right-padded after a random length in [8, length]."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (batch_size, length), generator=g)
    src[:, 0] = BOS
    lengths = torch.randint(8, length + 1, (batch_size,), generator=g)
    src[torch.arange(length) >= lengths.unsqueeze(1)] = PAD
    return src


def test_bert_loss_at_init_is_about_ln_vocab():
    model = objective("bert", build_cfg("text")).train()
    assert isinstance(model, BERTStyle) and isinstance(backbone_of(model), Data2Vec2)
    out = model(_text_rows(8))
    assert math.isfinite(out.loss.item()) and abs(out.loss.item() - math.log(VOCAB)) < 0.3
    assert out.pred.shape == (int(out.mask.sum()), VOCAB) and out.target.shape == (int(out.mask.sum()),)


def test_bert_chooses_15_percent_of_the_real_tokens_only():
    model = BERTStyle(build_cfg("text"))
    src = _text_rows(64)
    chosen = model.select(src, generator=torch.Generator().manual_seed(1))
    real = src.ne(PAD) & src.ne(BOS)
    assert not bool((chosen & ~real).any())  # never <pad> or <s>
    n_real, n_chosen = real.sum(1).float(), chosen.sum(1).float()
    # per row: floor or ceil of 15% (random rounding), at least one
    assert bool((n_chosen >= torch.floor(0.15 * n_real).clamp_min(1)).all())
    assert bool((n_chosen <= torch.ceil(0.15 * n_real)).all())
    assert abs(float(n_chosen.sum() / n_real.sum()) - 0.15) < 0.02


def test_bert_80_10_10_corruption():
    model = BERTStyle(build_cfg("text"))
    g = torch.Generator().manual_seed(2)
    src = torch.randint(4, VOCAB, (400, 64), generator=g)  # no <unk>: a mask id is unambiguous
    chosen = model.select(src, generator=g)
    x = model.corrupt(src, chosen, generator=g)
    assert torch.equal(x[~chosen], src[~chosen])  # only the chosen positions change
    xc, sc = x[chosen], src[chosen]
    n = xc.numel()
    assert n > 3000
    as_mask = float((xc == UNK).sum()) / n
    unchanged = float((xc == sc).sum()) / n
    replaced = float(((xc != UNK) & (xc != sc)).sum()) / n
    # a random replacement equals the original with probability 1/96
    assert abs(as_mask - 0.8) < 0.025
    assert abs(unchanged - (0.1 + 0.1 / (VOCAB - 4))) < 0.02
    assert abs(replaced - 0.1 * (1 - 1 / (VOCAB - 4))) < 0.02
    assert int(xc[xc != UNK].min()) >= 4 and int(xc.max()) < VOCAB  # random ids are ordinary tokens


def test_bert_full_length_gradients_and_no_teacher():
    cfg = build_cfg("text")
    model = BERTStyle(cfg).train()
    bb = model.backbone
    student_calls, teacher_calls = _count_calls(bb.blocks[0]), _count_calls(bb.teacher.blocks[0])
    src = _text_rows(4)
    out = model(src)
    assert student_calls == [(4, 32, cfg.embed_dim)] and teacher_calls == []  # full length, no teacher
    out.loss.backward()
    emb = bb.encoder("text").local_encoder.embed_tokens
    assert model.embed_tokens is emb and emb.weight.grad is not None and float(emb.weight.grad.abs().sum()) > 0
    assert model.lm_bias.grad is not None and model.lm_dense.weight.grad is not None
    assert all(p.grad is None for p in bb.teacher.parameters())
    before = [p.clone() for p in bb.teacher.parameters()]
    model.update_teacher(1)  # a no-op
    assert all(torch.equal(a, b) for a, b in zip(before, bb.teacher.parameters()))
    ids = {id(p) for grp in model.param_groups(0.05) for p in grp["params"]}
    assert id(emb.weight) in ids and id(model.lm_bias) in ids
    assert not any(id(p) in ids for p in bb.teacher.parameters())
    with pytest.raises(InputError, match="real tokens"):
        model(src, mask=src.eq(BOS))


def test_bert_loss_falls_on_a_fixed_batch():
    model = BERTStyle(build_cfg("text")).train()
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=2e-3)
    src = _text_rows(8)
    chosen = model.select(src, generator=torch.Generator().manual_seed(3))
    # The same corruption every step (a fixed generator seed).
    losses = fit(opt, lambda: model(src, mask=chosen, generator=torch.Generator().manual_seed(4)).loss, 30)
    assert losses[-1] < 0.7 * losses[0] and losses[-1] == min(losses[-3:]), losses


def test_bert_refuses_a_model_without_text():
    with pytest.raises(InputError, match="text encoder"):
        BERTStyle(build_cfg("image"))
    with pytest.raises(InputError, match="text encoder"):
        objective("bert", build_cfg("image", "speech"))
    model = BERTStyle(build_cfg("image", "text"))
    with pytest.raises(InputError, match="text-only"):
        model(make_batch("image", 2), "image")


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
    r = _run([str(PROJECT_ROOT / "benchmarks/time_to_accuracy.py"), "--root", str(root), "--budget", "1",
              "--probe-every", "2", "--batch", "2", "--probe-train", "10", "--probe-val", "10",
              "--out", str(out), "--plot", str(png)])
    rep = json.loads(out.read_text())
    assert [x["objective"] for x in rep["results"]] == ["data2vec2", "mae", "data2vec1"]
    for x in rep["results"]:  # each a d2v pretrain run: its online probe at step 0, every 2 steps and at the end
        assert x["steps"] > 0 and len(x["points"]) >= 2 and x["points"][0]["step"] == 0
        steps = [q["step"] for q in x["points"]]
        assert steps == sorted(steps) and steps[-1] == x["steps"] and all(s % 2 == 0 for s in steps[:-1])
        secs = [q["train_s"] for q in x["points"]]
        assert secs == sorted(secs) and secs[-1] >= 1.0  # ran out its 1 s training budget
        assert all(0 <= q["probe_acc"] <= 1 for q in x["points"])
    batch = {x["objective"]: x["batch"] for x in rep["results"]}
    assert batch == {"data2vec2": 2, "mae": 256, "data2vec1": 2}  # MAE's own recipe, not data2vec's
    assert rep["headline_vs_mae"]["text"] and png.stat().st_size > 1000
    assert "headline" in r.stdout


def _vs_mae_shards(tmp_path):
    from test_shards import make_image_data

    from d2v.data.shards import write_shards

    root = tmp_path / "data"
    make_image_data(root)
    write_shards("image", root, seed=0, maxcount=3, min_shards=2, progress=False)
    return root


def test_vs_mae_benchmark_runs_d2v_on_its_time_grid(tmp_path):
    """The data2vec 2.0 side of benchmarks/vs_mae.py (the MAE side needs a facebookresearch/mae
    checkout: the next test); the D=64 encoder (--embed-dim), probed on the test split every 0.3 s."""
    out = tmp_path / "vs.json"
    _run([str(PROJECT_ROOT / "benchmarks/vs_mae.py"), "--only", "d2v", "--root", str(_vs_mae_shards(tmp_path)),
          "--budget", "1", "--probe-minutes", "0.005", "--probe-train", "10", "--threads", "1", "--embed-dim", "64",
          "--d2v", "train.batch_size=2", "--finetune-minutes", "0", "--finetune-steps", "2", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert rep["embed_dim"] == 64 and rep["encoder"][0] == "model.embed_dim=64"
    (run,) = rep["runs"]
    # the step-0 encoder (the only one within half a probe gap of minute 0) was scored by the short fine-tune
    assert [i for i, q in enumerate(run["points"]) if "finetune_acc" in q] == [0]
    assert 0 <= run["points"][0]["finetune_acc"] <= 1 and rep["finetune"]["steps"] == 2
    assert run["objective"].startswith("data2vec2") and run["overrides"] == ["train.batch_size=2"]
    secs = [q["train_s"] for q in run["points"]]
    assert secs[0] < 0.05 and secs == sorted(secs) and len(secs) >= 3 and secs[-1] >= 1.0  # step 0: before training
    assert all(s >= k * 0.3 - 1e-3 for k, s in enumerate(secs[:-1]))
    assert rep["summary"] == {"per_seed": []}  # no MAE run, no ratio
    assert out.with_suffix(".png").stat().st_size > 1000


def test_vs_mae_stop_minutes_ends_the_d2v_run_early_on_its_budget_schedule(tmp_path):
    """--stop-minutes: probes every 0.3 s, the run ends at the first probe after 0.6 s of a 30 s budget."""
    out = tmp_path / "early.json"
    _run([str(PROJECT_ROOT / "benchmarks/vs_mae.py"), "--only", "d2v", "--root", str(_vs_mae_shards(tmp_path)),
          "--budget", "30", "--stop-minutes", "0.01", "--probe-minutes", "0.005", "--probe-train", "10",
          "--threads", "1", "--embed-dim", "64", "--d2v", "train.batch_size=2", "--finetune-minutes", "--out", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    secs = [q["train_s"] for q in run["points"]]
    assert "first 0.01 of 0.5 min" in run["objective"] and run["steps"] is None
    assert secs[0] < 0.05 and secs == sorted(secs) and secs[-2] < 0.6 <= secs[-1] < 5  # stopped, far short of 30 s
    assert run["train_seconds"] == secs[-1] and not any("finetune_acc" in q for q in run["points"])


def test_vs_mae_summary_ratio_is_the_mae_budget_over_the_time_d2v_needs():
    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    from vs_mae import summarise

    def run(obj, seed, pts, secs=720.0):
        return {"objective": obj, "seed": seed, "train_seconds": secs, "final_acc": pts[-1][1],
                "points": [{"train_s": s, "probe_acc": a} for s, a in pts]}

    runs = [run("mae (facebookresearch/mae)", 1, [(0, 0.7), (720, 0.85)]),
            run("data2vec2 (d2v pretrain)", 1, [(0, 0.7), (90, 0.84), (180, 0.851), (720, 0.86)]),
            run("mae (facebookresearch/mae)", 2, [(0, 0.7), (720, 0.86)]),
            run("data2vec2 (d2v pretrain)", 2, [(0, 0.7), (720, 0.855)])]
    s = summarise(runs, 720.0)
    assert [r["ratio"] for r in s["per_seed"]] == [4.0, None]  # seed 2 never reaches MAE's 0.86
    assert s["median_ratio"] == 2.0 and s["ratio_range"] == [0.0, 4.0] and s["median_mae_final_acc"] == 0.855


def test_vs_mae_fine_tune_ratio_and_checkpoint_choice():
    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    from vs_mae import finetune_points, summarise

    pts = [{"train_s": s} for s in (0.0, 91.0, 180.4, 272.0, 360.2, 720.0)]
    # the nearest probe point to each minute, when within half a 90 s gap; 2 min (120 s) is 29 s from 91 s
    assert finetune_points(pts, [0, 1.5, 3, 12], 90.0) == [0, 1, 2, 5]
    assert finetune_points(pts, [0.5, 2.5], 90.0) == [0, 2]  # 30 s from 0 s; 150 s is 30.4 s from 180.4 s
    assert finetune_points(pts, [9], 90.0) == []  # 540 s: no point within 46 s

    def run(obj, pts):
        return {"objective": obj, "seed": 1, "train_seconds": 720.0, "final_acc": pts[-1][1],
                "points": [{"train_s": s, "probe_acc": a} | ({"finetune_acc": f} if f is not None else {})
                           for s, a, f in pts]}

    s = summarise([run("mae (facebookresearch/mae)", [(0, 0.7, 0.6), (360, 0.8, None), (720, 0.85, 0.88)]),
                   run("data2vec2 (d2v pretrain)", [(0, 0.7, 0.6), (90, 0.86, 0.87), (180, 0.87, 0.885), (720, 0.9, 0.9)])],
                  720.0)
    (row,) = s["per_seed"]
    assert row["ratio"] == 8.0 and row["finetune_ratio"] == 4.0  # the probe reaches 0.85 at 90 s, the fine-tune 0.88 at 180 s
    assert s["median_finetune_ratio"] == 4.0 and s["median_mae_final_finetune_acc"] == 0.88
    # a d2v run stopped after 180 s (--stop-minutes) that has not reached MAE's fine-tuned 0.88 yet: a bound, no median
    stopped = run("data2vec2 (d2v pretrain, the first 3 of 12 min)", [(0, 0.7, 0.6), (90, 0.86, 0.87), (180, 0.87, 0.875)])
    stopped["train_seconds"] = 180.0
    s = summarise([run("mae (facebookresearch/mae)", [(0, 0.7, 0.6), (720, 0.85, 0.88)]), stopped], 720.0)
    (row,) = s["per_seed"]
    assert row["ratio"] == 8.0 and row["finetune_ratio"] is None and row["finetune_ratio_at_most"] == 4.0
    assert s["median_ratio"] == 8.0 and "median_finetune_ratio" not in s


def test_short_finetune_learns_a_task_the_frozen_encoder_cannot_solve():
    """The benchmark's short fine-tune trains the encoder too: two classes that differ only in the sign
    of a product of inputs (XOR) are not linearly separable from a random encoder's features."""
    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    from vs_mae import short_finetune

    from d2v.data.downstream import LabelledSplit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 2, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    train = LabelledSplit("image", "train", x[:1536], y[:1536], [])
    test = LabelledSplit("image", "test", x[1536:], y[1536:], [])
    accs = {}
    for steps in (0, 300):
        torch.manual_seed(1)
        enc = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
        accs[steps] = short_finetune(enc, lambda m, v: m(v), 16, train, test, steps, seed=0)
    assert accs[0] < 0.7 < 0.9 < accs[300]


def test_vs_mae_runs_the_real_mae_code_when_a_checkout_is_given(tmp_path):
    """Runs only with MAE_REPO=<a facebookresearch/mae checkout> and timm installed (never in CI: no network)."""
    repo = os.environ.get("MAE_REPO")
    if not repo:
        pytest.skip("set MAE_REPO to a facebookresearch/mae checkout to run the real MAE code")
    pytest.importorskip("timm")
    out = tmp_path / "vs.json"
    _run([str(PROJECT_ROOT / "benchmarks/vs_mae.py"), "--mae-repo", repo, "--root", str(_vs_mae_shards(tmp_path)),
          "--budget", "1", "--probe-minutes", "0.01", "--probe-train", "10", "--threads", "1",
          "--d2v", "train.batch_size=2", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert [r["objective"].split()[0] for r in rep["runs"]] == ["mae", "data2vec2"]
    assert rep["runs"][0]["batch"] == 256 and rep["runs"][0]["steps"] >= 1
    (row,) = rep["summary"]["per_seed"]
    assert 0 <= row["mae_final_acc"] <= 1
