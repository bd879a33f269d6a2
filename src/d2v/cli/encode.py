"""``d2v encode``: embeddings of images, audio files or text lines from any model.

MODEL: a model folder (d2v convert / pretraining), a checkpoint file (models/pretrain/checkpoint.pt
or a fairseq data2vec 2.0 .pt), or an MLflow model URI (models:/<name>@champion, runs:/<id>/encoder).
INPUT: files, folders or manifest CSVs (data/raw/<modality>/manifest/<split>.csv); or --split to
use data/raw/<modality>/manifest/<split>.csv of the chosen modality.

Output (--out): .npy (+ <stem>.keys.json) or .parquet, with the keys in input order.

Examples:
  d2v encode models:/d2v@champion --modality image --split test --out emb/image_test.parquet
  d2v encode models/converted/base_libri clips/ --pooling tokens --layer 8 --out clips.npy
  d2v encode MODEL lines.txt --device cuda --batch-size 64 --out lines.parquet
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from d2v.cli.common import add_progress_arg, run_cli, show_progress


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v encode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder, checkpoint file or MLflow model URI")
    p.add_argument("inputs", nargs="*", type=Path, help="files, folders or manifest CSVs")
    p.add_argument("--out", type=Path, required=True, help="output .npy or .parquet")
    p.add_argument("--modality", choices=["image", "speech", "text"], default=None,
                   help="which encoder (default: the inputs' / the model's only one)")
    p.add_argument("--split", default=None, help="encode data/raw/<modality>/manifest/<split>.csv (needs --modality "
                   "for multi-modality models)")
    p.add_argument("--data-root", type=Path, default=Path("data"), help="root of the data folders (default: data)")
    p.add_argument("--pooling", choices=["mean", "cls", "tokens"], default="mean",
                   help="mean over tokens (default), the image CLS token, or every token")
    p.add_argument("--layer", type=int, default=-1, help="block whose output is taken (0-based; -1 = last, default)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--tokenizer", default=None, help="text: spm.model, fairseq dict.txt or 'bytes' (default: the model's)")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N items")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable items (listed at the end) instead of failing")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_progress_arg(p)
    ns = p.parse_args(argv)

    def run() -> int:
        import torch

        from d2v.errors import InputError
        from d2v.inference.encode import Encoder, write_embeddings
        from d2v.inference.inputs import collect_inputs

        if ns.out.suffix.lower() not in (".npy", ".parquet"):
            raise InputError(f"{ns.out}: --out must end in .npy or .parquet")
        if ns.threads:
            torch.set_num_threads(ns.threads)
        inputs = list(ns.inputs)
        t0 = time.perf_counter()
        from d2v.config import PROJECT_ROOT

        enc = Encoder.load(ns.model, device=ns.device, precision=ns.precision, tokenizer=ns.tokenizer,
                           tokenizer_fallback=PROJECT_ROOT / "models" / "tokenizer" / "spm.model")
        modality = ns.modality
        if ns.split:
            m = modality or (enc.modalities[0] if len(enc.modalities) == 1 else None)
            if m is None:
                raise InputError(f"--split: the model encodes {', '.join(enc.modalities)}; choose one with --modality")
            from d2v.data.manifest import manifest_path

            inputs.append(manifest_path(ns.data_root, m, ns.split))
            modality = m
        if not inputs:
            raise InputError("give INPUT files/folders/manifests or --split")
        mod, items = collect_inputs(inputs, modality, allowed=enc.modalities, limit=ns.limit)
        t1 = time.perf_counter()
        res = enc.encode_items(items, pooling=ns.pooling, layer=ns.layer, batch_size=ns.batch_size,
                               progress=show_progress(ns), on_error="skip" if ns.skip_bad else "raise")
        t2 = time.perf_counter()
        files = write_embeddings(res, ns.out)
        for key, why in res.skipped:
            print(f"skipped {key}: {why}")
        print(json.dumps({"out": [str(f) for f in files], "modality": mod, "items": len(res), "skipped": len(res.skipped),
                          "dim": res.dim, "pooling": res.pooling, "layer": res.layer, "device": str(enc.device),
                          "bf16": enc.bf16, "load_s": round(t1 - t0, 2), "encode_s": round(t2 - t1, 2),
                          "items_per_s": round(len(res) / max(t2 - t1, 1e-9), 1)}))
        return 0

    return run_cli(run)
