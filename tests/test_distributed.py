"""DDP: two gloo processes on the CPU make the same updates as one process on the global batch.

The two-process run goes through the real entry point (``torchrun ... -m d2v.cli.main pretrain``);
the reference is the same command's config run in this process. Dropout and the decoder's mask
noise draw from each process's own RNG, so they are switched off here; everything else (batches,
masks, round robin over three modalities, gradient accumulation with ``no_sync``, clipping, AdamW,
the EMA teacher, the image CLS term) is on.

Tolerance: the per-rank forward sees half the batch and DDP averages two half-batch gradients,
so float32 sums are taken in another order (~1e-7 relative). Losses agree to 1e-5 relative;
after six AdamW steps (lr 1e-3, which divides by sqrt(v) and so amplifies rounding in small
gradients) parameters agree to 1e-4 absolute. Observed on a 2-core CPU: losses 3e-7 relative,
parameters 1e-5 absolute.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import pytest
import torch

from d2v.config import load_config
from d2v.data.streams import batches_in, stream_seed
from d2v.errors import ConfigError
from d2v.train import distributed
from d2v.train.pretrain import pretrain

EQUIV = [
    "experiment=tiny", "data=sample", "data.num_samples=16", "data.audio_seconds=0.5",
    "train.batch_size=4", "train.max_steps=6", "train.warmup_steps=2", "train.grad_accum=2",
    "train.modalities=[image,speech,text]", "+train.track=false", "+train.threads=1", "+train.device=cpu",
    "+model.image.mask_noise_std=0.0", "+model.speech.mask_noise_std=0.0", "+model.text.mask_noise_std=0.0",
    "model.speech.decoder.input_dropout=0.0", "model.text.decoder.input_dropout=0.0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_losses(path) -> list[float]:
    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f, delimiter="\t")]


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    over = [*EQUIV, f"train.out_dir={tmp_path / 'two'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "d2v.cli.main", "pretrain", *over, "--no-progress",
           "--metrics", str(tmp_path / "two.json"), "--history", str(tmp_path / "two.tsv")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count('"checkpoint"') == 1  # the summary is printed by rank 0 only

    threads = torch.get_num_threads()
    try:
        one = pretrain(load_config([*EQUIV, f"train.out_dir={tmp_path / 'one'}"]), progress=False,
                       history_path=tmp_path / "one.tsv")
    finally:
        torch.set_num_threads(threads)

    l1, l2 = read_losses(tmp_path / "one.tsv"), read_losses(tmp_path / "two.tsv")
    assert len(l1) == len(l2) == 6
    assert l2 == pytest.approx(l1, rel=1e-5, abs=1e-6)

    a = torch.load(one.checkpoint, weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert b["world_size"] == 2 and len(b["rng"]) == 2 and b["step"] == a["step"] == 6
    worst = 0.0
    for k, v in a["model"].items():
        if v.is_floating_point():
            worst = max(worst, float((v - b["model"][k]).abs().max()))
        else:
            assert torch.equal(v, b["model"][k]), k
    print(f"1 vs 2 processes: max |loss diff| {max(abs(x - y) for x, y in zip(l1, l2)):.2e}, "
          f"max |param diff| {worst:.2e}")
    assert worst < 1e-4
    # the teacher moved (so it is compared above), and parameters a step did not use kept no
    # optimizer state in either run (DDP left their gradients at None, as one process does)
    assert not torch.equal(a["model"]["teacher.blocks.0.attn.qkv.weight"], a["model"]["blocks.0.attn.qkv.weight"])
    assert sorted(a["optimizer"]["state"]) == sorted(b["optimizer"]["state"])


def test_batch_size_must_split_over_the_world():
    cfg = load_config(["experiment=tiny", "data=sample", "train.batch_size=8"])
    assert cfg.train.per_rank_batch(1) == 8 and cfg.train.per_rank_batch(4) == 2
    with pytest.raises(ConfigError, match=r"train\.batch_size: 8 .*world size 3"):
        cfg.train.per_rank_batch(3)


def test_single_process_without_launcher_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_ranks() == (0, 1, 0)
    info = distributed.init_from_env("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed, info.backend) == (0, 1, True, False, None)
    assert not torch.distributed.is_initialized()
    t = torch.tensor([2.0, 4.0])
    assert distributed.all_reduce_mean(t) is t and t.tolist() == [2.0, 4.0]
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    distributed.cleanup(info)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK=3, WORLD_SIZE=2"):
        distributed.env_ranks()


def test_round_robin_batch_counts_and_stream_seeds():
    mods = ["image", "speech", "text"]
    for a in range(0, 9):
        for b in range(a, 12):
            for m in mods:
                want = sum(1 for s in range(a, b) if mods[s % 3] == m) * 2
                assert batches_in(a, b, m, mods, grad_accum=2) == want
    seeds = {stream_seed(1, r, seg, m) for r in range(4) for seg in (0, 20, 40) for m in mods}
    assert len(seeds) == 4 * 3 * 3  # distinct per (rank, segment, modality)
    assert stream_seed(1, 0, 20, "image") == stream_seed(1, 0, 20, "image")
