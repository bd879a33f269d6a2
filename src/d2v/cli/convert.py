"""``d2v convert``: import a fairseq data2vec 2.0 checkpoint as a d2v model folder.

Reads the checkpoint without fairseq (weights-only unpickling: tensors, plain containers and a
few omegaconf config classes bound to inert stand-ins; anything else is refused, never run),
maps the student and the EMA teacher onto this project's model, builds the config from the
checkpoint's ``cfg.model`` and writes DIR/config.json + DIR/weights.pt (+ the text dictionary).

Examples:
  d2v convert --from-fairseq base_libri.pt --out models/converted/base_libri
  d2v convert --from-fairseq nlp_base.pt --dict dict.txt --out models/converted/nlp_base
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from d2v.cli.common import run_cli


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-fairseq", dest="checkpoint", type=Path, required=True, metavar="CHECKPOINT",
                   help="a fairseq data2vec_multi checkpoint (.pt)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="model folder to write (replaced if it exists)")
    p.add_argument("--dict", dest="dictionary", type=Path, default=None,
                   help="text models: fairseq dict.txt (encoder.json + vocab.bpe beside it are copied too)")
    p.add_argument("--teacher-from-student", action="store_true",
                   help="if the file has no EMA teacher (_ema), start the teacher as a copy of the student")
    ns = p.parse_args(argv)

    def run() -> int:
        from d2v.models.model_dir import convert_fairseq, load_model_dir

        out = convert_fairseq(ns.checkpoint, ns.out, dictionary=ns.dictionary, teacher_from_student=ns.teacher_from_student)
        model, info = load_model_dir(out)  # read back: the folder is complete and consistent
        fs = info["extra"].get("fairseq", {})
        n = sum(p.numel() for k, p in model.state_dict().items() if not k.startswith("teacher."))
        print(json.dumps({"out": str(out), "modality": model.cfg.modalities, "embed_dim": model.cfg.embed_dim,
                          "depth": model.cfg.depth, "student_tensors_numel": n, "teacher": fs.get("teacher"),
                          "num_updates": fs.get("num_updates"), "tokenizer": (info["tokenizer"] or {}).get("type")}))
        return 0

    return run_cli(run)
