"""Step throughput of data2vec 2.0 vs a data2vec 1.0-style step, per modality and clone count M.

Both steps are forward + backward + AdamW + EMA update on the same shared encoder code
(``d2v.models.baselines.Data2Vec1Style`` for 1.0: full-length encoder with mask embeddings, one
teacher pass per masked copy, linear head). For a batch of B samples and M masks per sample both
see B*M masked copies per step, so the fair unit is *masked copies per second* (``copies_per_s``
= B*M / step time); ``samples_per_s`` = B / step time is reported too. ``speedup_same_m`` is
2.0's copies/s over 1.0's at the same M (``speedup_same_m_min``: the same from the fastest steps);
``speedup_vs_v1_m1`` is over 1.0 at M=1 (one mask per
sample and teacher pass, as data2vec 1.0 trained). Peak RSS is measured per configuration
(``/proc/self/clear_refs`` resets the high-water mark; ``rss_before_mb`` is the resident size
when the timing started, so the step's own peak is the difference; the process-wide ru_maxrss is
reported too).

    python benchmarks/step_throughput.py experiment=tiny data=sample --batch 8 --clones 1 2 4 8 16 \
        --steps 5 --warmup 2 --threads 1 --out reports/bench/step_throughput.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import cpu_name, timed_step, write_report  # noqa: E402

from d2v.config import load_config  # noqa: E402
from d2v.data.sample import SampleData  # noqa: E402
from d2v.models.baselines import objective  # noqa: E402

LABEL = {"data2vec2": "2.0", "data2vec1": "1.0-style"}
UNIT = {"image": "images/s", "speech": "clips/s", "text": "seqs/s"}


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    v = _status_mb("VmHWM")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(model, opt, data, modality: str, batch: int, clones: int, steps: int, warmup: int) -> list[float]:
    bb = model if not hasattr(model, "backbone") else model.backbone
    enc = bb.encoder(modality)
    times = []
    for step in range(warmup + steps):
        src = data.batch(modality, step, batch)
        mask = enc.make_mask(batch * clones, enc.num_tokens(tuple(src.shape)), torch.device("cpu"))
        dt_s = timed_step(model, opt, src, modality, mask, step)
        if step >= warmup:
            times.append(dt_s)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=tiny data=sample)")
    p.add_argument("--batch", type=int, default=8, help="samples per step (B)")
    p.add_argument("--clones", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="clone counts M")
    p.add_argument("--modalities", nargs="+", default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    p.add_argument("--out", type=Path, default=Path("reports/bench/step_throughput.json"))
    ns = p.parse_intermixed_args(argv)
    overrides = ns.overrides or ["experiment=tiny", "data=sample"]
    if ns.threads:
        torch.set_num_threads(ns.threads)
    base = load_config(overrides)
    mods = ns.modalities or list(base.model.modalities)
    data = SampleData(base.model, mods, 64, base.seed, base.data.audio_seconds, base.data.text_length)
    clear_ok = reset_peak_rss()

    rows = []
    for M in ns.clones:
        cfg = load_config(overrides + [f"model.clone_batch={M}"])
        for obj in ("data2vec2", "data2vec1"):
            torch.manual_seed(cfg.seed)
            model = objective(obj, cfg.model).train()
            opt = torch.optim.AdamW(model.param_groups(cfg.train.weight_decay), lr=1e-4, betas=tuple(cfg.train.betas))
            for m in mods:
                reset_peak_rss()
                rss0 = _status_mb("VmRSS") or 0.0
                times = time_steps(model, opt, data, m, ns.batch, M, ns.steps, ns.warmup)
                med = statistics.median(times)
                rows.append({
                    "modality": m, "objective": obj, "batch": ns.batch, "clones": M,
                    "median_step_s": med, "min_step_s": min(times),
                    "samples_per_s": ns.batch / med, "copies_per_s": ns.batch * M / med,
                    "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0,
                })
            del model, opt

    by = {(r["modality"], r["objective"], r["clones"]): r for r in rows}
    for r in rows:
        if r["objective"] != "data2vec2":
            continue
        v1 = by.get((r["modality"], "data2vec1", r["clones"]))
        v1m1 = by.get((r["modality"], "data2vec1", 1))
        r["speedup_same_m"] = r["copies_per_s"] / v1["copies_per_s"] if v1 else None
        r["speedup_vs_v1_m1"] = r["copies_per_s"] / v1m1["copies_per_s"] if v1m1 else None
        # the fastest step is less exposed to other jobs on a shared machine
        r["speedup_same_m_min"] = v1["min_step_s"] * r["clones"] / (r["min_step_s"] * v1["clones"]) if v1 else None

    report = {
        "command": "python benchmarks/step_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "device": "cpu"},
        "torch": torch.__version__, "overrides": overrides, "steps": ns.steps, "warmup": ns.warmup,
        "unit": "copies_per_s = batch * clones / median step s (one masked copy = one sample-mask pair)",
        "per_config_peak_rss": clear_ok,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "results": rows,
    }
    print(f"{' '.join(overrides)} on {report['machine']['cpu']} ({report['machine']['threads']} threads, cpu), B={ns.batch}")
    print(f"{'modality':<8} {'objective':<10} {'M':>3} {'median s':>9} {'samples/s':>10} {'copies/s':>9} "
          f"{'peak RSS MB':>11} {'(+step)':>7} {'2.0/1.0 same M':>14} {'(min)':>6} {'2.0/1.0(M=1)':>12}")
    for r in rows:
        s1 = f"{r['speedup_same_m']:.2f}x" if r.get("speedup_same_m") else ""
        s2 = f"{r['speedup_vs_v1_m1']:.2f}x" if r.get("speedup_vs_v1_m1") else ""
        s3 = f"{r['speedup_same_m_min']:.2f}x" if r.get("speedup_same_m_min") else ""
        print(f"{r['modality']:<8} {LABEL[r['objective']]:<10} {r['clones']:>3} {r['median_step_s']:>9.3f} "
              f"{r['samples_per_s']:>10.1f} {r['copies_per_s']:>9.1f} {r['peak_rss_mb']:>11.0f} "
              f"{r['peak_rss_mb'] - r['rss_before_mb']:>+7.0f} {s1:>14} {s3:>6} {s2:>12}")
    print("samples/s is in " + ", ".join(f"{m}: {UNIT.get(m, 'samples/s')}" for m in mods))
    write_report(report, ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
