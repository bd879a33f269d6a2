"""Fault injection: the pipeline survives crashes, a full disk, a locked tracking store and a
failing orchestration task without losing work or reading half-written files.

* kill -9 during pretraining (a real ``d2v pretrain`` process), then ``--resume``: the final
  student, teacher and optimizer state equal an uninterrupted run's, bit for bit (CPU, 1 thread);
* kill -9 while a checkpoint is being written: the previous checkpoint stays loadable and the run
  resumes from it exactly;
* kill -9 while shards are being written: the partial shard is never listed in an index, so no
  reader takes it for a whole one; a rerun writes the same bytes as a clean run;
* the disk filling up while a checkpoint or a shard is written (a real tmpfs of a few MB when
  this process may mount one, else ``OSError(ENOSPC)`` injected at the file-write boundary): a
  clear error naming the file, nothing corrupted, no temp file left;
* the MLflow SQLite store locked by another writer (``BEGIN EXCLUSIVE`` from another process):
  the run waits or retries, no metric is lost or written twice;
* a Prefect task (a DVC stage) that fails once: retried and completed (slow: a temporary
  Prefect server);
* the training health guards: collapse (target / prediction variance) and NaN/Inf stop training
  with the quantity and the step, keeping the last good checkpoint; the speech encoder's local
  CNN statistics are logged;
* security defaults: weights-only loading, safe YAML, loopback servers, verified downloads.

``pytest -m faults`` (quick part: ``-m "faults and not slow"``); all of it with the bad-input
corpus: ``scripts/test_faults.sh``. BENCHMARKS.md ("Reliability") has the table.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_pretrain import shard_root  # noqa: F401 - the fixture: tiny shards of all three modalities

from d2v.config import load_config
from d2v.errors import CollapseError, InputError
from d2v.train.checkpoint import CHECKPOINT, load_checkpoint
from d2v.train.pretrain import pretrain

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
# A small run of two modalities with dropout (so the RNG state in checkpoints matters): 8 steps,
# a checkpoint every 2.
RUN = ["experiment=tiny", "data=sample", "data.num_samples=32", "train.batch_size=4", "train.max_steps=8",
       "train.ckpt_every=2", "train.warmup_steps=2", "train.modalities=[image,text]", "+train.threads=1",
       "+train.track=false", "model.encoder_dropout=0.1", "model.text.dropout=0.1"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cfg(out_dir: Path, *extra: str):
    return load_config([*RUN, f"train.out_dir={out_dir}", *extra])


def child_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def cli_args(out_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", *RUN, f"train.out_dir={out_dir}", "train.log_every=1", *extra, "--no-progress",
            "--metrics", str(out_dir.parent / "metrics.json"), "--history", str(out_dir.parent / "history.tsv")]


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 300) -> str:
    """Read the child's output until a line matches ``pattern``; fail if it ends or times out first."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return line
    proc.kill()
    pytest.fail(f"child never printed {pattern!r} (rc {proc.poll()}):\n{''.join(seen)[-3000:]}")


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read() if proc.stdout else ""
            proc.kill()
            pytest.fail(f"child ended (rc {proc.poll()}) or timed out before {path.name} appeared:\n{out[-3000:]}")
        time.sleep(0.05)


def assert_same(a, b, where: str = "") -> None:
    """Recursive bit-for-bit equality of checkpoint contents (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(ref: dict, got: dict) -> None:
    assert got["step"] == ref["step"]
    assert_same(ref["model"], got["model"], "model")  # student and EMA teacher
    assert_same(ref["optimizer"], got["optimizer"], "optimizer")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run: its final checkpoint and the size of one checkpoint file."""
    out = tmp_path_factory.mktemp("reference") / "out"
    res = pretrain(run_cfg(out), progress=False)
    state = torch.load(res.checkpoint, weights_only=True)
    assert state["step"] == 8
    return {"state": state, "size": Path(res.checkpoint).stat().st_size, "history": res.history}


# ------------------------------------------------------------------------------------ kill -9
@pytest.mark.slow
def test_kill_9_during_pretraining_then_resume_is_bit_exact(tmp_path, reference):
    """kill -9 at whatever point the run has reached after step 3 (the quick test below kills it
    at a known point: inside a checkpoint write)."""
    out = tmp_path / "run" / "out"
    proc = subprocess.Popen([sys.executable, "-m", "d2v.cli.main", *cli_args(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=tmp_path)
    wait_for_line(proc, r"^step 3/8 ")
    kill9(proc)  # somewhere in steps 4..8: between checkpoints, in one, or in a forward pass
    saved = load_checkpoint(out / CHECKPOINT, run_cfg(out))  # what the kill left is loadable
    assert 2 <= saved["step"] < 8, "the run ended before the kill: nothing was interrupted"
    res = pretrain(run_cfg(out), resume=True, progress=False)
    assert_same_training_state(reference["state"], torch.load(res.checkpoint, weights_only=True))
    assert [r["loss"] for r in res.history] == [r["loss"] for r in reference["history"][saved["step"]:]]


# torch.save in the child writes the first checkpoint normally; the second one only half, then
# the process signals the parent (a marker file) and hangs until it is killed.
_HALF_WRITTEN_SAVE = r"""
import io, sys, time, torch
torch.set_num_threads(1)
marker, calls, real = sys.argv[1], [], torch.save
def save(obj, f, *a, **k):
    calls.append(1)
    if len(calls) < 2:
        return real(obj, f, *a, **k)
    buf = io.BytesIO(); real(obj, buf, *a, **k); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush()
    open(marker, "w").write(str(len(data)))
    time.sleep(600)
torch.save = save
from d2v.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, reference):
    out = tmp_path / "run" / "out"
    marker = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", _HALF_WRITTEN_SAVE, str(marker), *cli_args(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=tmp_path)
    wait_for_file(marker, proc)
    kill9(proc)
    part = out / (CHECKPOINT + ".tmp")
    assert part.stat().st_size == int(marker.read_text()) // 2  # a real half-written file on disk ...
    with pytest.raises(Exception):  # noqa: B017 - RuntimeError or UnpicklingError, by where the cut falls
        torch.load(part, weights_only=True)
    saved = load_checkpoint(out / CHECKPOINT, run_cfg(out))  # ... and the previous checkpoint intact
    assert saved["step"] == 2
    res = pretrain(run_cfg(out), resume=True, progress=False)
    assert_same_training_state(reference["state"], torch.load(res.checkpoint, weights_only=True))
    assert not part.exists()  # the next checkpoint write replaced the stale temp file


@pytest.mark.slow
def test_repeated_kills_during_pretraining_from_shards(tmp_path, shard_root):  # noqa: F811 - the fixture
    """Three kill -9s at different points of a run reading shard streams, each resumed with
    ``d2v pretrain --resume``: the result equals an uninterrupted run's."""
    from test_pretrain import tiny_shards

    over = ["train.max_steps=9", "train.ckpt_every=3", "train.warmup_steps=2", "+train.threads=1"]
    ref = torch.load(pretrain(tiny_shards(tmp_path / "ref", shard_root, *over), progress=False).checkpoint,
                     weights_only=True)
    out = tmp_path / "run" / "out"
    args = ["pretrain", "experiment=tiny", f"data.root={shard_root}", "data.audio_seconds=0.5", "data.text_length=16",
            "data.tokenizer.vocab_size=40", "train.batch_size=4", "train.modalities=[image,speech,text]",
            "+train.track=false", f"train.out_dir={out}", "train.log_every=1", *over, "--no-progress",
            "--metrics", str(tmp_path / "m.json"), "--history", str(tmp_path / "h.tsv")]
    steps = []
    for i, at in enumerate((2, 4, 7)):
        proc = subprocess.Popen([sys.executable, "-m", "d2v.cli.main", *args, *(["--resume"] if i else [])],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
                                cwd=tmp_path)
        wait_for_line(proc, rf"^step {at}/9 ")
        kill9(proc)
        ck = out / CHECKPOINT
        steps.append(torch.load(ck, weights_only=True)["step"] if ck.exists() else 0)
    r = subprocess.run([sys.executable, "-m", "d2v.cli.main", *args, "--resume"], capture_output=True, text=True,
                       env=child_env(), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout
    assert steps == sorted(steps) and steps[-1] < 9
    assert_same_training_state(ref, torch.load(out / CHECKPOINT, weights_only=True))


# shards: the child writes image shards (maxcount 4: train 4+4+2, val 3, test 3) and hangs in
# the middle of the second train shard, after signalling the parent.
_HANGING_SHARD_WRITER = r"""
import sys, time
import webdataset as wds
from d2v.data.shards import write_shards
marker, root = sys.argv[1], sys.argv[2]
real, n = wds.TarWriter.write, [0]
def write(self, obj):
    real(self, obj)
    n[0] += 1
    if n[0] == 6:
        stream = self.tarstream.fileobj  # tarfile's _Stream over the open .tar.tmp file
        getattr(stream, "fileobj", stream).flush()
        open(marker, "w").write("6")
        time.sleep(600)
wds.TarWriter.write = write
write_shards("image", root, seed=0, maxcount=4, min_shards=1, progress=False)
"""


def test_kill_9_during_shard_writing_never_exposes_a_partial_shard(tmp_path):
    from test_shards import make_image_data

    from d2v.data import loaders
    from d2v.data.shards import shard_dir, shard_urls, write_shards

    clean, root = tmp_path / "clean", tmp_path / "root"
    for r in (clean, root):
        make_image_data(r)
    write_shards("image", clean, seed=0, maxcount=4, min_shards=1, progress=False)
    write_shards("image", root, seed=0, maxcount=4, min_shards=1, progress=False)  # an earlier, complete run
    marker = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", _HANGING_SHARD_WRITER, str(marker), str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    wait_for_file(marker, proc)
    kill9(proc)
    out = shard_dir(root, "image")
    partial = sorted(p.name for p in out.glob("*.tmp"))
    assert partial == ["train-000001.tar.tmp"]  # the half-written shard is there ...
    # ... but no index lists it (or anything of the interrupted run): readers cannot take it for whole
    for split in ("train", "val", "test"):
        with pytest.raises(FileNotFoundError, match=rf"shard index not found: .*{split}\.json"):
            shard_urls(root, "image", split)
    cfg = load_config(["experiment=tiny", f"data.root={root}", "+train.track=false"])
    with pytest.raises(FileNotFoundError, match="shard index not found"):
        next(iter(loaders.make_train_loader(cfg, "image", 2, 1, seed=0)))
    # a rerun cleans up and writes exactly what an uninterrupted run writes
    write_shards("image", root, seed=0, maxcount=4, min_shards=1, progress=False)
    assert not list(out.glob("*.tmp"))
    got = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".tar", ".json")}
    want = {p.name: p.read_bytes() for p in shard_dir(clean, "image").iterdir() if p.suffix in (".tar", ".json")}
    assert "summary.json" in got  # with the counts only, no wall time: the same bytes
    assert got == want


# ------------------------------------------------------------------------------------ disk full
@contextlib.contextmanager
def small_disk(path: Path, size: int) -> Iterator[str | None]:
    """A tmpfs of ``size`` bytes mounted at ``path`` ("tmpfs"), or None where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    can = (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") and shutil.which("umount")
           and not os.environ.get("D2V_FAULTS_NO_TMPFS"))  # set it to test the ENOSPC-injection fallback
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True) if can else None
    if r is None or r.returncode != 0:
        yield None
        return
    try:
        yield "tmpfs"
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class _FullDisk:
    """A writable file that fails with ENOSPC once ``budget`` bytes (shared by all files) are used."""

    def __init__(self, f, budget: list[int]):
        self.f, self.budget = f, budget

    def write(self, b) -> int:
        n = len(memoryview(b).cast("B"))
        if n > self.budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget[0] -= n
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_during_a_checkpoint_write(tmp_path, reference, monkeypatch):
    from d2v import io as d2v_io

    size = reference["size"]
    out = tmp_path / "disk" / "out"
    with small_disk(out, (size * 3 // 2 // 4096 + 1) * 4096) as how:  # the first checkpoint fits, a second not
        if how is None:  # no mount permission: the same failure, raised where the bytes are written
            budget = [size * 3 // 2]
            monkeypatch.setattr(d2v_io, "open", lambda *a, **k: _FullDisk(open(*a, **k), budget), raising=False)
        with pytest.raises(OSError) as ei:
            pretrain(run_cfg(out), progress=False)
        monkeypatch.undo()
        e = ei.value
        assert e.errno == errno.ENOSPC
        assert f"{out / CHECKPOINT}: could not write the checkpoint (No space left on device)" in str(e)
        assert "the previous checkpoint" in str(e) and "is unchanged" in str(e)
        assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT]  # no temp file left taking the space
        saved = load_checkpoint(out / CHECKPOINT, run_cfg(out))
        assert saved["step"] == 2
        # nothing lost: the run continues from it elsewhere and ends where the uninterrupted one did
        res = pretrain(run_cfg(tmp_path / "elsewhere"), resume=out / CHECKPOINT, progress=False)
    assert_same_training_state(reference["state"], torch.load(res.checkpoint, weights_only=True))
    print(f"disk full simulated with: {how or 'ENOSPC injected at the file write'}")


def test_disk_full_while_writing_a_model_folder(tmp_path, monkeypatch):
    """``save_model_dir`` (convert, registry) on a full disk: a clear error, the old folder kept."""
    from conftest import build_cfg

    from d2v import io as d2v_io
    from d2v.models import Data2Vec2
    from d2v.models import model_dir as export

    model = Data2Vec2(build_cfg("image"))
    first = export.save_model_dir(model, tmp_path / "probe" / "m")
    size = (first / export.WEIGHTS_FILE).stat().st_size
    disk = tmp_path / "disk"
    with small_disk(disk, (size * 3 // 2 // 4096 + 2) * 4096) as how:
        if how is None:
            budget = [size * 3 // 2]
            monkeypatch.setattr(d2v_io, "open", lambda *a, **k: _FullDisk(open(*a, **k), budget), raising=False)
        export.save_model_dir(model, disk / "m")  # fits
        with pytest.raises(OSError) as ei:
            export.save_model_dir(model, disk / "m")  # a second copy does not
        monkeypatch.undo()
        assert ei.value.errno == errno.ENOSPC
        assert f"{disk / 'm'}: could not write the model folder (No space left on device); " \
               f"{disk / 'm'} is unchanged" in str(ei.value)
        assert sorted(p.name for p in disk.iterdir()) == ["m"]  # no temp folder left
        export.load_model_dir(disk / "m")


def test_disk_full_during_shard_writing(tmp_path, monkeypatch):
    import webdataset as wds
    from test_shards import make_image_data

    from d2v.data.shards import shard_dir, shard_urls, write_shards

    clean = tmp_path / "clean"
    make_image_data(clean)
    write_shards("image", clean, seed=0, maxcount=4, min_shards=1, progress=False)
    train = [p.stat().st_size for p in shard_dir(clean, "image").glob("train-*.tar")]
    pages = sum(-(-n // 4096) for n in train) + 1  # the train shards and train.json fit; val's first shard not
    root = tmp_path / "root"
    make_image_data(root)
    out = shard_dir(root, "image")
    with small_disk(out, pages * 4096) as how:
        if how is None:
            budget, real = [sum(train) + 100], wds.TarWriter

            def writer(path, **kw):
                return real(_FullDisk(open(path, "wb"), budget), **kw)

            monkeypatch.setattr(wds, "TarWriter", writer)
        with pytest.raises(OSError) as ei:
            write_shards("image", root, seed=0, maxcount=4, min_shards=1, progress=False)
        monkeypatch.undo()
        assert ei.value.errno == errno.ENOSPC
        assert f"{out}: could not write the val shards of image (No space left on device); the partial shard " \
               "was removed and no val.json index written" in str(ei.value)
        assert not list(out.glob("*.tmp"))
        # the split written before the disk filled up is whole: its index lists complete shards only
        urls = shard_urls(root, "image", "train")
        assert len(urls) == 3
        for u in urls:
            with tarfile.open(u) as tf:
                assert len(tf.getmembers()) > 0
            assert Path(u).read_bytes() == (shard_dir(clean, "image") / Path(u).name).read_bytes()
        for split in ("val", "test"):
            with pytest.raises(FileNotFoundError, match="shard index not found"):
                shard_urls(root, "image", split)
    print(f"disk full simulated with: {how or 'ENOSPC injected at the file write'}")


# ------------------------------------------------------------------------------------ locked MLflow store
_HOLD_LOCK = r"""
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("COMMIT")
"""


@contextlib.contextmanager
def store_locked(seconds: float) -> Iterator[None]:
    """Another process holds an exclusive lock on the MLflow SQLite store for ``seconds``."""
    from d2v.tracking.mlflow_utils import tracking_uri

    uri = tracking_uri()
    assert uri.startswith("sqlite:///"), uri
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, uri[len("sqlite:///"):], str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.wait(timeout=seconds + 60)


def _history(tr, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tr.client.get_metric_history(tr.run_id, key))


@pytest.mark.slow
def test_a_locked_mlflow_store_makes_the_run_wait_and_loses_no_metric():
    from d2v.tracking.mlflow_utils import Tracker

    tr = Tracker("faults-locked-store", {"a": 1})
    for s in range(1, 31):
        tr.log({"loss": 1.0 / s}, s)
    with store_locked(2.5):
        t0 = time.monotonic()
        tr.finish()
        waited = time.monotonic() - t0
    assert waited > 1.5, "the store was locked: the write should have waited"
    assert _history(tr, "loss") == [(s, 1.0 / s) for s in range(1, 31)]
    assert tr.client.get_run(tr.run_id).info.status == "FINISHED"


class _Store:
    """An in-memory stand-in for MlflowClient (what Tracker calls), failing as a locked store does."""

    def __init__(self, fail_calls=(), error: str = "(sqlite3.OperationalError) database is locked"):
        self.metrics, self.calls, self.status = [], [], None
        self.fail_calls, self.error = set(fail_calls), error

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        from mlflow.exceptions import MlflowException

        self.calls.append(len(metrics))
        if len(self.calls) in self.fail_calls or "always" in self.fail_calls:
            raise MlflowException(self.error)
        self.metrics += [(m.key, m.step, m.value) for m in metrics]

    def set_terminated(self, run_id, status=None):
        self.status = status


def _offline_tracker(store: _Store):
    from mlflow.entities import Metric

    from d2v.tracking.mlflow_utils import Tracker

    tr = Tracker.__new__(Tracker)
    tr.client, tr.run_id, tr._pending, tr._metric = store, "offline", [], Metric
    tr._system = None  # no system-metrics monitor thread
    return tr


def test_store_errors_are_retried_with_backoff_without_duplicates(monkeypatch):
    from mlflow.exceptions import MlflowException

    from d2v.tracking import mlflow_utils

    monkeypatch.setattr(mlflow_utils, "_BACKOFF_MAX_S", 0.05)
    store = _Store(fail_calls=(2, 3))  # the second batch fails twice, as a locked store does
    tr = _offline_tracker(store)
    for s in range(1, 2501):
        tr.log({"m": float(s)}, s)  # 2500 metrics: flushed at 500 each, batches of up to 1000
    tr.finish()
    assert store.calls[:3] == [500, 500, 500] and len(store.calls) == 7  # the failed batch alone was resent
    assert sorted(store.metrics) == [("m", s, float(s)) for s in range(1, 2501)]  # none lost, none twice
    assert store.status == "FINISHED"

    # a store that stays locked past the budget: a clear error, and the metrics stay buffered
    monkeypatch.setenv("D2V_MLFLOW_RETRY_S", "0.2")
    store = _Store(fail_calls=("always",))
    tr = _offline_tracker(store)
    tr.log({"late": 1.0}, 1)
    with pytest.raises(RuntimeError, match=r"MLflow store .* stayed locked for \d+ s \(\d+ attempts\) while writing 1 "
                                           r"metrics.*the 1 unsent metrics are saved in .*\.jsonl"):
        tr.flush()
    assert len(tr._pending) == 1 and len(store.calls) > 2
    assert tr._spool_path().is_file()  # a durable copy while the stage fails
    store.fail_calls = set()
    tr.finish()
    assert store.metrics == [("late", 1, 1.0)]
    assert not tr._spool_path().exists()  # sent from memory: the copy is gone, so never sent twice
    # other errors are not retried
    tr = _offline_tracker(_Store(fail_calls=("always",), error="INVALID_PARAMETER_VALUE: bad key"))
    tr.log({"x": 1.0}, 1)
    with pytest.raises(MlflowException, match="bad key"):
        tr.flush()
    assert tr.client.calls == [1]
    assert mlflow_utils.is_transient(MlflowException("(sqlite3.OperationalError) database is locked"))


def test_metrics_of_a_stage_that_failed_on_a_locked_store_are_sent_by_the_next_one(monkeypatch):
    """The stage dies with its metrics unsent; they are in the spool file, and the next tracked
    stage sends them to the right run once the writing process is gone (not while it runs)."""
    from d2v.tracking import mlflow_utils

    monkeypatch.setenv("D2V_MLFLOW_RETRY_S", "0.2")
    monkeypatch.setattr(mlflow_utils, "_BACKOFF_MAX_S", 0.05)
    tr = _offline_tracker(_Store(fail_calls=("always",)))
    tr.run_id = "run-that-died"
    tr._pending += [tr._metric("loss", 1.0 / s, 0, s) for s in range(1, 1501)]  # buffered: more than one batch
    with pytest.raises(RuntimeError, match="the 1500 unsent metrics are saved in"):
        tr.flush()
    spool = tr._spool_path()
    assert len(spool.read_text().splitlines()) == 1500
    later = _Store()
    assert mlflow_utils.replay_spool(later, alive=lambda pid: True) == 0 and spool.is_file()  # writer still running
    assert mlflow_utils.replay_spool(later, alive=lambda pid: False) == 1500
    assert sorted(later.metrics) == sorted(("loss", s, 1.0 / s) for s in range(1, 1501)) and later.calls == [1000, 500]
    assert not spool.exists()
    assert mlflow_utils.replay_spool(later, alive=lambda pid: False) == 0  # sent once only
    # a spool whose run the store refuses (deleted, another store) is left alone, and does not stop the stage
    tr._pending.append(tr._metric("loss", 9.0, 0, 9))
    with pytest.raises(RuntimeError, match="unsent metrics are saved in"):
        tr.flush()
    refusing = _Store(fail_calls=("always",), error="RESOURCE_DOES_NOT_EXIST: run 'run-that-died' not found")
    assert mlflow_utils.replay_spool(refusing, alive=lambda pid: False) == 0 and tr._spool_path().is_file()
    tr._spool_path().unlink()


def test_a_new_tracker_replays_the_spool_into_the_real_store(monkeypatch):
    """End to end on the SQLite store: a spool left by a dead process lands in its run on the next Tracker."""
    from d2v.tracking import mlflow_utils
    from d2v.tracking.mlflow_utils import Tracker

    first = Tracker("faults-spooled", {"a": 1}, system_metrics=False)
    first.log({"loss": 0.5}, 7)
    first._spool()  # as a failed flush leaves it
    first._pending.clear()
    dead = first._spool_path().with_name(f"{first.run_id}.999999999.jsonl")  # no such pid
    first._spool_path().rename(dead)
    first.finish()
    monkeypatch.setattr(mlflow_utils, "_pid_alive", lambda pid: pid != 999999999)
    second = Tracker("faults-next-stage", {"a": 2}, system_metrics=False)
    assert _history(first, "loss") == [(7, 0.5)] and not dead.exists()
    second.finish()


@pytest.mark.slow
def test_pretraining_survives_a_store_locked_longer_than_sqlites_busy_timeout(tmp_path, monkeypatch, caplog):
    """MLflow's SQLite busy timeout is 20 s; the lock here lasts 25 s, from before the run starts."""
    from mlflow.tracking import MlflowClient

    from d2v.tracking.mlflow_utils import tracking_uri

    monkeypatch.setenv("D2V_MLFLOW_RETRY_S", "120")
    MlflowClient(tracking_uri()).search_experiments()  # the store exists (tables made) before it is locked
    with store_locked(25.0):
        t0 = time.monotonic()
        res = pretrain(run_cfg(tmp_path / "out", "train.track=true", "train.max_steps=4"), progress=False)
        waited = time.monotonic() - t0
    assert waited > 20
    assert any("MLflow store locked" in r.getMessage() for r in caplog.records)  # it did retry, not just wait
    client = MlflowClient(tracking_uri())
    assert client.get_run(res.mlflow_run_id).info.status == "FINISHED"
    for key in ("image/loss", "text/loss"):
        assert [m.step for m in client.get_metric_history(res.mlflow_run_id, key)] in ([1, 3], [2, 4])


# ------------------------------------------------------------------------------------ Prefect retries
_FLAKY_PY = """\
from pathlib import Path
n = Path("attempts.txt")
k = int(n.read_text()) + 1 if n.exists() else 1
n.write_text(str(k))
if k == 1:
    raise SystemExit("flaky: first attempt fails on purpose")
Path("flaky.txt").write_text("done")
"""

_RUN_FLAKY_FLOW = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from flows.pipeline import run_pipeline
r = run_pipeline(sys.argv[1], stages=["flaky"], retries=int(sys.argv[3]), retry_delay_seconds=0)
print("RESULT " + json.dumps({"ran": r["ran"], "stages": [s["stage"] for s in r["stages"]]}))
"""


@pytest.mark.slow
@pytest.mark.prefect
def test_a_prefect_task_that_fails_once_is_retried_and_completes(tmp_path):
    """The pipeline flow (a temporary Prefect server on 127.0.0.1) runs a DVC stage that fails on its
    first attempt: the task is retried and the flow completes; without retries it fails."""
    import json

    from test_flows import make_toy_repo, sh

    repo = make_toy_repo(tmp_path / "toy")
    (repo / "flaky.py").write_text(_FLAKY_PY)
    with open(repo / "dvc.yaml", "a") as f:
        f.write("  flaky:\n    cmd: python flaky.py\n    deps: [flaky.py]\n    outs: [flaky.txt]\n")
    (repo / ".gitignore").write_text("attempts.txt\n")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "flaky stage"], repo)
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_UI_ENABLED="false",
                    PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore")
    env.pop("PREFECT_API_URL", None)

    def flow(retries: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _RUN_FLAKY_FLOW, str(repo), str(ROOT), str(retries)],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)

    r = flow(retries=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert result == {"ran": ["flaky"], "stages": ["flaky"]}
    assert (repo / "attempts.txt").read_text() == "2" and (repo / "flaky.txt").read_text() == "done"
    assert "Retry 1/1" in r.stdout + r.stderr

    (repo / "attempts.txt").unlink()
    with open(repo / "flaky.py", "a") as f:  # a new dependency: DVC's run cache cannot answer for it
        f.write("# second run\n")
    r = flow(retries=0)
    assert r.returncode != 0 and "flaky: first attempt fails on purpose" in r.stdout + r.stderr
    assert (repo / "attempts.txt").read_text() == "1"


# ------------------------------------------------------------------------------------ training health
def _fail_at(monkeypatch, step: int, value: float) -> None:
    """The sample source hands out a batch full of ``value`` at ``step`` (1-based)."""
    from d2v.data.sample import SampleData

    real = SampleData.batch

    def batch(self, modality, idx, batch_size, *a, **k):
        x = real(self, modality, idx, batch_size, *a, **k)
        return torch.full_like(x, value) if idx == step - 1 else x

    monkeypatch.setattr(SampleData, "batch", batch)


@pytest.mark.parametrize("guard,extra,match", [
    ("target variance", ["model.min_target_var=1e9", "+model.collapse_check_after=5"],
     r"step 5: target variance [\d.e+-]+ < min_target_var=1000000000\.0 \(teacher collapsed\)"),
    ("prediction variance", ["model.min_pred_var=1e9", "+model.collapse_check_after=5"],
     r"step 5: prediction variance [\d.e+-]+ < min_pred_var=1000000000\.0 \(student collapsed\)"),
    ("NaN", ["nan@5"], r"step 5: loss is nan \(not finite\)"),
    ("Inf", ["inf@5"], r"step 5: (loss|target variance|prediction variance) is (nan|inf) \(not finite\)"),
], ids=["collapse-target", "collapse-prediction", "nan", "inf"])
def test_health_guards_name_the_quantity_and_step_and_keep_the_last_good_checkpoint(
        tmp_path, monkeypatch, guard, extra, match):
    over = [e for e in extra if "@" not in e]
    for e in extra:
        if "@" in e:
            v, at = e.split("@")
            _fail_at(monkeypatch, int(at), float(v))
    out = tmp_path / "out"
    cfg = run_cfg(out, *over)
    with pytest.raises(CollapseError, match=match) as ei:
        pretrain(cfg, progress=False)
    msg = str(ei.value)
    assert "pretraining stopped (image batch)" in msg  # step 5 is an image step
    assert f"the last good checkpoint is {out / CHECKPOINT} (step 4)" in msg
    saved = load_checkpoint(out / CHECKPOINT, cfg)  # kept, loadable, and from before the bad step
    assert saved["step"] == 4 and all(bool(torch.isfinite(v).all()) for v in saved["model"].values()
                                      if v.is_floating_point())
    assert not (out / (CHECKPOINT + ".tmp")).exists()


def test_guard_failure_is_one_line_from_the_cli(tmp_path, capsys):
    from d2v.cli.pretrain import main

    rc = main([*RUN, f"train.out_dir={tmp_path / 'out'}", "model.min_target_var=1e9", "+model.collapse_check_after=3",
               "--no-progress", "--metrics", str(tmp_path / "m.json"), "--history", str(tmp_path / "h.tsv")])
    err = capsys.readouterr().err
    assert rc == 3 and err.count("\n") == 1, err
    assert err.startswith("d2v: training stopped: pretraining stopped (image batch): step 3: target variance")
    assert "(step 2)" in err


class _RecordingTracker:
    """Stands in for mlflow_utils.Tracker: records what pretraining logs."""

    last = None

    def __init__(self, run_name, params, tags=None, **kwargs):
        self.run_id, self.logged, self.status = "recorded", [], None
        _RecordingTracker.last = self

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def artifact(self, *a, **k):
        pass

    def figure(self, fig, artifact_file):
        import matplotlib.pyplot as plt

        plt.close(fig)

    def finish(self, status="FINISHED"):
        self.status = status


def test_speech_local_encoder_statistics_are_logged(tmp_path, monkeypatch):
    import csv
    import math

    from d2v.tracking import mlflow_utils

    monkeypatch.setattr(mlflow_utils, "Tracker", _RecordingTracker)
    cfg = run_cfg(tmp_path / "out", "train.modalities=[image,speech]", "train.max_steps=4", "train.track=true")
    res = pretrain(cfg, progress=False, history_path=tmp_path / "history.tsv", metrics_path=tmp_path / "m.json")
    speech = [r for r in res.history if r["modality"] == "speech"]
    assert len(speech) == 2 and all(math.isfinite(r["local_mean"]) and r["local_std"] > 0 for r in speech)
    assert all(math.isnan(r["local_mean"]) for r in res.history if r["modality"] == "image")
    with open(tmp_path / "history.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert {"local_mean", "local_std", "local_frame_std"} <= set(rows[0])
    assert all(0 < r["local_frame_std"] for r in speech)
    logged = _RecordingTracker.last.logged
    assert all("speech/local_frame_std" in m for step, m in logged if "speech/loss" in m)
    assert [step for step, m in logged if "speech/local_mean" in m] == [2, 4]
    assert all("speech/local_std" in m and m["speech/local_std"] > 0 for step, m in logged if "speech/loss" in m)
    assert _RecordingTracker.last.status == "FINISHED"


def test_a_collapsed_speech_cnn_is_reported(tmp_path, monkeypatch, capsys):
    """fairseq #5239: a CNN whose frames are all alike passes every loss/variance check; the frame
    std of its output gives it away, with a warning naming the fix."""
    from d2v.models.encoders import ConvFeatureExtractor

    healthy = pretrain(run_cfg(tmp_path / "a", "train.modalities=[speech]", "train.max_steps=2"), progress=False)
    assert "may have collapsed" not in capsys.readouterr().err
    assert all(r["local_frame_std"] > 0.3 * r["local_std"] for r in healthy.history)
    forward = ConvFeatureExtractor.forward

    def same_frames(self, wav):  # every frame of every clip = one vector, plus a tiny ripple
        out = forward(self, wav)
        return out.mean((0, 2), keepdim=True) + 1e-3 * out
    monkeypatch.setattr(ConvFeatureExtractor, "forward", same_frames)
    collapsed = pretrain(run_cfg(tmp_path / "b", "train.modalities=[speech]", "train.max_steps=2"), progress=False)
    assert all(r["local_frame_std"] < 0.1 * r["local_std"] for r in collapsed.history)
    err = capsys.readouterr().err
    assert err.count("may have collapsed") == 1 and "step 1" in err and "local_grad_mult=0" in err


def test_a_collapsing_projection_behind_a_fixed_cnn_is_reported(tmp_path, monkeypatch, capsys):
    """With the CNN fixed (local_grad_mult 0) the projection after it still trains, and it is what
    the teacher is fed: the monitor reads the projection's output, so its collapse is seen too."""
    from d2v.models import Data2Vec2

    init = Data2Vec2.__init__

    def shrunk_projection(self, *args, **kw):  # every frame maps to (almost) the bias vector
        init(self, *args, **kw)
        with torch.no_grad():
            proj = self.modality_encoders["speech"].project_features[2]
            proj.weight.mul_(1e-3)
            proj.bias.normal_()
    monkeypatch.setattr(Data2Vec2, "__init__", shrunk_projection)
    res = pretrain(run_cfg(tmp_path / "a", "train.modalities=[speech]", "train.max_steps=2",
                           "model.speech.local_grad_mult=0.0"), progress=False)
    assert all(r["local_frame_std"] < 0.1 * r["local_std"] for r in res.history)
    assert capsys.readouterr().err.count("may have collapsed") == 1


def test_the_local_statistics_hook_does_not_change_the_numerics(tmp_path, monkeypatch):
    """The hook only reads the local features: a run without it (hooks disabled) ends bit-identical."""
    from types import SimpleNamespace

    cfg = run_cfg(tmp_path / "a", "train.modalities=[speech]", "train.max_steps=2")
    a = pretrain(cfg, progress=False)
    assert all(r["local_std"] > 0 for r in a.history)
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook",
                        lambda self, *args, **kw: SimpleNamespace(remove=lambda: None))
    b = pretrain(run_cfg(tmp_path / "b", "train.modalities=[speech]", "train.max_steps=2"), progress=False)
    assert all(r["local_std"] != r["local_std"] for r in b.history)  # NaN: nothing was recorded
    assert_same(torch.load(a.checkpoint, weights_only=True)["model"], torch.load(b.checkpoint, weights_only=True)["model"])


# ------------------------------------------------------------------------------------ security defaults
def _py_files() -> list[Path]:
    return sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "flows").glob("*.py"))


@functools.lru_cache(maxsize=1)
def _all_calls() -> list[tuple[Path, str, ast.Call]]:
    """(file, dotted callee, call) for every call in src/ and flows/, parsed once."""
    out = []
    for p in _py_files():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Call):
                out.append((p, ast.unparse(node.func), node))
    return out


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Calls whose dotted name ends with ``name`` (``torch.load``, ``yaml.load`` ...)."""
    return [(p, c) for p, fn, c in _all_calls() if fn == name or fn.endswith("." + name)]


def _kw(call: ast.Call, key: str) -> str | None:
    return next((ast.unparse(k.value) for k in call.keywords if k.arg == key), None)


def test_checkpoints_and_foreign_files_load_weights_only():
    loads = _calls("torch.load")
    assert loads, "no torch.load found: the scan is broken"
    bad = [f"{p.relative_to(ROOT)}:{c.lineno}" for p, c in loads if _kw(c, "weights_only") != "True"]
    assert not bad, f"torch.load without weights_only=True: {bad}"
    # no plain unpickling of files anywhere (the fairseq importer uses a restricted Unpickler subclass)
    for name in ("pickle.load", "pickle.loads", "cloudpickle.load", "dill.load", "joblib.load"):
        assert not _calls(name), name
    for p, c in _calls("np.load"):
        assert _kw(c, "allow_pickle") == "False", f"{p.relative_to(ROOT)}:{c.lineno}: np.load needs allow_pickle=False"


def test_yaml_is_loaded_safely():
    for name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
        bad = [f"{p.relative_to(ROOT)}:{c.lineno}" for p, c in _calls(name) if _kw(c, "Loader") not in ("yaml.SafeLoader",)]
        assert not bad, f"{name}: {bad}"
    assert _calls("yaml.safe_load")


def test_servers_bind_to_loopback():
    texts = {p: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "scripts").glob("*.sh")),
                                        *sorted((ROOT / "flows").glob("*.py")), *sorted((ROOT / "flows").glob("*.md"))]}
    for p, t in texts.items():
        assert "0.0.0.0" not in t, f"{p.relative_to(ROOT)} binds all interfaces"
        for m in re.finditer(r"(mlflow (ui|server)|prefect server start) +--[^\n]*", t):  # command lines
            assert "--host 127.0.0.1" in m.group(0), f"{p.relative_to(ROOT)}: {m.group(0)!r}"
    started = [m.group(0) for t in texts.values() for m in re.finditer(r"(mlflow (ui|server)|prefect server start) +--", t)]
    assert len(started) >= 2  # the two scripts (scripts/mlflow_ui.sh, scripts/prefect_server.sh) at least


# Download call sites without a checksum argument, and what verifies the file before use instead.
_UNCHECKED_OK = {"image.py": "the decompressed IDX files' MD5s are verified before use"}


def test_downloads_verify_checksums_before_use():
    calls = _calls("download_file")
    assert calls
    unchecked = sorted({p.name for p, c in calls if _kw(c, "sha256") in (None, "None") and _kw(c, "md5") in (None, "None")})
    known_gap = {"text.py"}  # WikiText-103 parquet files: no published checksum pinned (see BENCHMARKS.md)
    assert set(unchecked) - set(_UNCHECKED_OK) <= known_gap, unchecked
    src = (ROOT / "src/d2v/data/sources/image.py").read_text()
    assert "_decompress_verified" in src and "file_digest(tmp, \"md5\")" in src


def test_weights_only_refuses_a_pickle_that_runs_code(tmp_path):
    """The end-to-end check of the scans above: a checkpoint whose pickle would run a command."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "checkpoint.pt"
    torch.save({"model": Evil(), "optimizer": {}, "step": 1, "config": {"model": {}}}, p)
    with pytest.raises(InputError, match="holds objects other than tensors"):
        load_checkpoint(p, run_cfg(tmp_path))
    from d2v.models.model_dir import load_model_dir

    with pytest.raises(InputError):
        load_model_dir(p)
    assert not marker.exists()
