"""Shared CLI plumbing: config loading from params.yaml or conf/, and clean error exits."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from d2v.errors import CollapseError, ConfigError, InputError

if TYPE_CHECKING:
    from d2v.config import Config


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=Path, default=None,
                   help="read the experiment from this params file (e.g. params.yaml) instead of composing conf/")
    p.add_argument("--config-name", default="config", help="primary config in conf/ (default: config)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=tiny train.max_steps=20")


def config_from_args(ns: argparse.Namespace) -> Config:
    import yaml

    from d2v.config import from_dict, load_config

    if ns.params is not None:
        if ns.overrides:
            raise ConfigError("give either --params or Hydra overrides, not both")
        if not ns.params.is_file():
            raise ConfigError(f"params file not found: {ns.params}")
        try:
            d = yaml.safe_load(ns.params.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{ns.params}: not valid YAML: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{ns.params}: not UTF-8 text (byte {e.start}: {e.reason})") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{ns.params}: expected a mapping at the top level")
        try:
            return from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{ns.params}: {e}") from e
    return load_config(ns.overrides, config_name=ns.config_name)


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="log lines instead of progress bars (the default when stderr is not a terminal)")


def show_progress(ns: argparse.Namespace) -> bool:
    """Progress bars only for a person at a terminal: piped into a log (dvc repro, Prefect, CI), a
    bar's carriage returns would pile up as one unreadable line, so stages log lines instead."""
    return not getattr(ns, "no_progress", False) and sys.stderr.isatty()


def reports_root(model_dir: str | Path) -> Path:
    """Where a stage's reports go: ``reports/`` for the pipeline's model folders (``models/...``, what
    the DVC stages write), else a ``reports/`` folder beside the models (``runs/reports`` for a
    quick run composed from ``conf/config.yaml``), so a try-out never overwrites the DVC outputs."""
    parent = Path(model_dir).parent
    return Path("reports") if parent == Path("models") else parent / "reports"


def run_cli(fn: Callable[[], int]) -> int:
    """Run a command; turn expected errors into one readable line and exit code 2."""
    try:
        return fn()
    except (ConfigError, InputError, FileNotFoundError) as e:
        print(f"d2v: error: {e}", file=sys.stderr)
        return 2
    except CollapseError as e:
        print(f"d2v: training stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("d2v: interrupted", file=sys.stderr)
        return 130
