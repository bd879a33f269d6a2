"""Eager vs ``train.compile`` (torch.compile of the model step): step time, compile time, wall clock.

A step is what pretraining does: forward + backward + AdamW + EMA update, on the same batches
and masks (drawn on the CPU outside the timed region, as the loader does) for both modes, from
the same initial weights. Cases: each modality of the tiny config, and a D=128, 4-block, 4-head
image model (``--cases``). Prints a table and writes JSON. Example (BENCHMARKS.md):

    python benchmarks/compile_speedup.py --threads 2 --steps 30 --out reports/bench/compile_speedup.json

Per case and mode: the median step time over the last ``--steps`` steps (after ``--warmup``
steps; the first compiled step compiles), the wall clock of all ``warmup + steps`` steps (the
compiled one includes compilation), and ``compile_s`` = first compiled step - median compiled
step. ``break_even_steps`` = compile_s / (eager - compiled median): the steps after which
compiling has paid for itself. Inductor's on-disk caches are off unless ``--warm-cache`` (a
first compilation on a fresh machine, as a pipeline run sees it).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import cpu_name, timed_step, write_report  # noqa: E402

from d2v.config import load_config  # noqa: E402
from d2v.data.sample import SampleData  # noqa: E402
from d2v.models import Data2Vec2  # noqa: E402
from d2v.train.compile import compile_model  # noqa: E402

CASES = {
    "tiny": [],  # experiment=tiny as it is (D=64, 4 blocks, 4 heads), every modality
    "d128": ["model.embed_dim=128", "model.depth=4", "model.num_heads=4", "train.modalities=[image]"],
}


def run(model: Data2Vec2, opt: torch.optim.Optimizer, batches: list, modality: str, device: torch.device) -> list[float]:
    return [timed_step(model, opt, src, modality, mask, step) for step, (src, mask) in enumerate(batches)]


def bench_case(name: str, overrides: list[str], ns: argparse.Namespace, device: torch.device) -> list[dict]:
    cfg = load_config(overrides)
    if ns.batch_size:
        cfg.train.batch_size = ns.batch_size
    mods = [m for m in cfg.train.modalities if not ns.modalities or m in ns.modalities]
    torch.manual_seed(cfg.seed)
    init = Data2Vec2(cfg.model).to(device).train()
    bs, n = cfg.train.batch_size, ns.warmup + ns.steps
    data = SampleData(cfg.model, cfg.model.modalities, max(bs, 64), cfg.seed, cfg.data.audio_seconds, cfg.data.text_length)
    rows = []
    for m in mods:
        enc = init.encoder(m)
        batches = []
        for step in range(n):
            src = data.batch(m, step, bs)
            mask = enc.make_mask(bs * cfg.model.clone_batch, enc.num_tokens(tuple(src.shape)), torch.device("cpu"))
            batches.append((src.to(device), mask))
        res = {}
        for mode in ("eager", "compiled"):
            torch.manual_seed(cfg.seed)
            model = copy.deepcopy(init)  # the same initial weights (a copy runs eager until compiled)
            opt = torch.optim.AdamW(model.param_groups(cfg.train.weight_decay), lr=1e-4, betas=tuple(cfg.train.betas))
            if mode == "compiled":
                torch._dynamo.reset()  # compile this case from scratch
                compile_model(model, True, backend=ns.backend)
            times = run(model, opt, batches, m, device)
            core = model._compiled_core
            res[mode] = {
                "median_step_s": statistics.median(times[ns.warmup:]), "min_step_s": min(times[ns.warmup:]),
                "first_step_s": times[0], "wall_s": sum(times),
                "compiled": bool(core is not None and core.active and core.compiled_calls > 0),
                "fallback": core.failure if core is not None else None,
            }
        e, c = res["eager"], res["compiled"]
        compile_s = max(0.0, c["first_step_s"] - c["median_step_s"])
        gain = e["median_step_s"] - c["median_step_s"]
        rows.append({
            "case": name, "modality": m, "overrides": overrides, "embed_dim": cfg.model.embed_dim,
            "depth": cfg.model.depth, "batch": bs, "clones": cfg.model.clone_batch, "eager": e, "compiled": c,
            "speedup": e["median_step_s"] / c["median_step_s"], "compile_s": compile_s,
            "wall_ratio": e["wall_s"] / c["wall_s"],
            "break_even_steps": compile_s / gain if gain > 0 else None,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every case (default: experiment=tiny data=sample)")
    p.add_argument("--cases", default="tiny,d128", help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--modalities", default="", help="comma-separated subset (default: every modality of a case)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode (the median is over these)")
    p.add_argument("--warmup", type=int, default=2, help="steps before them (the first compiled one compiles)")
    p.add_argument("--batch-size", type=int, default=0, help="0: train.batch_size of the config")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor; eager for a quick check)")
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk caches (default: off)")
    p.add_argument("--out", type=Path, default=Path("reports/bench/compile_speedup.json"))
    ns = p.parse_intermixed_args(argv)
    if ns.warmup < 1:
        p.error("--warmup must be >= 1: the first compiled step compiles")
    ns.modalities = [m for m in ns.modalities.split(",") if m]
    base = ns.overrides or ["experiment=tiny", "data=sample"]
    if ns.threads:
        torch.set_num_threads(ns.threads)
    if not ns.warm_cache:
        torch.compiler.config.force_disable_caches = True
    device = torch.device(ns.device)
    for name in ns.cases.split(","):
        if name not in CASES:
            p.error(f"unknown case {name!r}; expected {', '.join(CASES)}")
    t_all = time.perf_counter()
    report = {
        "command": "python benchmarks/compile_speedup.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "device": str(device)},
        "torch": torch.__version__, "backend": ns.backend, "warm_cache": ns.warm_cache, "overrides": base,
        "seed": load_config(base).seed, "steps": ns.steps, "warmup": ns.warmup, "total_s": 0.0, "results": [],
    }
    for name in ns.cases.split(","):
        report["results"] += bench_case(name, base + CASES[name], ns, device)
        report["total_s"] = time.perf_counter() - t_all
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(report, indent=2))  # what is measured so far, should a later case fail
    rows = report["results"]
    print(f"{' '.join(base)} on {report['machine']['cpu']} ({report['machine']['threads']} threads, {device}, "
          f"{ns.backend}, {ns.warmup}+{ns.steps} steps)")
    print(f"{'case':<6} {'modality':<8} {'D':>4} {'eager s':>8} {'compiled s':>10} {'speed-up':>8} {'compile s':>9} "
          f"{'wall eager':>10} {'wall comp.':>10} {'break-even':>10}")
    for r in rows:
        be = f"{r['break_even_steps']:.0f}" if r["break_even_steps"] is not None else "never"
        print(f"{r['case']:<6} {r['modality']:<8} {r['embed_dim']:>4} {r['eager']['median_step_s']:>8.4f} "
              f"{r['compiled']['median_step_s']:>10.4f} {r['speedup']:>7.2f}x {r['compile_s']:>9.1f} "
              f"{r['eager']['wall_s']:>10.1f} {r['compiled']['wall_s']:>10.1f} {be:>10}"
              + ("" if r["compiled"]["compiled"] else f"  (not compiled: {r['compiled']['fallback']})"))
    write_report(report, ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
