"""``d2v``: one subcommand per pipeline stage. ``d2v <command> --help`` for each."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs, so
# ``d2v --help`` stays fast (MLflow, Prefect and GX take seconds to import).
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("d2v.cli.download", "fetch raw data and write per-split manifests (DVC stage 'download@<modality>')"),
    "validate": ("d2v.cli.validate", "Great Expectations checks of the manifests (DVC stage 'validate@<modality>')"),
    "tokenizer": ("d2v.cli.tokenizer", "train the sentencepiece tokenizer on the text training split (DVC stage 'tokenizer')"),
    "shard": ("d2v.cli.shard", "write WebDataset shards and wids indexes per split (DVC stage 'shard@<modality>')"),
    "pretrain": ("d2v.cli.pretrain", "self-supervised pretraining of the data2vec 2.0 model (DVC stage 'pretrain')"),
    "finetune": ("d2v.cli.finetune", "fine-tune a classifier on the pretrained and on a random encoder (DVC stage 'finetune@<task>')"),
    "evaluate": ("d2v.cli.evaluate", "test accuracy and linear probes against random init (DVC stage 'evaluate@<task>')"),
    "register": ("d2v.cli.register", "register encoder and classifiers in MLflow; move 'champion' on improvement (DVC stage 'register')"),
    "report": ("d2v.cli.report", "one self-contained HTML page of the run: curves, confusion matrices, summary (DVC stage 'report')"),
    "summary": ("d2v.cli.summary", "did pretraining help, per task, and how fast: a table from reports/metrics/"),
    "compose": ("d2v.cli.compose", "compose conf/ with Hydra overrides into params.yaml (or print it)"),
    "describe": ("d2v.cli.describe", "print a config's architecture: parameter counts per modality, token counts"),
    "convert": ("d2v.cli.convert", "import a fairseq data2vec 2.0 checkpoint as a d2v model folder"),
    "encode": ("d2v.cli.encode", "embeddings of images, audio or text lines from a model folder, checkpoint or MLflow URI"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="d2v",
        description="data2vec 2.0 for image, speech and text: pipeline stages.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in COMMANDS.items()),
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="command", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the command (see d2v <command> --help)")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    ns = parser.parse_args(argv[:1])
    module = importlib.import_module(COMMANDS[ns.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
