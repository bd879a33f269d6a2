"""Loader throughput per modality: samples/s from the shards, with decoding, augmentation and masks.

Compared, in the same process and on the same machine, with the training step rate of the same
config (forward + backward + AdamW + EMA on the same batches), so the table says whether one
loader worker can feed the step. Needs the shards (``dvc repro shard@image shard@speech shard@text``).

    python benchmarks/loader_throughput.py experiment=tiny --batches 30 --out reports/bench/loader_tiny.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import cpu_name, write_report  # noqa: E402

from d2v.config import load_config  # noqa: E402
from d2v.data.loaders import make_train_loader  # noqa: E402
from d2v.models import Data2Vec2  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--steps", type=int, default=10, help="training steps timed for the comparison")
    p.add_argument("--out", type=Path, default=Path("reports/bench/loader.json"))
    ns = p.parse_intermixed_args(argv)
    overrides = ns.overrides or ["experiment=tiny"]
    cfg = load_config(overrides)
    bs = cfg.train.batch_size
    model = Data2Vec2(cfg.model).train()
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4)
    rows = []
    for m in cfg.train.modalities:
        it = iter(make_train_loader(cfg, m, bs, ns.batches + ns.steps + 2, cfg.seed))  # 0 workers: the main process
        next(it)  # open the shards
        t0 = time.perf_counter()
        kept = []
        for _ in range(ns.batches):
            kept.append(next(it))
        load_s = (time.perf_counter() - t0) / ns.batches
        step_times = []
        for i in range(ns.steps):
            b = kept[i % len(kept)]
            t1 = time.perf_counter()
            out = model(b.source, m, mask=b.mask)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_teacher(i + 1)
            step_times.append(time.perf_counter() - t1)
        step_s = sorted(step_times)[len(step_times) // 2]
        rows.append({"modality": m, "batch": bs, "loader_samples_per_s": bs / load_s, "step_samples_per_s": bs / step_s,
                     "loader_over_step": step_s / load_s, "batch_shape": list(kept[0].source.shape)})
    report = {"command": "python benchmarks/loader_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads()}, "overrides": overrides, "results": rows}
    print(f"{' '.join(overrides)} on {report['machine']['cpu']} ({report['machine']['threads']} threads)")
    print(f"{'modality':<8} {'loader samples/s (1 worker)':>28} {'train step samples/s':>21} {'loader/step':>12}")
    for r in rows:
        print(f"{r['modality']:<8} {r['loader_samples_per_s']:>28.0f} {r['step_samples_per_s']:>21.0f} {r['loader_over_step']:>12.1f}x")
    write_report(report, ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
