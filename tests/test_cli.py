"""The ``d2v`` command line: help for every command, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from d2v.cli.main import COMMANDS


def d2v(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d2v.cli.main", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_command():
    r = d2v("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert name in r.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_has_help(command):
    r = d2v(command, "--help")
    assert r.returncode == 0, r.stderr
    assert f"d2v {command}" in r.stdout


def test_unknown_command():
    r = d2v("frobnicate")
    assert r.returncode != 0 and "invalid choice" in r.stderr


def test_bad_override_is_one_clear_line():
    r = d2v("describe", "model.embed_dim=abc")
    assert r.returncode == 2
    assert "embed_dim" in r.stderr and "Traceback" not in r.stderr


def test_missing_params_file(tmp_path):
    r = d2v("pretrain", "--params", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_params_file_with_a_bad_value(tmp_path):
    import yaml

    from d2v.config import PROJECT_ROOT

    d = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    d["train"]["batch_size"] = -3
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(d))
    r = d2v("pretrain", "--params", str(p))
    assert r.returncode == 2 and "train.batch_size" in r.stderr and str(p) in r.stderr


def test_describe_counts_parameters():
    r = d2v("describe", "experiment=tiny")
    assert r.returncode == 0
    assert all(m in r.stdout for m in ("image", "speech", "text"))


def test_compose_prints_yaml():
    r = d2v("compose", "experiment=text_base")
    assert r.returncode == 0 and "vocab_size: 50265" in r.stdout


def test_progress_bars_only_at_a_terminal(monkeypatch):
    """Bars for a person at a terminal; piped into a log (dvc repro, Prefect, CI) stages log lines."""
    import argparse
    import io
    import os

    from d2v.cli.common import show_progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a file
    assert not show_progress(argparse.Namespace(no_progress=False))
    leader, follower = os.openpty()  # a real terminal
    with os.fdopen(follower, "w") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        assert show_progress(argparse.Namespace(no_progress=False))
        assert not show_progress(argparse.Namespace(no_progress=True))
    os.close(leader)
