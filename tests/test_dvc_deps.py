"""DVC never serves stale results, and the package's import graph stays a layered DAG.

Static analysis (``ast``) over ``src/d2v``: every ``import d2v.x``, ``from d2v.x import y`` (``y``
may be a submodule), relative import and ``importlib.import_module("d2v.x")`` with a literal name,
**including imports inside functions** (the CLI imports its heavy modules lazily), and excluding
only ``if TYPE_CHECKING:`` blocks (never executed). Importing a module also runs its packages'
``__init__.py``.

* ``test_stage_deps_cover_the_code_they_run``: for every stage of ``dvc.yaml`` (``foreach``
  expanded), the ``d2v <command>`` of its ``cmd`` is mapped to its module (``d2v.cli.main.COMMANDS``);
  every file under ``src/d2v`` that module loads, transitively, must be covered by a ``deps`` entry
  (the file itself or a folder above it). Otherwise ``dvc repro`` would serve results computed by
  older code.
* ``test_code_deps_exist_and_are_run``: every ``src/`` dep exists and holds code the stage loads.
* ``test_import_graph_has_no_cycles``: no import cycle inside ``d2v`` (function-level imports count).
* ``test_layering``: ``d2v.models`` loads (transitively) none of ``d2v.train``, ``d2v.data``,
  ``d2v.config``, ``d2v.inference``, ``d2v.tracking``, ``d2v.cli``; ``d2v.train`` and ``d2v.data``
  load nothing of ``d2v.cli``.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = "d2v"


# ----------------------------------------------------------------------------- import analysis

def module_files(src: Path = SRC, pkg: str = PKG) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under ``src/<pkg>`` (a package is its ``__init__.py``)."""
    mods: dict[str, Path] = {}
    for f in sorted((src / pkg).rglob("*.py")):
        parts = list(f.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(not re.fullmatch(r"[A-Za-z_]\w*", p) for p in parts):
            continue
        mods[".".join(parts)] = f
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement and ``import_module("...")`` call, at any depth, except under
    ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                yield node
        stack.extend(ast.iter_child_nodes(node))


def _existing(name: str, mods: dict[str, Path]) -> str | None:
    """``name`` if it is a module, else its nearest ancestor that is (``import d2v.x.y`` of a
    missing ``y`` still runs ``d2v.x``)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def direct_imports(mod: str, mods: dict[str, Path], pkg: str = PKG) -> set[str]:
    """The modules of ``pkg`` that ``mod`` imports directly (its own packages' ``__init__`` not
    counted as an edge unless a name is imported from it)."""
    path = mods[mod]
    is_pkg = path.name == "__init__.py"
    package = mod if is_pkg else mod.rpartition(".")[0]
    out: set[str] = set()

    def add(name: str | None) -> None:
        if name and (name == pkg or name.startswith(pkg + ".")):
            hit = _existing(name, mods)
            if hit and hit != mod:
                out.add(hit)

    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                sub = f"{base}.{a.name}"
                add(sub if a.name != "*" and sub in mods else base)
        else:  # import_module("d2v.x") / __import__("d2v.x")
            add(node.args[0].value)
    return out


def import_graph(src: Path = SRC, pkg: str = PKG) -> tuple[dict[str, set[str]], dict[str, Path]]:
    mods = module_files(src, pkg)
    return {m: direct_imports(m, mods, pkg) for m in mods}, mods


def _ancestors(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def loaded_modules(roots: list[str], graph: dict[str, set[str]]) -> dict[str, str | None]:
    """Every module that importing ``roots`` runs -> the module that pulled it in (for messages)."""
    seen: dict[str, str | None] = {}
    todo = [(r, None) for r in roots]
    while todo:
        m, parent = todo.pop()
        if m in seen or m not in graph:
            continue
        seen[m] = parent
        todo.extend((a, m) for a in _ancestors(m))
        todo.extend((d, m) for d in sorted(graph[m]))
    return seen


def _chain(mod: str, parents: dict[str, str | None]) -> str:
    chain = [mod]
    while parents.get(chain[-1]):
        chain.append(parents[chain[-1]])
    return " <- ".join(chain)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan, iterative
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)

    cycles = []
    for comp in sccs:  # shortest cycle through the component's first module (BFS inside it)
        members, start = set(comp), comp[0]
        prev: dict[str, str] = {}
        frontier, found = [start], None
        while frontier and found is None:
            nxt = []
            for u in frontier:
                for w in sorted(graph[u]):
                    if w == start:
                        found = u
                        break
                    if w in members and w not in prev:
                        prev[w] = u
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


# ----------------------------------------------------------------------------- dvc.yaml

def _subst(value, ctx: dict):
    if isinstance(value, str):
        def repl(m):
            cur = ctx
            for part in m.group(1).strip().split("."):
                if not isinstance(cur, dict) or part not in cur:
                    return m.group(0)
                cur = cur[part]
            return str(cur)
        return re.sub(r"\$\{([^}]+)\}", repl, value)
    if isinstance(value, list):
        return [_subst(v, ctx) for v in value]
    if isinstance(value, dict):
        return {_subst(k, ctx): _subst(v, ctx) for k, v in value.items()}
    return value


def dvc_stages(path: Path = ROOT / "dvc.yaml") -> dict[str, dict]:
    """Stage name (``name@key`` for ``foreach``) -> its definition with ``${item}``/``${key}`` filled in."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    out: dict[str, dict] = {}
    for name, st in doc["stages"].items():
        if "foreach" in st:
            items = st["foreach"]
            pairs = items.items() if isinstance(items, dict) else ((str(i), i) for i in items)
            for key, item in pairs:
                out[f"{name}@{key}"] = _subst(st["do"], {"item": item, "key": key})
        else:
            out[name] = st
    return out


def dep_paths(stage: dict) -> list[str]:
    deps = []
    for d in stage.get("deps") or []:
        d = next(iter(d)) if isinstance(d, dict) else d
        deps.append(str(d).rstrip("/").removeprefix("./"))
    return deps


def command_modules(cmd) -> list[str]:
    """The ``d2v`` modules a stage's ``cmd`` runs: ``d2v <command>``, ``python -m d2v.cli.main
    <command>`` (e.g. under torchrun) or ``python -m d2v.<module>``."""
    from d2v.cli.main import COMMANDS

    cmds = cmd if isinstance(cmd, list) else [cmd]
    found = []
    for c in cmds:
        toks = shlex.split(c)
        for i, t in enumerate(toks):
            nxt = toks[i + 1] if i + 1 < len(toks) else ""
            if (t == "d2v" or t.endswith("/d2v") or t == "d2v.cli.main") and nxt in COMMANDS:
                found.append(COMMANDS[nxt][0])
            elif re.fullmatch(r"d2v(\.\w+)+", t) and t != "d2v.cli.main" and i > 0 and toks[i - 1] == "-m":
                found.append(t)
    return found


def uncovered_files(stage: dict, graph: dict[str, set[str]], mods: dict[str, Path]) -> dict[str, str]:
    """Files under src/d2v the stage's command loads that no dep covers -> how they are reached."""
    roots = command_modules(stage["cmd"])
    if not roots:
        raise AssertionError(f"no d2v command found in cmd {stage['cmd']!r}")
    loaded = loaded_modules(roots, graph)
    deps = dep_paths(stage)
    out = {}
    for m in sorted(loaded):
        rel = mods[m].relative_to(ROOT).as_posix() if mods[m].is_relative_to(ROOT) else str(mods[m])
        if not any(rel == d or rel.startswith(d + "/") for d in deps):
            out[rel] = _chain(m, loaded)
    return out


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_stage_deps_cover_the_code_they_run(graph):
    g, mods = graph
    problems = []
    stages = dvc_stages()
    for name, st in stages.items():
        if "d2v" not in str(st.get("cmd", "")):
            continue
        missing = uncovered_files(st, g, mods)
        for f, why in missing.items():
            problems.append(f"  {name}: {f}  (loaded by {why})")
    assert any("d2v" in str(st.get("cmd", "")) for st in stages.values())
    assert not problems, ("dvc.yaml: stages run code their deps do not list, so `dvc repro` would not "
                          "re-run them when it changes; add these files (or their folder) to deps:\n"
                          + "\n".join(problems))


def stale_code_deps(stage: dict, graph: dict[str, set[str]], mods: dict[str, Path]) -> list[str]:
    """``src/`` deps that do not exist or hold no code the stage's command loads."""
    loaded = {mods[m].relative_to(ROOT).as_posix() for m in loaded_modules(command_modules(stage["cmd"]), graph)}
    out = []
    for dep in dep_paths(stage):
        if not dep.startswith("src/"):
            continue
        if not (ROOT / dep).exists():
            out.append(f"{dep} does not exist")
        elif not any(f == dep or f.startswith(dep + "/") for f in loaded):
            out.append(f"{dep} is not loaded by `{stage['cmd']}`")
    return out


def test_code_deps_exist_and_are_run(graph):
    """No stale code dep: each ``src/`` dep exists (DVC refuses a missing one) and holds code the
    stage's command loads (a file it does not load only makes DVC re-run the stage for nothing)."""
    g, mods = graph
    problems = [f"  {name}: {p}" for name, st in dvc_stages().items() if command_modules(st.get("cmd", ""))
                for p in stale_code_deps(st, g, mods)]
    assert not problems, "dvc.yaml: stale code deps (remove or update them):\n" + "\n".join(problems)


def test_checker_reports_a_dropped_dep(graph):
    """The check can fail: drop one code dep from a stage and it names the file(s) it covered."""
    g, mods = graph
    tried = 0
    for name, st in dvc_stages().items():
        for dep in dep_paths(st):
            if not dep.startswith("src/d2v"):
                continue
            needed = set(uncovered_files({**st, "deps": []}, g, mods))
            covered_only_here = {f for f in needed if f == dep or f.startswith(dep + "/")}
            if not covered_only_here:
                continue
            others = [d for d in st["deps"] if (next(iter(d)) if isinstance(d, dict) else d).rstrip("/") != dep]
            missing = uncovered_files({**st, "deps": others}, g, mods)
            still_covered = {f for f in covered_only_here
                             if any(f == d or f.startswith(d + "/") for d in dep_paths({"deps": others}))}
            assert covered_only_here - still_covered <= set(missing), (name, dep, missing)
            tried += 1
    assert tried, "no stage has a src/d2v dep to drop"
    # a moved file and a file the command never loads are both reported as stale
    st = dvc_stages()["validate@image"]
    bogus = {**st, "deps": [*st["deps"], "src/d2v/no_such_module.py", "src/d2v/cli/register.py"]}
    stale = stale_code_deps(bogus, g, mods)
    assert any("no_such_module.py does not exist" in p for p in stale), stale
    assert any("src/d2v/cli/register.py is not loaded" in p for p in stale), stale
    # and a stage with no deps at all reports its command's own module
    st = dvc_stages()["pretrain"]
    missing = uncovered_files({**st, "deps": []}, g, mods)
    assert any(f.startswith("src/d2v/cli/") for f in missing), missing


def test_analysis_on_a_toy_package(tmp_path):
    """Function-level, relative, ``from pkg import submodule`` and TYPE_CHECKING imports, and
    package ``__init__``s, on a package written here."""
    p = tmp_path / "toy"
    (p / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from toy.sub import b\n",
        "sub/__init__.py": "from .c import C\n",
        "sub/b.py": "from .. import d\nimport toy.sub.missing\n",
        "sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy import e\nC = 1\n",
        "d.py": "import importlib\ndef g():\n    return importlib.import_module('toy.f')\n",
        "e.py": "",
        "f.py": "from toy.a import f\n",
    }
    for rel, text in files.items():
        (p / rel).write_text(text)
    g, _ = import_graph(tmp_path, "toy")
    assert g["toy.a"] == {"toy.sub.b"}
    assert g["toy.sub"] == {"toy.sub.c"}
    assert g["toy.sub.b"] == {"toy.d", "toy.sub"}  # missing submodule -> its package
    assert g["toy.sub.c"] == set()  # TYPE_CHECKING only
    assert g["toy.d"] == {"toy.f"}
    loaded = loaded_modules(["toy.a"], g)
    assert set(loaded) == {"toy", "toy.a", "toy.sub", "toy.sub.b", "toy.sub.c", "toy.d", "toy.f"}
    assert find_cycles(g) == [["toy.a", "toy.sub.b", "toy.d", "toy.f", "toy.a"]]


def test_import_graph_has_no_cycles(graph):
    g, _ = graph
    cycles = find_cycles(g)
    assert not cycles, "import cycles inside d2v (function-level imports count):\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles)


LAYERS = {
    "d2v.models": ["d2v.train", "d2v.data", "d2v.config", "d2v.inference", "d2v.tracking", "d2v.cli"],
    "d2v.train": ["d2v.cli"],
    "d2v.data": ["d2v.cli"],
}


def _within(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def test_layering(graph):
    g, _ = graph
    edges: dict[tuple[str, str], str] = {}  # first forbidden import on the way -> one chain to it
    for low, forbidden in LAYERS.items():
        for m in sorted(g):
            if not _within(m, low):
                continue
            loaded = loaded_modules([m], g)
            for hit in sorted(loaded):
                if not any(_within(hit, f) for f in forbidden):
                    continue
                path = _chain(hit, loaded).split(" <- ")[::-1]  # m -> ... -> hit
                i = next(i for i, x in enumerate(path) if any(_within(x, f) for f in forbidden))
                why = f"{low} must not load {path[i]}: " + " -> ".join(path[: i + 1])
                edges.setdefault((path[i - 1], path[i]), why)
    assert not edges, "layering: lower packages import upper ones:\n" + "\n".join(
        f"  {why}" for why in edges.values())
