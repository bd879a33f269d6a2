"""`d2v summary`: the per-task verdicts, the numbers behind them, missing/truncated reports and
stale metrics (the end-to-end test also runs it after the real `dvc repro`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import pytest
import yaml

from d2v.cli.main import main
from d2v.report.summary import Comparison, render, summarize

EVAL = {  # task -> (accuracy, baseline, probe, probe baseline, n)
    "image": (0.716, 0.675, 0.732, 0.576, 10000),
    "speech": (0.413, 0.442, 0.278, 0.314, 385),
    "text": (0.60, 0.75, 0.63, 0.63, 637),
}


def write_reports(root: Path) -> None:
    m = root / "reports/metrics"
    m.mkdir(parents=True)
    for task, (a, b, c, d, n) in EVAL.items():
        (m / f"eval_{task}.json").write_text(json.dumps({
            "task": task, "split": "test", "eval_samples": n, "accuracy": a, "baseline_accuracy": b,
            "probe_accuracy": c, "probe_baseline_accuracy": d, "seconds": 12.5}))
        (m / f"finetune_{task}.json").write_text(json.dumps({"seconds": 40.0, "baseline_seconds": 30.0}))
    (m / "pretrain.json").write_text(json.dumps({
        "steps": 600, "first_loss": {"image": 11.0}, "final_loss": {"image": 6.8}, "samples_per_s": 94.0,
        "copies_per_s": 376.0, "train_seconds": 114.0, "probe": {"image": 0.625}, "probe_seconds": 9.0}))


def test_verdicts_follow_the_standard_error_of_the_difference(tmp_path):
    write_reports(tmp_path)
    s = summarize(tmp_path)
    assert s.complete and [t.task for t in s.tasks] == ["image", "speech", "text"]
    verdicts = {}
    for t in s.tasks:
        a, b, c, d, n = EVAL[t.task]
        se = math.sqrt(a * (1 - a) / n + b * (1 - b) / n)  # independent of the module's formula
        assert t.finetuned.diff == pytest.approx(a - b) and t.finetuned.stderr == pytest.approx(se)
        verdicts[t.task] = (t.finetuned.verdict, t.probe.verdict)
    # image: +0.041 at se 0.0065 (6 se); speech: -0.029 at se 0.036; text: -0.15 at se 0.026; probes
    assert verdicts == {"image": ("better", "better"), "speech": ("within noise", "within noise"),
                        "text": ("worse", "within noise")}
    assert Comparison(0.52, 0.50, 10000).verdict == "better"  # 2.8 se
    assert Comparison(0.51, 0.50, 10000).verdict == "within noise"  # 1.4 se
    text = render(s)
    for want in ("+0.041 ± 0.007", "-0.150 ± 0.026", "worse", "94 samples/s (376 masked copies/s)",
                 "finetune@image 70 s", "evaluate@text 12 s",
                 "probing took 9 s, 8% of the training time", "mlflow_ui.sh", "no dvc.lock here"):
        assert want in text, want


def test_a_missing_or_truncated_report_is_named_and_the_rest_still_shown(tmp_path, capsys):
    write_reports(tmp_path)
    (tmp_path / "reports/metrics/eval_speech.json").unlink()
    good = (tmp_path / "reports/metrics/eval_text.json").read_text()
    (tmp_path / "reports/metrics/eval_text.json").write_text(good[: len(good) // 2])  # truncated
    rc = main(["summary", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "eval_speech.json: missing" in out and "eval_text.json: unreadable, truncated or not JSON" in out
    assert "image" in out and "+0.041 ± 0.007" in out  # what can be shown still is
    rc = main(["summary", "--root", str(tmp_path), "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 1 and [t["task"] for t in d["tasks"]] == ["image"] and len(d["problems"]) == 2
    assert d["tasks"][0]["finetuned"]["verdict"] == "better"


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def test_a_metric_whose_inputs_changed_after_it_was_written_is_stale(tmp_path):
    write_reports(tmp_path)
    root = tmp_path
    (root / "models/finetune/image").mkdir(parents=True)
    (root / "models/finetune/image/weights.pt").write_bytes(b"w")
    (root / "src.py").write_text("x = 1\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"finetune": {"image": {"steps": 150}}}))
    old = time.time() - 100
    os.utime(root / "models/finetune/image/weights.pt", (old, old))
    ev = root / "reports/metrics/eval_image.json"
    lock = {"schema": "2.0", "stages": {
        "evaluate@image": {
            "cmd": "d2v evaluate --task image",
            "deps": [{"path": "models/finetune/image", "md5": "x.dir"}, {"path": "src.py", "md5": _md5(root / "src.py")}],
            "params": {"params.yaml": {"finetune.image": {"steps": 150}}},
            "outs": [{"path": "reports/metrics/eval_image.json", "md5": _md5(ev)}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    s = summarize(root)
    assert s.lock_checked and s.stale == {} and not s.tasks[0].stale  # as the last run left it

    (root / "models/finetune/image/weights.pt").write_bytes(b"new weights")  # fine-tuning ran again (or failed)
    s = summarize(root)
    assert s.stale["reports/metrics/eval_image.json"] == [
        "its input models/finetune/image/ changed after it was written"]
    assert s.tasks[0].stale and "image (stale)" in render(s) and "STALE" in render(s)

    os.utime(root / "models/finetune/image/weights.pt", (old, old))
    (root / "src.py").write_text("x = 2\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"finetune": {"image": {"steps": 60}}}))
    why = summarize(root).stale["reports/metrics/eval_image.json"]
    assert why == ["its input src.py changed since stage evaluate@image ran",
                   "param finetune.image.steps changed since stage evaluate@image ran (150 -> 60)"]

    (root / "src.py").write_text("x = 1\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"finetune": {"image": {"steps": 150}}}))
    import shutil

    shutil.rmtree(root / "models/finetune/image")  # the stage that makes it failed before writing
    assert summarize(root).stale["reports/metrics/eval_image.json"] == ["its input models/finetune/image is missing"]


def write_plots(root: Path) -> None:
    plots = root / "reports/plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows = ["step\tmodality\tloss\tlr\tema_decay\ttarget_var\tpred_var\tstep_time_s\tlocal_mean\tlocal_std\tlocal_frame_std"]
    for step in range(1, 31):
        m = ("image", "speech", "text")[step % 3]
        local = "0.1\t0.5\t0.4" if m == "speech" else "nan\tnan\tnan"
        rows.append(f"{step}\t{m}\t{10 - step / 10}\t1e-3\t0.999\t0.5\t0.3\t0.1\t{local}")
    (plots / "pretrain_loss.tsv").write_text("\n".join(rows) + "\n")
    (plots / "pretrain_probe.tsv").write_text("step\ttrain_seconds\tmodality\taccuracy\n0\t0\timage\t0.5\n30\t9.5\timage\t0.7\n")
    (plots / "finetune_image.tsv").write_text("step\tloss_pretrained\tloss_random\n1\t2.3\t2.3\n2\t2.0\t2.2\n")


def test_the_report_page_embeds_the_curves_and_the_table(tmp_path, capsys):
    write_reports(tmp_path)
    write_plots(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\ntrain:\n  lr: 0.001\n")
    out = tmp_path / "reports/report.html"
    assert main(["report", "--root", str(tmp_path)]) == 0
    page = out.read_text()
    captions = re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="([^"]+)"', page)
    # loss, variances, speech front end, online probe, fine-tuning (image only here): five drawn curves
    assert len(captions) == 5 and any("online probe" in c.lower() for c in captions), captions
    assert "+0.041 ± 0.007" in page and 'class="worse">worse' in page and "lr: 0.001" in page
    # what is absent is listed, not an error: the other tasks' curves and every confusion matrix
    assert "fine-tuning curve of speech" in page and "confusion matrix of text" in page
    assert "<script" not in page  # self-contained and static


def test_the_report_of_a_broken_run_says_what_is_missing_and_escapes_what_it_shows(tmp_path, capsys):
    write_reports(tmp_path)
    (tmp_path / "reports/metrics/eval_image.json").write_text("{not json")
    (tmp_path / "params.yaml").write_text("note: <script>alert(1)</script>\n")
    assert main(["report", "--root", str(tmp_path)]) == 1
    assert "eval_image.json: unreadable" in capsys.readouterr().out
    page = (tmp_path / "reports/report.html").read_text()
    assert "eval_image.json: unreadable" in page and "pretraining curves" in page
    assert "<script>alert" not in page and "&lt;script&gt;" in page  # autoescaped
