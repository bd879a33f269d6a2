"""``d2v describe``: what a config builds: parameters per modality encoder, tokens per sample.

Example:
  d2v describe experiment=image_base
"""

from __future__ import annotations

import argparse

from d2v.cli.common import add_config_args, config_from_args, run_cli


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="d2v describe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    ns = p.parse_intermixed_args(argv)

    def run() -> int:
        from d2v.models import Data2Vec2

        cfg = config_from_args(ns).model
        model = Data2Vec2(cfg)
        print(f"embed_dim {cfg.embed_dim}, {cfg.depth} shared blocks, {cfg.num_heads} heads, clone_batch {cfg.clone_batch}")
        print(f"{'modality':<8} {'encoder params':>15} {'+ decoder':>12}")
        for m in cfg.modalities:
            enc = model.num_parameters(m)
            full = model.num_parameters(m, encoder_only=False)
            print(f"{m:<8} {enc:>15,} {full - enc:>12,}")
        return 0

    return run_cli(run)
