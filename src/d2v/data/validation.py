"""Great Expectations (1.x) checks of one modality's manifests; writes a JSON report.

``validate_modality`` concatenates ``data/raw/<modality>/manifest/{train,val,test}.csv`` (read with
:func:`d2v.data.manifest.read_manifest`), adds a few columns computed with pandas (``path_exists``,
``manifest_split``, ``key_n_splits``, ``text_len``), runs one GX suite on the result plus a tiny
suite on the per-split row counts, and writes a report (see :func:`validate_modality`).
Quarantined items (``quarantine.csv``) are not failures; they are counted in the report.

GX is imported lazily (≈3 s), runs in an ephemeral context (no files, no network), with analytics
and progress bars off. A validation of a ~70k-row manifest takes well under a second.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from d2v.data.manifest import COLUMNS, SPLITS, manifest_path, quarantine_path, raw_dir, read_manifest
from d2v.errors import ConfigError, InputError

# Default limits; ``validate_modality(limits=...)`` overrides any of these keys (unknown keys are an
# error). ``labels`` maps a modality to its allowed label set (None/absent: labels not checked);
# a plain list in ``limits["labels"]`` applies to the modality being validated.
DEFAULT_LIMITS: dict[str, Any] = {
    "min_rows_per_split": 1,  # int, or {split: int}
    "image_min_size": 8,  # width and height in [image_min_size, image_max_size] pixels
    "image_max_size": 4096,
    # The default speech corpus (espeak-ng spoken words, silence trimmed) has single words of
    # 0.2-0.75 s, so the minimum is 0.1 s (the speech source quarantines anything shorter)
    # rather than the 0.5 s usual for sentences.
    "speech_min_s": 0.1,
    "speech_max_s": 30.0,
    "sample_rate": 16000,
    "text_min_chars": 1,
    "text_max_chars": 100_000,
    # Rotten-Tomatoes snippets are "fresh"/"rotten"; pretraining text is unlabelled ("").
    # Image (Fashion-MNIST / ImageNet folders) and speech (word / LibriSpeech) labels depend on the
    # dataset, so they are not checked unless configured.
    "labels": {"text": ["", "fresh", "rotten"]},
    "max_examples": 5,  # unexpected values / rows listed per failed expectation
}

_NUMERIC = {"image": ["offset", "width", "height"], "speech": ["duration", "sample_rate"], "text": ["n_chars"]}
_STRING = ["key", "split", "label", "path", "voice", "synth", "text", "source"]
_NAN_FREE = (str, int, float, bool, type(None))


@dataclass
class _Exp:
    name: str  # stable id, stored in the GX expectation's meta
    expectation: Any  # a gx.expectations.* instance
    column: str | None
    description: str
    on_counts: bool = False  # checks the per-split row-count table, not the manifest rows
    result: dict = field(default_factory=dict)


def merge_limits(modality: str, limits: dict | None) -> dict:
    """DEFAULT_LIMITS updated with ``limits``; ``labels`` resolved to this modality's set (or None)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULT_LIMITS.items()}
    for k, v in (limits or {}).items():
        if k not in DEFAULT_LIMITS:
            raise ConfigError(f"validation limits: unknown key {k!r} (known: {sorted(DEFAULT_LIMITS)})")
        if k == "labels" and isinstance(v, dict):
            out["labels"].update(v)
        elif k == "labels" and v is not None:
            out["labels"][modality] = list(v)
        elif k == "labels":
            out["labels"] = {}
        else:
            out[k] = v
    labels = out["labels"].get(modality)
    out["labels"] = None if labels is None else sorted({str(x) for x in labels})
    mr = out["min_rows_per_split"]
    if isinstance(mr, dict):
        unknown = set(mr) - set(SPLITS)
        if unknown:
            raise ConfigError(f"validation limits: min_rows_per_split has unknown splits {sorted(unknown)}")
        out["min_rows_per_split"] = {s: int(mr.get(s, DEFAULT_LIMITS["min_rows_per_split"])) for s in SPLITS}
    else:
        out["min_rows_per_split"] = {s: int(mr) for s in SPLITS}
    return out


def _load(modality: str, root: Path):
    import pandas as pd

    frames = []
    for split in SPLITS:
        path = manifest_path(root, modality, split)
        df = read_manifest(path)
        # read_manifest types only key/label/path as str: an all-digit text/voice column (e.g. a
        # text "007") would come back as int and lose its exact spelling, so re-read those as str.
        numeric = [c for c in _STRING if c in df.columns and pd.api.types.is_numeric_dtype(df[c])]
        if numeric and len(df):
            exact = pd.read_csv(path, usecols=numeric, dtype=str, keep_default_na=False)
            for c in numeric:
                df[c] = exact[c]
        df["manifest_split"] = split
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    for c in _STRING:
        if c in df.columns:
            df[c] = df[c].where(df[c].isna(), df[c].astype(str)).astype(object)
    for c in _NUMERIC[modality]:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def _derive(df, modality: str, root: Path) -> None:
    base = raw_dir(root, modality)
    if "path" in df.columns:
        uniq = {p: isinstance(p, str) and p.strip() != "" and (base / p).is_file() for p in df["path"].unique()}
        df["path_exists"] = df["path"].map(uniq).astype(bool)
        inside = {p: not isinstance(p, str) or not (PurePath(p).is_absolute() or p.startswith(("/", "\\"))
                                                    or ".." in PurePath(p.replace("\\", "/")).parts)
                  for p in df["path"].unique()}
        df["path_inside"] = df["path"].map(inside).astype(bool)
    if "key" in df.columns:
        df["key_n_splits"] = df.groupby("key", dropna=False)["manifest_split"].transform("nunique").astype(int)
    if modality == "text" and "text" in df.columns:
        df["text_len"] = df["text"].map(lambda t: len(t) if isinstance(t, str) else -1).astype(int)


def _suite(modality: str, lim: dict, columns: set[str]) -> list[_Exp]:
    import great_expectations as gx

    E = gx.expectations
    exps: list[_Exp] = []

    def add(name, cls, column, description, on_counts=False, **kw):
        if column is not None and column not in columns and not on_counts:
            return  # reported by the "columns" expectation instead
        if column is not None and not on_counts and not ({"column_A", "column_set"} & set(kw)):
            kw["column"] = column
        exp = cls(meta={"d2v_name": name}, **kw)
        exps.append(_Exp(name, exp, column, description, on_counts))

    required = COLUMNS[modality]
    add("columns", E.ExpectTableColumnsToMatchSet, None, f"manifest has the columns {required}",
        column_set=required, exact_match=False)
    for c in ("key", "split", "path"):
        add(f"{c}_not_null", E.ExpectColumnValuesToNotBeNull, c, f"{c} is present")
        add(f"{c}_not_empty", E.ExpectColumnValuesToMatchRegex, c, f"{c} is not empty", regex=r"\S")
    add("key_unique", E.ExpectColumnValuesToBeUnique, "key", "key is unique across all splits")
    add("key_in_one_split", E.ExpectColumnValuesToBeBetween, "key_n_splits", "each key is in one split only",
        min_value=1, max_value=1)
    add("split_in_set", E.ExpectColumnValuesToBeInSet, "split", f"split in {list(SPLITS)}", value_set=list(SPLITS))
    if "split" in columns:
        add("split_matches_file", E.ExpectColumnPairValuesToBeEqual, "split",
            "split column equals the manifest file it is in", column_A="split", column_B="manifest_split")
    add("path_exists", E.ExpectColumnValuesToBeInSet, "path_exists", "every referenced file exists",
        value_set=[True])
    add("path_inside", E.ExpectColumnValuesToBeInSet, "path_inside",
        "every path is relative and stays inside data/raw/<modality> (no absolute path, no '..')", value_set=[True])
    add("rows_per_split", E.ExpectColumnPairValuesAToBeGreaterThanB, "rows",
        f"rows per split >= {lim['min_rows_per_split']}", on_counts=True,
        column_A="rows", column_B="min_rows", or_equal=True)
    if lim["labels"] is not None:
        add("label_in_set", E.ExpectColumnValuesToBeInSet, "label", f"label in {lim['labels']}",
            value_set=lim["labels"])
    for c in _NUMERIC[modality]:
        add(f"{c}_numeric", E.ExpectColumnValuesToNotBeNull, c, f"{c} is a number")

    if modality == "image":
        lo, hi = lim["image_min_size"], lim["image_max_size"]
        for c in ("width", "height"):
            add(f"{c}_range", E.ExpectColumnValuesToBeBetween, c, f"{c} in [{lo}, {hi}] px", min_value=lo, max_value=hi)
        add("offset_range", E.ExpectColumnValuesToBeBetween, "offset", "offset >= -1", min_value=-1)
    elif modality == "speech":
        lo, hi = lim["speech_min_s"], lim["speech_max_s"]
        add("duration_range", E.ExpectColumnValuesToBeBetween, "duration", f"duration in [{lo}, {hi}] s",
            min_value=lo, max_value=hi)
        add("sample_rate", E.ExpectColumnValuesToBeInSet, "sample_rate", f"sample_rate == {lim['sample_rate']}",
            value_set=[lim["sample_rate"]])
        add("voice_not_empty", E.ExpectColumnValuesToMatchRegex, "voice", "voice is not empty", regex=r"\S")
        add("voice_not_null", E.ExpectColumnValuesToNotBeNull, "voice", "voice is present")
    elif modality == "text":
        lo, hi = lim["text_min_chars"], lim["text_max_chars"]
        add("n_chars_range", E.ExpectColumnValuesToBeBetween, "n_chars", f"n_chars in [{lo}, {hi}]",
            min_value=lo, max_value=hi)
        add("text_not_null", E.ExpectColumnValuesToNotBeNull, "text", "text is present")
        add("text_not_empty", E.ExpectColumnValuesToMatchRegex, "text", "text is not empty (not only whitespace)",
            regex=r"\S")
        if "n_chars" in columns:
            add("text_len_equals_n_chars", E.ExpectColumnPairValuesToBeEqual, "text_len",
                "len(text) == n_chars", column_A="text_len", column_B="n_chars")
    else:
        raise InputError(f"unknown modality {modality!r} (image|speech|text)")
    return exps


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, _NAN_FREE):  # numpy scalars
        try:
            v = v.item()
        except (ValueError, TypeError):
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, _NAN_FREE):
        return v
    return str(v)


def _short(v: Any, n: int = 80) -> Any:
    if isinstance(v, str) and len(v) > n:
        return v[: n - 3] + "..."
    return v


def _read_quarantine(root: Path, modality: str) -> dict:
    import pandas as pd

    p = quarantine_path(root, modality)
    if not p.is_file():
        return {"count": 0, "reasons": {}}
    try:
        q = pd.read_csv(p, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return {"count": 0, "reasons": {}}
    reasons = Counter(q["reason"]) if "reason" in q.columns else Counter({"(no reason column)": len(q)})
    top = dict(reasons.most_common(50))
    if len(reasons) > 50:
        top["(other reasons)"] = sum(reasons.values()) - sum(top.values())
    return {"count": int(len(q)), "reasons": {_short(k, 200): int(v) for k, v in top.items()}}


_INDEX_COLS = ("key", "manifest_split", "path")


def _example(ex: dict) -> dict:
    """A failing row as {key, manifest_split, path, <checked column>: value}, identifiers first."""
    first = {c: ex[c] for c in (*_INDEX_COLS, "split") if c in ex}
    return {c: _short(v) for c, v in {**first, **ex}.items()}


def _message(e: _Exp, df, counts, lim: dict, modality: str, root: Path) -> str:
    """A human-readable line for a failed expectation, with pandas-computed specifics."""
    k = lim["max_examples"]
    r = e.result
    if e.name == "columns":
        missing = r.get("details", {}).get("mismatched", {}).get("missing") or []
        return f"manifest lacks the columns {missing}"
    if e.name == "rows_per_split":
        bad = counts[counts["rows"] < counts["min_rows"]]
        return "; ".join(f"split {s!r} has {n} rows (min {m})" for s, n, m in bad[["split", "rows", "min_rows"]].values)
    if e.name in ("key_unique", "key_in_one_split"):
        dup = df[df.duplicated("key", keep=False)]
        multi = dup.groupby("key")["manifest_split"].agg(lambda s: sorted(set(s), key=SPLITS.index))
        cross = multi[multi.map(len) > 1]
        parts = []
        if len(cross):
            ex = ", ".join(f"{key!r} ({'+'.join(sp)})" for key, sp in cross.head(k).items())
            parts.append(f"{len(cross)} key(s) appear in more than one split, e.g. {ex}")
        within = dup.groupby(["manifest_split", "key"]).size()
        within = within[within > 1]
        if e.name == "key_unique" and len(within):
            ex = ", ".join(f"{key!r} x{n} in {s}" for (s, key), n in within.head(k).items())
            parts.append(f"{len(within)} key(s) repeated within a split, e.g. {ex}")
        return "; ".join(parts) or f"{r.get('unexpected_count')} duplicated key rows"
    if e.name == "path_inside":
        bad = df.loc[~df["path_inside"], "path"].unique()
        return f"{len(bad)} path(s) leave {raw_dir(root, modality)}, e.g. {', '.join(repr(_short(p)) for p in bad[:k])}"
    if e.name == "path_exists":
        missing = df.loc[~df["path_exists"], "path"].unique()
        ex = ", ".join(repr(_short(p)) for p in missing[:k])
        return f"{len(missing)} referenced file(s) missing under {raw_dir(root, modality)}, e.g. {ex}"
    n, total = r.get("unexpected_count"), r.get("element_count")
    vals = ", ".join(repr(_short(v)) for v in (r.get("partial_unexpected_list") or [])[:k])
    return f"{e.description}: {n} of {total} rows fail, e.g. {vals}"


def validate_modality(modality: str, root: Path, report_path: Path, limits: dict | None = None) -> dict:
    """Validate the three manifests of ``modality`` under ``root`` (the ``data`` dir); write a report.

    The report (also returned) is JSON::

        {"modality": "speech", "success": false,
         "rows": {"train": 120, "val": 12, "test": 24, "total": 156},
         "quarantined": {"count": 2, "reasons": {"decode error": 2}},
         "limits": {...the effective limits...},
         "failed": ["duration_range"],
         "expectations": [{"name": "duration_range", "expectation": "expect_column_values_to_be_between",
                           "column": "duration", "description": "duration in [0.2, 30.0] s",
                           "success": false, "unexpected_count": 1, "element_count": 156,
                           "unexpected_values": [45.0], "examples": [{"key": "w1", "manifest_split": "train",
                                         "path": "wav/w1.flac", "duration": 45.0}],
                           "message": "duration in [0.2, 30.0] s: 1 of 156 rows fail, e.g. 45.0"}, ...],
         "great_expectations": "1.24.1"}

    A missing manifest raises ``FileNotFoundError``; bad ``limits`` raise ``ConfigError``; an
    internal GX failure raises ``RuntimeError``. Data problems never raise: ``success`` is False.
    """
    import pandas as pd

    if modality not in COLUMNS:
        raise InputError(f"unknown modality {modality!r} (image|speech|text)")
    root, report_path = Path(root), Path(report_path)
    lim = merge_limits(modality, limits)
    df = _load(modality, root)
    _derive(df, modality, root)
    rows = {s: int((df["manifest_split"] == s).sum()) for s in SPLITS}
    counts = pd.DataFrame({"split": list(SPLITS), "rows": [rows[s] for s in SPLITS],
                           "min_rows": [lim["min_rows_per_split"][s] for s in SPLITS]})

    exps = _run_gx(modality, lim, df, counts)

    expectations = []
    for e in exps:
        r = e.result
        entry = {
            "name": e.name,
            "expectation": e.expectation.expectation_type,
            "column": e.column,
            "description": e.description,
            "success": bool(r["success"]),
            "unexpected_count": int(r.get("unexpected_count") or 0),
            "element_count": r.get("element_count"),
        }
        if not r["success"]:
            k = lim["max_examples"]
            entry["unexpected_values"] = [_short(v) for v in (r.get("partial_unexpected_list") or [])[:k]]
            entry["examples"] = [_example(ex) for ex in (r.get("partial_unexpected_index_list") or [])[:k]
                                 if isinstance(ex, dict)]
            if e.name == "columns":
                entry["unexpected_count"] = len(r.get("details", {}).get("mismatched", {}).get("missing") or [])
            entry["message"] = _message(e, df, counts, lim, modality, root)
        expectations.append(entry)

    report = {
        "modality": modality,
        "success": all(x["success"] for x in expectations),
        "rows": {**rows, "total": int(len(df))},
        "quarantined": _read_quarantine(root, modality),
        "limits": lim,
        "failed": [x["name"] for x in expectations if not x["success"]],
        "expectations": expectations,
        "great_expectations": _gx_version(),
    }
    report = _jsonable(report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = report_path.with_name(report_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(report_path)
    return report


def _gx_version() -> str:
    import great_expectations as gx

    return gx.__version__


def _quiet_gx():
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import logging

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx

    return gx


def _run_gx(modality: str, lim: dict, df, counts) -> list[_Exp]:
    """Run the suites; fill each ``_Exp.result`` (success + GX result dict)."""
    gx = _quiet_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    exps = _suite(modality, lim, set(df.columns))
    index_cols = [c for c in _INDEX_COLS if c in df.columns]
    try:
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        ds = ctx.data_sources.add_pandas(f"{modality}_manifests")
        runs = [
            ("rows", [e for e in exps if not e.on_counts], df, index_cols),
            ("split_counts", [e for e in exps if e.on_counts], counts, ["split"]),
        ]
        for name, group, frame, idx in runs:
            bd = ds.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("all")
            # Expectations given to the constructor: add_expectation() on a registered suite
            # re-serialises the store each time (~0.5 s for the whole suite).
            suite = ctx.suites.add(gx.ExpectationSuite(name=f"{modality}_{name}",
                                                       expectations=[e.expectation for e in group]))
            vd = ctx.validation_definitions.add(
                gx.ValidationDefinition(name=f"{modality}_{name}", data=bd, suite=suite))
            fmt = {"result_format": "SUMMARY", "partial_unexpected_count": lim["max_examples"],
                   "unexpected_index_column_names": idx}
            res = vd.run(batch_parameters={"dataframe": frame}, result_format=fmt)
            by_name = {e.name: e for e in group}
            for r in res.results:
                e = by_name[r.expectation_config.meta["d2v_name"]]
                if r.exception_info and r.exception_info.get("raised_exception"):
                    raise RuntimeError(f"Great Expectations raised while checking {e.name!r} "
                                       f"({e.description}): {r.exception_info.get('exception_message')}")
                e.result = {"success": bool(r.success), **(r.result or {})}
    except RuntimeError:
        raise
    except Exception as err:  # anything GX raises internally
        raise RuntimeError(f"Great Expectations failed while validating the {modality} manifests: "
                           f"{type(err).__name__}: {err}") from err
    missing = [e.name for e in exps if not e.result]
    if missing:
        raise RuntimeError(f"Great Expectations returned no result for {missing}")
    return exps


def summarize(report: dict) -> str:
    """A readable multi-line summary: status, rows, quarantine, then each failed expectation."""
    rows = report.get("rows", {})
    q = report.get("quarantined", {})
    exps = report.get("expectations", [])
    failed = [x for x in exps if not x.get("success")]
    status = "passed" if report.get("success") else f"FAILED ({len(failed)} of {len(exps)} expectations)"
    lines = [f"{report.get('modality')} manifests: validation {status}",
             "  rows: " + ", ".join(f"{s}={rows.get(s, 0)}" for s in (*SPLITS, "total"))]
    qline = f"  quarantined: {q.get('count', 0)}"
    if q.get("reasons"):
        # one count per kind of reason: "shorter than min_chars (5 < 8)" and "(6 < 8)" are one kind here
        # (the report's JSON keeps each exact reason)
        kinds: Counter = Counter()
        for r, n in q["reasons"].items():
            kinds[re.sub(r"\s*\([^()]*\)", "", r).strip() or r] += n
        shown = kinds.most_common(6)
        qline += " (" + ", ".join(f"{r}: {n}" for r, n in shown) + (", ..." if len(kinds) > len(shown) else "") + ")"
    lines.append(qline)
    for x in failed:
        col = f" [{x['column']}]" if x.get("column") else ""
        lines.append(f"  FAILED {x['name']}{col}: {x.get('message') or x.get('description')}")
        for ex in (x.get("examples") or [])[:3]:
            lines.append("      " + ", ".join(f"{k}={v!r}" for k, v in ex.items()))
    return "\n".join(lines)


__all__ = ["DEFAULT_LIMITS", "merge_limits", "summarize", "validate_modality"]
