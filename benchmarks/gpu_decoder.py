"""The convolutional decoders alone on a GPU: which layout and cuDNN setting runs them fastest.

    python benchmarks/gpu_decoder.py --out reports/bench/gpu_decoder.json     # a CUDA machine, ~30 s

Why: on an H200 (reports/bench/gpu_h200.json), 26% of an ``image_base`` step's kernel time went to
cuDNN's ``tensorTransformGeneric`` (9 calls per decoder layer: a layout transform around each grouped
convolution's forward, data gradient and weight gradient), and the speech step spent 5% in
``nchwToNhwc``/``nhwcToNchw``. This times one forward + backward of each base config's decoder
(``d2v.models.decoders``, bf16 autocast, the training shapes: image 1024 x 196 x 768 = 64 images x 16
clones; speech 32 x 781 x 768; text 128 x 512 x 768) in these variants:

* ``as_is``: the model's code (2d: the NHWC view of the token tensor), cudnn.benchmark off;
* ``as_is+bench``: the same with ``torch.backends.cudnn.benchmark = True`` (what training sets);
* ``nchw+bench``: every activation made contiguous NCHW / (N, C, T) before each convolution;
* ``cl_weights+bench`` (2d): weights and activations channels-last;
* ``unfold`` (2d): the grouped convolution as ``F.unfold`` + one batched matmul per group, no cuDNN;
* ``im2col_nhwc`` (2d): the same from the channels-last tensor (the k*k shifted views stacked).

Each: the median of ``--reps`` CUDA-event-timed steps after ``--warmup``; the output's relative
difference to ``as_is`` (the same function, so bf16 rounding only). Prints a table, writes one JSON.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2v.config import load_config
from d2v.models.decoders import Decoder1d, Decoder2d

SHAPES = {  # (experiment, rows = batch x clones, tokens) at gpu.py's default per-GPU batches
    "image_base": ("image_base", 64 * 16, 196),
    "speech_base": ("speech_base", 4 * 8, 781),
    "text_base": ("text_base", 16 * 8, 512),
}


class UnfoldConv2d(nn.Module):
    """A grouped 2-D convolution as unfold + batched matmul (same weights, same function)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        n, ch, h, w = x.shape
        g, k = c.groups, c.kernel_size[0]
        cols = F.unfold(x, k, padding=c.padding[0]).view(n, g, (ch // g) * k * k, h * w)
        wt = c.weight.view(g, c.out_channels // g, -1).to(cols.dtype)
        out = torch.einsum("ngkl,gok->ngol", cols, wt).reshape(n, c.out_channels, h, w)
        return out + c.bias.to(out.dtype).view(1, -1, 1, 1)


class Im2colConv2d(nn.Module):
    """A grouped 2-D convolution (odd kernel, stride 1, same padding) as channels-last im2col (the
    k*k shifted views stacked) and one batched matmul over the groups: no cuDNN, no NCHW."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        n, ch, h, w = x.shape
        g, k = c.groups, c.kernel_size[0]
        cg, og, p = ch // g, c.out_channels // g, k // 2
        xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, p, p, p, p))  # (N, H+2p, W+2p, C)
        cols = torch.stack([xp[:, i:i + h, j:j + w] for i in range(k) for j in range(k)], dim=3)  # (N,H,W,kk,C)
        cols = cols.view(n * h * w, k * k, g, cg).permute(2, 0, 1, 3).reshape(g, n * h * w, k * k * cg)
        wt = c.weight.view(g, og, cg, k, k).permute(0, 3, 4, 2, 1).reshape(g, k * k * cg, og).to(cols.dtype)
        out = torch.bmm(cols, wt).permute(1, 0, 2).reshape(n, h, w, g * og) + c.bias.to(cols.dtype)
        return out.permute(0, 3, 1, 2)


def run_blocks(dec, h: torch.Tensor, fmt) -> torch.Tensor:
    """``_ConvDecoder._run`` with each block's input in the layout ``fmt`` (None: as it comes)."""
    residual = h
    for blk in dec.blocks:
        if fmt == "contiguous":
            h = h.contiguous()
        elif fmt is not None:
            h = h.contiguous(memory_format=fmt)
        h = blk(h)
        if dec.residual and residual.shape[1] == h.shape[1]:
            h = h + residual
        residual = h
    return h


def forward(dec, x: torch.Tensor, fmt) -> torch.Tensor:
    n, t, c = x.shape
    if isinstance(dec, Decoder2d):
        h = x.transpose(1, 2).reshape(n, c, dec.grid, dec.grid)
        h = run_blocks(dec, h, fmt)
        return dec.proj(h.reshape(n, -1, t).transpose(1, 2))
    h = run_blocks(dec, x.transpose(1, 2), fmt)
    return dec.proj(h.transpose(1, 2))


def time_variant(dec, x, fmt, bench: bool, warmup: int, reps: int) -> tuple[float, torch.Tensor]:
    torch.backends.cudnn.benchmark = bench
    out = None
    times = []
    for i in range(warmup + reps):
        xi = x.detach().requires_grad_(True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = forward(dec, xi, fmt)
        out.float().square().mean().backward()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
        dec.zero_grad(set_to_none=True)
    return statistics.median(times), out.detach().float()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("reports/bench/gpu_decoder.json"))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--configs", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ns = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_decoder.py: needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    rows = []
    for name in ns.configs:
        exp, n, t = SHAPES[name]
        mc = load_config([f"experiment={exp}"]).model
        modality = name.split("_")[0]
        dcfg = getattr(mc, modality).decoder
        torch.manual_seed(0)
        dec = (Decoder2d(dcfg, mc.embed_dim, int(round(t ** 0.5))) if modality == "image"
               else Decoder1d(dcfg, mc.embed_dim)).to(dev).train()
        x = torch.randn(n, t, mc.embed_dim, device=dev)
        variants = [("as_is", dec, None, False), ("as_is+bench", dec, None, True),
                    ("nchw+bench", dec, "contiguous", True)]
        if modality == "image":
            cl = copy.deepcopy(dec).to(memory_format=torch.channels_last)
            variants.append(("cl_weights+bench", cl, torch.channels_last, True))
            uf = copy.deepcopy(dec)
            for blk in uf.blocks:
                blk[0] = UnfoldConv2d(blk[0])
            variants.append(("unfold", uf, "contiguous", False))
            ic = copy.deepcopy(dec)
            for blk in ic.blocks:
                blk[0] = Im2colConv2d(blk[0])
            variants.append(("im2col_nhwc", ic, None, False))
        ref = None
        for vname, d, fmt, bench in variants:
            try:
                med, out = time_variant(d, x, fmt, bench, ns.warmup, ns.reps)
                ref = out if ref is None else ref
                rel = float((out - ref).norm() / ref.norm())
                row = {"config": name, "variant": vname, "rows": n, "tokens": t, "median_ms": med * 1e3,
                       "rel_diff_vs_as_is": rel}
            except Exception as e:  # one variant failing (OOM, unsupported) does not end the run
                row = {"config": name, "variant": vname, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    rep = {"command": "python benchmarks/gpu_decoder.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(dev),
           "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
           "what": "one forward + backward of the decoder alone (bf16 autocast), median CUDA-event time",
           "rows": rows}
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(rep, indent=2))
    print(f"{'config':<12} {'variant':<18} {'ms':>8} {'rel diff':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:<12} {r['variant']:<18} {r['error'][:60]}")
        else:
            print(f"{r['config']:<12} {r['variant']:<18} {r['median_ms']:>8.2f} {r['rel_diff_vs_as_is']:>9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
