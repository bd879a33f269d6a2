"""`train.objective` (data2vec2 | data2vec1 | mae | bert) in `d2v pretrain`, the online probe, and the
run knobs (keep_every, max_minutes, copies/s): same loop, loaders, checkpoints and resume for all."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
import torch
from test_pretrain import shard_root, tiny, tiny_shards  # noqa: F401 - shard_root is a fixture

from d2v.config import load_config
from d2v.errors import ConfigError, InputError
from d2v.models.model_dir import load_model_dir
from d2v.train.pretrain import pretrain


@pytest.mark.parametrize("objective, modality", [("mae", "image"), ("bert", "text"), ("data2vec1", "image")])
def test_each_objective_trains_in_d2v_pretrain_and_its_encoder_loads_for_downstream_use(tmp_path, objective,
                                                                                         modality):
    cfg = tiny(tmp_path, f"train.objective={objective}", f"train.modalities=[{modality}]", "train.max_steps=3",
               "+train.track=false", "train.batch_size=4")
    res = pretrain(cfg, progress=False)
    assert res.steps == 3 and torch.isfinite(torch.tensor(res.last_loss[modality]))
    state = torch.load(res.checkpoint, weights_only=True)
    assert state["config"]["train"]["objective"] == objective
    assert any(k.startswith("backbone.") for k in state["model"])  # the baseline wraps the encoder
    # d2v finetune / evaluate / encode load the checkpoint's encoder: the trained backbone, not a fresh one
    model, info = load_model_dir(res.checkpoint)
    assert info["extra"]["objective"] == objective
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][f"backbone.{k}"]), k
    # copies/s counts the masked copies: M per sample for data2vec 1/2, one for MAE and BERT
    want = cfg.model.clone_batch if objective == "data2vec1" else 1
    assert res.copies_per_s == pytest.approx(res.samples_per_s * want)


def test_a_baseline_run_resumes_exactly(tmp_path):
    over = ["train.objective=mae", "train.modalities=[image]", "train.max_steps=4", "+train.track=false",
            "train.batch_size=4"]
    ref = torch.load(pretrain(tiny(tmp_path / "a", *over), progress=False).checkpoint, weights_only=True)
    cfg = tiny(tmp_path / "b", *over)
    pretrain(cfg, progress=False, stop_after=2)
    got = torch.load(pretrain(cfg, resume=True, progress=False).checkpoint, weights_only=True)
    for k, v in ref["model"].items():  # MAE draws its masks from the RNG the checkpoint restores
        assert torch.equal(v, got["model"][k]), k


@pytest.mark.parametrize("over, msg", [
    (["train.objective=mae", "train.modalities=[image,text]"], r"mae is a image-only objective"),
    (["train.objective=bert", "train.modalities=[image]"], r"bert is a text-only objective"),
    (["train.objective=simclr"], r"unknown objective 'simclr'"),
    (["train.probe_every=10"], r"online probe reads the labelled shards: it needs data.source=shards"),
    (["train.probe_every_minutes=1"], r"online probe reads the labelled shards: it needs data.source=shards"),
    (["train.probe_split=train"], r"train.probe_split.*val or test"),
    (["train.probe_train=5"], r"at least 10 samples each \(0: the whole split\)"),
])
def test_an_objective_or_probe_that_does_not_fit_is_a_clear_error(tmp_path, over, msg):
    with pytest.raises(ConfigError, match=msg):
        tiny(tmp_path, *over).validate()


def test_keep_every_keeps_numbered_checkpoints(tmp_path):
    res = pretrain(tiny(tmp_path, "train.modalities=[image]", "train.max_steps=4", "train.keep_every=2",
                        "train.ckpt_every=2", "+train.track=false", "train.batch_size=4"), progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint*.pt")) == ["checkpoint.pt", "checkpoint_2.pt", "checkpoint_4.pt"]
    assert torch.load(out / "checkpoint_2.pt", weights_only=True)["step"] == 2
    assert torch.load(res.checkpoint, weights_only=True)["step"] == 4


def test_max_minutes_stops_on_time_and_spreads_the_schedule_over_it(tmp_path):
    from d2v.train.schedule import lr_at

    cfg = tiny(tmp_path, "train.modalities=[image]", "train.max_steps=100000", "train.max_minutes=0.03",
               "train.warmup_steps=0", "+train.track=false", "train.batch_size=4")
    t, budget = cfg.train, 0.03 * 60
    res = pretrain(cfg, progress=False)
    assert 1 <= res.steps < 100000  # 1.8 s of training, not 100,000 steps
    assert res.train_seconds >= budget
    lrs = [r["lr"] for r in res.history]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # no warm-up: the cosine only falls
    # Each step's lr is set from the clock at its start, which is at least the earlier steps' own time
    # into the budget: the cosine ran over the minutes (over the 100,000 steps it would stay near lr).
    # A bound, not a value, so a slow (loaded) machine with few long steps passes too.
    before_last = sum(r["step_time_s"] for r in res.history[:-1])
    assert lrs[-1] <= lr_at(int(t.max_steps * min(1.0, before_last / budget)), t.lr, 0, t.max_steps, t.min_lr) + 1e-12
    # the clock stops before the final save: the checkpoint (read by --resume) holds the reported seconds
    assert torch.load(res.checkpoint, weights_only=True)["train_seconds"] == res.train_seconds


def test_online_probe_logs_curves_without_changing_training(tmp_path, shard_root):  # noqa: F811
    over = ["train.modalities=[image,text]", "train.max_steps=4", "train.probe_train=12", "train.probe_val=10"]
    plain = pretrain(tiny_shards(tmp_path / "a", shard_root, *over), progress=False)
    probe_tsv = tmp_path / "probe.tsv"
    t0 = time.perf_counter()
    probed = pretrain(tiny_shards(tmp_path / "b", shard_root, *over, "train.probe_every=2"), progress=False,
                      probe_path=probe_tsv)
    wall = time.perf_counter() - t0
    # the probe's own clock: 0 when off; when on, apart from the training seconds and inside the call's wall time
    assert plain.probe_seconds == 0.0 and probed.probe_seconds > 0.0
    assert probed.train_seconds + probed.probe_seconds < wall
    # probing reads the encoder in eval mode and restores it and the RNG: the run trains identically
    a, b = (torch.load(r.checkpoint, weights_only=True)["model"] for r in (plain, probed))
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    rows = list(csv.DictReader(open(probe_tsv), delimiter="\t"))
    assert [(int(r["step"]), r["modality"]) for r in rows] == [(s, m) for s in (0, 2, 4) for m in ("image", "text")]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    secs = [float(r["train_seconds"]) for r in rows if r["modality"] == "image"]
    # training time, probes excluded (the TSV rounds to the millisecond: the last probe may read 0.5 ms more)
    assert secs[0] < secs[1] < secs[2] <= probed.train_seconds + 5e-4 + 1e-9


def test_probe_every_minutes_probes_on_a_time_grid_and_can_score_the_test_split(tmp_path, shard_root):  # noqa: F811
    from d2v.train.probe import OnlineProbe

    gap = 0.01 * 60
    cfg = tiny_shards(tmp_path, shard_root, "train.modalities=[image]", "train.max_steps=100000",
                      "train.max_minutes=0.04", "train.probe_every_minutes=0.01", "train.probe_split=test",
                      "train.probe_train=12", "train.probe_val=10", "train.batch_size=4")
    assert cfg.train.probe_every == 0  # time-based probes alone turn the probe on
    assert OnlineProbe(cfg, torch.device("cpu")).splits["image"][1].split == "test"
    res = pretrain(cfg, progress=False)
    secs = [p["train_seconds"] for p in res.probes]
    steps = [p["step"] for p in res.probes]
    assert steps[0] == 0 and steps[-1] == res.steps and steps == sorted(set(steps))
    assert len(secs) >= 4  # 0, about every 0.6 s of a 2.4 s budget, and the end
    # the k-th probe comes once k gaps of training seconds have passed, never before
    assert all(s >= k * gap - 1e-3 for k, s in enumerate(secs[:-1]))
    # and never two in one gap: each probe's multiple of the gap is past the previous one's
    assert all(int(b / gap + 1e-6) > int(a / gap + 1e-6) for a, b in zip(secs[:-2], secs[1:-1]))


def test_the_probe_keeps_the_frozen_speech_cnn_output_only_while_its_weights_stay(tmp_path, shard_root):  # noqa: F811
    from d2v.data.downstream import load_task_data
    from d2v.models import Data2Vec2
    from d2v.train.probe import OnlineProbe

    cfg = tiny_shards(tmp_path, shard_root, "train.probe_every=1", "train.probe_train=10", "train.probe_val=10")
    assert cfg.model.speech.local_grad_mult == 0.0  # the tiny model's CNN is frozen in pretraining
    probe = OnlineProbe(tiny_shards(tmp_path, shard_root, "train.modalities=[image]", "train.probe_every=1",
                                    "train.probe_train=10", "train.probe_val=10"), torch.device("cpu"), batch_size=4,
                         local_batch_size=4)
    train = load_task_data(cfg, "speech", "train", 10)  # one class only in these shards: no probe fit here
    model = Data2Vec2(cfg.model).eval()
    enc = model.encoder("speech")
    calls = []
    enc.local_encoder.register_forward_hook(lambda *a: calls.append(1))
    batches = -(-len(train) // 4)
    first = probe.pooled(model, "speech", train)
    assert len(calls) == batches
    again = probe.pooled(model, "speech", train)
    assert len(calls) == batches and np.array_equal(first, again)  # reused, same features
    enc.mcfg.local_grad_mult = 1.0  # a trained CNN: nothing is kept, the features are computed afresh
    fresh = probe.pooled(model, "speech", train)
    enc.mcfg.local_grad_mult = 0.0
    assert len(calls) == 2 * batches and np.array_equal(first, fresh)
    with torch.no_grad():
        next(enc.local_encoder.parameters()).add_(0.05)  # the weights moved: the kept output is stale
    moved = probe.pooled(model, "speech", train)
    assert len(calls) == 3 * batches and not np.allclose(first, moved)
    # the CNN in chunks of its own size (cache-sized on a CPU), the transformer in batches of 4: the same features
    probe.local_batch_size, probe._local = 3, {}
    chunked = probe.pooled(model, "speech", train)
    assert len(calls) == 3 * batches + -(-len(train) // 3)
    np.testing.assert_allclose(chunked, moved, rtol=1e-5, atol=1e-6)


def test_probe_of_a_modality_without_labels_is_a_clear_error(tmp_path, shard_root):  # noqa: F811
    cfg = tiny_shards(tmp_path, shard_root, "train.modalities=[image]", "train.max_steps=2", "train.probe_every=1",
                      "data.root=" + str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match=r"train.probe_every=1: cannot probe image"):
        pretrain(cfg, progress=False)


def test_the_new_train_keys_are_in_params_yaml_so_dvc_overrides_need_no_plus():
    """`dvc exp run -S train.objective=mae` needs the key in params.yaml (DVC's Hydra refuses a new key)."""
    import yaml

    from d2v.config import PROJECT_ROOT

    train = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["train"]
    assert {"objective", "keep_every", "max_minutes", "probe_every", "probe_train", "probe_val", "probe_every_minutes",
            "probe_split"} <= set(train)
    cfg = load_config(["train.objective=mae", "train.modalities=[image]"], config_name="pipeline")
    assert cfg.validate().train.objective == "mae"
