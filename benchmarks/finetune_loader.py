"""Fine-tuning loader throughput for the full-scale image recipe, per loader worker (one process).

What one worker does per batch at ImageNet scale: decode the stored images (``--src`` px, RGB; the
shards keep a source's JPEG bytes as they are and hold PNG for other sources: both are timed),
then MAE's recipe from ``conf/finetune/base.yaml`` (RandomResizedCrop 224 bicubic + flip,
RandAugment 2 x 9, normalise, RandomErasing 0.25, MixUp 0.8 / CutMix 1.0 over 1,000 classes), or
only decode + resize (``plain``). The images are synthetic (smooth random fields, which PNG
compresses about as much as photos; JPEG at quality 90), made in memory: no dataset is needed.

The GPU side is an estimate, stated with its formula: ViT-B/16 fine-tuning costs about
3 (forward + backward) x 2 x 86 M parameters x 197 tokens = 102 GFLOP per image, so an H100 at
45% MFU of its 989 bf16 TFLOP/s trains about 4,400 images/s. The ratio printed is images/s per
worker over that rate, and the workers per GPU it implies.

    python benchmarks/finetune_loader.py --out reports/bench/finetune_loader.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import cpu_name, write_report  # noqa: E402

from d2v.data.augment import ImageAugment  # noqa: E402
from d2v.data.downstream import TaskInputs  # noqa: E402

VIT_B_PARAMS = 86e6
TOKENS = 197
H100_BF16_TFLOPS = 989.0
MFU = 0.45


def gpu_images_per_s() -> float:
    flops = 3 * 2 * VIT_B_PARAMS * TOKENS
    return H100_BF16_TFLOPS * 1e12 * MFU / flops


def synthetic_samples(n: int, size: int, seed: int, fmt: str = "PNG") -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)  # smooth, like a photo's regions
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append({"__key__": f"img{i}", "jpg" if fmt == "JPEG" else "png": buf.getvalue(),
                    "cls": int(rng.integers(0, 1000))})
    return out


def time_collate(inputs: TaskInputs, samples: list[dict], batch_size: int, batches: int, size: int) -> float:
    """Seconds per training batch of ``inputs.collate`` (after one warm-up batch)."""
    inputs.collate(samples[:batch_size], "train")  # warm-up (imports, caches)
    t0 = time.perf_counter()
    for b in range(batches):
        start = (b % 2) * batch_size
        batch = inputs.collate(samples[start : start + batch_size], "train")
    assert batch.source.shape == (batch_size, 3, size, size)
    return (time.perf_counter() - t0) / batches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=8, help="timed batches per variant")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="the model's input size")
    p.add_argument("--src", type=int, default=256, help="stored image size in px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("reports/bench/finetune_loader.json"))
    ns = p.parse_args(argv)
    torch.set_num_threads(1)  # one loader worker = one core
    variants = {
        "plain (decode + resize)": TaskInputs("image", ns.size, 3),
        "MAE recipe (crop, RandAugment, erasing, MixUp/CutMix)": TaskInputs(
            "image", ns.size, 3, augment=ImageAugment(ns.size, 3, 0.08, 2, 9, 0.25, 0.8, 1.0, 1000, ns.seed)),
    }
    gpu = gpu_images_per_s()
    rows = []
    for fmt in ("PNG", "JPEG"):
        samples = synthetic_samples(ns.batch_size * 2, ns.src, ns.seed, fmt)
        stored_kib = sum(len(s.get("jpg", s.get("png"))) for s in samples) / len(samples) / 1024
        for name, inputs in variants.items():
            s = time_collate(inputs, samples, ns.batch_size, ns.batches, ns.size)
            ips = ns.batch_size / s
            rows.append({"variant": name, "stored": fmt, "stored_kib_per_image": round(stored_kib, 1), "batch_s": s,
                         "images_per_s_per_worker": ips, "ratio_to_gpu_estimate": ips / gpu,
                         "workers_per_gpu": gpu / ips})
    print(f"| variant | stored as | KiB/image | images/s per worker | / GPU estimate ({gpu:,.0f} img/s) "
          "| workers per GPU |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['stored']} | {r['stored_kib_per_image']:.0f} | {r['images_per_s_per_worker']:.0f} "
              f"| {r['ratio_to_gpu_estimate']:.3f} | {r['workers_per_gpu']:.0f} |")
    write_report({
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "seed": ns.seed,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": cpu_name(), "threads": 1},
        "gpu_estimate": {"images_per_s": gpu, "formula": "989e12 * 0.45 / (3 * 2 * 86e6 * 197)"},
        "batch_size": ns.batch_size, "input_size": ns.size, "stored_size": ns.src, "results": rows,
    }, ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
