"""What a person wants to know after ``dvc repro``: did pretraining help, per task, and how fast.

``summarize(root)`` reads the stage reports under ``root`` (``reports/metrics/*.json`` and the data
stages' reports) and ``render(summary)`` prints

* per task: test accuracy fine-tuned from pretraining vs from random init, and the two linear
  probes; each difference with its standard error on that test set and a verdict (``better`` /
  ``within noise`` / ``worse`` at two standard errors);
* pretraining throughput, and the wall time of each stage that records it;
* where to look next (the two web UIs).

The standard error of a difference of two accuracies p1, p2 on the same n test samples is taken as
``sqrt(p1(1-p1)/n + p2(1-p2)/n)``: the unpaired formula, which overstates it when the two models
err on the same samples (they often do), so ``better`` and ``worse`` are conservative.

A report that is missing, truncated or not JSON is named and skipped; what can be shown still is.
With a ``dvc.lock`` beside ``reports/``, a metric whose stage's inputs changed after it was
written (a dependency newer than it, or missing, or params that differ from the ones the lock
recorded) is marked **stale**: the number shown is not what the current inputs give, so a failed
stage never hides behind an older number.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("image", "speech", "text")
# stage -> the report it leaves, relative to the project root, and the key holding its seconds
STAGE_REPORTS: dict[str, tuple[str, tuple[str, ...]]] = {
    # (the speech download report's "seconds" is the audio's length; "elapsed" its wall time)
    **{f"download@{m}": (f"reports/data/download_{m}.json", ("elapsed_s", "elapsed")) for m in TASKS},
    **{f"validate@{m}": (f"reports/validation/{m}.json", ("seconds",)) for m in TASKS},
    "tokenizer": ("reports/data/tokenizer.json", ("seconds",)),
    **{f"shard@{m}": (f"reports/data/shard_{m}.json", ("seconds",)) for m in TASKS},
    "pretrain": ("reports/metrics/pretrain.json", ("train_seconds",)),
    **{f"finetune@{m}": (f"reports/metrics/finetune_{m}.json", ("seconds",)) for m in TASKS},
    **{f"evaluate@{m}": (f"reports/metrics/eval_{m}.json", ("seconds",)) for m in TASKS},
    "register": ("reports/metrics/register.json", ("seconds",)),
}


@dataclass
class Comparison:
    """Pretrained vs random init on one test set."""

    pretrained: float
    random: float
    n: int

    @property
    def diff(self) -> float:
        return self.pretrained - self.random

    @property
    def stderr(self) -> float:
        p1, p2, n = self.pretrained, self.random, max(self.n, 1)
        return math.sqrt(max(p1 * (1 - p1), 0.0) / n + max(p2 * (1 - p2), 0.0) / n)

    @property
    def verdict(self) -> str:
        if self.stderr == 0.0:
            return "better" if self.diff > 0 else "worse" if self.diff < 0 else "within noise"
        z = self.diff / self.stderr
        return "better" if z > 2 else "worse" if z < -2 else "within noise"


@dataclass
class TaskResult:
    task: str
    split: str
    n: int
    finetuned: Comparison
    probe: Comparison
    stale: list[str] = field(default_factory=list)


@dataclass
class Summary:
    root: Path
    tasks: list[TaskResult] = field(default_factory=list)
    pretrain: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # missing / unreadable reports
    stale: dict[str, list[str]] = field(default_factory=dict)  # report -> why it is stale
    lock_checked: bool = False

    @property
    def complete(self) -> bool:
        return not self.problems and len(self.tasks) == len(TASKS) and bool(self.pretrain)


def read_report(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None with the reason added to ``problems``."""
    if not path.is_file():
        problems.append(f"{path}: missing (its stage has not run, or failed)")
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError
        problems.append(f"{path}: unreadable, truncated or not JSON ({type(e).__name__}: {e})")
        return None
    if not isinstance(d, dict):
        problems.append(f"{path}: expected a JSON object, got {type(d).__name__}")
        return None
    return d


def _accuracy(d: dict[str, Any], key: str, path: Path, problems: list[str]) -> float | None:
    v = d.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= float(v) <= 1.0:
        problems.append(f"{path}: no accuracy {key!r} in [0, 1] (got {v!r})")
        return None
    return float(v)


def summarize(root: str | Path = ".") -> Summary:
    """Read the reports of the pipeline rooted at ``root`` (the folder holding ``reports/``)."""
    root = Path(root)
    s = Summary(root)
    s.stale, s.lock_checked = stale_outputs(root)
    for stage, (rel, keys) in STAGE_REPORTS.items():
        path = root / rel
        if not path.is_file():
            continue  # reported below where it matters (the metrics), not for every data report
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        for k in keys:
            if isinstance(d, dict) and isinstance(d.get(k), (int, float)):
                s.stage_seconds[stage] = float(d[k])
                if stage.startswith("finetune@") and isinstance(d.get("baseline_seconds"), (int, float)):
                    s.stage_seconds[stage] += float(d["baseline_seconds"])
                break
    pre_path = root / "reports/metrics/pretrain.json"
    s.pretrain = read_report(pre_path, s.problems) or {}
    for task in TASKS:
        path = root / f"reports/metrics/eval_{task}.json"
        d = read_report(path, s.problems)
        if d is None:
            continue
        accs = [_accuracy(d, k, path, s.problems) for k in
                ("accuracy", "baseline_accuracy", "probe_accuracy", "probe_baseline_accuracy")]
        n = d.get("eval_samples")
        if not isinstance(n, int) or n <= 0:
            s.problems.append(f"{path}: no positive 'eval_samples' (got {n!r})")
            continue
        if any(a is None for a in accs):
            continue
        a, b, c, e = accs  # type: ignore[misc]
        s.tasks.append(TaskResult(task, str(d.get("split", "test")), n, Comparison(a, b, n), Comparison(c, e, n),
                                  s.stale.get(f"reports/metrics/eval_{task}.json", [])))
    return s


# ------------------------------------------------------------------------------------ staleness
def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _newest_mtime(path: Path) -> float:
    if path.is_file():
        return path.stat().st_mtime
    return max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=path.stat().st_mtime)


def stale_outputs(root: Path) -> tuple[dict[str, list[str]], bool]:
    """For each JSON output that ``dvc.lock`` records: why it no longer matches its stage's inputs.

    Returns ({output path: [reasons]}, whether a dvc.lock was there to check against)."""
    import yaml

    from d2v.tracking.mlflow_utils import flatten  # the dotted keys of params, as MLflow gets them

    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        return {}, False
    try:
        lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
        stages = lock.get("stages", {})
        params_now = {}
        for pfile in {f for st in stages.values() for f in (st.get("params") or {})}:
            ppath = root / pfile
            params_now[pfile] = flatten(yaml.safe_load(ppath.read_text(encoding="utf-8")) or {}) if ppath.is_file() else None
    except (yaml.YAMLError, OSError, AttributeError) as e:
        return {"dvc.lock": [f"unreadable ({type(e).__name__}: {e})"]}, False
    out: dict[str, list[str]] = {}
    for name, st in stages.items():
        for o in st.get("outs") or []:
            rel = o.get("path", "")
            if not rel.endswith(".json") or not (root / rel).is_file():
                continue
            written = (root / rel).stat().st_mtime
            why: list[str] = []
            if o.get("md5") and _md5(root / rel) != o["md5"]:
                why.append(f"not the output dvc.lock records for stage {name}")
            for dep in st.get("deps") or []:
                p = root / dep.get("path", "")
                if not p.exists():
                    why.append(f"its input {dep.get('path')} is missing")
                elif p.is_file() and dep.get("md5") and _md5(p) != dep["md5"]:
                    why.append(f"its input {dep.get('path')} changed since stage {name} ran")
                elif p.is_dir() and _newest_mtime(p) > written:
                    why.append(f"its input {dep.get('path')}/ changed after it was written")
            for pfile, recorded in (st.get("params") or {}).items():
                now = params_now.get(pfile)
                if now is None:
                    why.append(f"{pfile} is missing")
                    continue
                for key, value in flatten(recorded if isinstance(recorded, dict) else {}).items():
                    if key in now and now[key] != value and str(now[key]) != str(value):
                        why.append(f"param {key} changed since stage {name} ran ({value!r} -> {now[key]!r})")
                        break
            if why:
                out[rel] = why
    return out, True


# ------------------------------------------------------------------------------------ rendering
def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _cmp_cells(c: Comparison) -> list[str]:
    return [f"{c.pretrained:.3f}", f"{c.random:.3f}", f"{c.diff:+.3f} ± {c.stderr:.3f}", c.verdict]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]


def render(s: Summary, mlflow_uri: str | None = None) -> str:
    """The summary as plain, line-oriented text (the same in a terminal and in a CI log)."""
    out = ["Did pretraining help? Test accuracy, pretrained vs random init (same budget); "
           "difference ± its standard error; verdict at 2 standard errors."]
    if s.tasks:
        rows = []
        for t in s.tasks:
            rows.append([t.task + (" (stale)" if t.stale else ""), f"{t.n:,}", *_cmp_cells(t.finetuned),
                         *_cmp_cells(t.probe)])
        out += _table(["task", "n", "fine-tuned", "random", "difference", "verdict",
                       "probe", "random", "difference", "verdict"], rows)
    else:
        out.append("  (no evaluation report yet: run `dvc repro`)")
    p = s.pretrain
    if p:
        loss = ", ".join(f"{m} {p['first_loss'][m]:.2f} -> {v:.2f}" for m, v in (p.get("final_loss") or {}).items()
                         if m in (p.get("first_loss") or {}))
        sps = p.get("samples_per_s")
        cps = p.get("copies_per_s")
        speed = f"{sps:.0f} samples/s" if isinstance(sps, (int, float)) else "throughput not recorded"
        if isinstance(cps, (int, float)):
            speed += f" ({cps:.0f} masked copies/s)"
        secs = p.get("train_seconds")
        out += ["", f"Pretraining: {p.get('steps', '?')} steps, {speed}"
                + (f", {_fmt_seconds(secs)} of training" if isinstance(secs, (int, float)) else "")
                + (f"; loss {loss}" if loss else "")]
        if p.get("probe"):
            ps = p.get("probe_seconds")
            cost = (f" (probing took {_fmt_seconds(ps)}, {ps / secs:.0%} of the training time)"
                    if isinstance(ps, (int, float)) and isinstance(secs, (int, float)) and secs > 0 else "")
            out.append("  online probe at the end: " + ", ".join(f"{m} {a:.3f}" for m, a in p["probe"].items()) + cost)
    if s.stage_seconds:
        out += ["", "Wall time per stage (as each stage's report records it): "
                + ", ".join(f"{k} {_fmt_seconds(v)}" for k, v in s.stage_seconds.items())]
    stale = s.stale
    if stale:
        out += ["", "STALE (the inputs changed after these were written; `dvc repro` reruns their stages):"]
        out += [f"  {k}: {'; '.join(v[:2])}" + (f" (and {len(v) - 2} more)" if len(v) > 2 else "")
                for k, v in stale.items()]
    elif s.root.joinpath("reports").is_dir() and not s.lock_checked:
        out += ["", "(no dvc.lock here: staleness not checked)"]
    if s.problems:
        out += ["", "MISSING OR UNREADABLE:"] + [f"  {x}" for x in s.problems]
    out += ["", "Look next:",
            "  scripts/mlflow_ui.sh       runs, metrics and the model registry on http://127.0.0.1:5000 (it prints"
            " the link to the runs table with the d2v columns)"
            + (f" ({mlflow_uri})" if mlflow_uri else ""),
            "  scripts/prefect_server.sh  the Prefect UI on http://127.0.0.1:4200 (scripts/serve_flows.sh schedules runs)",
            "  dvc plots show             the pretraining and probe curves (dvc_plots/index.html)"]
    return "\n".join(out)
