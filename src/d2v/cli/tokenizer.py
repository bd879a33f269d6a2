"""``d2v tokenizer``: train sentencepiece on the text training split (DVC stage ``tokenizer``).

Writes ``models/tokenizer/spm.model`` (ids: <s>=0, <pad>=1, </s>=2, <unk>=3) and ``tokenizer.json``,
and ``reports/data/tokenizer.json``: the same with the stage's wall time.

Example:
  d2v tokenizer --params params.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from d2v.cli.common import add_config_args, config_from_args, run_cli


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v tokenizer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/tokenizer"))
    add_config_args(p)
    ns = p.parse_intermixed_args(argv)

    def run() -> int:
        from d2v.data.tokenizer import train_tokenizer

        cfg = config_from_args(ns)
        t = cfg.data.tokenizer
        info = train_tokenizer(cfg.data.root, ns.out, t.vocab_size, t.model_type, t.character_coverage, cfg.seed)
        report = Path("reports/data/tokenizer.json")
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(info, indent=2))
        print(json.dumps(info, indent=2))
        return 0

    return run_cli(run)
