"""A full-scale dry run: the released base models and fine-tuning recipes through every stage, on CPU.

For each modality, ``experiment=<m>_base`` (conf/experiment: the released ``image_base`` ViT-B/16,
``speech_base`` and ``text_base`` model and pretraining configs, with the full-scale fine-tuning
recipes of conf/finetune/base.yaml) runs the pipeline's own stage commands, read from dvc.yaml, in
a fresh working folder: download -> validate -> (tokenizer) -> shard -> pretrain (2 steps) ->
finetune (2 steps per init) -> evaluate -> register (a fresh MLflow store and registry).

The data are a few real files that the test writes, in the layouts the full-scale sources read:

* image: an ImageNet folder (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``, one of them greyscale,
  as ImageNet has) read by ``data.image.dataset=imagenet_folder``;
* speech: an extracted LibriSpeech folder (``LibriSpeech/<subset>/<speaker>/<chapter>/*.flac`` and
  ``*.trans.txt``), as a user who already has it, read in place by ``data.speech.dataset=librispeech``
  with ``data.speech.folder`` (nothing downloaded); the speech task is the recipe's letter CTC;
* text: a text folder (an unlabelled ``.txt`` corpus and a labelled ``.jsonl`` file) read by
  ``data.text.dataset=text_files``.

The MODEL configs stay the released ones, and the test checks that the checkpoint and the
fine-tuned classifiers really are them (so a silent fall-back to the tiny model fails it) and that
the fine-tuning recipe reaches the classifiers. What changes, each noted where it is set: budgets
(steps, batch sizes, warm-up, evaluation and probe sizes, no resumable fine-tuning checkpoints),
the speech recipe's 35 s padding (3 s) and its frozen-encoder updates (1 of the 2 steps), the text
recipe's 512-token padding (64), and the tokenizer's vocabulary (200 pieces for a 380-line corpus).

Everything is written under the test's tmp_path (the stages run there, as in the project root);
the large weight files (GBs per modality) are deleted at the end. About 2-2.5 minutes per modality
on an idle 2-core machine, most of it fixed costs: nine processes importing torch, MLflow, Great
Expectations; GBs of weights written; a base model built and loaded several times.
"""

from __future__ import annotations

import csv
import json
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from PIL import Image

from d2v.config import PROJECT_ROOT, compose_dict

BIN = Path(sys.executable).parent
# Base-model weights, written as the pipeline writes them: the checkpoint (weights + EMA teacher +
# AdamW state, 1.4 GB image .. 1.9 GB text) and its MLflow copy, two classifiers and their copies,
# the registered encoder; deleted when the test ends.
DISK_NEEDED = 9e9
SR = 16000
MODALITIES = ("image", "speech", "text")

# Budgets that make a full-scale recipe a dry run; nothing here is a model setting.
BUDGET = [
    "train.max_steps=2", "train.batch_size=1", "train.warmup_steps=1",
    "train.probe_every=0",  # the released train configs have it off; conf/pipeline.yaml turns it on
]


def task_budget(task: str) -> list[str]:
    return [f"finetune.tasks=[{task}]", f"finetune.{task}.steps=2", f"finetune.{task}.batch_size=2",
            f"finetune.{task}.warmup_steps=1", f"finetune.{task}.eval_batch_size=2", f"finetune.{task}.max_eval=2",
            f"finetune.{task}.probe_max_train=8",
            # the recipe's resumable checkpoints (every 1000 steps and at the end: model + AdamW
            # state, 1 GB per init for ViT-B) would only add GBs of writes; resuming is tested in
            # tests/test_finetune_scale.py
            "finetune.ckpt_every=0"]


# --------------------------------------------------------------------------------------- the data
IMAGENET_CLASSES = {"n01440764": (200, 60, 40), "n02102040": (40, 160, 60), "n03000684": (50, 70, 200)}


def write_imagenet(folder: Path) -> dict[str, int]:
    """``train/<wnid>/<wnid>_<n>.JPEG`` (4 per class) and ``val/<wnid>/ILSVRC2012_val_*.JPEG`` (2 per
    class): varied sizes and aspect ratios, one greyscale JPEG, as ImageNet has."""
    rng = np.random.default_rng(0)
    n_val = 0
    for ci, (wnid, colour) in enumerate(IMAGENET_CLASSES.items()):
        for split, count in (("train", 4), ("val", 2)):
            d = folder / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = int(rng.integers(60, 140)), int(rng.integers(60, 140))
                yy, xx = np.mgrid[0:h, 0:w]
                stripes = (np.sin((xx * (ci + 1) + yy * (2 - ci)) / 6.0) > 0)[..., None]
                img = np.clip(np.where(stripes, colour, 255 - np.array(colour)) + rng.normal(0, 20, (h, w, 3)), 0, 255)
                im = Image.fromarray(img.astype(np.uint8))
                if split == "train" and ci == 1 and i == 0:
                    im = im.convert("L")
                if split == "val":
                    n_val += 1
                    name = f"ILSVRC2012_val_{n_val:08d}.JPEG"
                else:
                    name = f"{wnid}_{1000 + i}.JPEG"
                im.save(d / name, quality=90)
    return {"train": 12, "val": 3, "test": 3}  # the official val set is halved into val and test


# Words the CTC head spells (its letters are blank | ' A-Z); each test transcript also occurs in training.
PHRASES = ["YES", "NO", "GO UP", "STOP NOW", "TURN LEFT", "IT'S ON"]
LIBRISPEECH = {  # subset -> {(speaker, chapter): [phrase index per utterance]}
    "train-clean-100": {("103", "1240"): [0, 1, 2, 3], ("1088", "134315"): [4, 5, 0, 1]},
    "dev-clean": {("84", "121123"): [2, 3]},
    "test-clean": {("1089", "134686"): [0, 4]},
}


def utterance(text: str, seed: int) -> np.ndarray:
    """A speech-like clip, 1.0-2.0 s at 16 kHz: per letter a voiced segment (harmonics of a gliding
    pitch, two formant-like peaks) with an amplitude envelope, short pauses between words, noise."""
    rng = np.random.default_rng(seed)
    seconds = min(2.0, max(1.0, 0.12 * len(text) + 0.4))
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = 110 + 40 * rng.random() + 20 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    formants = rng.uniform(300, 2500, size=len(text))
    seg = np.minimum((t / seconds * len(text)).astype(int), len(text) - 1)
    bright = np.sin(2 * np.pi * formants[seg] * t)
    env = np.where(np.array([c == " " for c in text])[seg], 0.05, 1.0) * np.sin(np.pi * (t * len(text) / seconds % 1.0))
    x = env * (0.6 * voiced + 0.3 * bright * voiced) + 0.01 * rng.standard_normal(n)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def write_librispeech(ls: Path) -> dict[str, int]:
    """An extracted ``LibriSpeech`` folder (``<subset>/<speaker>/<chapter>/``), as openslr's archives unpack."""
    counts = {"train": 0, "val": 0, "test": 0}
    split = {"train-clean-100": "train", "dev-clean": "val", "test-clean": "test"}
    for subset, chapters in LIBRISPEECH.items():
        for (spk, ch), phrases in chapters.items():
            d = ls / subset / spk / ch
            d.mkdir(parents=True)
            lines = []
            for i, p in enumerate(phrases):
                utt = f"{spk}-{ch}-{i:04d}"
                sf.write(d / f"{utt}.flac", utterance(PHRASES[p], int(spk) * 100 + i), SR,
                         format="FLAC", subtype="PCM_16")
                lines.append(f"{utt} {PHRASES[p]}")
                counts[split[subset]] += 1
            (d / f"{spk}-{ch}.trans.txt").write_text("\n".join(lines) + "\n")
    for name in ("LICENSE.TXT", "README.TXT"):
        (ls / name).write_text("LibriSpeech ASR corpus (test stand-in)\n")
    return counts


WORDS = ("the of and a to in is was he for it with as his on be at by had are but from or have an they which one "
         "you were her all she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still own see "
         "men work long get here between both life being under never day same another know while last might us great "
         "old year off come since against go came right used take three").split()
GOOD = "a warm funny moving film with a great cast and a clever story".split()
BAD = "a dull tiresome clumsy film with a weak cast and a muddled story".split()


def write_text_folder(folder: Path) -> int:
    """``books/corpus.txt``: 300 unlabelled lines (pretraining); ``reviews.jsonl``: 80 labelled
    ``{"text", "label"}`` records (fresh/rotten, the task)."""
    rng = np.random.default_rng(0)
    (folder / "books").mkdir(parents=True)
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 30)))).capitalize() + "." for _ in range(300)]
    (folder / "books" / "corpus.txt").write_text("\n".join(lines) + "\n")
    records = []
    for i in range(80):
        words, label = (GOOD, "fresh") if i % 2 == 0 else (BAD, "rotten")
        text = " ".join(rng.choice(words, size=int(rng.integers(6, 14)))) + f" review {i}"
        records.append(json.dumps({"text": text, "label": label}))
    (folder / "reviews.jsonl").write_text("\n".join(records) + "\n")
    return 380


# ------------------------------------------------------------------------------ the experiment
def overrides(task: str, tmp: Path) -> list[str]:
    """``experiment=<task>_base``, the data sources of the files written above, and the budgets."""
    if task == "image":
        data = ["data.image.dataset=imagenet_folder", f"data.image.folder={tmp / 'imagenet'}"]
    elif task == "speech":
        data = ["data.speech.dataset=librispeech",  # subsets: train-clean-100, dev-clean, test-clean
                f"data.speech.folder={tmp / 'LibriSpeech'}",
                # The recipe pads every training clip to 35 s (LibriSpeech's longest): 1750 frames
                # through the 12 blocks, ~1.5 TFLOP per clip and step: about a minute per step at
                # batch 2 on two cores.
                # These clips are at most 2 s; 3 s keeps them whole (CTC refuses cropped clips).
                "finetune.speech.audio_seconds=3.0",
                # the recipe trains only the letter layer for the first 10k of its 20k updates; here
                # the first of the two steps (the encoder is unfrozen for the second)
                "finetune.speech.freeze_updates=1"]
    else:
        data = ["data.text.dataset=text_files", f"data.text.folder={tmp / 'text'}",
                # sentencepiece refuses a 4000-piece vocabulary for a 380-line corpus; the model's
                # embedding table stays the released 50,265 entries (ids beyond the tokenizer's unused)
                "data.tokenizer.vocab_size=200",
                # The recipe pads every sentence to 512 tokens (RoBERTa's limit): 8x the compute of
                # 64 for lines of at most ~60 tokens, over a minute of this test's CPU time.
                "finetune.text.text_length=64",
                # and pretraining packs 512-token blocks (tokens_per_sample): 64 here, for the same reason
                "data.text_length=64"]
    return [f"experiment={task}_base", *data, *BUDGET, *task_budget(task)]


def stage_commands(task: str) -> list[tuple[str, list[str]]]:
    """The commands of dvc.yaml's stages for one modality, in pipeline order (the report stage,
    which summarises all three tasks, excluded)."""
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    out = []
    for name, spec in stages.items():
        if "foreach" in spec:
            if task not in spec["foreach"]:  # a list of modalities, or a dict keyed by them
                continue
            cmd = spec["do"]["cmd"].replace("${item}", task).replace("${key}", task)
            name = f"{name}@{task}"
        elif (name == "tokenizer" and task != "text") or name == "report":
            continue
        else:
            cmd = spec["cmd"]
        argv = shlex.split(cmd)
        assert argv[0] == "d2v", cmd
        out.append((name, [str(BIN / "d2v"), *argv[1:]]))
    return out


def run(name: str, cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run one stage, its output kept in ``logs/<name>.log``; (wall seconds, CPU seconds of its process)."""
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    seconds, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    (cwd / "logs").mkdir(exist_ok=True)
    (cwd / "logs" / f"{name}.log").write_text(f"$ {shlex.join(cmd)}\n{r.stdout}\n--- stderr\n{r.stderr}")
    assert r.returncode == 0, (f"{' '.join(cmd)} failed (exit {r.returncode}, {seconds:.0f} s):\n"
                               f"--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}")
    return seconds, (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)


def assert_released(released: dict, got: dict, where: str) -> None:
    """Every key the released config sets has its released value in ``got`` (which may add defaults)."""
    for k, v in released.items():
        assert k in got, f"{where}.{k} missing"
        if isinstance(v, dict):
            assert_released(v, got[k], f"{where}.{k}")
        else:
            assert got[k] == v or (isinstance(v, float) and math.isclose(got[k], v)), \
                f"{where}.{k} = {got[k]!r}, released {v!r}"


def in_unit(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def score_ok(task: str, x) -> bool:
    """A task score: an accuracy in [0, 1]; for letter CTC 1 - WER, which insertions can take below 0."""
    return isinstance(x, float) and (x <= 1.0 and math.isfinite(x) if task == "speech" else 0.0 <= x <= 1.0)


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    # The weights (checkpoint 1.4-2 GB, classifiers, their MLflow copies): GBs per modality, and
    # pytest keeps the last runs' tmp_path folders. The reports and logs stay for a look.
    shutil.rmtree(tmp_path / "mlartifacts", ignore_errors=True)
    for p in list(tmp_path.rglob("*.pt")):
        p.unlink(missing_ok=True)


# All three run in CI (idle 2-core machine: image ~2.5 min, speech ~2.7 min, text ~2.5 min).
@pytest.mark.slow
@pytest.mark.parametrize("task", ["image", "speech", "text"])
def test_full_scale_dry_run(task: str, workdir: Path):
    tmp = workdir
    free = shutil.disk_usage(tmp).free
    if free < DISK_NEEDED:
        pytest.skip(f"{tmp}: {free / 1e9:.1f} GB free, the dry run writes up to {DISK_NEEDED / 1e9:.0f} GB")
    if task == "image":
        expected = write_imagenet(tmp / "imagenet")
    elif task == "speech":
        expected = write_librispeech(tmp / "LibriSpeech")
    else:
        n_text = write_text_folder(tmp / "text")
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db",
               DVC_NO_ANALYTICS="1", DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true")

    # params.yaml as DVC composes it (conf/pipeline.yaml + the experiment), then the stages' commands
    ov = overrides(task, tmp)
    times = {"compose": run("compose", [str(BIN / "d2v"), "compose", "--config-name", "pipeline", *ov,
                                        "--out", "params.yaml"], tmp, env)}
    params = yaml.safe_load((tmp / "params.yaml").read_text())
    released = compose_dict([f"experiment={task}_base"], config_name="pipeline")
    assert params["model"] == released["model"]  # the released model config, untouched
    for key in ("image", "speech", "text"):
        assert params["finetune"][key] == released["finetune"][key] or key == task
    commands = stage_commands(task)
    names = [n for n, _ in commands]
    assert names == [f"download@{task}", f"validate@{task}", *(["tokenizer"] if task == "text" else []),
                     f"shard@{task}", "pretrain", f"finetune@{task}", f"evaluate@{task}", "register"], names
    for name, cmd in commands:
        times[name] = run(name, cmd, tmp, env)
    print(f"{task}: stage seconds (wall/CPU) " + ", ".join(f"{k} {w:.0f}/{c:.0f}" for k, (w, c) in times.items()))
    (tmp / "stage_seconds.json").write_text(json.dumps(times, indent=2))

    # ---- data: manifests, validation, shards
    down = json.loads((tmp / f"reports/data/download_{task}.json").read_text())
    if task == "text":
        assert sum(down["counts"].values()) == n_text and down["labelled"] is True, down
    else:
        assert down["counts"] == expected and down["quarantined"] == 0, down
    assert down["dataset"] == {"image": "imagenet_folder", "speech": "librispeech", "text": "text_files"}[task]
    if task == "speech":
        assert down["skipped"] is False and not (tmp / "data/raw/speech/downloads").exists()  # read, not fetched
    assert json.loads((tmp / f"reports/validation/{task}.json").read_text())["success"] is True
    summary = json.loads((tmp / f"data/shards/{task}/summary.json").read_text())
    assert {s: v["samples"] for s, v in summary["splits"].items()} == down["counts"], summary
    for split in ("train", "val", "test"):
        assert sorted((tmp / f"data/shards/{task}").glob(f"{split}-*.tar")), split
    labels = {"image": sorted(IMAGENET_CLASSES), "speech": sorted(set(PHRASES)), "text": ["fresh", "rotten"]}[task]
    assert summary["labels"] == labels
    if task == "text":
        tok = json.loads((tmp / "models/tokenizer/tokenizer.json").read_text())
        assert tok["vocab_size"] == 200, tok

    # ---- pretraining: 2 steps of the released model, and the checkpoint is that model
    import torch

    pre = json.loads((tmp / "reports/metrics/pretrain.json").read_text())
    assert pre["steps"] == 2 and pre["mlflow_run_id"], pre
    assert all(math.isfinite(pre[k][task]) for k in ("first_loss", "final_loss")), pre
    with open(tmp / "reports/plots/pretrain_loss.tsv", newline="") as f:
        assert len(list(csv.reader(f, delimiter="\t"))) == 3  # a header and the two steps
    ckpt = torch.load(tmp / "models/pretrain/checkpoint.pt", map_location="cpu", weights_only=True, mmap=True)
    assert ckpt["step"] == 2
    model_cfg = ckpt["config"]["model"]
    assert_released(released["model"], model_cfg, "checkpoint model")
    assert model_cfg["embed_dim"] == 768 and model_cfg["num_heads"] == 12
    assert model_cfg["depth"] + (model_cfg[task].get("prenet_depth") or 0) == 12  # ViT-B: 2 prenet + 10 blocks
    assert [m for m in ("image", "speech", "text") if model_cfg.get(m)] == [task]
    n_params = sum(t.numel() for k, t in ckpt["model"].items() if t.is_floating_point())
    assert n_params > 150e6, n_params  # student + EMA teacher of a ~90-125 M-parameter base model
    del ckpt

    # ---- fine-tuning: the recipe's head on the pretrained and on a random encoder, both base-sized
    ft = json.loads((tmp / f"reports/metrics/finetune_{task}.json").read_text())
    changed = {o.split("=", 1)[0].rsplit(".", 1)[1] for o in ov if o.startswith(f"finetune.{task}.")}
    recipe = {k: v for k, v in released["finetune"][task].items() if k not in changed}  # the rest is the recipe
    assert {"lr", "weight_decay", "betas", "layer_decay"} <= set(recipe), recipe
    assert ft["train_samples_seen"] == 4, ft
    assert score_ok(task, ft["val_accuracy"]) and score_ok(task, ft["baseline_val_accuracy"]), ft
    assert ft["mlflow_run_id"] and ft["baseline_mlflow_run_id"], ft
    for init in ("pretrained", "random"):
        d = tmp / f"models/finetune/{task}/{init}"
        meta = json.loads((d / "config.json").read_text())
        assert (d / "weights.pt").stat().st_size > 300e6, init  # a base encoder's fp32 weights
        assert_released(released["model"], meta["model"], f"{init} classifier model")
        assert meta["task_config"]["head"] == ("ctc" if task == "speech" else "classify")
        assert_released(recipe, meta["task_config"], f"finetune.{task}")  # lr, weight decay, layer decay ...

    # ---- evaluation: test scores and linear probes, pretrained against random init
    ev = json.loads((tmp / f"reports/metrics/eval_{task}.json").read_text())
    for k in ("accuracy", "baseline_accuracy"):
        assert score_ok(task, ev[k]), (k, ev)
    for k in ("probe_accuracy", "probe_baseline_accuracy"):
        assert in_unit(ev[k]), (k, ev)
    assert ev["split"] == "test" and ev["eval_samples"] == 2 and ev["probe_train_samples"] == 8, ev
    assert ev["mlflow_run_id"] and ev["finetune_run_id"] == ft["mlflow_run_id"], ev
    if task == "speech":  # letter CTC: accuracy = 1 - WER, with the character error rate
        assert ev["wer"] >= 0 and ev["cer"] >= 0 and ev["accuracy"] == pytest.approx(1 - ev["wer"]), ev
    else:
        assert (tmp / f"reports/plots/eval_{task}_confusion.png").stat().st_size > 0

    # ---- register: encoder and classifier, both champions of a fresh registry
    from mlflow.tracking import MlflowClient

    reg = json.loads((tmp / "reports/metrics/register.json").read_text())["registrations"]
    assert {r["name"]: r["promoted"] for r in reg} == {"d2v-encoder": True, f"d2v-{task}-classifier": True}, reg
    assert {r["name"]: r["value"] for r in reg} == {"d2v-encoder": ev["probe_accuracy"],
                                                      f"d2v-{task}-classifier": ev["accuracy"]}
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db", registry_uri=f"sqlite:///{tmp}/mlflow.db")
    for r in reg:
        mv = client.get_model_version_by_alias(r["name"], "champion")
        assert str(mv.version) == r["version"] == "1" and mv.tags["metric_value"] == repr(r["value"]), (r, mv)
    enc = next(r for r in reg if r["name"] == "d2v-encoder")
    assert enc["source"].startswith(f"runs:/{pre['mlflow_run_id']}/"), enc
