"""data2vec 2.0 (``d2v pretrain``) against the real facebookresearch/mae code: time to accuracy on Fashion-MNIST.

Issue 16 item 4. Both pretrain the same encoder size (ViT D=``--embed-dim``, 128 or 64, 4 blocks, 4 heads, patch 4 on
28x28) for ``--budget`` training seconds on the 55,000 training images of the pipeline's shards,
one after the other in one process, and both are scored by the same probe on a fixed time grid
(every ``--probe-minutes`` of training, probe time excluded): :func:`d2v.train.probe.linear_probe`,
a standardised logistic regression on mean-pooled last-block features, fit on the first
``--probe-train`` training images (10,000; 0: all 55,000, about 90 s of feature extraction per
probe on 2 CPU threads) and scored on the 10,000 test images (``--probe-split val`` to choose
settings on the validation split instead).

* **MAE**: ``models_mae.MaskedAutoencoderViT`` and ``util.lr_sched.adjust_learning_rate`` imported
  from a checkout of https://github.com/facebookresearch/mae (``--mae-repo``; it needs ``timm``:
  ``pip install --no-deps -r benchmarks/requirements-mae.txt``), with its own recipe
  (``main_pretrain.py`` / ``engine_pretrain.py``): batch 256, lr 1e-3 (blr 1e-3 x 256/256), AdamW
  betas (0.9, 0.95), weight decay 0.05 without norms and biases (timm's param groups), mask 0.75,
  ``--norm_pix_loss``, 10% warm-up (40 of 400 epochs) then a half cosine, spread over the budget,
  RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip; a decoder 64 wide, 1 block (``--mae-decoder-dim``,
  ``--mae-decoder-depth``: MAE's better choice here than 128 x 2). The grey image is repeated to 3
  channels (MAE's patchify assumes RGB, as an ImageFolder would load it). Two compatibility shims,
  nothing else: timm >= 0.6's ``Block`` has no ``qk_scale`` argument (always None in MAE), and
  numpy >= 1.24 has no ``np.float`` (used by ``util/pos_embed.py``). Features: the encoder's output
  (``forward_encoder`` with mask ratio 0, after its final norm) without the cls token, mean-pooled.
* **data2vec 2.0**: one ``d2v pretrain`` run, image only, ``model.embed_dim`` and the defaults
  a user gets otherwise (``experiment=tiny``); ``train.max_minutes`` spreads its schedule over the
  budget; ``train.probe_every_minutes`` + ``train.probe_split=test`` give the same probe grid.

Headline: MAE's accuracy at the end of its budget, and the training seconds data2vec 2.0 needs to
first reach it (``first_time_reaching``): the ratio MAE budget / that time. Medians over ``--seeds``.

Because the paper's 16x is on fine-tuning accuracy, the encoders at ``--finetune-minutes`` of training
(the probe points nearest them) are also scored by a **short fine-tune**, the same for both sides
(:func:`short_finetune`, ``FINETUNE_RECIPE``): the whole encoder plus a LayerNorm + linear head on the
mean-pooled last-block features (MAE's ``global_pool`` head), AdamW, 10% warm-up then cosine, no
augmentation, one seeded batch order, scored on the same test images; the same ratio follows from it.

    python benchmarks/vs_mae.py --mae-repo ~/src/mae --budget 720 --probe-minutes 1.5 --seeds 1 2 3 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import importlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import cpu_name  # noqa: E402
from time_to_accuracy import IMAGE_ONLY, SCHEDULE_STEPS, first_time_reaching  # noqa: E402

from d2v.config import load_config  # noqa: E402
from d2v.data.downstream import LabelledSplit, load_task_data  # noqa: E402
from d2v.models import Data2Vec2  # noqa: E402
from d2v.train.pretrain import pretrain  # noqa: E402
from d2v.train.probe import OnlineProbe, linear_probe  # noqa: E402


def encoder(embed_dim: int) -> list[str]:
    """The encoder both sides train: ViT D=``embed_dim``, 4 blocks, 4 heads, patch 4."""
    return [f"model.embed_dim={embed_dim}", "model.depth=4", "model.num_heads=4"]


MAE_RECIPE = {"batch": 256, "lr": 1e-3, "min_lr": 0.0, "weight_decay": 0.05, "mask_ratio": 0.75,
              "epochs": 400, "warmup_epochs": 40, "norm_pix_loss": True}


def import_mae(repo: Path):
    """``models_mae`` and ``util.lr_sched`` from a facebookresearch/mae checkout, with the two shims."""
    if not (repo / "models_mae.py").is_file():
        raise SystemExit(f"--mae-repo {repo}: no models_mae.py there (a checkout of facebookresearch/mae)")
    try:
        import timm.models.vision_transformer as vit
    except ImportError:
        raise SystemExit("the MAE code needs timm: pip install --no-deps -r benchmarks/requirements-mae.txt") from None
    if "qk_scale" not in vit.Block.__init__.__code__.co_varnames:
        class Block(vit.Block):  # MAE passes qk_scale=None (timm 0.3.2); later timm dropped the argument
            def __init__(self, *args, qk_scale=None, **kwargs):
                super().__init__(*args, **kwargs)
        vit.Block = Block
    if not hasattr(np, "float"):
        np.float = float  # util/pos_embed.py: np.arange(..., dtype=np.float), removed in numpy 1.24
    sys.path.insert(0, str(repo))
    return importlib.import_module("models_mae"), importlib.import_module("util.lr_sched")


# The short fine-tune both sides' checkpoints get (issue 16: the paper's 16x is on fine-tuning accuracy).
# No layer decay, drop path, MixUp or augmentation: a common minimal recipe, not either method's own.
FINETUNE_RECIPE = {"steps": 300, "batch": 128, "lr": 1e-3, "weight_decay": 0.05, "warmup_fraction": 0.1}


class PooledClassifier(torch.nn.Module):
    """``head(norm(mean-pooled last-block features))``: MAE's ``global_pool`` + ``fc_norm`` head."""

    def __init__(self, encoder: torch.nn.Module, pooled, dim: int, classes: int):
        super().__init__()
        self.encoder, self.pooled = encoder, pooled
        self.norm, self.head = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.pooled(self.encoder, x)))


def short_finetune(encoder: torch.nn.Module, pooled, dim: int, train: LabelledSplit, test: LabelledSplit,
                   steps: int, seed: int) -> float:
    """Test accuracy after fine-tuning ``encoder`` and a new head for ``steps`` steps of ``FINETUNE_RECIPE``.

    The same head initialisation and batch order for every encoder of one seed; the encoder in eval
    mode (no dropout or layerdrop) with gradients on. Parameters never reached (MAE's decoder,
    data2vec 2.0's decoder and other modalities) get no gradient, so AdamW leaves them alone.
    """
    r = FINETUNE_RECIPE
    torch.manual_seed(seed)
    model = PooledClassifier(encoder, pooled, dim, int(train.label.max()) + 1).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": r["weight_decay"]},
                             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=r["lr"])
    warm = max(1, int(r["warmup_fraction"] * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))))
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(train), generator=gen), 0
    with torch.enable_grad():
        for _ in range(steps):
            if pos + r["batch"] > len(order):
                order, pos = torch.randperm(len(train), generator=gen), 0
            idx = order[pos : pos + r["batch"]]
            pos += r["batch"]
            loss = torch.nn.functional.cross_entropy(model(train.source[idx]), train.label[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
    with torch.no_grad():
        pred = torch.cat([model(test.source[i : i + 1024]).argmax(1) for i in range(0, len(test), 1024)])
    return float((pred == test.label).float().mean())


def finetune_points(points: list[dict], minutes: list[float], gap_s: float) -> list[int]:
    """Indices of the probe points nearest each of ``minutes`` (within half a probe gap; others skipped)."""
    chosen = []
    for m in minutes:
        i = min(range(len(points)), key=lambda k: abs(points[k]["train_s"] - 60 * m))
        if abs(points[i]["train_s"] - 60 * m) <= gap_s / 2 + 1.0 and i not in chosen:
            chosen.append(i)
    return chosen


def score_by_finetune(points: list[dict], snapshots: list, build, pooled, dim: int, data, ns, seed: int) -> None:
    """Adds ``finetune_acc`` to the chosen points (``build(snapshot)``: a fresh encoder holding it)."""
    for i in finetune_points(points, ns.finetune_minutes, ns.probe_minutes * 60):
        t0 = time.perf_counter()
        points[i]["finetune_acc"] = short_finetune(build(snapshots[i]), pooled, dim, data.train, data.test,
                                                   ns.finetune_steps, seed)
        print(f"  fine-tuned the {points[i]['train_s'] / 60:.1f}-minute encoder: {points[i]['finetune_acc']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


class Prober:
    """The probe both methods get: fixed train/test sets in memory, ``linear_probe`` on pooled features."""

    def __init__(self, cfg, probe_train: int, split: str = "test", probe_eval: int = 0):
        self.train = load_task_data(cfg, "image", "train", probe_train)
        self.test = load_task_data(cfg, "image", split, probe_eval)
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self, features) -> float:
        t0 = time.perf_counter()
        x = [torch.cat([features(s.source[i : i + 1024]) for i in range(0, len(s), 1024)]).double().numpy()
             for s in (self.train, self.test)]
        acc = linear_probe(x[0], self.train.label.numpy(), x[1], self.test.label.numpy())
        self.seconds += time.perf_counter() - t0
        return acc


def raw_pixel_probe(prober: Prober) -> float:
    """The reference line: the same probe on the normalised pixels themselves."""
    return prober(lambda x: x.flatten(1))


def run_mae(mae, lr_sched, prober: Prober, images: torch.Tensor, ns, seed: int, data=None) -> dict:
    """MAE's pretraining loop (engine_pretrain.train_one_epoch, fp32 on CPU) for ``ns.budget`` training seconds."""
    from timm.optim import param_groups_weight_decay
    from torchvision.transforms import v2

    r = MAE_RECIPE
    torch.manual_seed(seed)
    model = mae.MaskedAutoencoderViT(img_size=28, patch_size=4, in_chans=3, embed_dim=ns.embed_dim, depth=4, num_heads=4,
                                     decoder_embed_dim=ns.mae_decoder_dim, decoder_depth=ns.mae_decoder_depth,
                                     decoder_num_heads=4, mlp_ratio=4,
                                     norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
                                     norm_pix_loss=r["norm_pix_loss"])
    opt = torch.optim.AdamW(param_groups_weight_decay(model, r["weight_decay"]), lr=r["lr"], betas=(0.9, 0.95))
    args = SimpleNamespace(lr=r["lr"], min_lr=r["min_lr"], epochs=r["epochs"], warmup_epochs=r["warmup_epochs"])
    augment = v2.Compose([v2.RandomResizedCrop(28, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                               antialias=True), v2.RandomHorizontalFlip()])

    def features(x: torch.Tensor) -> torch.Tensor:
        model.eval()
        latent, _, _ = model.forward_encoder(x.expand(-1, 3, -1, -1), 0.0)
        model.train()
        return latent[:, 1:].mean(1)

    points, snapshots, steps, trained = [], [], 0, 0.0
    gap = ns.probe_minutes * 60
    points.append({"train_s": 0.0, "step": 0, "probe_acc": prober(features)})
    snapshots.append(copy.deepcopy(model.state_dict()) if ns.finetune_minutes else None)
    next_probe = gap
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    pos = 0
    model.train()
    while trained < ns.budget:
        t0 = time.perf_counter()
        if pos + r["batch"] > len(order):  # a new epoch, drop_last as MAE's loader
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos : pos + r["batch"]]
        pos += r["batch"]
        batch = (torch.stack([augment(images[i]) for i in idx]) if ns.mae_augment else images[idx]).expand(-1, 3, -1, -1)
        # engine_pretrain: the schedule per iteration, by (fractional) epoch; here by the fraction of the budget
        lr_sched.adjust_learning_rate(opt, trained / ns.budget * r["epochs"], args)
        loss, _, _ = model(batch, mask_ratio=r["mask_ratio"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps += 1
        trained += time.perf_counter() - t0
        if trained >= next_probe or trained >= ns.budget:
            points.append({"train_s": round(trained, 1), "step": steps, "probe_acc": prober(features),
                           "loss": loss.item()})
            snapshots.append(copy.deepcopy(model.state_dict()) if ns.finetune_minutes else None)
            next_probe = (int(trained / gap) + 1) * gap
    if data is not None:
        def build(state):
            model.load_state_dict(state)
            return model

        def pooled(m, x):  # forward_encoder with mask ratio 0 keeps every patch (shuffled: mean-pooling ignores order)
            return m.forward_encoder(x.expand(-1, 3, -1, -1), 0.0)[0][:, 1:].mean(1)

        score_by_finetune(points, snapshots, build, pooled, ns.embed_dim, data, ns, seed)
    return {"objective": "mae (facebookresearch/mae)", "seed": seed, "augment": ns.mae_augment, "steps": steps, "batch": r["batch"],
            "images_per_s": steps * r["batch"] / trained, "train_seconds": trained, "points": points,
            "final_acc": points[-1]["probe_acc"]}


class StopEarly(Exception):
    """--stop-minutes: the data2vec 2.0 run ends at a probe once that much training has passed."""


def run_d2v(ns, seed: int, out_dir: Path, data=None) -> dict:
    cfg = load_config(["experiment=tiny", *IMAGE_ONLY, *encoder(ns.embed_dim), *ns.d2v, f"seed={seed}", "data.source=shards",
                       f"data.root={ns.root}", f"train.max_minutes={ns.budget / 60}",
                       f"train.max_steps={SCHEDULE_STEPS}", f"train.warmup_steps={int(0.05 * SCHEDULE_STEPS)}",
                       "train.ckpt_every=0", "train.probe_every=0", f"train.probe_every_minutes={ns.probe_minutes}",
                       f"train.probe_train={ns.probe_train}", f"train.probe_val={ns.probe_eval}",
                       f"train.probe_split={ns.probe_split}",
                       "train.track=false", f"train.threads={ns.threads}", f"train.out_dir={out_dir}"])
    snapshots: list[dict] = []
    seen: list[tuple[float, float]] = []  # (training seconds, accuracy) per probe

    class SnapshotProbe(OnlineProbe):
        """Keeps the student at each probe (for the short fine-tunes); ends the run after --stop-minutes."""

        def __call__(self, backbone):
            now = time.perf_counter()
            if not seen:  # the step-0 probe comes as pretraining's clock starts
                self.started = now
            # pretraining's clock, probe time excluded; rounded as recorded, so the stop below
            # decides on the very value the JSON shows
            train_s = round(now - self.started - self.seconds, 3)
            snapshots.append(copy.deepcopy(backbone.state_dict()) if ns.finetune_minutes else None)  # only to fine-tune
            self.seconds += time.perf_counter() - now  # the copy is probe time, not training time
            accs = super().__call__(backbone)
            seen.append((train_s, accs["image"]))
            if ns.stop_minutes and train_s >= ns.stop_minutes * 60:
                raise StopEarly
            return accs

    import d2v.train.pretrain as pretrain_module
    pretrain_module.OnlineProbe = SnapshotProbe
    try:
        res = pretrain(cfg, progress=False)
    except StopEarly:
        res = None
    finally:
        pretrain_module.OnlineProbe = OnlineProbe
    if res is not None:
        points = [{"train_s": p["train_seconds"], "step": p["step"], "probe_acc": p["accuracy"]} for p in res.probes]
    else:  # stopped early: the probe's own records (no step count)
        points = [{"train_s": t, "step": None, "probe_acc": a} for t, a in seen]
    if data is not None:
        def build(state):
            model = Data2Vec2(cfg.model)
            model.load_state_dict(state)
            return model

        score_by_finetune(points, snapshots, build, lambda m, x: m.features(x, "image").x.mean(1),
                          cfg.model.embed_dim, data, ns, seed)
    stopped = f", the first {ns.stop_minutes:g} of {ns.budget / 60:g} min" if res is None else ""
    return {"objective": f"data2vec2 (d2v pretrain{stopped})", "seed": seed, "steps": res and res.steps,
            "batch": cfg.train.batch_size, "masks_per_sample": cfg.model.clone_batch,
            "images_per_s": res and res.samples_per_s, "train_seconds": res.train_seconds if res else points[-1]["train_s"],
            "points": points, "final_acc": points[-1]["probe_acc"], "overrides": ns.d2v}


def _ratio(points: list[dict], target: float, mae_s: float, stopped: bool, kind: str) -> dict:
    """``kind`` "" (probe) or "finetune_": the first time reaching ``target``, MAE's seconds over it, or a bound."""
    t = first_time_reaching(points, target)
    out = {f"d2v_time_to_mae_final{'_' + kind[:-1] if kind else ''}_s": t, f"{kind}ratio": mae_s / t if t else None}
    if t is None and stopped:
        out[f"{kind}ratio_at_most"] = mae_s / points[-1]["train_s"]
    return out


def summarise(runs: list[dict], budget: float) -> dict:
    """Per seed: MAE's final accuracy, data2vec 2.0's first time reaching it, the ratio; then medians.

    A data2vec 2.0 run stopped early (``--stop-minutes``) that has not reached it yet gives no ratio but
    an upper bound (``ratio_at_most``: MAE's budget over the last time scored), and then no median."""
    by_seed: dict[int, dict] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})["mae" if r["objective"].startswith("mae") else "d2v"] = r
    rows = []
    for seed, pair in sorted(by_seed.items()):
        if len(pair) < 2:
            continue
        mae_s = pair["mae"]["train_seconds"]
        stopped = pair["d2v"]["train_seconds"] < 0.95 * mae_s
        row = {"seed": seed, "mae_final_acc": pair["mae"]["final_acc"], "d2v_final_acc": pair["d2v"]["final_acc"]}
        row |= _ratio(pair["d2v"]["points"], pair["mae"]["final_acc"], mae_s, stopped, "")
        ft_target = pair["mae"]["points"][-1].get("finetune_acc")
        ft_points = [{"train_s": q["train_s"], "probe_acc": q["finetune_acc"]}
                     for q in pair["d2v"]["points"] if "finetune_acc" in q]
        if ft_target is not None and ft_points:  # the same ratio, by the short fine-tune
            row |= {"mae_final_finetune_acc": ft_target, "d2v_final_finetune_acc": ft_points[-1]["probe_acc"]}
            row |= _ratio(ft_points, ft_target, mae_s, stopped, "finetune_")
        rows.append(row)
    out: dict = {"per_seed": rows}
    if rows:
        out |= {"median_mae_final_acc": statistics.median(r["mae_final_acc"] for r in rows),
                "median_d2v_final_acc": statistics.median(r["d2v_final_acc"] for r in rows),
                "goal": 8.0, "budget_s": budget}
        if not any("ratio_at_most" in r for r in rows):
            ratios = [r["ratio"] or 0.0 for r in rows]  # never reached counts as 0 (below 1x)
            out |= {"median_ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}
        if all("finetune_ratio" in r for r in rows):
            out |= {"median_mae_final_finetune_acc": statistics.median(r["mae_final_finetune_acc"] for r in rows),
                    "median_d2v_final_finetune_acc": statistics.median(r["d2v_final_finetune_acc"] for r in rows)}
            if not any("finetune_ratio_at_most" in r for r in rows):
                ft = [r["finetune_ratio"] or 0.0 for r in rows]
                out |= {"median_finetune_ratio": statistics.median(ft), "finetune_ratio_range": [min(ft), max(ft)]}
    return out


def plot(runs: list[dict], summary: dict, path: Path, raw: float | None = None, embed_dim: int = 128) -> None:
    """Probe accuracy against training minutes, one line per run, MAE's final accuracies dashed; a
    second panel with the short fine-tune's accuracy when the runs were scored by it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("probe_acc", "mae_final_acc", "linear probe accuracy (frozen, mean-pooled)", "median_ratio")]
    if any("finetune_acc" in q for r in runs for q in r["points"]):
        panels.append(("finetune_acc", "mae_final_finetune_acc", "accuracy after a short fine-tune",
                       "median_finetune_ratio"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
    colours = {"mae": "tab:orange", "data2vec2": "tab:blue"}
    for ax, (key, target, ylabel, ratio) in zip(axes[0], panels):
        seen = set()
        for r in runs:
            kind = r["objective"].split()[0]
            pts = [q for q in r["points"] if key in q]
            ax.plot([q["train_s"] / 60 for q in pts], [q[key] for q in pts], marker="o", ms=3,
                    color=colours.get(kind, "grey"), alpha=0.8, label=None if kind in seen else r["objective"])
            seen.add(kind)
        for row in summary.get("per_seed", []):
            if target in row:
                ax.axhline(row[target], color=colours["mae"], ls="--", lw=0.8, alpha=0.6)
        if raw is not None and key == "probe_acc":
            ax.axhline(raw, color="black", ls=":", lw=1, label=f"raw pixels ({raw:.3f})")
        ax.set_xlabel("pretraining minutes (probe time excluded)")
        ax.set_ylabel(ylabel)
        head = f", median {summary[ratio]:.1f}x (goal 8x)" if summary.get(ratio) is not None else ""
        ax.set_title(f"Fashion-MNIST, ViT D={embed_dim}: data2vec 2.0 vs facebookresearch/mae{head}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mae-repo", type=Path, help="a checkout of facebookresearch/mae (needed unless --only d2v)")
    p.add_argument("--root", default="data", help="data root holding the pipeline's shards/image")
    p.add_argument("--budget", type=float, default=720.0, help="training seconds per run (issue 16: 12 minutes)")
    p.add_argument("--probe-minutes", type=float, default=1.5, help="training minutes between probes")
    p.add_argument("--probe-train", type=int, default=10000, help="training images the probe is fit on (0: all 55,000)")
    p.add_argument("--probe-split", choices=("test", "val"), default="test",
                   help="the split the probe scores (val: for choosing settings)")
    p.add_argument("--probe-eval", type=int, default=0, help="images of --probe-split scored (0: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--only", choices=("mae", "d2v"), default=None, help="run one side only")
    p.add_argument("--no-mae-augment", dest="mae_augment", action="store_false",
                   help="MAE without its RandomResizedCrop + flip (data2vec 2.0's loader crops and flips as fairseq does)")
    p.add_argument("--embed-dim", type=int, default=128, help="the encoder width of both sides (4 blocks, 4 heads)")
    # MAE's better decoder at this size: 64 wide, 1 block beat 128 x 2 at every probe point (BENCHMARKS.md)
    p.add_argument("--mae-decoder-dim", type=int, default=64)
    p.add_argument("--mae-decoder-depth", type=int, default=1)
    p.add_argument("--d2v", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override of the data2vec 2.0 run (repeatable); default: the defaults")
    p.add_argument("--finetune-minutes", type=float, nargs="*", default=[0, 1.5, 3, 6, 12], metavar="MIN",
                   help="score the encoders at these training minutes (the nearest probe points) by a short "
                        "fine-tune too (none: probe only)")
    p.add_argument("--finetune-steps", type=int, default=FINETUNE_RECIPE["steps"],
                   help=f"steps of the short fine-tune (batch {FINETUNE_RECIPE['batch']})")
    p.add_argument("--stop-minutes", type=float, default=None,
                   help="end the data2vec 2.0 run at the first probe after this many training minutes, its "
                        "schedule still spread over --budget (a fine probe grid over the start, for less cost)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("reports/bench/vs_mae.json"), help="the JSON; the plot beside it (.png)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only summarise the runs of these reports into --out (sides run as separate, "
                        "concurrent processes: --only mae and --only d2v, one thread each)")
    ns = p.parse_args(argv)
    if ns.merge:
        reports = [json.loads(f.read_text()) for f in ns.merge]
        runs = [r for rep in reports for r in rep["runs"]]
        ns.embed_dim = reports[0].get("embed_dim", 128)
        cfg = load_config(["experiment=tiny", *IMAGE_ONLY, *encoder(ns.embed_dim), "data.source=shards", f"data.root={ns.root}"])
        probe_train = reports[0].get("probe_train", ns.probe_train)
        merged = reports[0] | {"command": "python benchmarks/vs_mae.py " + " ".join(sys.argv[1:] if argv is None else argv),
                               "merged": [rep["command"] for rep in reports], "runs": runs,
                               "summary": summarise(runs, max(r["train_seconds"] for r in runs)),
                               "raw_pixel_probe": raw_pixel_probe(Prober(cfg, probe_train, "test", 0))}
        print(f"raw pixels: {merged['raw_pixel_probe']:.4f}")
        for row in merged["summary"]["per_seed"]:
            print(row)
        ns.out.write_text(json.dumps(merged, indent=2))
        plot(runs, merged["summary"], ns.out.with_suffix(".png"), merged["raw_pixel_probe"], ns.embed_dim)
        print(f"wrote {ns.out} and its plot {ns.out.with_suffix('.png')}")
        return 0
    if ns.only != "d2v" and ns.mae_repo is None:
        p.error("--mae-repo is required to run MAE (or --only d2v)")
    torch.set_num_threads(ns.threads)
    t0 = time.perf_counter()
    runs: list[dict] = []
    cfg = load_config(["experiment=tiny", *IMAGE_ONLY, *encoder(ns.embed_dim), "data.source=shards", f"data.root={ns.root}"])
    mae = lr_sched = prober = images = data = None
    if ns.only != "d2v":
        mae, lr_sched = import_mae(ns.mae_repo.expanduser())
        prober = Prober(cfg, ns.probe_train, ns.probe_split, ns.probe_eval)
    if ns.finetune_minutes or ns.only != "d2v":
        # the whole training split: the probe's own copy when it fits on all of it (decoded once)
        train = prober.train if prober is not None and ns.probe_train == 0 else load_task_data(cfg, "image", "train", 0)
        images = train.source
        if ns.finetune_minutes:  # the short fine-tune: all training images, scored on the probe's test images
            test = prober.test if prober is not None else load_task_data(cfg, "image", ns.probe_split, ns.probe_eval)
            data = SimpleNamespace(train=train, test=test)
    with tempfile.TemporaryDirectory(prefix="d2v-vs-mae-") as tmp:
        for seed in ns.seeds:
            for side in ("mae", "d2v"):
                if ns.only not in (None, side):
                    continue
                r = (run_mae(mae, lr_sched, prober, images, ns, seed, data) if side == "mae"
                     else run_d2v(ns, seed, Path(tmp) / f"d2v_{seed}", data))
                runs.append(r)
                print(f"{r['objective']:<28} seed {seed}: {r['steps']} steps, {r['images_per_s'] or 0:.0f} images/s, "
                      + " ".join(f"{q['train_s'] / 60:.1f}m:{q['probe_acc']:.4f}" for q in r["points"]), flush=True)
    summary = summarise(runs, ns.budget)
    for row in summary["per_seed"]:
        for what, suffix in (("probe", ""), ("fine-tune", "_finetune")):
            if f"mae_final{suffix}_acc" not in row:
                continue
            t = row[f"d2v_time_to_mae_final{suffix}_s"]
            print(f"seed {row['seed']}, {what}: MAE after {ns.budget / 60:.1f} min {row[f'mae_final{suffix}_acc']:.4f}; "
                  "data2vec 2.0 " + (f"reaches it after {t:.0f} s: {row['finetune_ratio' if suffix else 'ratio']:.2f}x"
                                     if t else "never reaches it: below 1x"))
    report = {"command": "python benchmarks/vs_mae.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "machine": {"cpu": cpu_name(), "threads": ns.threads, "device": "cpu"}, "torch": torch.__version__,
              "mae_recipe": MAE_RECIPE | {"decoder_dim": ns.mae_decoder_dim, "decoder_depth": ns.mae_decoder_depth},
              "embed_dim": ns.embed_dim, "encoder": encoder(ns.embed_dim), "probe_train": ns.probe_train, "probe_split": ns.probe_split,
              "finetune": FINETUNE_RECIPE | {"steps": ns.finetune_steps, "minutes": ns.finetune_minutes},
              "wall_s": time.perf_counter() - t0, "summary": summary, "runs": runs}
    if prober is not None:
        report["raw_pixel_probe"] = raw_pixel_probe(prober)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(report, indent=2))
    plot(runs, summary, ns.out.with_suffix(".png"), report.get("raw_pixel_probe"), ns.embed_dim)
    print(f"wrote {ns.out} and its plot {ns.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
