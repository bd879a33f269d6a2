"""The DVC repository and its stages: which folder, which stages (in run order), what changed.

``list_stages`` reads the pipeline with DVC's own index (dvc.yaml, foreach expanded), so a stage
name here is whatever ``dvc stage list`` and ``dvc repro`` take; ``resolve_stages`` turns the
names a user gave (or foreach groups such as ``shard``) into that list, or a clear error;
``dvc_status`` says which stages changed since dvc.lock.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.errors import FlowInputError, NotADvcRepoError, StageFailedError, UnknownStageError
from flows.streaming import PathLike, run_dvc

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The repository


def check_repo(repo: PathLike | None = None) -> Path:
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


# ---------------------------------------------------------------------------------------------
# Stages


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


def resolve_stages(requested: Iterable[str] | None, stages: Sequence[StageInfo]) -> list[str]:
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


def select_stages(repo: PathLike | None, requested: Iterable[str] | None) -> tuple[Path, list[StageInfo], list[str]]:
    """``check_repo`` + ``list_stages`` + ``resolve_stages``: (repo root, all stages, the requested names)."""
    root = check_repo(repo)
    stages = list_stages(root)
    return root, stages, resolve_stages(requested, stages)


# ---------------------------------------------------------------------------------------------
# dvc status: what changed since dvc.lock


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
    r = run_dvc(["status", "--json", *(["--with-deps", *targets] if targets else [])], repo, timeout=timeout)
    if r.returncode != 0:
        raise StageFailedError(f"`dvc status` failed in {repo} (exit {r.returncode}):\n{r.stderr.strip() or r.stdout.strip()}")
    text = r.stdout.strip()
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else {}
    except ValueError as e:
        raise StageFailedError(f"`dvc status --json` printed something that is not JSON: {text[:500]}") from e
    return parse_status(data)
