"""Fine-tuning, evaluation, linear probes and the model registry on tiny real shards.

The image data here is learnable by construction (the class decides which half of the picture is
bright), so a fine-tuned classifier must beat chance; the registry test uses a real SQLite store.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_cfg
from PIL import Image

from d2v.config import Config, DataConfig, FinetuneConfig, TaskConfig
from d2v.data.downstream import load_split
from d2v.data.manifest import manifest_path, raw_dir, write_manifest
from d2v.data.shards import write_shards
from d2v.errors import InputError
from d2v.models import Data2Vec2
from d2v.models.classifier_dir import load_classifier, save_classifier
from d2v.models.heads import Classifier
from d2v.train import finetune as ft
from d2v.train.distributed import DistInfo
from d2v.train.evaluate import evaluate_task
from d2v.train.probe import linear_probe

SPLITS = {"train": 120, "val": 40, "test": 40}


def make_halves(root: Path) -> None:
    """28x28 grey images: class 'left' is bright on the left half, 'right' on the right, plus noise."""
    base = raw_dir(root, "image")
    (base / "files").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in SPLITS.items():
        rows = []
        for i in range(n):
            label = ["left", "right"][i % 2]
            arr = rng.integers(0, 60, (28, 28)).astype(np.uint8)
            cols = slice(0, 14) if label == "left" else slice(14, 28)
            arr[:, cols] += 150
            key = f"img-{split}-{i}"
            Image.fromarray(arr).save(base / f"files/{key}.png")
            rows.append(dict(key=key, split=split, label=label, path=f"files/{key}.png", offset=-1, width=28, height=28))
        write_manifest(manifest_path(root, "image", split), "image", rows)
    write_shards("image", root, seed=0, maxcount=50, min_shards=2, progress=False)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_halves(root)
    return root


def make_cfg(root: Path, out: Path, init: str, steps: int = 40) -> Config:
    task = TaskConfig(steps=steps, batch_size=16, lr=2e-3, warmup_steps=5, layer_decay=0.75, probe_max_train=100)
    cfg = Config(seed=3, model=build_cfg("image"), data=DataConfig(root=str(root)),
                 finetune=FinetuneConfig(tasks=["image"], image=task, init=init, out_dir=str(out / "finetune"),
                                         threads=2, track=True))
    return cfg


def save_pretrained(cfg: Config, path: Path) -> Path:
    """A pretraining-style checkpoint of a (briefly trained) model."""
    from d2v.config import to_dict
    from d2v.train.checkpoint import input_preprocess

    torch.manual_seed(11)
    model = Data2Vec2(cfg.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "step": 0,
                "preprocess": input_preprocess(cfg)}, path)
    return path


def test_load_split_keeps_labels_and_limits(image_root):
    full = load_split(image_root, "image", "train")
    assert len(full) == SPLITS["train"] and full.source.shape == (SPLITS["train"], 1, 28, 28)
    assert set(full.label.tolist()) == {0, 1}
    part = load_split(image_root, "image", "train", max_n=7)
    assert part.keys == full.keys[:7] and torch.equal(part.source, full.source[:7])


def test_photo_datasets_are_normalised_with_imagenet_statistics_everywhere(image_root, tmp_path):
    """Fashion-MNIST keeps its grey statistics; an image folder (ImageNet or your own photos) gets
    ImageNet's per-channel ones (MAE's, and what a converted release checkpoint was trained on) in
    fine-tuning, evaluation, the fine-tuning augmentation and ``d2v encode`` of the pretraining
    checkpoint alike."""
    from dataclasses import replace

    from d2v.data import transforms
    from d2v.data.downstream import task_inputs
    from d2v.models.model_dir import load_model_dir

    rgb = torch.rand(3, 28, 28)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    want = (rgb - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    assert torch.allclose(transforms.normalize_image(rgb, *transforms.image_stats("imagenet_folder")), want)
    grey = rgb[:1]  # per-channel statistics on a grey image: their average
    assert torch.allclose(transforms.normalize_image(grey, *transforms.image_stats("image_folder")),
                          (grey - mean.mean()) / std.mean())
    assert torch.equal(transforms.normalize_image(grey, *transforms.image_stats("fashion_mnist")),
                       (grey - 0.2860) / 0.3530)
    with pytest.raises(ValueError, match="3 mean values for 2 channels"):
        transforms.normalize_image(torch.rand(2, 4, 4), *transforms.image_stats("image_folder"))

    cfg = make_cfg(image_root, tmp_path, "random")
    photo = replace(cfg, data=replace(cfg.data, image=replace(cfg.data.image, dataset="image_folder", folder="x")))
    fm, ph = task_inputs(cfg, "image"), task_inputs(photo, "image")
    sample = [{"__key__": "a", "cls": 0, "png": (image_root / "raw/image/files/img-train-0.png").read_bytes()}]
    x = transforms.decode_image(sample[0]["png"])
    assert torch.equal(fm.collate(sample).source[0], (x - 0.2860) / 0.3530)
    viewed = transforms.resize_center_crop(transforms.decode_image_uint8(sample[0]["png"]), 28, 0.875).float() / 255
    assert torch.allclose(ph.collate(sample).source[0], (viewed - mean.mean()) / std.mean())
    photo_ft = replace(photo, finetune=replace(photo.finetune, image=replace(photo.finetune.image, random_erasing=0.0,
                                                                            random_resized_crop=0.5)))
    aug = task_inputs(photo_ft, "image", train=True).augment
    assert aug is not None and (aug.mean, aug.std) == transforms.image_stats("image_folder")
    # photos are evaluated as MAE does: the shorter side to size / 0.875 (bicubic), the centre crop,
    # never squashed; checked against PIL's Resize + CenterCrop, computed independently here
    import io

    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    wide = Image.fromarray(small).resize((90, 60), Image.BICUBIC)  # 3:2, smooth
    buf = io.BytesIO()
    wide.save(buf, format="PNG")
    got = ph.collate([{"__key__": "w", "cls": 0, "png": buf.getvalue()}]).source[0]
    ref = wide.resize((48, 32), Image.BICUBIC)  # shorter side 60 -> int(28 / 0.875) = 32
    ref = np.asarray(ref.crop((10, 2, 38, 30)), dtype=np.float32) / 255  # centre 28 x 28
    ref = (torch.from_numpy(ref).permute(2, 0, 1).mean(0, keepdim=True) - mean.mean()) / std.mean()
    assert got.shape == (1, 28, 28) and (got - ref).abs().mean() < 0.02 and (got - ref).abs().max() < 0.15
    squashed = transforms.image_tensor(transforms.decode_image(buf.getvalue()), 28, 1, *transforms.image_stats("x"))
    assert (squashed - ref).abs().mean() > 5 * (got - ref).abs().mean()  # the old view would fail the check
    # the pretraining checkpoint records its dataset's normalisation and view for d2v encode
    ck = save_pretrained(photo, tmp_path / "pre" / "checkpoint.pt")
    _, info = load_model_dir(ck)
    assert info["extra"]["preprocess"]["image"]["mean"] == list(transforms.IMAGENET_MEAN)
    assert (info["extra"]["preprocess"]["image"]["resize"], info["extra"]["preprocess"]["image"]["crop"]) == (32, "center")
    _, info = load_model_dir(save_pretrained(cfg, tmp_path / "pre2" / "checkpoint.pt"))
    assert info["extra"]["preprocess"]["image"]["mean"] == [transforms.IMAGE_MEAN]


def _text_split(root: Path, samples: list[dict]) -> None:

    import webdataset as wds

    out = root / "shards" / "text"
    out.mkdir(parents=True)
    with wds.TarWriter(str(out / "train-000000.tar")) as w:
        for s in samples:
            w.write(s)
    (out / "train.json").write_text(json.dumps({"shardlist": [{"url": "train-000000.tar", "nsamples": len(samples)}]}))


def _ids(*v: int) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.array(v, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


def test_load_split_never_decodes_unlabelled_samples(tmp_path):
    """The text training split is mostly unlabelled pretraining lines: they are dropped by their
    ``.cls`` before their ids are decoded (an unreadable one costs nothing), a labelled one is not."""
    _text_split(tmp_path / "a", [
        {"__key__": "u0", "cls": b"-1", "ids.npy": b"not an npy file", "txt": b"x"},
        {"__key__": "l0", "cls": b"1", "ids.npy": _ids(7, 8, 2), "txt": b"good"},
        {"__key__": "u1", "cls": b"-1", "ids.npy": _ids(9, 2), "txt": b"y"},
        {"__key__": "l1", "cls": b"0", "ids.npy": _ids(5, 2), "txt": b"bad"},
    ])
    d = load_split(tmp_path / "a", "text", "train", text_length=8)
    assert d.keys == ["l0", "l1"] and d.label.tolist() == [1, 0] and d.lengths.tolist() == [4, 3]
    assert d.source[0, :5].tolist() == [0, 7, 8, 2, 1]  # <s> first, <pad> after
    _text_split(tmp_path / "b", [{"__key__": "l0", "cls": b"1", "ids.npy": b"not an npy file", "txt": b"z"}])
    with pytest.raises(InputError, match=r"sample 'l0'.*ids\.npy"):
        load_split(tmp_path / "b", "text", "train", text_length=8)


def test_layer_decay_scales_each_layer():
    m = Data2Vec2(build_cfg("image"))
    clf = Classifier(m, "image", 3)
    groups = clf.layer_param_groups(1e-3, 0.05, 0.5)
    depth = len(clf.blocks)
    seen = {}
    for g in groups:
        assert g["lr_scale"] == pytest.approx(0.5 ** (depth + 1 - g["layer"]))
        for p in g["params"]:
            seen[id(p)] = g
    names = dict(clf.named_parameters())
    assert seen[id(names["head.weight"])]["lr_scale"] == 1.0
    assert seen[id(names["head.bias"])]["weight_decay"] == 0.0
    assert seen[id(names["blocks.0.attn.qkv.weight"])]["layer"] == 1
    assert seen[id(names["encoder.local_encoder.proj.weight"])]["layer"] == 0
    assert len(seen) == len(names)  # every trainable parameter in exactly one group
    assert not any(n.startswith("encoder.decoder") for n in names)  # the decoder is dropped


def test_text_pooling_ignores_padding():
    m = Data2Vec2(build_cfg("text")).eval()
    clf = Classifier(m, "text", 2).eval()
    ids = torch.randint(4, 100, (2, 10))
    padded = torch.cat([ids, torch.ones(2, 6, dtype=torch.long)], 1)  # <pad> = 1
    with torch.no_grad():
        a = clf.features(ids, torch.tensor([10, 10]))
        b = clf.features(padded, torch.tensor([10, 10]))
    assert torch.allclose(a, b, atol=1e-5)


def test_linear_probe_separates_separable_features():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    x = rng.standard_normal((200, 8)) + 3 * y[:, None]
    assert linear_probe(x[:150], y[:150], x[150:], y[150:]) > 0.95
    noise = rng.standard_normal((200, 8))
    assert linear_probe(noise[:150], y[:150], noise[150:], y[150:]) < 0.8


@pytest.mark.parametrize("classes", [3, 10])
def test_linear_probe_matches_scikit_learn(classes):
    """The torch L-BFGS regression reaches scikit-learn's optimum: the same test predictions on
    overlapping classes with a constant and a badly scaled column (an independent implementation)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(classes)
    y = rng.integers(0, classes, 900) * 7  # labels need not be 0..K-1
    x = rng.standard_normal((900, 12)) + 0.6 * rng.standard_normal((classes * 7 + 1, 12))[y]
    x[:, 3] = 5.0  # constant: left unscaled, as StandardScaler does
    x[:, 4] *= 1e3
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000, tol=1e-10))
    ref.fit(x[:600], y[:600])
    want = float((ref.predict(x[600:]) == y[600:]).mean())
    assert 1 / classes + 0.1 < want < 0.98  # the problem is neither trivial nor hopeless
    assert abs(linear_probe(x[:600], y[:600], x[600:], y[600:], c=0.5) - want) <= 1 / 300


def test_finetune_evaluate_round_trip(image_root, tmp_path):
    cfg = make_cfg(image_root, tmp_path, init="")
    cfg.finetune.init = str(save_pretrained(cfg, tmp_path / "pretrain" / "checkpoint.pt"))
    metrics, history = tmp_path / "ft.json", tmp_path / "ft.tsv"
    runs = ft.finetune_task(cfg, "image", progress=False, metrics_path=metrics, history_path=history)
    assert set(runs) == {"pretrained", "random"}
    for r in runs.values():
        assert r.val_accuracy > 0.8, r  # the halves task is easy: far above chance (0.5)
        assert np.mean(r.train_loss[-5:]) < np.mean(r.train_loss[:5])
    rep = json.loads(metrics.read_text())
    assert rep["val_accuracy"] == runs["pretrained"].val_accuracy and rep["mlflow_run_id"]
    assert history.read_text().splitlines()[0].split("\t") == ["step", "loss_pretrained", "loss_random"]

    # Saved classifiers load back and predict exactly as before.
    clf, meta = load_classifier(runs["pretrained"].out_dir)
    assert meta["labels"] == ["left", "right"] and meta["task"] == "image"
    val = load_split(image_root, "image", "val")
    acc = clf.score([val], torch.device("cpu"))["accuracy"]  # the whole split as one batch
    assert acc == pytest.approx(runs["pretrained"].val_accuracy)

    out = tmp_path / "eval.json"
    report = evaluate_task(cfg, "image", metrics_path=out, plot_path=tmp_path / "cm.png", finetune_report=metrics)
    saved = json.loads(out.read_text())
    for k in ("accuracy", "baseline_accuracy", "probe_accuracy", "probe_baseline_accuracy"):
        assert 0.0 <= saved[k] <= 1.0
    assert saved["accuracy"] > 0.8 and saved["finetune_run_id"] == rep["mlflow_run_id"]
    assert (tmp_path / "cm.png").stat().st_size > 1000

    from mlflow.tracking import MlflowClient

    from d2v.tracking.mlflow_utils import tracking_uri

    run = MlflowClient(tracking_uri()).get_run(report["mlflow_run_id"])
    assert run.data.metrics["accuracy"] == pytest.approx(saved["accuracy"])
    assert run.data.params["task"] == "image"
    ft_run = MlflowClient(tracking_uri()).get_run(rep["mlflow_run_id"])
    assert ft_run.data.metrics["test_accuracy"] == pytest.approx(saved["accuracy"])
    assert ft_run.data.tags["init"] == "pretrained"


def test_same_budget_same_batches(image_root, tmp_path, capsys):
    """Both inits see the same batches: two runs from the same init are identical."""
    cfg = make_cfg(image_root, tmp_path, init="random", steps=5)
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        clf = Classifier(Data2Vec2(cfg.model), "image", 2)
        losses.append(ft.train_classifier(clf, cfg, "image", DistInfo(), progress=False))
    assert losses[0] == losses[1]
    # without a bar (a log: dvc repro, Prefect) a line per tenth of the steps, with its numbers
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("finetune: step ")]
    assert [x.split()[2] for x in lines] == ["1/5", "2/5", "3/5", "4/5", "5/5"] * 2
    assert f"loss {losses[0][-1]:.4f}" in lines[4] and "samples/s" in lines[4]


def test_batch_pool_norm_standardises_features_and_round_trips(image_root, tmp_path):
    """pool_norm='batch': per-feature standardisation in training (no affine), running statistics
    saved with the classifier, so a reloaded classifier predicts exactly as the trained one."""
    cfg = make_cfg(image_root, tmp_path, init="random", steps=15)
    train, test = load_split(image_root, "image", "train"), load_split(image_root, "image", "test")
    torch.manual_seed(0)
    clf = Classifier(Data2Vec2(cfg.model), "image", 2, pool_norm="batch")
    assert isinstance(clf.fc_norm, torch.nn.BatchNorm1d) and not clf.fc_norm.affine
    with torch.no_grad():
        z = clf.fc_norm(clf.features(train.source[:32]) * 50 + 7)  # scale and shift do not survive
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0, unbiased=False) - 1).abs().max() < 1e-2
    ft.train_classifier(clf, cfg, "image", DistInfo(), progress=False)
    assert int(clf.fc_norm.num_batches_tracked) > 15  # updated by training (and by the check above)
    before = clf.predict(test, torch.device("cpu"))
    out = save_classifier(clf, tmp_path / "clf", {"task": "image"})
    loaded, meta = load_classifier(out)
    assert meta["pool_norm"] == "batch" and isinstance(loaded.fc_norm, torch.nn.BatchNorm1d)
    assert torch.equal(loaded.predict(test, torch.device("cpu")), before)
    with pytest.raises(InputError, match="pool_norm"):
        Classifier(Data2Vec2(cfg.model), "image", 2, pool_norm="group")
    bad = make_cfg(image_root, tmp_path, init="random")
    bad.finetune.image.pool_norm = "group"
    with pytest.raises(Exception, match="finetune.image.pool_norm"):
        bad.validate()


def test_classifier_bad_input(tmp_path):
    with pytest.raises(InputError, match="not a classifier folder"):
        load_classifier(tmp_path / "nothing")
    clf = Classifier(Data2Vec2(build_cfg("image")), "image", 2)
    out = save_classifier(clf, tmp_path / "clf", {"task": "image"})
    (out / "weights.pt").write_bytes((out / "weights.pt").read_bytes()[:100])
    with pytest.raises(InputError, match="weights.pt"):
        load_classifier(out)
    with pytest.raises(InputError, match="no 'speech' encoder"):
        Classifier(Data2Vec2(build_cfg("image")), "speech", 2)


def test_classifier_folder_is_written_atomically(tmp_path, monkeypatch):
    """A failed write (here: a full disk at weights.pt) leaves the previous folder as it was and no
    temp folder beside it."""
    import errno

    import d2v.models.classifier_dir as cd

    clf = Classifier(Data2Vec2(build_cfg("image")), "image", 2)
    out = save_classifier(clf, tmp_path / "clf", {"task": "image", "labels": ["a", "b"]})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(obj, path):
        raise OSError(errno.ENOSPC, f"{path}: No space left on device")

    monkeypatch.setattr(cd, "save_torch", full)
    with pytest.raises(OSError, match="No space left on device"):
        save_classifier(Classifier(Data2Vec2(build_cfg("image")), "image", 2), out, {"task": "image"})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]
    loaded, meta = load_classifier(out)
    assert meta["labels"] == ["a", "b"]


def test_registry_moves_champion_only_on_improvement(tmp_path):
    from d2v.tracking import registry
    from d2v.tracking.mlflow_utils import Tracker

    cl = registry.client()
    name = f"test-clf-{tmp_path.name}"
    tr = Tracker("reg-test", {"a": 1})
    (tmp_path / "m.txt").write_text("model")
    tr.artifact(tmp_path / "m.txt", "classifier")
    tr.finish()
    source = f"{cl.get_run(tr.run_id).info.artifact_uri}/classifier"

    first = registry.register_version(cl, name, source, tr.run_id, "test_accuracy", 0.70)
    assert first.promoted and first.previous_champion is None
    worse = registry.register_version(cl, name, source, tr.run_id, "test_accuracy", 0.65)
    assert not worse.promoted and worse.previous_champion == first.version
    assert str(registry.champion(cl, name).version) == first.version
    same = registry.register_version(cl, name, source, tr.run_id, "test_accuracy", 0.70)
    assert not same.promoted  # a tie does not move the alias
    better = registry.register_version(cl, name, source, tr.run_id, "test_accuracy", 0.75)
    assert better.promoted and str(registry.champion(cl, name).version) == better.version
    assert cl.get_model_version(name, worse.version).tags["metric_value"] == repr(0.65)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from d2v.cli.main import main

    assert main(["finetune", "--task", "image", "finetune.image.steps=0"]) == 2
    assert "finetune.image.steps" in capsys.readouterr().err
    assert main(["evaluate", "--task", "image", f"finetune.out_dir={tmp_path}"]) == 2
    assert "not a classifier folder" in capsys.readouterr().err
    assert main(["register", "--reports", str(tmp_path)]) == 2
    assert "eval_image.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", "--task", "video"])
