"""The benchmarks run on a tiny budget and write well-formed JSON (their numbers are not tested)."""

from __future__ import annotations

import json
import subprocess
import sys

from d2v.config import PROJECT_ROOT


def test_step_time_benchmark_writes_json(tmp_path):
    out = tmp_path / "st.json"
    r = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks/step_time.py"), "experiment=tiny", "data=sample",
         "train.batch_size=2", "--steps", "2", "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert {x["modality"] for x in rep["results"]} == {"image", "speech", "text"}
    for x in rep["results"]:
        assert x["median_step_s"] > 0 and x["samples_per_s"] > 0 and x["visible_per_clone"] < x["tokens_per_sample"]
    assert rep["machine"]["cpu"] and rep["date"] and "step_time.py" in rep["command"]
    assert "median s" in r.stdout  # the printed table
