"""Time to accuracy: data2vec 2.0 vs a baseline objective, one run per modality.

* ``--modality image`` (default): data2vec 2.0 vs MAE (and a data2vec 1.0-style step) on
  Fashion-MNIST, the tiny image ViT; probe: 10-way classification.
* ``--modality text``: data2vec 2.0 vs a BERT/RoBERTa-style masked-token objective on the tiny
  text encoder (``model.image=null model.speech=null train.modalities=[text]``). Pretraining rows
  come from *every* line of the text shards' training split (the unlabelled KJV + Wikipedia lines
  and the labelled Rotten-Tomatoes lines), the stored sentencepiece ids, arranged as the
  project's text pretraining does (``d2v.data.loaders.pack_text_blocks``: lines concatenated and
  cut into ``data.text_length`` blocks with ``<s>`` first, no padding; ``--text-rows lines``
  gives one ``<s>``-prefixed, right-padded row per line instead). Probe: Rotten-Tomatoes
  fresh/rotten, labelled training lines vs the labelled test lines.

The same tiny model (shared encoder code, ``d2v.models.baselines``), the same seed, the same
in-memory training rows and batch size; each objective pretrains for ``--budget`` seconds of
wall-clock *training* time, one after another in one process. Every ``--probe-every`` training
seconds (and at 0 and at the end) the clock is paused and the frozen, mean-pooled last-block
features are scored by a linear probe (``d2v.train.probe.linear_probe``: standardised logistic
regression; ``--probe-train`` train / ``--probe-test`` test samples).

Headline: the baseline's (MAE's / BERT's) time to reach its best probe accuracy divided by
data2vec 2.0's time to first reach that accuracy. When 2.0 never reaches it, the inverse
comparison is reported instead.

    python benchmarks/time_to_accuracy.py --budget 150 --probe-every 25 --threads 1 \
        --out reports/bench/time_to_accuracy.json --plot reports/bench/time_to_accuracy.png
    python benchmarks/time_to_accuracy.py --modality text --budget 120 --probe-every 20 --threads 1 \
        --out reports/bench/time_to_accuracy_text.json --plot reports/bench/time_to_accuracy_text.png
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import cpu_name  # noqa: E402

from d2v.config import load_config  # noqa: E402
from d2v.data.downstream import load_split  # noqa: E402
from d2v.data.loaders import eval_loader, pack_text_blocks  # noqa: E402
from d2v.data.shards import shard_urls  # noqa: E402
from d2v.data.tokenizer import BOS, PAD  # noqa: E402
from d2v.errors import InputError  # noqa: E402
from d2v.models.baselines import OBJECTIVES, backbone_of, objective  # noqa: E402
from d2v.models.heads import Classifier  # noqa: E402
from d2v.train.evaluate import extract  # noqa: E402
from d2v.train.probe import linear_probe  # noqa: E402

IMAGE_ONLY = ["model.speech=null", "model.text=null", "train.modalities=[image]"]
TEXT_ONLY = ["model.image=null", "model.speech=null", "train.modalities=[text]"]
ONLY = {"image": IMAGE_ONLY, "text": TEXT_ONLY}
DEFAULT_OBJECTIVES = {"image": ["data2vec2", "mae", "data2vec1"], "text": ["data2vec2", "bert"]}
BASELINE = {"image": "mae", "text": "bert"}
NOT_FOR = {"image": {"bert"}, "text": {"mae"}}  # image-only / text-only objectives
NUM_CLASSES = {"image": 10, "text": 2}


def probe(model, train, test, modality: str = "image") -> float:
    # Classifier drops the pretraining decoder of the encoder it wraps: give it a copy.
    clf = Classifier(copy.deepcopy(backbone_of(model)), modality, NUM_CLASSES[modality])
    dev = torch.device("cpu")
    xtr, xte = extract(clf, train, 256, dev), extract(clf, test, 256, dev)
    return linear_probe(xtr, train.label.numpy(), xte, test.label.numpy())


def load_text_rows(root, length: int, max_lines: int = 0, rows: str = "packed") -> tuple[torch.Tensor, int]:
    """Pretraining rows (N, length) of ids from *all* lines of the training shards (cls -1 included).

    ``packed``: as ``d2v.data.loaders`` builds text pretraining batches (consecutive lines'
    ids concatenated, cut into blocks of ``length`` with ``<s>`` first; no padding; the tail that
    does not fill a block is dropped). ``lines``: one row per line, ``<s>`` + ids cut at
    ``length``, right-padded with ``<pad>`` (as the downstream splits). Returns (rows, lines read).
    """
    lines: list[np.ndarray] = []
    for chunk in eval_loader(shard_urls(root, "text", "train"), 256, lambda s: s):
        for s in chunk:
            ids = np.asarray(s["ids.npy"], dtype=np.int64)
            if ids.size:
                lines.append(ids)
            if max_lines and len(lines) >= max_lines:
                break
        if max_lines and len(lines) >= max_lines:
            break
    if rows == "packed":
        blocks = [b["ids"] for b in pack_text_blocks(({"ids.npy": x} for x in lines), length)]
        if not blocks:
            raise InputError(f"{root}: {len(lines)} training lines are too few for one {length}-token block")
        return torch.from_numpy(np.stack(blocks)), len(lines)
    out = torch.full((len(lines), length), PAD, dtype=torch.long)
    for i, x in enumerate(lines):
        r = np.concatenate([[BOS], x])[:length]
        out[i, : len(r)] = torch.from_numpy(r)
    return out, len(lines)


def run_objective(name: str, overrides: list[str], pool: torch.Tensor, train, test, ns) -> dict:
    modality = ns.modality
    clones = ns.v1_clones if name == "data2vec1" else None
    cfg = load_config(overrides + ([f"model.clone_batch={clones}"] if clones else []))
    torch.manual_seed(cfg.seed)
    model = objective(name, cfg.model).train()
    opt = torch.optim.AdamW(model.param_groups(cfg.train.weight_decay), lr=ns.lr or cfg.train.lr,
                            betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    lr = ns.lr or cfg.train.lr
    g = torch.Generator().manual_seed(cfg.seed)
    bb = backbone_of(model)
    enc = bb.encoder(modality)
    T = enc.num_tokens(tuple(pool.shape))
    bs = ns.batch or cfg.train.batch_size

    points = [{"train_s": 0.0, "step": 0, "probe_acc": probe(model.eval(), train, test, modality), "loss": None}]
    model.train()
    print(f"  {name:<10} t={0.0:7.1f}s step={0:6d} probe={points[-1]['probe_acc']:.4f}", flush=True)
    train_s, step, next_probe, losses = 0.0, 0, ns.probe_every, []
    while train_s < ns.budget:
        t0 = time.perf_counter()
        idx = torch.randint(0, pool.shape[0], (bs,), generator=g)
        src = pool[idx]
        kw = {}
        if name == "mae":
            mask = model.make_mask(bs, T, generator=g)
        elif name == "bert":  # 15% of the real tokens; the 80/10/10 corruption is drawn in forward
            mask = model.select(src, generator=g)
            kw["generator"] = g
        else:
            mask = enc.make_mask(bs * cfg.model.clone_batch, T, torch.device("cpu"), g)
        for group in opt.param_groups:  # linear warm-up, then constant (the budget is open-ended)
            group["lr"] = lr * min(1.0, (step + 1) / ns.warmup_steps)
        out = model(src, modality, mask=mask, **kw)
        out.loss.backward()
        if cfg.train.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], cfg.train.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if name in ("data2vec2", "data2vec1"):  # MAE and BERT have no teacher to move
            model.update_teacher(step)
        losses.append(out.loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{name}: loss is {losses[-1]} at step {step}")
        train_s += time.perf_counter() - t0
        if train_s >= next_probe or train_s >= ns.budget:
            acc = probe(model.eval(), train, test, modality)
            model.train()
            loss = sum(losses[-20:]) / len(losses[-20:])
            points.append({"train_s": train_s, "step": step, "probe_acc": acc, "loss": loss})
            print(f"  {name:<10} t={train_s:7.1f}s step={step:6d} probe={acc:.4f} loss={loss:.4f}", flush=True)
            while next_probe <= train_s:
                next_probe += ns.probe_every
    best = max(points, key=lambda p: p["probe_acc"])
    masks = 1 if name in ("mae", "bert") else cfg.model.clone_batch
    return {"objective": name, "masks_per_sample": masks, "batch": bs, "steps": step,
            "steps_per_s": step / train_s, "best_acc": best["probe_acc"], "time_to_best_s": best["train_s"],
            "points": points}


def first_time_reaching(points: list[dict], acc: float) -> float | None:
    for p in points:
        if p["probe_acc"] >= acc:
            return p["train_s"]
    return None


def headline(res: dict[str, dict], base: str = "mae", ours: str = "data2vec2") -> dict:
    if base not in res or ours not in res:
        return {}
    b, o = res[base], res[ours]
    h: dict = {"baseline": base, "baseline_best_acc": b["best_acc"], "baseline_time_to_best_s": b["time_to_best_s"],
               "ours_best_acc": o["best_acc"]}
    t = first_time_reaching(o["points"], b["best_acc"])
    h["ours_time_to_baseline_best_s"] = t
    if t is not None and t > 0:
        h["ratio"] = b["time_to_best_s"] / t
        h["text"] = (f"{base} reaches its best probe accuracy {b['best_acc']:.4f} after {b['time_to_best_s']:.0f} s; "
                     f"{ours} reaches it after {t:.0f} s: {h['ratio']:.2f}x")
    elif t == 0:
        h["ratio"] = None
        h["text"] = f"{base}'s best ({b['best_acc']:.4f}) is not above the random-init probe: no ratio"
    else:
        h["ratio"] = None
        tb = first_time_reaching(b["points"], o["best_acc"])
        h["inverse_baseline_time_to_ours_best_s"] = tb
        h["inverse_ours_time_to_best_s"] = o["time_to_best_s"]
        init = " = its random-init probe" if o["time_to_best_s"] == 0 else ""
        h["text"] = (f"{ours} never reaches {base}'s best {b['best_acc']:.4f} within the budget (its best: "
                     f"{o['best_acc']:.4f} at {o['time_to_best_s']:.0f} s{init}); {base} reaches {ours}'s best after "
                     + (f"{tb:.0f} s" if tb is not None else "never"))
    return h


def plot(res: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in res.items():
        ax.plot([p["train_s"] for p in r["points"]], [p["probe_acc"] for p in r["points"]], marker="o", label=name)
    ax.set_xlabel("pretraining wall-clock seconds (probe time excluded)")
    ax.set_ylabel("linear probe accuracy (frozen, mean-pooled)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=tiny)")
    p.add_argument("--modality", choices=("image", "text"), default="image")
    p.add_argument("--objectives", nargs="+", default=None, choices=OBJECTIVES,
                   help="default: data2vec2 mae data2vec1 (image) | data2vec2 bert (text)")
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per objective")
    p.add_argument("--probe-every", type=float, default=20.0, help="training seconds between probes")
    p.add_argument("--batch", type=int, default=0, help="samples per step (0: train.batch_size)")
    p.add_argument("--lr", type=float, default=0.0, help="peak lr (0: train.lr)")
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--v1-clones", type=int, default=1, help="masked copies per sample for data2vec1 (1.0 used 1)")
    p.add_argument("--pretrain-n", type=int, default=None,
                   help="image: training images for pretraining (default 10000); "
                        "text: training lines read, labelled or not (default 0 = all)")
    p.add_argument("--text-rows", choices=("packed", "lines"), default="packed",
                   help="text pretraining rows: packed blocks (as d2v.data.loaders) or one padded row per line")
    p.add_argument("--probe-train", type=int, default=None, help="default 3000 (image) | 8000 (text)")
    p.add_argument("--probe-test", type=int, default=2000)
    p.add_argument("--root", default=None, help="data root holding shards/<modality> (default: data.root)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("reports/bench/time_to_accuracy.json"))
    p.add_argument("--plot", type=Path, default=Path("reports/bench/time_to_accuracy.png"))
    ns = p.parse_intermixed_args(argv)
    mod = ns.modality
    ns.objectives = ns.objectives or DEFAULT_OBJECTIVES[mod]
    bad = [o for o in ns.objectives if o in NOT_FOR[mod]]
    if bad:
        p.error(f"objective(s) {', '.join(bad)} cannot run on {mod}")
    if ns.pretrain_n is None:
        ns.pretrain_n = 10000 if mod == "image" else 0
    if ns.probe_train is None:
        ns.probe_train = 3000 if mod == "image" else 8000
    overrides = (ns.overrides or ["experiment=tiny"]) + ONLY[mod]
    if ns.threads:
        torch.set_num_threads(ns.threads)
    cfg = load_config(overrides)
    root = ns.root or cfg.data.root
    t0 = time.perf_counter()
    extra: dict = {}
    if mod == "image":
        n_load = max(ns.pretrain_n, ns.probe_train)
        train_all = load_split(root, "image", "train", n_load, image_size=cfg.model.image.input_size,
                               in_chans=cfg.model.image.in_chans)
        test = load_split(root, "image", "test", ns.probe_test, image_size=cfg.model.image.input_size,
                          in_chans=cfg.model.image.in_chans)
        pool = train_all.source[: ns.pretrain_n]
        probe_train = copy.copy(train_all)
        probe_train.source, probe_train.label = train_all.source[: ns.probe_train], train_all.label[: ns.probe_train]
        extra["pretrain_images"] = int(pool.shape[0])
        print(f"loaded {len(train_all)} train / {len(test)} test images in {time.perf_counter() - t0:.1f} s", flush=True)
    else:
        L = cfg.data.text_length
        pool, n_lines = load_text_rows(root, L, ns.pretrain_n, ns.text_rows)
        probe_train = load_split(root, "text", "train", ns.probe_train, text_length=L)
        test = load_split(root, "text", "test", ns.probe_test, text_length=L)
        extra.update(pretrain_lines=n_lines, pretrain_rows=int(pool.shape[0]), text_rows=ns.text_rows,
                     text_length=L, pretrain_tokens=int(pool.ne(PAD).sum()))
        print(f"loaded {n_lines} training lines -> {pool.shape[0]} {ns.text_rows} rows of {L} ids; probe "
              f"{len(probe_train)} train / {len(test)} test labelled lines in {time.perf_counter() - t0:.1f} s",
              flush=True)

    res = {}
    for name in ns.objectives:
        res[name] = run_objective(name, overrides, pool, probe_train, test, ns)
    base = BASELINE[mod]
    head = headline(res, base=base)
    head_v1 = headline(res, base="data2vec1") if "data2vec1" in res else {}

    report = {
        "command": "python benchmarks/time_to_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "device": "cpu"},
        "torch": torch.__version__, "modality": mod, "overrides": overrides, "budget_s": ns.budget,
        "probe_every_s": ns.probe_every, **extra, "probe_train": len(probe_train), "probe_test": len(test),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "headline": head, f"headline_vs_{base}": head, "headline_vs_data2vec1": head_v1,
        "results": list(res.values()),
    }
    print(f"{'objective':<10} {'M':>2} {'steps':>6} {'steps/s':>8} {'best acc':>9} {'at s':>7}   probe acc by training seconds")
    for r in res.values():
        curve = " ".join(f"{p['train_s']:.0f}:{p['probe_acc']:.3f}" for p in r["points"])
        print(f"{r['objective']:<10} {r['masks_per_sample']:>2} {r['steps']:>6} {r['steps_per_s']:>8.2f} {r['best_acc']:>9.4f} "
              f"{r['time_to_best_s']:>7.0f}   {curve}")
    for h in (head, head_v1):
        if h:
            print("headline: " + h["text"])
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(report, indent=2))
    what = "Fashion-MNIST, tiny ViT" if mod == "image" else "Rotten Tomatoes fresh/rotten, tiny text encoder"
    plot(res, ns.plot, f"{what}, {ns.budget:.0f} s each, {cpu_name()} x{torch.get_num_threads()} thread")
    print(f"wrote {ns.out} and {ns.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
