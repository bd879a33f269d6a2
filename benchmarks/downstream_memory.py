"""Peak RSS of ``d2v finetune`` and ``d2v evaluate`` (image task) as the labelled split grows.

Fine-tuning and evaluation stream the labelled splits from the WebDataset shards
(``d2v.data.downstream.train_batches`` / ``eval_batches``), so their host memory must not grow
with the split. This benchmark checks that on the CPU:

1. For each multiplier m in ``--sizes`` it builds a synthetic labelled image dataset with
   N = m x ``--base`` training samples, a fixed val split (``--val``) and a test split that grows
   with it (N / 6): 28x28 grey images of 10 classes (a bright horizontal band whose row is the
   class, on uniform noise). The pixels go into an IDX file and a manifest per split, then
   ``d2v.data.shards.write_shards`` writes the shards exactly as ``d2v shard`` does (PNG, ``cls``,
   JSON metadata; ``maxcount`` 2000, ``min_shards`` 4 as params.yaml), so 60,000 samples are 30 shards.
2. It runs ``d2v finetune --task image`` and then ``d2v evaluate --task image`` on it, each in
   its own subprocess, with a params YAML from a ``d2v.config.Config``: a tiny model (D=32,
   3 blocks, the tests' ``build_cfg("image")``) saved as the pretrained checkpoint, one torch
   thread, no MLflow, and the SAME budget at every size: ``--steps`` x ``--batch`` training
   samples per init, the whole (fixed) val split, ``probe_max_train`` (``--probe-train``) probe
   training rows, and ``max_eval: 0``, so evaluation scores and extracts features for EVERY test
   sample (two scoring passes and two feature passes over the growing test split).
3. Peak RSS, two numbers per stage, both the kernel's high-water mark ``ru_maxrss``:
   ``peak_rss_mib``, the whole process to its exit, from ``os.wait4`` in a small launcher process
   (what ``/usr/bin/time -v`` reports; not cumulative over children as ``RUSAGE_CHILDREN`` is),
   and ``run_peak_rss_mib``, the process's own ``ru_maxrss`` when the command (``d2v.cli.main.main``,
   what ``python -m d2v.cli.main`` runs) has returned, before interpreter teardown, which with torch
   loaded touches over 100 MiB more by itself and can hide growth beneath it. The launcher matters:
   on Linux a process that exec()s keeps the peak RSS of the image it replaced, and subprocess
   spawns with vfork, so a stage started directly by this (torch-sized) process would report this
   process's peak. Also recorded: wall seconds, fine-tuning samples/s (training samples of both
   inits over the seconds of the two runs, from the fine-tuning report) and the same two peaks of
   a process that only imports torch, webdataset and the d2v stages (the floor).
4. A control (``--no-control`` skips it): a process that decodes the whole training split into
   memory with the in-memory reader ``d2v.data.downstream.load_split``. Its peak RSS must grow
   with N (60,000 x 28 x 28 float32 is 180 MiB, and concatenating the batches doubles it): the
   measurement can see growth, so a flat stage is flat, not unmeasured.

The report says, per stage and for both peaks, max/min over the sizes and max - min in MiB, and
``flat`` (both ratios <= 1.10). The ratio is of the whole process, most of which is the import
floor, so the MiB difference is the sharper number. What evaluation keeps grows with the test
split by design, bounded by ``max_eval``: the probe's test features (N_test x D float64; 10,000 x 32
is 2.4 MiB), held as one small array per batch, and those arrays pin freed heap between them
(glibc), which costs far more than the features (BENCHMARKS.md, "Fine-tuning and evaluation
memory vs split size").

    python benchmarks/downstream_memory.py                              # 600 / 6,000 / 60,000 samples
    python benchmarks/downstream_memory.py --base 40 --sizes 1,2 --steps 2 --out /tmp/m.json   # smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from step_time import cpu_name, write_report  # noqa: E402

from d2v.config import PROJECT_ROOT, Config, DataConfig, FinetuneConfig, TaskConfig, to_dict  # noqa: E402
from d2v.data.manifest import manifest_path, raw_dir, write_manifest  # noqa: E402
from d2v.data.shards import write_shards  # noqa: E402
from d2v.models import DecoderConfig, ImageConfig, ModelConfig  # noqa: E402

CLASSES = 10
SIDE = 28
MAXCOUNT, MIN_SHARDS = 2000, 4  # params.yaml data.shard
FLAT_RATIO = 1.10
MIB = 2**20
FLOOR_IMPORTS = "import torch, webdataset, d2v.cli.main, d2v.train.finetune, d2v.train.evaluate"


# ------------------------------------------------------------------------------ data
def _images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (n, 28, 28) uint8 and their classes: noise in [0, 80) plus 150 on a 3-row band
    starting at row 4 + 2 * class (the band's row is the class: learnable, not trivial)."""
    labels = np.arange(n) % CLASSES
    rng.shuffle(labels)
    img = rng.integers(0, 80, (n, SIDE, SIDE), dtype=np.uint8)
    rows = np.arange(SIDE)[None, :]
    start = (4 + 2 * labels)[:, None]
    band = (rows >= start) & (rows < start + 3)  # (n, 28)
    img += (150 * band).astype(np.uint8)[:, :, None]
    return img, labels


def _write_idx(path: Path, images: np.ndarray) -> None:
    """An IDX ``idx3`` unsigned-byte file (the MNIST format the image sources read)."""
    n, h, w = images.shape
    header = (0x0803).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in (n, h, w))
    path.write_bytes(header + np.ascontiguousarray(images).tobytes())


def build_dataset(root: Path, sizes: dict[str, int], seed: int) -> dict:
    """The raw IDX files and manifests of every split, then the shards (``write_shards``); the raw
    folder is removed afterwards (only the shards are read). Returns the shard summary."""
    base = raw_dir(root, "image")
    (base / "files").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        images, labels = _images(n, rng)
        rel = f"files/{split}-images-idx3-ubyte"
        _write_idx(base / rel, images)
        rows = ({"key": f"syn-{split}-{i:06d}", "split": split, "label": f"c{int(c)}", "path": rel, "offset": i,
                 "width": SIDE, "height": SIDE} for i, c in enumerate(labels))
        write_manifest(manifest_path(root, "image", split), "image", rows)
    summary = write_shards("image", root, seed=seed, maxcount=MAXCOUNT, min_shards=MIN_SHARDS, progress=False)
    shutil.rmtree(root / "raw")
    return summary


# ------------------------------------------------------------------------------ config
def tiny_model() -> ModelConfig:
    """The tests' ``build_cfg("image")``: D=32, 3 blocks, 4 heads, no dropout, 28x28x1, patch 4."""
    return ModelConfig(
        embed_dim=32, depth=3, num_heads=4, mlp_ratio=4.0,
        encoder_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, post_mlp_drop=0.0,
        layerdrop=0.0, average_top_k_layers=2, clone_batch=2, layer_norm_targets=True, cls_loss=0.01,
        ema_decay=0.99, ema_end_decay=0.999, ema_anneal_end_step=100,
        min_target_var=0.0, min_pred_var=0.0, collapse_check_after=10,
        image=ImageConfig(input_size=SIDE, in_chans=1, patch_size=4, prenet_depth=1,
                          decoder=DecoderConfig(decoder_dim=32, decoder_groups=4, decoder_kernel=3, decoder_layers=2,
                                                input_dropout=0.0)),
    )


def make_config(root: Path, out: Path, init: str, ns: argparse.Namespace) -> Config:
    task = TaskConfig(steps=ns.steps, batch_size=ns.batch, lr=2e-3, warmup_steps=min(5, ns.steps // 2),
                      layer_decay=0.75, max_eval=0, eval_batch_size=256, probe_max_train=ns.probe_train)
    return Config(seed=ns.seed, model=tiny_model(), data=DataConfig(source="shards", root=str(root)),
                  finetune=FinetuneConfig(tasks=["image"], image=task, init=init, out_dir=str(out / "finetune"),
                                          device="cpu", threads=ns.threads, track=False))


def save_pretrained(cfg: Config, path: Path, seed: int) -> Path:
    """A pretraining-style checkpoint (``{"model", "config", "step"}``) of a fresh tiny model."""
    import torch

    from d2v.models import Data2Vec2

    torch.manual_seed(seed)
    model = Data2Vec2(cfg.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "step": 0}, path)
    return path


# ------------------------------------------------------------------------------ measurement
# The measured process is started by a small launcher, never by this (torch-sized) process: Linux
# hands a process that exec()s the peak RSS of the image it replaces, and subprocess spawns with
# vfork, so a child of this process would start with this process's peak as its own ru_maxrss.
LAUNCHER = """
import json, os, subprocess, sys
with open(sys.argv[1], "w") as log:
    p = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"rc": p.returncode, "maxrss_kib": usage.ru_maxrss}))
"""
# Appended to a measured program: its peak RSS so far (KiB) into the file sys.argv[1], before the
# interpreter's teardown (which, with torch loaded, touches over 100 MiB more on its own).
REPORT = """
import resource as _r
with open(sys.argv[1], "w") as _f:
    _f.write(str(_r.getrusage(_r.RUSAGE_SELF).ru_maxrss))
"""
# What `python -m d2v.cli.main <argv>` runs, then the report.
STAGE = "import sys\nfrom d2v.cli.main import main\nrc = main(sys.argv[2:])\n" + REPORT + "sys.exit(rc)\n"
FLOOR = "import sys\n" + FLOOR_IMPORTS + "\n" + REPORT
CONTROL = ("import sys\nfrom d2v.data.downstream import load_split\n"
           "print(len(load_split(sys.argv[2], 'image', 'train')), 'samples decoded')\n" + REPORT)


def measure(code: str, args: list[str], log: Path, threads: int) -> dict:
    """Run ``python -c code <report file> *args`` under the launcher; its peak RSS, whole process
    (``ru_maxrss`` from ``os.wait4``, KiB on Linux) and before teardown (its own report), and wall
    seconds. Output goes to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    report = log.with_suffix(".maxrss")
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", code, str(report), *args]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", LAUNCHER, str(log), *cmd], capture_output=True, text=True, env=env,
                       cwd=log.parent)
    seconds = time.perf_counter() - t0
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"launcher failed (exit {r.returncode}): {r.stderr[-2000:]}") from None
    if out["rc"] != 0 or not report.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"exit {out['rc']}: {' '.join(args) or 'python -c'}\n--- {log} (tail) ---\n{tail}")
    return {"peak_rss_mib": out["maxrss_kib"] / 1024, "run_peak_rss_mib": int(report.read_text()) / 1024,
            "seconds": seconds}


def run_size(mult: int, work: Path, ns: argparse.Namespace) -> dict:
    n_train = mult * ns.base
    sizes = {"train": n_train, "val": ns.val, "test": max(1, n_train // 6)}
    d = work / f"x{mult}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    summary = build_dataset(d / "data", sizes, ns.seed)
    build_s = time.perf_counter() - t0
    cfg = make_config(d / "data", d, "", ns)
    cfg.finetune.init = str(save_pretrained(cfg, d / "pretrain" / "checkpoint.pt", ns.seed + 10))
    params = d / "params.yaml"
    params.write_text(yaml.safe_dump(to_dict(cfg)))
    common = ["--task", "image", "--params", str(params), "--no-progress"]
    ft_json, ev_json = d / "finetune_image.json", d / "eval_image.json"
    ft = measure(STAGE, ["finetune", *common, "--metrics", str(ft_json), "--history", str(d / "finetune_image.tsv")],
                 d / "finetune.log", ns.threads)
    ev = measure(STAGE, ["evaluate", *common, "--metrics", str(ev_json), "--plot", str(d / "confusion.png")],
                 d / "evaluate.log", ns.threads)
    control = None
    if ns.control:  # the in-memory reader on the same split: shows that this measurement sees growth
        control = measure(CONTROL, [str(d / "data")], d / "control.log", ns.threads)
    ftr, evr = json.loads(ft_json.read_text()), json.loads(ev_json.read_text())
    train_s = ftr["seconds"] + ftr["baseline_seconds"]
    ft.update(samples_per_s=2 * ns.steps * ns.batch / train_s, run_seconds=train_s,
              val_accuracy=ftr["val_accuracy"], baseline_val_accuracy=ftr["baseline_val_accuracy"])
    ev.update(eval_samples=evr["eval_samples"], probe_train_samples=evr["probe_train_samples"],
              accuracy=evr["accuracy"], probe_accuracy=evr["probe_accuracy"],
              test_features_mib=evr["eval_samples"] * cfg.model.embed_dim * 8 / MIB)
    splits = summary["splits"]
    row = {"multiplier": mult, "train_samples": n_train, "val_samples": sizes["val"], "test_samples": sizes["test"],
           "shards": {s: splits[s]["shards"] for s in splits},
           "shard_bytes": {s: splits[s]["bytes"] for s in splits},
           "shard_mib_total": sum(splits[s]["bytes"] for s in splits) / MIB,
           "build_seconds": build_s, "finetune": ft, "evaluate": ev, "control_load_split": control}
    if ev["eval_samples"] != sizes["test"]:
        raise RuntimeError(f"evaluate scored {ev['eval_samples']} test samples, expected all {sizes['test']}")
    if not ns.keep:
        shutil.rmtree(d / "data")
    return row


def spread(values: list[float]) -> dict:
    """Min, max, max/min and max - min of peak RSS values (MiB)."""
    return {"min_peak_rss_mib": min(values), "max_peak_rss_mib": max(values), "ratio": max(values) / min(values),
            "max_minus_min_mib": max(values) - min(values)}


def table(report: dict) -> str:
    s = report["summary"]
    control = "control" in s
    lines = ["| train N | test N | shards MiB | finetune peak RSS MiB (process / before exit) | finetune s "
             "| finetune samples/s | evaluate peak RSS MiB (process / before exit) | evaluate s |"
             + (" control: load_split(train) peak RSS MiB (process / before exit) |" if control else ""),
             "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if control else "")]

    def rss(x: dict) -> str:
        return f"{x['peak_rss_mib']:.0f} / {x['run_peak_rss_mib']:.0f}"

    for r in report["results"]:
        ft, ev = r["finetune"], r["evaluate"]
        lines.append(f"| {r['train_samples']:,} | {r['test_samples']:,} | {r['shard_mib_total']:.1f} "
                     f"| {rss(ft)} | {ft['seconds']:.1f} | {ft['samples_per_s']:.0f} | {rss(ev)} | {ev['seconds']:.1f} |"
                     + (f" {rss(r['control_load_split'])} |" if control else ""))
    lines.append("")
    lines.append(f"import floor (python + torch + webdataset + d2v stages): {report['import_floor_rss_mib']:.0f} / "
                 f"{report['import_floor_run_rss_mib']:.0f} MiB")
    for stage in ("finetune", "evaluate", "control")[: 3 if control else 2]:
        x = s[stage]
        lines.append(f"max/min peak RSS, {stage}: process {x['ratio']:.3f} (max - min {x['max_minus_min_mib']:.0f} MiB), "
                     f"before exit {x['run']['ratio']:.3f} (max - min {x['run']['max_minus_min_mib']:.0f} MiB)"
                     + (f"; flat (<= {FLAT_RATIO}): {x['flat']}" if stage != "control" else " (expected to grow)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=int, default=600, help="training samples at multiplier 1 (default 600)")
    p.add_argument("--sizes", default="1,10,100",
                   help="comma-separated multipliers of --base for the training split; the test split is "
                        "train/6 (default 1,10,100)")
    p.add_argument("--val", type=int, default=200, help="val samples, the same at every size (default 200)")
    p.add_argument("--steps", type=int, default=30, help="fine-tuning steps per init, every size (default 30)")
    p.add_argument("--batch", type=int, default=32, help="fine-tuning batch size (default 32)")
    p.add_argument("--probe-train", type=int, default=500,
                   help="finetune.image.probe_max_train: probe training rows, every size (default 500)")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of each stage (default 1)")
    p.add_argument("--seed", type=int, default=0, help="data, shard order, model init and training seed (default 0)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the synthetic data, configs, logs and models (default: a temporary "
                        "folder, removed at the end); each size's shards are removed after it is measured "
                        "unless --keep")
    p.add_argument("--keep", action="store_true", help="keep each size's shards under --work")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the control: a process that decodes the whole training split into memory "
                        "(d2v.data.downstream.load_split), whose peak RSS must grow, showing the measurement can "
                        "see growth")
    p.add_argument("--out", type=Path, default=Path("reports/bench/downstream_memory.json"),
                   help="report JSON (default reports/bench/downstream_memory.json)")
    ns = p.parse_args(argv)
    try:
        mults = [int(x) for x in ns.sizes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--sizes: comma-separated integers, got {ns.sizes!r}")
    if not mults or min(mults) < 1 or ns.base < CLASSES or ns.steps < 1 or ns.batch < 1 or ns.val < 1:
        p.error("--sizes >= 1, --base >= 10, --steps >= 1, --batch >= 1, --val >= 1")

    tmp = None
    if ns.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="d2v-memory-")
        work = Path(tmp.name)
    else:
        work = ns.work.resolve()
        work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    try:
        floor = measure(FLOOR, [], work / "floor.log", ns.threads)
        rows = []
        for m in mults:
            rows.append(run_size(m, work, ns))
            r = rows[-1]
            print(f"x{m}: train {r['train_samples']:,}, test {r['test_samples']:,}: finetune "
                  f"{r['finetune']['peak_rss_mib']:.0f} / {r['finetune']['run_peak_rss_mib']:.0f} MiB "
                  f"({r['finetune']['seconds']:.0f} s), evaluate {r['evaluate']['peak_rss_mib']:.0f} / "
                  f"{r['evaluate']['run_peak_rss_mib']:.0f} MiB ({r['evaluate']['seconds']:.0f} s)", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    summary: dict = {}
    for stage in ("finetune", "evaluate") + (("control",) if ns.control else ()):
        key = "control_load_split" if stage == "control" else stage
        summary[stage] = {**spread([r[key]["peak_rss_mib"] for r in rows]),
                          "run": spread([r[key]["run_peak_rss_mib"] for r in rows])}
        if stage != "control":  # the control is expected to grow: not part of "flat"
            summary[stage]["flat"] = max(summary[stage]["ratio"], summary[stage]["run"]["ratio"]) <= FLAT_RATIO
    summary["flat"] = summary["finetune"]["flat"] and summary["evaluate"]["flat"]
    summary["flat_threshold"] = FLAT_RATIO
    try:
        command_path = str(Path(__file__).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        command_path = __file__
    report = {
        "command": f"python {command_path} " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": ns.threads},
        "seed": ns.seed,
        "settings": {"base": ns.base, "sizes": mults, "val": ns.val, "test": "train // 6", "steps": ns.steps,
                     "batch": ns.batch, "probe_max_train": ns.probe_train, "max_eval": 0, "eval_batch_size": 256,
                     "shard_maxcount": MAXCOUNT, "shard_min_shards": MIN_SHARDS, "model": "D=32, depth 3, 28x28x1",
                     "rss": "peak_rss_mib: ru_maxrss of the stage's whole process (os.wait4 in a small launcher); "
                            "run_peak_rss_mib: its own ru_maxrss when the command returned, before interpreter "
                            "teardown", "control": ns.control},
        "import_floor_rss_mib": floor["peak_rss_mib"],
        "import_floor_run_rss_mib": floor["run_peak_rss_mib"],
        "results": rows,
        "summary": summary,
        "total_seconds": time.perf_counter() - t_all,
    }
    print(f"{report['machine']['cpu']} ({report['machine']['cores']} cores, {ns.threads} thread(s) per stage)")
    print(table(report))
    write_report(report, ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
