"""Fine-tuning and evaluation at scale, on CPU: streamed from the shards, under torchrun (DDP over
gloo), killed and resumed.

* Two processes read the same global batches as one and each decodes its half; DDP averages the
  two half-batch gradients, so losses agree to float rounding (1e-5 relative) and the evaluation
  (every other batch per process, counts summed, probe features gathered in split order) gives
  the same accuracies.
* A run killed with SIGKILL and resumed with ``--resume`` ends with exactly the weights of an
  uninterrupted run (same stream segment, RNG, optimizer and loss history).

The model has no dropout (``build_cfg``), and every process uses one thread, so the two worlds
differ only in how the batch is split.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_distributed import free_port
from test_downstream import make_cfg, make_halves, save_pretrained

from d2v.config import Config, from_dict, to_dict
from d2v.errors import ConfigError
from d2v.models.classifier_dir import load_classifier
from d2v.train.evaluate import evaluate_task
from d2v.train.finetune import finetune_task

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def halves(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("halves")
    make_halves(root)
    return root


def write_params(cfg: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def config(root: Path, out: Path, steps: int, **finetune) -> Config:
    cfg = make_cfg(root, out, init="", steps=steps)
    cfg.finetune.init = str(save_pretrained(cfg, out / "pretrain" / "checkpoint.pt"))
    cfg.finetune.threads, cfg.finetune.track, cfg.finetune.device = 1, False, "cpu"
    cfg.finetune.image.max_eval = 30  # not a multiple of the eval batch: a short last batch
    cfg.finetune.image.eval_batch_size = 8
    for k, v in finetune.items():
        setattr(cfg.finetune, k, v)
    return cfg


def d2v(*args: str, torchrun: int = 0, **kw) -> subprocess.CompletedProcess | subprocess.Popen:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "--master_addr",
                 "127.0.0.1", "--master_port", str(free_port())] if torchrun else [sys.executable])
    return subprocess.run([*launcher, "-m", "d2v.cli.main", *args, "--no-progress"], capture_output=True, text=True,
                          env=ENV, timeout=600, **kw)


def losses(path: Path) -> dict[str, list[float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {k: [float(r[k]) for r in rows] for k in rows[0] if k != "step"}


def test_two_processes_finetune_and_evaluate_as_one(halves, tmp_path):
    one_cfg = config(halves, tmp_path / "one", steps=8)
    two_cfg = config(halves, tmp_path / "two", steps=8)
    two_cfg.finetune.init = one_cfg.finetune.init  # the same pretrained weights
    params = write_params(two_cfg, tmp_path / "two.yaml")
    r = d2v("finetune", "--task", "image", "--params", str(params), "--metrics", str(tmp_path / "two_ft.json"),
            "--history", str(tmp_path / "two.tsv"), torchrun=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count('"val_accuracy"') == 2  # one summary (two inits), from rank 0 only
    r = d2v("evaluate", "--task", "image", "--params", str(params), "--metrics", str(tmp_path / "two_ev.json"),
            "--plot", str(tmp_path / "two.png"), torchrun=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    threads = torch.get_num_threads()
    try:
        cfg = from_dict(to_dict(one_cfg))
        finetune_task(cfg, "image", progress=False, metrics_path=tmp_path / "one_ft.json",
                      history_path=tmp_path / "one.tsv")
        one_ev = evaluate_task(from_dict(to_dict(one_cfg)), "image", metrics_path=tmp_path / "one_ev.json")
    finally:
        torch.set_num_threads(threads)

    l1, l2 = losses(tmp_path / "one.tsv"), losses(tmp_path / "two.tsv")
    assert set(l1) == set(l2) == {"loss_pretrained", "loss_random"}
    for k in l1:
        assert len(l1[k]) == len(l2[k]) == 8
        assert l2[k] == pytest.approx(l1[k], rel=1e-5, abs=1e-6)
        assert l1[k][0] != l1[k][-1]  # it trained
    ft1, ft2 = (json.loads((tmp_path / f"{w}_ft.json").read_text()) for w in ("one", "two"))
    assert ft2["val_accuracy"] == ft1["val_accuracy"] and ft2["baseline_val_accuracy"] == ft1["baseline_val_accuracy"]
    ev2 = json.loads((tmp_path / "two_ev.json").read_text())
    assert ev2["eval_samples"] == one_ev["eval_samples"] == 30
    assert ev2["probe_train_samples"] == one_ev["probe_train_samples"] == 100
    for k in ("accuracy", "baseline_accuracy", "probe_accuracy", "probe_baseline_accuracy"):
        assert ev2[k] == pytest.approx(one_ev[k], abs=1 / 30 + 1e-9), k  # at most one of 30 samples may flip
    assert ev2["accuracy"] == one_ev["accuracy"] and (tmp_path / "two.png").stat().st_size > 1000
    # the weights of both worlds end up within float rounding of each other
    for init in ("pretrained", "random"):
        a, _ = load_classifier(tmp_path / "one" / "finetune" / "image" / init)
        b, _ = load_classifier(tmp_path / "two" / "finetune" / "image" / init)
        worst = max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values())
                    if x.is_floating_point())
        assert worst < 1e-4, (init, worst)


def test_killed_finetune_resumes_to_the_same_weights(halves, tmp_path):
    steps = 40
    cfg = config(halves, tmp_path / "whole", steps=steps, ckpt_every=5)
    whole = write_params(cfg, tmp_path / "whole.yaml")
    r = d2v("finetune", "--task", "image", "--params", str(whole), "--history", str(tmp_path / "whole.tsv"),
            "--metrics", str(tmp_path / "whole.json"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    killed_cfg = config(halves, tmp_path / "killed", steps=steps, ckpt_every=5)
    killed_cfg.finetune.init = cfg.finetune.init
    params = write_params(killed_cfg, tmp_path / "killed.yaml")
    ckpt = tmp_path / "killed" / "finetune" / "image" / "checkpoints" / "pretrained.pt"
    proc = subprocess.Popen([sys.executable, "-m", "d2v.cli.main", "finetune", "--task", "image", "--params",
                             str(params), "--no-progress"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL, out[-2000:]  # killed mid-run, not finished
    done = torch.load(ckpt, weights_only=True)["step"]
    assert 5 <= done < steps

    r = d2v("finetune", "--task", "image", "--params", str(params), "--resume", "--history",
            str(tmp_path / "resumed.tsv"), "--metrics", str(tmp_path / "resumed.json"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout
    for init in ("pretrained", "random"):
        a, _ = load_classifier(tmp_path / "whole" / "finetune" / "image" / init)
        b, _ = load_classifier(tmp_path / "killed" / "finetune" / "image" / init)
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), (init, name)
    assert losses(tmp_path / "resumed.tsv") == losses(tmp_path / "whole.tsv")  # the history survives too
    w, rs = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("whole", "resumed"))
    assert rs["val_accuracy"] == w["val_accuracy"]

    # another setting: refused, naming the keys
    other = config(halves, tmp_path / "killed", steps=steps, ckpt_every=5)
    other.finetune.init = cfg.finetune.init
    other.finetune.image.lr = 1e-3
    other.finetune.image.warmup_steps = 3
    with pytest.raises(ConfigError, match=r"2 differing key\(s\): finetune\.image\.lr \(checkpoint 0\.002, now 0\.001\); "
                                          r"finetune\.image\.warmup_steps"):
        finetune_task(other, "image", progress=False, resume=True)


# ------------------------------------------------------------------------------ the image recipe
def test_image_recipe_augments_each_batch_reproducibly(halves):
    """MAE's recipe (crop + flip, RandAugment, erasing, MixUp/CutMix): shapes and soft targets are
    right, a batch is augmented the same way whenever its keys come again (both inits, any rank,
    a resume), and different batches differently."""
    from itertools import islice

    from d2v.data.augment import ImageAugment
    from d2v.data.downstream import TaskInputs, _raw_labelled, eval_batches
    from d2v.data.shards import shard_urls

    plain = next(b for _, b in eval_batches(halves, TaskInputs("image"), "train", 8))
    raw = list(islice(_raw_labelled(shard_urls(halves, "image", "train")), 8))
    aug = TaskInputs("image", augment=ImageAugment(28, 1, 0.08, 2, 9, 0.25, 0.8, 1.0, num_classes=2, seed=5))
    a, b = aug.collate(raw, "train"), aug.collate(raw, "train")
    assert a.source.shape == plain.source.shape == (8, 1, 28, 28) and a.keys == plain.keys
    assert torch.equal(a.source, b.source) and torch.equal(a.soft_label, b.soft_label)  # reproducible
    assert not torch.allclose(a.source, plain.source, atol=1e-3)  # and augmented
    assert a.soft_label.shape == (8, 2) and torch.allclose(a.soft_label.sum(1), torch.ones(8))
    assert (a.soft_label.max(1).values < 1).any()  # mixed: some targets are not one-hot
    other = aug.collate(raw[::-1], "train")  # other keys order: other draws
    assert not torch.equal(other.source, a.source.flip(0))
    state = torch.get_rng_state()
    aug.collate(raw, "train")
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (dropout) is not touched


def test_soft_target_loss_and_drop_path(halves):
    """Soft targets with label smoothing give the cross-entropy computed by hand; one-hot soft
    targets give exactly the class-id loss; drop_path rises linearly over the blocks."""
    from d2v.config import TaskConfig
    from d2v.models import Data2Vec2
    from d2v.models.heads import Classifier
    from d2v.train.finetune import make_model

    cfg = make_cfg(halves, halves, init="")
    clf = Classifier(Data2Vec2(cfg.model), "image", 3)
    logits = torch.randn(4, 3)
    ids = torch.tensor([0, 2, 1, 2])
    onehot = torch.nn.functional.one_hot(ids, 3).float()
    assert torch.allclose(clf.loss(logits, onehot, 0.1), clf.loss(logits, ids, 0.1), atol=1e-6)
    soft = torch.tensor([[0.7, 0.3, 0], [0, 0.5, 0.5], [1, 0, 0], [0.2, 0.2, 0.6]])
    p = torch.softmax(logits.double(), -1)
    t = soft.double() * 0.9 + 0.1 / 3
    want = float(-(t * p.log()).sum(1).mean())
    assert float(clf.loss(logits, soft, 0.1)) == pytest.approx(want, rel=1e-5)
    model = make_model(Data2Vec2(cfg.model), "image", TaskConfig(drop_path=0.2), 2)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2])
    with pytest.raises(ConfigError, match="image task only"):
        TaskConfig(mixup=0.8).validate("text")


# ------------------------------------------------------------------------------ the speech recipe's schedule
def test_tri_stage_schedule_matches_fairseqs_phases():
    """fairseq ``tri_stage`` (vox_10h): 1% of the peak at step 0, the peak over the hold phase,
    an exponential decay reaching the final lr at the end of the decay phase."""
    from d2v.train.schedule import tri_stage_lr

    total, peak, final = 1000, 1e-4, 5e-6
    lr = [tri_stage_lr(s, peak, total, (0.1, 0.4, 0.5), final) for s in range(total + 5)]
    assert lr[0] == pytest.approx(1e-6) and lr[50] == pytest.approx(1e-6 + (peak - 1e-6) * 0.5)
    assert lr[100] == lr[499] == peak
    assert lr[750] == pytest.approx(peak * (final / peak) ** 0.5)  # halfway through the decay: the geometric mean
    assert lr[1000] == pytest.approx(final) and lr[1004] == final
    assert all(a >= b for a, b in zip(lr[500:], lr[501:]))  # never rises after the hold


def test_freeze_updates_train_only_the_head_first(halves, tmp_path):
    from d2v.models import Data2Vec2
    from d2v.models.heads import Classifier
    from d2v.train.distributed import DistInfo
    from d2v.train.finetune import train_classifier

    cfg = make_cfg(halves, tmp_path, init="random", steps=5)
    cfg.finetune.image.freeze_updates = 3
    torch.manual_seed(0)
    clf = Classifier(Data2Vec2(cfg.model), "image", 2)
    enc0 = {k: v.clone() for k, v in clf.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    head0 = clf.head.weight.detach().clone()
    train_classifier(clf, cfg, "image", DistInfo(), progress=False, stop_after=3)
    assert all(torch.equal(v, clf.state_dict()[k]) for k, v in enc0.items())  # frozen for 3 updates
    assert not torch.equal(head0, clf.head.weight)  # while the head learned
    torch.manual_seed(0)
    clf = Classifier(Data2Vec2(cfg.model), "image", 2)
    train_classifier(clf, cfg, "image", DistInfo(), progress=False)
    assert not torch.equal(enc0["blocks.0.attn.qkv.weight"], clf.state_dict()["blocks.0.attn.qkv.weight"])
    assert not clf.freeze_encoder
