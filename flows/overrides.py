"""``-S key=value`` overrides and sweep grids: checked against params.yaml and the Hydra config
groups, and written into the params files the way ``dvc exp run -S`` does.

``validate_overrides`` refuses an unknown key or config-group option before anything runs;
``apply_params`` composes params.yaml with DVC's own Hydra helpers; ``grid_overrides`` turns a
parameter grid into one override list per combination.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.errors import FlowInputError, UnknownParamError

PARAMS_FILE = "params.yaml"


# ---------------------------------------------------------------------------------------------
# Params files and Hydra config groups


def hydra_settings(repo: Path) -> dict[str, Any]:
    """The ``[hydra]`` section of the DVC config (empty when Hydra composition is off)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        h = dict(r.config.get("hydra", {}) or {})
    return h if h.get("enabled") else {}


def hydra_groups(repo: Path) -> dict[str, list[str]]:
    """Hydra config groups (sub-folders of the config dir) and their options (yaml file stems)."""
    h = hydra_settings(repo)
    if not h or h.get("config_module"):
        return {}
    conf = repo / h.get("config_dir", "conf")
    groups: dict[str, list[str]] = {}
    if conf.is_dir():
        for d in sorted(p for p in conf.rglob("*") if p.is_dir()):
            opts = sorted(f.stem for f in d.iterdir() if f.suffix in (".yaml", ".yml"))
            groups[d.relative_to(conf).as_posix()] = opts
    return groups


def load_params(repo: Path, name: str = PARAMS_FILE) -> dict[str, Any]:
    """A params file (YAML or JSON) as a dict; FlowInputError when it is missing."""
    import yaml

    path = repo / name
    if not path.is_file():
        raise FlowInputError(f"{path} does not exist: no parameters to override")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return data if isinstance(data, dict) else {}


def _has_key(tree: Any, dotted: str) -> bool:
    """Whether ``a.b.0`` exists in a nested dict/list tree."""
    node = tree
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Checking and applying overrides

# [file:][~|+|++]key[=value], as DVC's -S takes it
_OVERRIDE = re.compile(r"^(?:(?P<file>[^=:]+\.(?:ya?ml|json|toml|py)):)?(?P<prefix>~|\+\+|\+)?(?P<key>[^=~+][^=]*?)(?:=(?P<value>.*))?$")


def validate_overrides(repo: Path, overrides: Iterable[str]) -> list[str]:
    """Check ``-S`` overrides (``train.lr=5e-4``, ``experiment=image_base``) against the repo.

    A key must exist in params.yaml (dotted for nested keys) or be a Hydra config group (a
    sub-folder of the config dir) whose value is one of its options. ``+key=...`` (Hydra: add a
    new key) is passed through. Returns the overrides; UnknownParamError names the bad key.
    """
    items = [o.strip() for o in overrides if o and o.strip()]
    if not items:
        return []
    groups = hydra_groups(repo)
    params_cache: dict[str, dict[str, Any]] = {}
    for item in items:
        m = _OVERRIDE.match(item)
        if not m or (m.group("value") is None and m.group("prefix") != "~"):
            raise FlowInputError(f"bad override {item!r}: expected key=value (e.g. train.lr=5e-4)")
        fname, prefix, key, value = m.group("file") or PARAMS_FILE, m.group("prefix"), m.group("key"), m.group("value")
        if prefix in ("+", "++"):
            continue
        if fname == PARAMS_FILE and key in groups:
            options = groups[key]
            for v in _split_sweep(value or ""):
                if v not in options and v != "null":
                    raise UnknownParamError(
                        f"{item!r}: {v!r} is not an option of the config group {key!r}; "
                        f"options: {', '.join(options) or '(none)'}"
                    )
            continue
        if fname not in params_cache:
            params_cache[fname] = load_params(repo, fname)
        if not _has_key(params_cache[fname], key):
            hint = f"; config groups: {', '.join(sorted(groups))}" if groups and fname == PARAMS_FILE else ""
            top = ", ".join(sorted(params_cache[fname]))
            raise UnknownParamError(
                f"unknown parameter {key!r} in {item!r}: not a key of {fname} (top-level keys: {top}){hint}"
            )
    return items


def _split_sweep(value: str) -> list[str]:
    """``a,b`` (a Hydra sweep value) -> ``["a", "b"]``."""
    return [v.strip() for v in value.split(",")] if value else [""]


def experiment_overrides(repo: Path, experiment: str | None, overrides: Iterable[str] | None) -> list[str]:
    """``experiment=<name>`` (when given) followed by the extra overrides, all validated."""
    items = ([f"experiment={experiment}"] if experiment else []) + list(overrides or [])
    if experiment and "experiment" not in hydra_groups(repo):
        raise UnknownParamError(
            f"experiment={experiment!r}: {repo} has no Hydra 'experiment' config group "
            "(enable [hydra] in .dvc/config and add conf/experiment/)"
        )
    return validate_overrides(repo, items)


def apply_params(repo: Path, overrides: Sequence[str]) -> list[str]:
    """Write the overrides into the params files exactly as ``dvc exp run -S`` does.

    With DVC's Hydra integration on, params.yaml is composed from the config dir with the
    overrides (DVC's own ``compose_and_dump``); other files, or Hydra off, get the overrides
    applied in place. Returns the params files written.
    """
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides, compose_and_dump

    h = hydra_settings(repo)
    per_file = to_path_overrides(list(overrides))
    if h:
        per_file.setdefault(PARAMS_FILE, [])
    for name, items in per_file.items():
        path = repo / name
        if h and name == PARAMS_FILE:
            module = h.get("config_module")
            config_dir = None if module else str(repo / h.get("config_dir", "conf"))
            compose_and_dump(path, config_dir, module, h.get("config_name", "config"),
                             str(repo / h.get("plugins_path", "")), items)
        else:
            apply_overrides(path, items)
    return list(per_file)



# ---------------------------------------------------------------------------------------------
# Sweep grids


def format_value(value: Any) -> str:
    """A Python value as a Hydra override value (``True`` -> ``true``, lists -> ``[a,b]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.search(r"[\s,'\"\[\]{}()=]", text):  # would be parsed as a sweep or break the grammar
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


def grid_overrides(grid: Mapping[str, Sequence[Any]]) -> list[list[str]]:
    """Every combination of a parameter grid as a list of ``key=value`` overrides."""
    if not grid:
        raise FlowInputError("the sweep grid is empty: give at least one key with a list of values")
    keys = list(grid)
    values = []
    for k in keys:
        v = grid[k]
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
            v = [v]
        if not v:
            raise FlowInputError(f"the sweep grid has no values for {k!r}")
        values.append([format_value(x) for x in v])
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*values)]


def parse_grid_arg(specs: Iterable[str]) -> dict[str, list[str]]:
    """``["train.lr=1e-4,5e-4", "seed=1,2"]`` (command-line form) -> ``{"train.lr": [...], ...}``."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise FlowInputError(f"bad grid entry {spec!r}: expected key=v1,v2,... (e.g. train.lr=1e-4,5e-4)")
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return grid

