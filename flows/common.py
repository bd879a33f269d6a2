"""Prefect-free helpers for the flows: DVC stage lists, input checks, streaming subprocesses.

Nothing here imports Prefect, so the command lines can refuse bad input (unknown stage, not a DVC
repository, unknown parameter key, unreachable server) in a fraction of a second.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_API_URL = "http://127.0.0.1:4200/api"
PARAMS_FILE = "params.yaml"

PathLike = Union[str, Path]
LogFn = Callable[[int, str], None]  # (logging level, line)


class FlowInputError(ValueError):
    """Bad input to a flow or command line: the message says what is wrong and what is valid."""


class NotADvcRepoError(FlowInputError):
    """The folder is not the root of a DVC repository."""


class UnknownStageError(FlowInputError):
    """A requested stage is not in the repository's pipeline."""


class UnknownParamError(FlowInputError):
    """An override or sweep key that is neither a params key nor a Hydra config group."""


class ServerUnreachableError(RuntimeError):
    """The Prefect API does not answer its health check."""


class StageFailedError(RuntimeError):
    """A DVC command exited with an error; the message ends with its last output lines."""


class StageTimeoutError(StageFailedError):
    """A DVC command ran past its timeout and was killed."""


# ---------------------------------------------------------------------------------------------
# Repository and stages


def check_repo(repo: Optional[PathLike] = None) -> Path:
    """The absolute path of a DVC repository root (default: this project), or NotADvcRepoError."""
    path = Path(repo if repo is not None else PROJECT_ROOT).expanduser().resolve()
    if not path.is_dir():
        raise NotADvcRepoError(f"{path} is not a DVC repository: the folder does not exist")
    if not (path / ".dvc").is_dir():
        raise NotADvcRepoError(
            f"{path} is not a DVC repository (no .dvc/ folder); pass the folder that holds "
            "dvc.yaml and .dvc/ (run `dvc init` to make one)"
        )
    if not (path / "dvc.yaml").is_file():
        raise NotADvcRepoError(f"{path} has no dvc.yaml: there is no pipeline to run")
    return path


def require_git(repo: Path) -> None:
    """DVC experiments need git with at least one commit; raise FlowInputError otherwise."""
    r = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=repo, capture_output=True, text=True)
    if r.returncode != 0:
        raise FlowInputError(
            f"{repo}: DVC experiments need a git repository with at least one commit "
            "(`git init && git add -A && git commit -m init`)"
        )


@dataclass(frozen=True)
class StageInfo:
    """One expanded DVC stage (``shard@image``) with its outputs, relative to the repo root."""

    name: str
    cmd: str
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()

    @property
    def group(self) -> str:
        """``shard`` for ``shard@image``; the name itself for a stage without foreach."""
        return self.name.split("@", 1)[0]


def list_stages(repo: PathLike) -> list[StageInfo]:
    """The pipeline's stages (foreach expanded) in run order: upstream stages first.

    Read with DVC's own index, so it is whatever ``dvc stage list`` shows; ties keep the order of
    dvc.yaml.
    """
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    root = check_repo(repo)
    try:
        with Repo(str(root)) as r:
            stages = [s for s in r.index.stages if isinstance(s, PipelineStage)]
            order = {s: i for i, s in enumerate(stages)}
            graph = r.index.graph.reverse(copy=True)  # DVC's edges point from a stage to its deps
            topo = nx.lexicographical_topological_sort(graph, key=lambda s: f"{order.get(s, -1):08d}")
            out = []
            for s in topo:
                if s not in order:
                    continue
                outs = tuple(os.path.relpath(o.fs_path, r.root_dir) for o in s.outs)
                metrics = tuple(os.path.relpath(o.fs_path, r.root_dir) for o in s.outs if o.metric)
                cmd = s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd or [])
                dvcfile = os.path.relpath(s.dvcfile.path, r.root_dir)
                name = s.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{s.name}"  # as `dvc repro` in the root takes it
                out.append(StageInfo(name, cmd, outs, metrics))
            return out
    except DvcException as e:
        raise FlowInputError(f"cannot read the DVC pipeline in {root}: {e}") from e


def resolve_stages(requested: Optional[Iterable[str]], stages: Sequence[StageInfo]) -> list[str]:
    """Requested stage names, in run order; a foreach group (``shard``) means all its stages.

    None or an empty list means every stage. Unknown names raise UnknownStageError listing the
    valid ones.
    """
    names = [s.name for s in stages]
    wanted = [r.strip() for r in (requested or []) if r and r.strip()]
    if not wanted:
        return names
    groups: dict[str, list[str]] = {}
    for s in stages:
        if "@" in s.name:
            groups.setdefault(s.group, []).append(s.name)
    chosen: set[str] = set()
    unknown = []
    for w in wanted:
        if w in names:
            chosen.add(w)
        elif w in groups:
            chosen.update(groups[w])
        else:
            unknown.append(w)
    if unknown:
        valid = ", ".join(names)
        group_text = f"; groups: {', '.join(sorted(groups))}" if groups else ""
        raise UnknownStageError(
            f"unknown stage{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)}; "
            f"valid stages: {valid}{group_text}"
        )
    return [n for n in names if n in chosen]


# ---------------------------------------------------------------------------------------------
# Parameters, overrides and sweep grids


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
    node = tree
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


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
    return [v.strip() for v in value.split(",")] if value else [""]


def experiment_overrides(repo: Path, experiment: Optional[str], overrides: Optional[Iterable[str]]) -> list[str]:
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


# ---------------------------------------------------------------------------------------------
# Results: MLflow run ids in the stages' JSON outputs


def collect_run_ids(repo: Path, paths: Iterable[str]) -> dict[str, str]:
    """``{"reports/metrics/pretrain.json:mlflow_run_id": "<id>"}`` for every key ending in
    ``run_id`` (at any depth) in the JSON files among ``paths``."""
    found: dict[str, str] = {}

    def walk(node: Any, prefix: str, where: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                key = f"{prefix}{k}"
                if isinstance(v, str) and str(k).endswith("run_id") and v:
                    found[f"{where}:{key}"] = v
                else:
                    walk(v, key + ".", where)

    for rel in paths:
        p = repo / rel
        if p.suffix != ".json" or not p.is_file() or p.stat().st_size > 10_000_000:
            continue
        try:
            walk(json.loads(p.read_text()), "", rel)
        except (OSError, ValueError):
            continue
    return found


# ---------------------------------------------------------------------------------------------
# Running DVC with its output streamed line by line


def dvc_exe() -> str:
    """The ``dvc`` next to this interpreter (the project's venv), else the one on PATH."""
    local = Path(sys.executable).with_name("dvc")
    if local.exists():
        return str(local)
    found = shutil.which("dvc")
    if not found:
        raise FileNotFoundError("dvc is not installed: run scripts/setup.sh (or pip install dvc)")
    return found


def child_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment for DVC and its stages: the venv's bin first, unbuffered Python output."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DO_NOT_TRACK", "true")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class StreamResult:
    """What a streamed command did: exit code, last lines, stages DVC ran, wall time."""

    cmd: list[str]
    returncode: int
    tail: list[str] = field(default_factory=list)
    ran_stages: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timed_out: bool = False
    restored_stages: list[str] = field(default_factory=list)  # outputs restored from DVC's run cache

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def error_text(self, what: str) -> str:
        last = "\n".join(self.tail[-20:]) or "(no output)"
        if self.timed_out:
            return f"{what} timed out after {self.seconds:.0f} s and was killed. Last output:\n{last}"
        return f"{what} failed with exit code {self.returncode}. Last output:\n{last}"


_RUNNING = re.compile(r"^Running stage '([^']+)'")
_RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run")


def _line_level(line: str) -> int:
    import logging

    head = line.lstrip()[:12].upper()
    if head.startswith("ERROR"):
        return logging.ERROR
    if head.startswith("WARNING"):
        return logging.WARNING
    return logging.INFO


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the command's process group (DVC and the stage it runs), SIGKILL after ``grace``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    except ProcessLookupError:
        pass


def run_streaming(
    cmd: Sequence[str],
    cwd: PathLike,
    log: Optional[LogFn] = None,
    timeout: Optional[float] = None,
    env: Optional[Mapping[str, str]] = None,
    tail_lines: int = 40,
) -> StreamResult:
    """Run ``cmd``, passing each output line (stdout and stderr merged) to ``log(level, line)``.

    The command runs in its own process group; on timeout, or when the caller is interrupted
    (Prefect cancelling the run), the whole group is terminated.
    """
    import logging

    log = log or (lambda level, line: logging.getLogger("flows").log(level, line))
    start = time.monotonic()
    proc = subprocess.Popen(
        list(cmd), cwd=str(cwd), env=dict(env) if env is not None else child_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, errors="replace", bufsize=1, start_new_session=True,
    )
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        _kill_group(proc)

    timer = threading.Timer(timeout, on_timeout) if timeout and timeout > 0 else None
    tail: deque[str] = deque(maxlen=tail_lines)
    ran: list[str] = []
    restored: list[str] = []
    try:
        if timer:
            timer.daemon = True
            timer.start()
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            tail.append(line)
            for pattern, found in ((_RUNNING, ran), (_RESTORED, restored)):
                m = pattern.match(line)
                if m:
                    found.append(m.group(1))
            log(_line_level(line), line)
        rc = proc.wait()
    except BaseException:
        _kill_group(proc, grace=5.0)
        raise
    finally:
        if timer:
            timer.cancel()
    return StreamResult(list(cmd), rc, list(tail), ran, time.monotonic() - start, timed_out.is_set(), restored)


# ---------------------------------------------------------------------------------------------
# dvc status and the Prefect server


def parse_status(status: Mapping[str, Any]) -> dict[str, list[str]]:
    """``dvc status --json`` output as ``{stage: ["deps: params.yaml (train.lr: modified)", ...]}``."""
    out: dict[str, list[str]] = {}
    for stage, entries in status.items():
        reasons: list[str] = []
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, str):
                reasons.append(entry)
                continue
            for kind, changes in entry.items():
                label = kind.replace("changed ", "")
                if isinstance(changes, Mapping):
                    for path, what in changes.items():
                        if isinstance(what, Mapping):
                            detail = ", ".join(f"{k}: {v}" for k, v in what.items())
                            reasons.append(f"{label}: {path} ({detail})")
                        else:
                            reasons.append(f"{label}: {path} {what}")
                else:
                    reasons.append(f"{label}: {changes}")
        out[stage] = reasons
    return out


def dvc_status(repo: Path, targets: Sequence[str] = (), timeout: float = 600) -> dict[str, list[str]]:
    """What ``dvc status`` says changed, per stage (empty: the pipeline is up to date)."""
    cmd = [dvc_exe(), "status", "--json", *(["--with-deps", *targets] if targets else [])]
    r = subprocess.run(cmd, cwd=repo, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise StageFailedError(f"`dvc status` failed in {repo} (exit {r.returncode}):\n{r.stderr.strip() or r.stdout.strip()}")
    text = r.stdout.strip()
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else {}
    except ValueError as e:
        raise StageFailedError(f"`dvc status --json` printed something that is not JSON: {text[:500]}") from e
    return parse_status(data)


def api_url_from_env() -> Optional[str]:
    """PREFECT_API_URL from the environment or the active Prefect profile, if one is set."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    if "prefect" in sys.modules:
        from prefect.settings import PREFECT_API_URL

        return PREFECT_API_URL.value() or None
    return None


def check_server(api_url: str, timeout: float = 3.0) -> None:
    """Raise ServerUnreachableError unless ``<api_url>/health`` answers within ``timeout`` s."""
    url = api_url.rstrip("/") + "/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(url, timeout=timeout) as resp:
            if resp.status == 200:
                return
            reason = f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    raise ServerUnreachableError(
        f"the Prefect server at {api_url} is unreachable ({reason}; checked {url} with a {timeout:g} s timeout). "
        "Start it with `scripts/prefect_server.sh`, or unset PREFECT_API_URL to run with a temporary server."
    )
