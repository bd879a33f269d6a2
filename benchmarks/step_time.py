"""Training-step time of a config, per modality: forward + backward + AdamW + EMA update.

Prints a table and writes JSON (machine, date, command, medians). Example:

    python benchmarks/step_time.py experiment=tiny --steps 20 --out reports/bench/step_time_tiny.json

Times are medians over ``--steps`` steps after ``--warmup`` steps, measured in one process so
that modalities can be compared as ratios. Masks are drawn on the CPU outside the timed region,
as the data loader does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from d2v.config import load_config
from d2v.data.sample import SampleData
from d2v.models import Data2Vec2


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed_step(model, opt, src: torch.Tensor, modality: str, mask: torch.Tensor, step: int,
               bf16: bool = False) -> float:
    """Seconds of one pretraining step (forward, backward, AdamW, EMA update), synchronised on CUDA:
    the one timed step the benchmark scripts share."""
    cuda = src.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast(src.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(src, modality, mask=mask)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.update_teacher(step + 1)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def write_report(report: dict, out: Path) -> None:
    """The benchmark's JSON report (machine, date, command, results) to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=tiny)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("reports/bench/step_time.json"))
    ns = p.parse_intermixed_args(argv)
    overrides = ns.overrides or ["experiment=tiny"]
    if ns.threads:
        torch.set_num_threads(ns.threads)
    cfg = load_config(overrides)
    device = torch.device("cuda" if ns.device == "auto" and torch.cuda.is_available() else ("cpu" if ns.device == "auto" else ns.device))
    bf16 = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    model = Data2Vec2(cfg.model).to(device).train()
    opt = torch.optim.AdamW(model.param_groups(cfg.train.weight_decay), lr=1e-4, betas=tuple(cfg.train.betas))
    bs = cfg.train.batch_size
    data = SampleData(cfg.model, cfg.model.modalities, max(bs, 64), cfg.seed, cfg.data.audio_seconds, cfg.data.text_length)

    rows = []
    for m in cfg.model.modalities:
        enc = model.encoder(m)
        times = []
        for step in range(ns.warmup + ns.steps):
            src = data.batch(m, step, bs)
            mask = enc.make_mask(bs * cfg.model.clone_batch, enc.num_tokens(tuple(src.shape)), torch.device("cpu"))
            src, mask = src.to(device), mask.to(device)
            dt_s = timed_step(model, opt, src, m, mask, step, bf16)
            if step >= ns.warmup:
                times.append(dt_s)
        med = statistics.median(times)
        tokens = enc.num_tokens(tuple(src.shape))
        rows.append({
            "modality": m, "batch": bs, "clones": cfg.model.clone_batch, "tokens_per_sample": tokens,
            "visible_per_clone": tokens - enc.num_masked(tokens), "median_step_s": med,
            "min_step_s": min(times), "samples_per_s": bs / med,
        })

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "command": "python benchmarks/step_time.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "device": str(device),
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
        "torch": torch.__version__, "overrides": overrides, "steps": ns.steps, "warmup": ns.warmup,
        "peak_rss_mb": rss_mb,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "results": rows,
    }
    print(f"{' '.join(overrides)} on {report['machine']['cpu']} ({report['machine']['threads']} threads, {device})")
    print(f"{'modality':<8} {'batch':>5} {'M':>3} {'tokens':>6} {'visible':>7} {'median s':>9} {'samples/s':>10}")
    for r in rows:
        print(f"{r['modality']:<8} {r['batch']:>5} {r['clones']:>3} {r['tokens_per_sample']:>6} {r['visible_per_clone']:>7} "
              f"{r['median_step_s']:>9.3f} {r['samples_per_s']:>10.1f}")
    print(f"peak RSS {rss_mb:.0f} MB")
    write_report(report, ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
