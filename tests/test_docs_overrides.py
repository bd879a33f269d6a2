"""Every config override the docs show works as written.

The overrides are read out of README.md, BENCHMARKS.md and docs/*.md: in code blocks and inline
code, after ``d2v <command>`` (or ``-m d2v.cli.main <command>``), after ``-S`` (``dvc exp run``,
``python -m flows.pipeline``) or ``-g`` (``flows.sweep``), in a flow's ``overrides`` list or grid,
or an inline span that is nothing but ``key=value`` overrides (``train.track=false``). Each one is
composed as its command would compose it and validated:

- a ``d2v`` command (and a bare span): ``d2v.config.load_config`` with its ``--config-name``
  (``config`` unless given);
- ``-S``, ``-g``, flows and Prefect parameters: DVC's own Hydra composition of conf/pipeline.yaml
  (``dvc.utils.hydra.compose_and_dump``, what ``dvc exp run -S`` writes to params.yaml), then
  ``from_dict``, as a stage reads params.yaml.

Overrides the docs show on purpose as wrong or as placeholders are listed in ``ALLOWED`` with the
reason; an entry that no longer occurs in the docs fails too.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from d2v.config import PROJECT_ROOT, from_dict, load_config
from d2v.models import ConfigError

DOCS = [PROJECT_ROOT / "README.md", PROJECT_ROOT / "BENCHMARKS.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
# top-level config keys and groups: what a bare inline `key=value` must start with to count
ROOTS = {"seed", "model", "train", "data", "finetune", "experiment"}
OVERRIDE = re.compile(r"^(\+{0,2})([A-Za-z_][\w]*(?:[./][\w]+)*)(?:@[\w.]+)?=(.+)$")
D2V_COMMANDS = {"pretrain", "finetune", "evaluate", "describe", "compose", "download", "validate", "tokenizer",
                "shard", "register", "encode", "convert"}

ALLOWED = {
    "key=value": "a placeholder in prose (`dvc exp run -S key=value`)",
    "experiment=<name>": "a placeholder (`d2v describe experiment=<name>`)",
    "data.audio_seconds=0": "BENCHMARKS.md: an example of a value validation now refuses",
}


@dataclass(frozen=True)
class Example:
    doc: str
    line: int
    config: str  # "config", "pipeline" (a d2v command's --config-name) or "dvc" (DVC's composition)
    overrides: tuple[str, ...]  # all the overrides of the command line, composed together

    def __str__(self) -> str:
        return f"{self.doc}:{self.line} [{self.config}] {' '.join(self.overrides)}"


def _snippets(text: str):
    """(line number, text) of every fenced code line (continuations joined) and inline code span."""
    fence = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
    pos = 0
    for m in fence.finditer(text):
        yield from _inline(text, pos, m.start())
        first = text.count("\n", 0, m.start(1)) + 1
        logical, start = "", None
        for i, line in enumerate(m.group(1).splitlines()):
            start = first + i if start is None else start
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            yield start, logical + line
            logical, start = "", None
        pos = m.end()
    yield from _inline(text, pos, len(text))


def _inline(text: str, start: int, end: int):
    for m in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", text[start:end]):
        yield text.count("\n", 0, start + m.start()) + 1, m.group(1).replace("\n", " ")


def _tokens(snippet: str) -> list[str]:
    try:
        return shlex.split(snippet, comments=True)
    except ValueError:
        return snippet.split()


def _is_override(tok: str, any_root: bool = False) -> bool:
    m = OVERRIDE.match(tok)
    return bool(m) and (any_root or m.group(2).split(".")[0].split("/")[0] in ROOTS)


def _quoted_overrides(snippet: str) -> list[str]:
    """``"train.lr=5e-4"`` inside a JSON-ish list (a flow's ``overrides``)."""
    return [s for s in re.findall(r'"([^"\s]+=[^"\s]+)"', snippet) if _is_override(s)]


def _grid(snippet: str) -> list[list[str]]:
    """``{"train.lr": [1e-4, 5e-4], "experiment": [...]}``: one override per grid value."""
    try:
        grid = json.loads(snippet)
    except ValueError:
        return []
    if not isinstance(grid, dict) or not all(isinstance(k, str) and k.split(".")[0] in ROOTS for k in grid):
        return []
    return [[f"{k}={v}"] for k, vs in grid.items() for v in (vs if isinstance(vs, list) else [vs])]


def examples_in(doc: str, text: str) -> list[Example]:
    out: list[Example] = []
    for line, snippet in _snippets(text):
        toks = _tokens(snippet)
        dvc_side: list[str] = []  # composed as DVC composes params.yaml
        for i, tok in enumerate(toks):
            nxt = toks[i + 1] if i + 1 < len(toks) else ""
            if tok in ("-S", "--set-param") and nxt:
                dvc_side.append(nxt)
            elif tok == "--experiment" and nxt:  # flows
                dvc_side.append(f"experiment={nxt}")
            elif tok == "--param" and _is_override(nxt):  # prefect: --param experiment=tiny
                dvc_side.append(nxt)
        if any("flows." in t or t == "prefect" or t.startswith("overrides") for t in toks) or "overrides" in snippet:
            dvc_side += _quoted_overrides(snippet)
        grid_cmd = [t for i, t in enumerate(toks) if i and toks[i - 1] == "-g"]
        dvc_side = [o for o in dvc_side if _is_override(o, any_root=True)]
        for g in grid_cmd:  # flows.sweep -g key=v1,v2: one run per value
            key, _, values = g.partition("=")
            out += [Example(doc, line, "dvc", (*dvc_side, f"{key}={v}")) for v in values.split(",")]
        if dvc_side and not grid_cmd:
            out.append(Example(doc, line, "dvc", tuple(dvc_side)))
        out += [Example(doc, line, "dvc", tuple(g)) for g in _grid(snippet)]
        # d2v <command> key=value ...
        for i, tok in enumerate(toks):
            if tok in ("d2v", "d2v.cli.main") and i + 1 < len(toks) and toks[i + 1] in D2V_COMMANDS:
                args = toks[i + 2:]
                name = args[args.index("--config-name") + 1] if "--config-name" in args[:-1] else "config"
                skip = {j + 1 for j, a in enumerate(args) if a.startswith("-") and "=" not in a}  # option values
                ov = [a for j, a in enumerate(args) if j not in skip and not a.startswith("-") and _is_override(a, any_root=True)]
                if ov:
                    out.append(Example(doc, line, name, tuple(ov)))
                break
        else:
            if toks and not dvc_side and all(_is_override(t) for t in toks):  # a bare `train.track=false`
                out.append(Example(doc, line, "config", tuple(toks)))
    return out


def all_examples() -> list[Example]:
    return [e for p in DOCS for e in examples_in(p.name, p.read_text(encoding="utf-8"))]


def compose(ex: Example) -> None:
    if ex.config == "dvc":
        import tempfile

        from dvc.utils.hydra import compose_and_dump

        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "params.yaml"
            compose_and_dump(out, str(PROJECT_ROOT / "conf"), None, "pipeline", str(PROJECT_ROOT), list(ex.overrides))
            from_dict(yaml.safe_load(out.read_text()))
    else:
        load_config(list(ex.overrides), config_name=ex.config)


EXAMPLES = all_examples()
CHECKED = [e for e in EXAMPLES if not any(o in ALLOWED for o in e.overrides)]


def test_the_docs_show_overrides_and_the_extractor_finds_them():
    shown = {o for e in EXAMPLES for o in e.overrides}
    # one of each kind the docs use: a d2v command, a bare span, -S, a flow's list, a sweep grid
    for o in ("train.max_steps=200", "finetune.speech.head=ctc", "train.track=false", "train.lr=5e-4",
              "train.max_steps=20", "data.image.folder=/path/to/imagenet", "experiment=text_base"):
        assert o in shown, f"{o} not extracted from the docs"
    assert len(CHECKED) >= 15
    stale = set(ALLOWED) - shown
    assert not stale, f"ALLOWED lists overrides the docs no longer show: {stale}"


@pytest.mark.parametrize("example", CHECKED, ids=str)
def test_override_shown_in_the_docs_composes_and_validates(example: Example):
    compose(example)


def test_a_made_up_key_is_caught():
    """The check can fail: a doc line with a key that is no config field is refused."""
    doc = "Try `d2v pretrain train.made_up_key=1` or `dvc exp run -S train.lrr=5e-4`.\n"
    found = examples_in("made-up.md", doc)
    assert [e.config for e in found] == ["config", "dvc"]
    for ex in found:
        with pytest.raises(Exception) as err:
            compose(ex)
        assert "made_up_key" in str(err.value) or "lrr" in str(err.value)
    with pytest.raises(ConfigError, match="not a config field"):
        compose(found[0])
