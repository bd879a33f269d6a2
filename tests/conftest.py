"""Shared fixtures: tiny model configs and batches, a fixed seed per test, two CPU threads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Tests log to a throwaway MLflow store, never to the project's mlflow.db (subprocesses inherit it).
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='d2v-mlflow-')}/mlflow.db"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest
import torch
from browser import browser  # noqa: F401 (a real headless Chromium, for the UI tests)

from d2v.models import DecoderConfig, ImageConfig, ModelConfig, SpeechConfig, TextConfig

# Two torch threads; scripts/test.sh sets D2V_TEST_THREADS=1 when the end-to-end pipeline runs alongside.
torch.set_num_threads(int(os.environ.get("D2V_TEST_THREADS", "2")))

# wav2vec 2.0 strides (total 320) with 32 channels: 8000 samples -> 24 frames.
SPEECH_SPEC = "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2"
SPEECH_SAMPLES = 8000
TEXT_LEN = 32
VOCAB = 100


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on two cores shared with other jobs, OpenMP threads spin
    against each other and two threads can be many times slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def build_cfg(*modalities: str, **overrides) -> ModelConfig:
    """A tiny config (D=32, 3 blocks, 4 heads, no dropout, M=2) for the given modalities.

    Keyword overrides set ``ModelConfig`` fields; ``image=``/``speech=``/``text=`` take a dict of
    fields for that modality's config. Image: 28x28x1, patch 4 (7x7 grid, 9 of 49 kept);
    speech: 8000 samples -> 24 frames (12 masked); text: vocab 100, 32 tokens (16 masked).
    """
    mods = modalities or ("image",)
    per_mod = {m: overrides.pop(m, {}) for m in ("image", "speech", "text")}
    kw = dict(
        embed_dim=32, depth=3, num_heads=4, mlp_ratio=4.0,
        encoder_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, post_mlp_drop=0.0,
        layerdrop=0.0, average_top_k_layers=2, clone_batch=2,
        layer_norm_targets=mods == ("image",), cls_loss=0.01 if "image" in mods else 0.0,
        ema_decay=0.99, ema_end_decay=0.999, ema_anneal_end_step=100,
        min_target_var=0.0, min_pred_var=0.0, collapse_check_after=10,
    )
    if "image" in mods:
        kw["image"] = ImageConfig(**{
            **dict(input_size=28, in_chans=1, patch_size=4, prenet_depth=1,
                   decoder=DecoderConfig(decoder_dim=32, decoder_groups=4, decoder_kernel=3, decoder_layers=2,
                                         input_dropout=0.0)),
            **per_mod["image"],
        })
    if "speech" in mods:
        kw["speech"] = SpeechConfig(**{
            **dict(feature_encoder_spec=SPEECH_SPEC, conv_pos_width=10, conv_pos_groups=4, conv_pos_depth=2,
                   prenet_dropout=0.0, prenet_layerdrop=0.0,
                   decoder=DecoderConfig(decoder_dim=32, decoder_groups=4, decoder_kernel=5, decoder_layers=2,
                                         input_dropout=0.0)),
            **per_mod["speech"],
        })
    if "text" in mods:
        kw["text"] = TextConfig(**{
            **dict(vocab_size=VOCAB, max_source_positions=64, dropout=0.0,
                   decoder=DecoderConfig(decoder_dim=32, decoder_groups=1, decoder_kernel=5, decoder_layers=2,
                                         input_dropout=0.0, decoder_residual=False, projection_layers=2,
                                         projection_ratio=2.0)),
            **per_mod["text"],
        })
    kw.update(overrides)
    return ModelConfig(**kw)


def make_batch(modality: str, batch_size: int = 2) -> torch.Tensor:
    """A random batch matching ``build_cfg`` (text ids avoid the specials 0..3, so no padding)."""
    if modality == "image":
        return torch.randn(batch_size, 1, 28, 28)
    if modality == "speech":
        return torch.randn(batch_size, SPEECH_SAMPLES)
    return torch.randint(4, VOCAB, (batch_size, TEXT_LEN))


@pytest.fixture(scope="session")
def tiny_cfg():
    return build_cfg


@pytest.fixture(scope="session")
def batch():
    return make_batch


def make_project_repo(root: Path) -> Path:
    """A fresh git + DVC repository holding this project's pipeline (dvc.yaml, params.yaml, conf/,
    src/ and the Hydra settings in .dvc/config), committed: what `dvc repro` runs end to end."""
    import shutil
    import subprocess
    import sys

    from d2v.config import PROJECT_ROOT

    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    for name in ("conf", "src"):
        shutil.copytree(PROJECT_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dvc = str(Path(sys.executable).parent / "dvc")
    env = dict(os.environ, DVC_NO_ANALYTICS="1", DO_NOT_TRACK="true")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "ci"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    shutil.copy(PROJECT_ROOT / ".dvc" / "config", root / ".dvc" / "config")  # Hydra composition settings
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root


# ----------------------------------------------------------------------------- the `full` marker
# Slower tests whose code path quicker tests already cover: `.ci/run` (scripts/test.sh) deselects
# them, `bash scripts/test.sh --full` (or plain `pytest`) runs them. Node id -> what covers it in CI.
FULL = {
    "tests/test_faults.py::test_kill_9_during_pretraining_then_resume_is_bit_exact":
        "test_kill_9_during_a_checkpoint_write_keeps_the_previous_checkpoint (kill -9 + --resume, bit-exact); "
        "test_pretrain.py::test_checkpoint_loads_weights_only_and_resume_is_exact",
    "tests/test_faults.py::test_repeated_kills_during_pretraining_from_shards":
        "test_pretrain.py::test_resume_from_shards_is_exact; the quick kill -9 test above",
    "tests/test_faults.py::test_pretraining_survives_a_store_locked_longer_than_sqlites_busy_timeout":
        "test_store_errors_are_retried_with_backoff_without_duplicates (the retry loop), "
        "test_a_locked_mlflow_store_makes_the_run_wait_and_loses_no_metric (a real lock)",
    "tests/test_faults.py::test_a_prefect_task_that_fails_once_is_retried_and_completes":
        "test_flows_server.py::test_a_failing_stage_fails_the_flow_with_its_error_in_the_log (a retried stage, "
        "on the module's one Prefect server; this test starts two more)",
    "tests/test_pretrain.py::test_loss_falls_on_the_sample_data[speech]":
        "test_loss_falls_on_the_sample_data[image] (the loop), "
        "test_model.py::test_loss_falls_on_fixed_batch[speech-40], test_distributed.py (the speech sample data), "
        "test_pipeline.py (the loss falls for every modality)",
    "tests/test_pretrain.py::test_loss_falls_on_the_sample_data[text]":
        "test_loss_falls_on_the_sample_data[image] (the loop), "
        "test_model.py::test_loss_falls_on_fixed_batch[text-60], test_distributed.py (the text sample data), "
        "test_pipeline.py (the loss falls for every modality)",
    "tests/test_compile.py::test_compiled_step_matches_eager_inductor[speech]":
        "test_compiled_step_matches_eager_aot[speech] (the same functionalised joint graph, without inductor's "
        "C++ code generation: 55 s on 2 cores), test_compiled_step_matches_eager_inductor[image] (inductor)",
    "tests/test_compile.py::test_compiled_step_matches_eager_inductor[text]":
        "test_compiled_step_matches_eager_aot[text] (the same joint graph, without inductor: 36 s), "
        "test_compiled_step_matches_eager_inductor[image] (inductor)",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    ids = {item.nodeid for item in items}
    for item in items:
        if item.nodeid in FULL:
            item.add_marker(pytest.mark.full)
    # A renamed test must not silently return to the CI run: when whole files were collected, every
    # FULL id of those files must exist.
    if any("::" in str(a) for a in config.args) or config.option.keyword:
        return
    files = {i.split("::", 1)[0] for i in ids}
    stale = [n for n in FULL if n.split("::", 1)[0] in files and n not in ids]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py FULL names tests that do not exist (renamed?): {stale}")
