"""One self-contained HTML page of a pipeline run (``d2v report``, the DVC stage ``report``).

Jinja2 renders ``templates/report.html.j2``; matplotlib draws the curves from the stages' TSVs
(``reports/plots/``): pretraining loss, target and prediction variance and the speech front-end
health per modality, the online probe against training seconds, fine-tuning loss for both inits;
the confusion matrices and the time-to-accuracy plots are the PNGs the stages and benchmarks
wrote. Images are embedded (base64), so the page opens anywhere as one file. The summary table,
stale marks and missing reports come from :mod:`d2v.report.summary`. A missing curve is listed as
"not drawn", never an error: the page shows what exists.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import os
from pathlib import Path
from typing import Any

from d2v.report.curves import by_modality, loss_figure, num
from d2v.report.summary import TASKS, Summary, summarize


def read_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a TSV with a header; [] when missing or unreadable (the page lists it as not drawn)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def pretrain_figures(plots: Path) -> tuple[list[dict[str, str]], list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs, missing = [], []
    rows = read_tsv(plots / "pretrain_loss.tsv")
    if rows:
        figs.append({"png": _png(loss_figure(rows)), "caption": "Pretraining loss (one modality per step, round robin)."})
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.2), sharey=True)
        for ax, col in zip(axes, ("target_var", "pred_var")):
            for m, (x, y) in by_modality(rows, "step", col).items():
                ax.plot(x, y, label=m, lw=1)
            ax.set(xlabel="step", title=col.replace("_", " "))
        axes[0].legend()
        figs.append({"png": _png(fig), "caption": "Target and prediction variance: a collapse shows as a fall to 0."})
        speech = by_modality(rows, "step", "local_frame_std").get("speech")
        if speech and speech[0]:
            fig, ax = plt.subplots(figsize=(5.2, 3.2))
            ax.plot(*speech, lw=1)
            ax.set(xlabel="step", ylabel="per-frame std", title="speech front-end health")
            figs.append({"png": _png(fig), "caption": "Speech CNN output spread per frame (near 0 = collapsed front end)."})
    else:
        missing.append("pretraining curves (reports/plots/pretrain_loss.tsv)")
    probe = read_tsv(plots / "pretrain_probe.tsv")
    if probe:
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        for m, (x, y) in by_modality(probe, "train_seconds", "accuracy").items():
            ax.plot(x, y, marker="o", label=m)
        ax.set(xlabel="training seconds (probe time excluded)", ylabel="probe accuracy (val)",
               title="online linear probe")
        ax.legend()
        figs.append({"png": _png(fig), "caption": "Online probe of the frozen encoder during pretraining."})
    else:
        missing.append("online probe curve (reports/plots/pretrain_probe.tsv; train.probe_every=0?)")
    return figs, missing


def downstream_figures(plots: Path) -> tuple[list[dict[str, str]], list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs, missing = [], []
    curves = {t: read_tsv(plots / f"finetune_{t}.tsv") for t in TASKS}
    have = {t: r for t, r in curves.items() if r}
    if have:
        fig, axes = plt.subplots(1, len(have), figsize=(3.6 * len(have), 3.2), squeeze=False)
        for ax, (task, rows) in zip(axes[0], have.items()):
            x = [num(r.get("step")) for r in rows]
            for col, label in (("loss_pretrained", "from pretraining"), ("loss_random", "from random init")):
                ax.plot(x, [num(r.get(col)) for r in rows], lw=1, label=label)
            ax.set(xlabel="step", title=f"{task}: fine-tuning loss")
        axes[0][0].legend()
        figs.append({"png": _png(fig), "caption": "Fine-tuning loss, both inits, same batches."})
    missing += [f"fine-tuning curve of {t} (reports/plots/finetune_{t}.tsv)" for t in TASKS if t not in have]
    for t in TASKS:
        png = plots / f"eval_{t}_confusion.png"
        if png.is_file():
            figs.append({"png": base64.b64encode(png.read_bytes()).decode("ascii"),
                         "caption": f"{t}: confusion matrix of the classifier fine-tuned from pretraining."})
        else:
            missing.append(f"confusion matrix of {t} ({png.relative_to(plots.parent.parent)})")
    return figs, missing


def bench_figures(bench: Path) -> list[dict[str, str]]:
    return [{"png": base64.b64encode(p.read_bytes()).decode("ascii"), "caption": f"{p.name} (benchmarks/time_to_accuracy.py)"}
            for p in sorted(bench.glob("time_to_accuracy*.png"))]


def pretrain_line(s: Summary) -> str:
    p = s.pretrain
    if not p:
        return "No pretraining report (reports/metrics/pretrain.json)."
    parts = [f"{p.get('steps', '?')} steps"]
    if isinstance(p.get("samples_per_s"), (int, float)):
        parts.append(f"{p['samples_per_s']:.0f} samples/s")
    if isinstance(p.get("copies_per_s"), (int, float)):
        parts.append(f"{p['copies_per_s']:.0f} masked copies/s")
    if isinstance(p.get("train_seconds"), (int, float)):
        parts.append(f"{p['train_seconds']:.0f} s of training")
    first, final = p.get("first_loss") or {}, p.get("final_loss") or {}
    loss = ", ".join(f"{m} {first[m]:.2f} → {v:.2f}" for m, v in final.items() if m in first)
    return ", ".join(parts) + (f"; loss {loss}" if loss else "") + "."


def build_report(root: str | Path, out: str | Path) -> Summary:
    """Write the page to ``out`` (atomically) from the run under ``root``; returns the summary."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    from d2v.tracking.mlflow_utils import git_commit

    root = Path(root)
    s = summarize(root)
    pre, miss_pre = pretrain_figures(root / "reports/plots")
    down, miss_down = downstream_figures(root / "reports/plots")
    params = root / "params.yaml"
    env = Environment(loader=PackageLoader("d2v.report", "templates"), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        written=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), root=str(root.resolve()),
        commit=git_commit(root), tasks=s.tasks, stale=s.stale, problems=s.problems, stage_seconds=s.stage_seconds,
        pretrain_line=pretrain_line(s), figures={"pretrain": pre, "downstream": down,
                                                 "bench": bench_figures(root / "reports/bench")},
        missing_figures=miss_pre + miss_down,
        params=params.read_text(encoding="utf-8") if params.is_file() else "(no params.yaml)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # a temp file and a rename (d2v.io needs torch; this does not)
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out)
    return s
