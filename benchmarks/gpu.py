"""The GPU benchmark in one command: throughput, FLOPs, MFU, memory, SDPA backend, bf16 error,
host syncs and a 2-GPU DDP step for the released base configs.

    python benchmarks/gpu.py --out reports/bench/gpu.json          # a CUDA machine, <= 6 minutes
    python benchmarks/gpu.py --smoke --out /tmp/gpu_smoke.json     # any CPU, the tiny config, < 60 s

For ``image_base`` (ViT-B/16, 16 clones), ``speech_base`` and ``text_base`` (8 clones each: the
released ``clone_batch``), one process, bf16 autocast, eager and compiled (as ``train.compile=true``
compiles: ``d2v.train.compile.compile_model``; a compile error, or its fall-back to eager, is
recorded with the reason and the run goes on). One training step is what ``d2v.train.pretrain.train_step``
does minus its per-step logging collective: forward, backward, gradient clipping where the config
clips, fused AdamW, EMA ``update_teacher``. Inputs are random tensors of the real shapes made on the
device before the clock starts; masks are drawn on the CPU and pinned, as the loader does.

Per config and mode (``results[].runs.eager|compiled``):

* ``median_step_s``: median over N steady-state steps after the warm-up, each step timed with CUDA
  events (no host sync inside the timed region; ``torch.cuda.synchronize()`` before and after it);
* ``samples_per_s = batch / median_step_s`` (unique samples), ``copies_per_s = batch * clones /
  median_step_s`` (masked copies); ``wall_samples_per_s``: N * batch / the region's wall time;
* ``flops_per_sample = FlopCounterMode total of one fwd+bwd step / batch`` (teacher forward,
  student forward + backward, decoder: every matmul, convolution and attention; the optimizer and
  elementwise work are not counted), ``achieved_tflops = flops_per_step / median_step_s / 1e12``,
  ``mfu = achieved_tflops / peak_tflops_bf16`` (a table of dense bf16 peaks by device name;
  ``--peak-tflops`` overrides; an unknown device gives ``mfu: null`` and a note);
* ``peak_mem_gb``: ``torch.cuda.max_memory_allocated()`` over the warm-up and timed steps.

Per config (``kernels``): one step under the profiler, its ops by self device time and the device
busy fraction (kernel time / step wall time: well under 1 means the host holds the step back).
The SDPA backend that ran (the profiler's aten op of every attention call of one step)
and, for each distinct attention call of the model (shapes, dtype, bias), which of flash /
efficient / cudnn / math accept it under ``torch.nn.attention.sdpa_kernel([backend])``; the loss in
bf16 and in fp32 on one fixed batch (eval mode, so no dropout: same weights, mask and mask noise;
TF32 off for the fp32 pass) and their relative difference; host syncs per step over a few steps
under ``torch.cuda.set_sync_debug_mode("warn")``, each with the Python stack that caused it.
With 2+ GPUs, a 2-process DDP step (torch.multiprocessing spawn, nccl, ``d2v.train.distributed``'s
``wrap_ddp`` and ``rank_loss``) on ``image_base``; each rank times its own steps.

``--budget-s`` (default 300) scales the number of timed steps so the whole run stays under 6
minutes: the eager runs first, then DDP, then the compiled runs in what is left (a config whose
compile cannot start with enough time left is recorded as skipped); past the budget plus a grace
period the run stops, and the JSON (written after every section) holds what was measured.
Goal: image_base at least 45% MFU on an H100/H200 (about 1,000 unique images/s on an H100).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import re
import signal
import socket
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import cpu_name  # noqa: E402

from d2v.config import load_config  # noqa: E402
from d2v.models import Data2Vec2  # noqa: E402

GOAL = "image_base at least 45% MFU on an H100/H200 (about 1,000 unique images/s on an H100)"
GOAL_MFU = 0.45

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets; first match wins.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"h200 nvl", 836.0), (r"h200", 989.0),
    (r"h100 nvl", 835.0), (r"h100 pcie", 756.0), (r"h100", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"h800 pcie", 756.0), (r"h800", 989.0),
    (r"b200", 2250.0),
    (r"a100", 312.0), (r"a800", 312.0),
    (r"l40s", 362.0), (r"l40\b", 181.0), (r"\bl4\b", 121.0),
]

FORMULAS = {
    "median_step_s": "median over the timed steps of one step's time (CUDA events on GPU, perf_counter on CPU); "
                     "a step = forward + backward (+ clip) + AdamW step + EMA update_teacher",
    "samples_per_s": "batch / median_step_s (unique samples)",
    "copies_per_s": "batch * clones / median_step_s (masked copies, one sample-mask pair each)",
    "wall_samples_per_s": "timed_steps * batch / wall time of the timed region (synchronize before and after)",
    "flops_per_sample": "flops_per_sample = FlopCounterMode total of one fwd+bwd step / batch_size",
    "achieved_tflops": "flops_per_step / median_step_s / 1e12",
    "mfu": "achieved_tflops / peak_tflops_bf16 (dense bf16 peak of the device)",
    "peak_mem_gb": "torch.cuda.max_memory_allocated() / 2**30 over the warm-up and timed steps",
    "loss_rel_diff": "|loss_bf16 - loss_fp32| / |loss_fp32| on one fixed batch, eval mode, same weights, mask and mask noise",
    "host_syncs_per_step": "warnings from torch.cuda.set_sync_debug_mode('warn') over sync_steps steps / sync_steps",
}

FLOPS_NOTE = ("counted by torch.utils.flop_counter.FlopCounterMode over one real training step, with one "
              "correction: a grouped convolution's weight gradient is counted as its forward (torch's formula "
              "ignores groups there and counts it groups-fold; the decoders use 16 groups)")

# Per-GPU batches (flags override): realistic for an 80 GB card.
CONFIGS: dict[str, dict[str, Any]] = {
    "image_base": {"experiment": "image_base", "modality": "image"},
    "speech_base": {"experiment": "speech_base", "modality": "speech"},
    "text_base": {"experiment": "text_base", "modality": "text"},
}

SDPA_OPS = {  # the profiler's forward op -> backend name
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


class BudgetExceeded(Exception):
    pass


def _on_alarm(signum, frame):
    raise BudgetExceeded("--budget-s plus grace reached")


def _err(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:400] if lines else ''}"


def peak_tflops_for(name: str | None) -> tuple[float | None, str]:
    if not name:
        return None, "no CUDA device: MFU is null"
    low = name.lower()
    for pat, tf in PEAK_BF16_TFLOPS:
        if re.search(pat, low):
            return tf, f"table: {name!r} matches {pat!r}, {tf:g} TFLOP/s dense bf16"
    return None, f"unknown device {name!r}: no bf16 peak in the table, MFU is null (pass --peak-tflops)"


class Clock:
    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ the workload
class Workload:
    """A model, its optimizer and a few fixed batches of one config."""

    bf16: bool = True  # autocast (set False for the fp32 CPU smoke run)
    world_size: int = 1  # > 1: the loss is d2v.train.distributed.rank_loss, as under torchrun

    def __init__(self, cfg, modality: str, batch: int, device: torch.device, seed: int, ns, rank: int = 0):
        self.cfg, self.modality, self.batch, self.device = cfg, modality, batch, device
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = Data2Vec2(cfg.model).to(device).train()
        t = cfg.train
        self.opt = torch.optim.AdamW(self.model.param_groups(t.weight_decay), lr=1e-4, betas=tuple(t.betas),
                                     eps=t.eps, fused=device.type == "cuda")
        self.clip = float(t.clip_norm)
        self.clones = cfg.model.clone_batch
        self.enc = self.model.encoder(modality)
        g = torch.Generator().manual_seed(seed + 1000 * rank)
        self.batches = [self._make_batch(g, ns) for _ in range(ns.distinct_batches)]
        src = self.batches[0][0]
        self.tokens = self.enc.num_tokens(tuple(src.shape))
        self.n_masked = self.enc.num_masked(self.tokens)
        self.input_desc = "x".join(str(s) for s in src.shape[1:])
        self.step_no = 0

    def _make_batch(self, g: torch.Generator, ns):
        m, mc, B = self.modality, self.cfg.model, self.batch
        if m == "image":
            im = mc.image
            src = torch.randn(B, im.in_chans, im.input_size, im.input_size, generator=g)
        elif m == "speech":
            n = int(round(ns.speech_seconds * mc.speech.sample_rate))
            src = torch.randn(B, n, generator=g)
            src = torch.nn.functional.layer_norm(src, src.shape[-1:])  # fairseq normalize=True
        else:
            tx = mc.text
            src = torch.randint(4, tx.vocab_size, (B, ns.text_length), generator=g)
        pad = src.eq(mc.text.pad_idx) if m == "text" else None  # CPU, as the loader gives it
        T = masking_tokens(self.model, m, src)
        mask = self.model.encoder(m).make_mask(B * self.cfg.model.clone_batch, T, torch.device("cpu"), g)
        if self.device.type == "cuda":
            mask = mask.pin_memory()
        return src.to(self.device), mask, pad

    def step(self, net=None) -> torch.Tensor:
        """One training step; returns the loss (not synced)."""
        net = self.model if net is None else net
        src, mask, pad = self.batches[self.step_no % len(self.batches)]
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = net(src, self.modality, mask=mask, padding_mask=pad)
        loss = self.loss_of(out)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.step_no += 1
        self.model.update_teacher(self.step_no)
        return loss.detach()

    def loss_of(self, out) -> torch.Tensor:
        if self.world_size == 1:
            return out.loss
        from d2v.train.distributed import rank_loss

        return rank_loss(out, self.world_size)


def masking_tokens(model: Data2Vec2, modality: str, src: torch.Tensor) -> int:
    return model.encoder(modality).num_tokens(tuple(src.shape))


# ------------------------------------------------------------------------------ measurements
def _flop_fixes() -> dict:
    """FlopCounterMode formulas that replace or add to torch's own (``custom_mapping``).

    * ``convolution_backward``: torch 2.14 counts a grouped convolution's weight gradient as if the
      convolution were dense (``conv_backward_flop`` ignores ``groups`` there), ``groups`` times too
      many: the decoders (16 groups) would add about 200 GFLOP per image_base image. The weight
      gradient of a convolution costs what its forward does, so that is what is counted here; the
      input gradient keeps torch's formula (it does account for groups).
    * the CPU flash-attention op (the smoke run) has no formula: counted as the CUDA SDPA ops.
    """
    from torch.utils.flop_counter import conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    out: dict = {}

    def conv_bwd(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                 _output_padding, _groups, output_mask, out_shape=None, **kwargs):
        flops = 0
        if output_mask[0]:
            flops += conv_flop_count(grad_out_shape, w_shape, list(out_shape[0]), not transposed)
        if output_mask[1]:
            flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
        return flops

    out[aten.convolution_backward] = conv_bwd

    def fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return out


def count_flops(w: Workload) -> dict:
    """FLOPs of one training step's forward + backward (one real step: it also warms up)."""
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False, custom_mapping=_flop_fixes())
    with fc:
        w.step()
    sync(w.device)
    total = int(fc.get_total_flops())
    by_op = {str(k): int(v) for k, v in sorted(fc.get_flop_counts().get("Global", {}).items(),
                                                key=lambda kv: -kv[1])}
    return {"flops_per_step": total, "flops_per_sample": total / w.batch,
            "flops_formula": FORMULAS["flops_per_sample"], "flops_note": FLOPS_NOTE, "flops_by_op": by_op}


def sdpa_report(w: Workload) -> dict:
    """Which SDPA backend ran (profiler op names over one step) and which could run the model's
    actual attention calls (each tried alone under ``sdpa_kernel([backend])``)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    calls: Counter = Counter()
    orig = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        sig = (tuple(q.shape), tuple(k.shape), str(q.dtype).replace("torch.", ""),
               None if attn_mask is None else (tuple(attn_mask.shape), str(attn_mask.dtype).replace("torch.", ""),
                                               bool(attn_mask.requires_grad)),
               float(dropout_p), bool(torch.is_grad_enabled() and q.requires_grad))
        calls[sig] += 1
        return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    F.scaled_dot_product_attention = spy
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            w.step()
            sync(w.device)
    finally:
        F.scaled_dot_product_attention = orig
    ran: Counter = Counter()
    for e in prof.key_averages():
        if e.key in SDPA_OPS:
            ran[SDPA_OPS[e.key]] += e.count
    n_calls = sum(calls.values())
    if sum(ran.values()) < n_calls:  # a call that decomposed without a backend op of its own
        ran["math (decomposed)"] += n_calls - sum(ran.values())

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    available = []
    for (qs, ks, dtype, bias, p, grad), n in calls.items():
        row: dict[str, Any] = {"q": list(qs), "k": list(ks), "dtype": dtype,
                               "bias": None if bias is None else {"shape": list(bias[0]), "dtype": bias[1],
                                                                  "requires_grad": bias[2]},
                               "dropout_p": p, "backward": grad, "calls_per_step": n}
        for name, be in names.items():
            row[name] = _try_backend(be, sdpa_kernel, qs, ks, dtypes.get(dtype, torch.float32), bias, dtypes,
                                     p, grad, w.device)
        available.append(row)
    prio = None
    with contextlib.suppress(Exception):
        short = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn"}
        inv = {int(v): short.get(k, k.lower()) for k, v in SDPBackend.__members__.items()}
        prio = [inv.get(int(i), str(i)) for i in torch._C._get_sdp_priority_order()]
    return {"ran": sorted(ran), "calls_per_step": dict(ran), "available": available, "priority_order": prio,
            "method": "ran: aten op names in a torch.profiler trace of one step; available: each distinct "
                      "attention call of that step re-run alone under sdpa_kernel([backend])"}


def _try_backend(be, sdpa_kernel, qs, ks, dtype, bias, dtypes, p, grad, device) -> str:
    import torch.nn.functional as F

    try:
        q = torch.randn(qs, device=device, dtype=dtype, requires_grad=grad)
        k = torch.randn(ks, device=device, dtype=dtype, requires_grad=grad)
        v = torch.randn(ks, device=device, dtype=dtype, requires_grad=grad)
        m = None
        if bias is not None:
            m = torch.randn(bias[0], device=device, dtype=dtypes.get(bias[1], dtype), requires_grad=bias[2] and grad)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([be]):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p)
                    if grad:
                        out.float().sum().backward()
                sync(device)
                return "ok"
            except Exception as e:
                # SDPA explains a refusal in warnings: a "... kernel not used because:" header, then reasons
                why = []
                for c in caught:
                    msg = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(c.message)).strip()
                    if msg and not msg.endswith("not used because:") and msg not in why:
                        why.append(msg.replace("\n", " "))
                return "no: " + "; ".join(why + [_err(e)])[:400]
    except torch.OutOfMemoryError:
        return "no: out of memory for the trial tensors"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def kernel_report(w: Workload, top: int = 15) -> dict:
    """Where one step's device time goes: the profiler's ops by self device time (CUDA, or CPU on
    the smoke run), and how busy the device is (kernel time over the step's wall time: well under
    1 means the step waits on the host, i.e. launch-bound)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if w.device.type == "cuda" else [])
    sync(w.device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        w.step()
        sync(w.device)
    wall = time.perf_counter() - t0

    def dev_self(e) -> float:  # microseconds; the attribute was renamed across torch releases
        if w.device.type != "cuda":
            return float(e.self_cpu_time_total)
        for a in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, a):
                return float(getattr(e, a))
        return 0.0

    evs = [e for e in prof.key_averages() if dev_self(e) > 0]
    total = sum(dev_self(e) for e in evs)
    if w.device.type == "cuda":  # the kernels themselves (a CPU op's self device time repeats its kernels')
        from torch.autograd import DeviceType

        kernels = [e for e in evs if getattr(e, "device_type", None) == DeviceType.CUDA]
        total = sum(dev_self(e) for e in kernels)
    else:
        kernels = evs
    busy = sum(dev_self(e) for e in kernels) / 1e6
    rows = sorted(kernels, key=dev_self, reverse=True)[:top]
    return {
        "profiled_step_wall_s": wall,
        "device_busy_s": busy,
        "device_busy_fraction": busy / wall if wall > 0 else None,
        "note": "one step under torch.profiler (its own overhead included in the wall time); self device time "
                "of each kernel (CUDA) or op (CPU smoke run)",
        "top": [{"name": e.key[:120], "calls": int(e.count), "self_ms": dev_self(e) / 1e3,
                 "share": dev_self(e) / total if total else None} for e in rows],
    }


def count_host_syncs(w: Workload, steps: int) -> dict:
    """Run ``steps`` steps under ``set_sync_debug_mode("warn")``; every warning, with its stack."""
    records: list[tuple[str, list[str]]] = []

    def hook(message, category, filename, lineno, file=None, line=None):
        msg = str(message)
        if "synchroniz" not in msg or "prototype" in msg:
            return
        stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        frames = [f"{_short(f.filename)}:{f.lineno} {f.name}" for f in stack[-8:]]
        records.append((f"{_short(filename)}:{lineno}", frames))

    sync(w.device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                w.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(w.device)
    where: dict[str, dict] = {}
    for loc, frames in records:
        d = where.setdefault(loc, {"where": loc, "count": 0, "stack": frames})
        d["count"] += 1
    return {"steps": steps, "count": len(records), "per_step": len(records) / steps,
            "sources": sorted(where.values(), key=lambda d: -d["count"]),
            "note": "the step has no logging; every count here is a host sync in the training step itself"}


def _short(path: str) -> str:
    for marker in ("/src/d2v/", "/site-packages/", "/benchmarks/"):
        if marker in path:
            return marker.strip("/").split("/")[-1] + "/" + path.split(marker, 1)[1]
    return path


def loss_precision(w: Workload) -> dict:
    """bf16 vs fp32 loss on one fixed batch: eval mode (no dropout), same weights, mask, mask noise."""
    src, mask, pad = w.batches[0]
    d = w.cfg.model.embed_dim
    g = torch.Generator().manual_seed(7)
    std = w.enc.mcfg.mask_noise_std
    noise = (torch.randn(w.batch * w.clones, w.n_masked, d, generator=g) * std).to(w.device)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    w.model.eval()
    try:
        with torch.no_grad():
            with torch.autocast(w.device.type, dtype=torch.bfloat16):
                lb = float(w.model(src, w.modality, mask=mask, padding_mask=pad, mask_noise=noise).loss)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            lf = float(w.model(src, w.modality, mask=mask, padding_mask=pad, mask_noise=noise).loss)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        w.model.train()
    return {"loss_bf16": lb, "loss_fp32": lf, "rel_diff": abs(lb - lf) / max(abs(lf), 1e-12),
            "how": "eval mode (no dropout / layerdrop), the first batch, its mask and one fixed mask-noise "
                   "tensor; bf16 autocast vs fp32 with TF32 off, from the same initial weights"}


def time_steps(w: Workload, net, steps: int) -> tuple[list[float], float]:
    """Per-step times of ``steps`` steps and the wall time of the region (syncs only around it)."""
    if w.device.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        torch.cuda.synchronize(w.device)
        t0 = time.perf_counter()
        for a, b in ev:
            a.record()
            w.step(net)
            b.record()
        torch.cuda.synchronize(w.device)
        wall = time.perf_counter() - t0
        return [a.elapsed_time(b) / 1000 for a, b in ev], wall
    times = []
    t0 = time.perf_counter()
    for _ in range(steps):
        s = time.perf_counter()
        w.step(net)
        times.append(time.perf_counter() - s)
    return times, time.perf_counter() - t0


def warm(w: Workload, net, n: int) -> list[float]:
    out = []
    for _ in range(n):
        sync(w.device)
        s = time.perf_counter()
        w.step(net)
        sync(w.device)
        out.append(time.perf_counter() - s)
    return out


def choose_steps(ns, est_step: float, seconds: float) -> int:
    if ns.smoke:
        return ns.steps
    return int(min(ns.steps, max(ns.min_steps, seconds / max(est_step, 1e-6))))


def run_mode(w: Workload, mode: str, ns, seconds_for_timing: float, flops: dict, peak: float | None,
             compile_net=None) -> dict:
    """Warm-up and timed steps of one mode (eager, or compiled: the first call compiles)."""
    net = compile_net or w.model
    res: dict[str, Any] = {"status": "ok"}
    if w.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(w.device)
    static = torch.cuda.memory_allocated(w.device) / 2**30 if w.device.type == "cuda" else None
    t_start = time.perf_counter()
    if mode == "compiled":
        first = warm(w, net, 1)[0]
        res["compile_s"] = first  # the first compiled step: tracing, compiling, running
    wt = warm(w, net, ns.warmup)
    est = statistics.median(wt[-2:]) if wt else 1.0
    left = seconds_for_timing - (time.perf_counter() - t_start)
    n = choose_steps(ns, est, left)
    times, wall = time_steps(w, net, n)
    med = statistics.median(times)
    tf = flops["flops_per_step"] / med / 1e12
    res.update({
        "warmup_steps": ns.warmup, "timed_steps": n, "median_step_s": med, "min_step_s": min(times),
        "max_step_s": max(times), "samples_per_s": w.batch / med, "copies_per_s": w.batch * w.clones / med,
        "wall_samples_per_s": n * w.batch / wall, "achieved_tflops": tf,
        "mfu": tf / peak if peak else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated(w.device) / 2**30 if w.device.type == "cuda" else None,
        "static_mem_gb": static,
        "wall_s": time.perf_counter() - t_start,
    })
    if mode == "compiled":  # graph breaks and graphs (recompiles included) over the whole compiled run
        with contextlib.suppress(Exception):
            from torch._dynamo.utils import counters

            res["graph_breaks"] = int(sum(counters["graph_break"].values()))
            res["graph_break_reasons"] = [str(k)[:200] for k in sorted(counters["graph_break"])[:10]]
            res["dynamo_stats"] = {str(k): int(v) for k, v in counters["stats"].items()}
    return res


# ------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int, port: int, spec: dict, ns_dict: dict, queue) -> None:
    import torch.distributed as dist

    from d2v.train.distributed import DistInfo, wrap_ddp

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    ns = argparse.Namespace(**ns_dict)
    cuda = spec["device"] == "cuda"  # "cpu" (gloo, fp32) only to check this code path without GPUs
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, **({"device_id": device} if cuda else {}))
        cfg = load_config([f"experiment={spec['experiment']}"])
        w = Workload(cfg, spec["modality"], spec["batch"], device, ns.seed, ns, rank=rank)
        w.world_size, w.bf16 = world, cuda
        net = wrap_ddp(w.model, DistInfo(rank, world, rank, device, backend, owned=True))
        warm(w, net, ns.warmup + 1)
        times, wall = time_steps(w, net, ns.ddp_steps)
        queue.put({"rank": rank, "median_step_s": statistics.median(times), "min_step_s": min(times),
                   "wall_s": wall, "steps": ns.ddp_steps,
                   "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None})
    except Exception as e:  # reported, not raised: the parent records it
        queue.put({"rank": rank, "error": _err(e)})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ddp(ns, spec: dict, single: dict | None, clock: Clock) -> dict:
    import torch.multiprocessing as mp

    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = mp.get_context("spawn").SimpleQueue()
    t0 = time.perf_counter()
    ctx = mp.start_processes(_ddp_worker, args=(world, port, spec, vars(ns), q), nprocs=world, join=False,
                             start_method="spawn")
    try:
        while not ctx.join(timeout=1):
            if clock.left() < -30:
                raise BudgetExceeded("DDP ran past the budget")
    except BaseException as e:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        return {"status": "error", "error": _err(e), "world_size": world}
    ranks = []
    while not q.empty():
        ranks.append(q.get())
    ranks.sort(key=lambda r: r["rank"])
    errs = [r["error"] for r in ranks if "error" in r]
    if errs or len(ranks) != world:
        return {"status": "error", "error": "; ".join(errs) or f"{len(ranks)} of {world} ranks reported",
                "world_size": world}
    slowest = max(r["median_step_s"] for r in ranks)
    sps = world * spec["batch"] / slowest
    out = {"status": "ok", "config": spec["name"], "world_size": world,
           "backend": "nccl" if spec["device"] == "cuda" else "gloo (CPU check)",
           "batch_per_gpu": spec["batch"], "global_batch": world * spec["batch"], "ranks": ranks,
           "samples_per_s": sps, "copies_per_s": sps * spec["clones"],
           "formula": "world_size * batch_per_gpu / max over ranks of the rank's median step time",
           "wall_s": time.perf_counter() - t0}
    if single and single.get("samples_per_s"):
        out["scaling_efficiency"] = sps / (world * single["samples_per_s"])
    return out


# ------------------------------------------------------------------------------ main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("reports/bench/gpu.json"))
    p.add_argument("--smoke", action="store_true",
                   help="tiny variant on the CPU (experiment=tiny, fp32, few steps; GPU-only fields null)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--image-batch", type=int, default=64, help="images per GPU (x 16 clones)")
    p.add_argument("--speech-batch", type=int, default=4, help="clips per GPU (x 8 clones)")
    p.add_argument("--speech-seconds", type=float, default=15.625,
                   help="seconds per clip (4 x 15.625 s = fairseq's max_tokens of 1M samples per GPU)")
    p.add_argument("--text-batch", type=int, default=16, help="sequences per GPU (x 8 clones)")
    p.add_argument("--text-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="at most this many timed steps (default 50; smoke 3)")
    p.add_argument("--min-steps", type=int, default=5, help="at least this many timed steps, whatever the budget")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps after the FLOP/profile steps (default 3; smoke 1)")
    p.add_argument("--sync-steps", type=int, default=3, help="steps run under set_sync_debug_mode('warn')")
    p.add_argument("--ddp-steps", type=int, default=10)
    p.add_argument("--distinct-batches", type=int, default=4, help="fixed batches cycled through")
    p.add_argument("--budget-s", type=float, default=300.0, help="scale the steps to finish in about this long")
    p.add_argument("--grace-s", type=float, default=30.0, help="stop (and write what was measured) at budget + grace")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (overrides the table)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--no-ddp", action="store_true")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off (training turns it on: d2v.train.distributed)")
    p.add_argument("--smoke-ddp", action="store_true",
                   help="with --smoke: run the DDP step on 2 CPU processes (gloo) to check that code path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default; smoke: 1)")
    ns = p.parse_args(argv)
    if ns.steps is None:
        ns.steps = 3 if ns.smoke else 50
    if ns.warmup is None:
        ns.warmup = 1 if ns.smoke else 3
    if ns.smoke:
        ns.min_steps = min(ns.min_steps, ns.steps)
        ns.text_length = min(ns.text_length, 64)
        ns.speech_seconds = min(ns.speech_seconds, 1.0)
    return ns


def config_list(ns) -> list[dict]:
    out = []
    for name in ns.configs:
        spec = dict(CONFIGS[name], name=name)
        spec["batch"] = {"image": ns.image_batch, "speech": ns.speech_batch, "text": ns.text_batch}[spec["modality"]]
        if ns.smoke:
            spec.update(experiment="tiny", name=f"tiny:{spec['modality']}", batch=min(spec["batch"], 4))
        out.append(spec)
    return out


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not ns.smoke and not cuda:
        print("benchmarks/gpu.py: needs a CUDA device (torch.cuda.is_available() is False); "
              "for the tiny CPU variant run: python benchmarks/gpu.py --smoke", file=sys.stderr)
        return 2
    device = torch.device("cpu") if ns.smoke else torch.device("cuda", 0)
    if ns.threads or ns.smoke:
        torch.set_num_threads(ns.threads or 1)
    clock = Clock(ns.budget_s)
    old_alarm = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max(1, int(math.ceil(ns.budget_s + ns.grace_s))))

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if ns.peak_tflops:
        peak, peak_note = ns.peak_tflops, f"--peak-tflops {ns.peak_tflops:g}"
    else:
        peak, peak_note = peak_tflops_for(gpu)
    bf16 = device.type == "cuda"
    torch.backends.cudnn.benchmark = not ns.no_cudnn_benchmark  # as training sets it
    specs = config_list(ns)
    report: dict[str, Any] = {
        "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "smoke": ns.smoke,
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "device": str(device), "gpu": gpu,
                    "gpu_count": torch.cuda.device_count() if cuda else 0,
                    "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None},
        "torch": torch.__version__,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "peak_tflops_bf16": peak, "peak_note": peak_note,
        "formulas": FORMULAS,
        "goal": {"text": GOAL, "mfu_target": GOAL_MFU, "measured_mfu": None, "met": None},
        "budget_s": ns.budget_s, "steps_max": ns.steps, "warmup": ns.warmup,
        "results": [], "ddp": None, "status": "running",
    }

    def save() -> None:
        report["wall_s"] = clock.elapsed()
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(report, indent=2))

    do_compile = not ns.no_compile and not ns.smoke
    do_ddp = cuda and not ns.smoke and not ns.no_ddp and torch.cuda.device_count() >= 2
    try:
        # ---- eager: every config (the core numbers) first
        for i, spec in enumerate(specs):
            # the compiled runs get about 55% of what is left after the eager ones, DDP 45 s
            reserve = (0.55 * clock.left() if do_compile else 0.0) + (45.0 if do_ddp else 0.0)
            share = min(60.0, max(10.0, (clock.left() - reserve) / (len(specs) - i)))
            t_cfg = time.perf_counter()
            try:
                r = bench_eager(spec, ns, device, bf16, peak, share, t_cfg)
            except BudgetExceeded:
                raise
            except Exception as e:  # one config failing (OOM, a bug) does not end the run
                r = {"config": spec["name"], "experiment": spec["experiment"], "modality": spec["modality"],
                     "batch": spec["batch"], "error": _err(e), "traceback_tail": traceback.format_exc()[-1500:],
                     "runs": {"eager": {"status": "error", "error": _err(e)}}}
            _release()
            report["results"].append(r)
            save()
        # ---- DDP
        if ns.smoke and ns.smoke_ddp:  # the DDP code path on 2 CPU processes (gloo), tiny image config
            spec = dict(specs[0], device="cpu", clones=load_config(["experiment=tiny"]).model.clone_batch)
            report["ddp"] = run_ddp(ns, spec, report["results"][0]["runs"].get("eager"), clock)
        elif ns.smoke or not cuda:
            report["ddp"] = {"status": "skipped: no CUDA (--smoke)"}
        elif ns.no_ddp:
            report["ddp"] = {"status": "skipped: --no-ddp"}
        elif torch.cuda.device_count() < 2:
            report["ddp"] = {"status": f"skipped: {torch.cuda.device_count()} GPU"}
        else:
            spec = next((s for s in specs if s["name"] == "image_base"), specs[0])
            spec = dict(spec, device="cuda", clones=load_config([f"experiment={spec['experiment']}"]).model.clone_batch)
            single = next((r["runs"]["eager"] for r in report["results"] if r["config"] == spec["name"]), None)
            report["ddp"] = run_ddp(ns, spec, single, clock)
        save()
        # ---- compiled, in what is left
        for i, (spec, r) in enumerate(zip(specs, report["results"])):
            if not do_compile:
                r["runs"]["compiled"] = {"status": "skipped: --smoke" if ns.smoke else "skipped: --no-compile"}
                continue
            if "flops_per_step" not in r:
                r["runs"]["compiled"] = {"status": "skipped: the eager run of this config failed"}
                continue
            share = clock.left() / (len(specs) - i)
            if share < 45 or clock.left() < 50:
                r["runs"]["compiled"] = {"status": f"skipped: budget ({clock.left():.0f} s left of --budget-s "
                                                   f"{ns.budget_s:g})"}
                continue
            r["runs"]["compiled"] = bench_compiled(spec, ns, device, bf16, peak, share, r)
            save()
        report["status"] = "done"
    except BudgetExceeded as e:
        report["status"] = f"stopped: {e} (the sections before this point are complete)"
        for r in report["results"]:
            r.setdefault("runs", {}).setdefault("compiled", {"status": "stopped: --budget-s reached"})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_alarm)

    img = next((r for r in report["results"] if r["config"] == "image_base"), None)
    if img is not None:
        mfus = [m.get("mfu") for m in img["runs"].values() if isinstance(m, dict) and m.get("mfu")]
        report["goal"]["measured_mfu"] = max(mfus) if mfus else None
        if mfus and gpu and re.search(r"h100|h200", gpu.lower()):
            report["goal"]["met"] = max(mfus) >= GOAL_MFU
        elif not mfus:
            report["goal"]["note"] = "no MFU measured (no CUDA device or unknown peak)"
        else:
            report["goal"]["note"] = f"the goal is stated for an H100/H200; this device is {gpu}"
    save()
    print_table(report)
    print(f"wrote {ns.out} ({report['status']}, {report['wall_s']:.0f} s)")
    return 0


def _release() -> None:
    """Give the last config's memory back before the next one (its peak memory is its own)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_eager(spec: dict, ns, device, bf16: bool, peak, share: float, t_cfg: float) -> dict:
    cfg = load_config([f"experiment={spec['experiment']}"])
    w = Workload(cfg, spec["modality"], spec["batch"], device, ns.seed, ns)
    w.bf16 = bf16
    r: dict[str, Any] = {
        "config": spec["name"], "experiment": spec["experiment"], "modality": spec["modality"],
        "batch": w.batch, "clones": w.clones, "input": w.input_desc, "tokens_per_sample": w.tokens,
        "visible_per_clone": w.tokens - w.n_masked, "precision": "bf16 autocast" if bf16 else "fp32",
        "clip_norm": w.clip,
        "params_m": w.model.num_parameters(spec["modality"], encoder_only=False) / 1e6,
    }
    try:
        r["loss_bf16_vs_fp32"] = loss_precision(w)
    except BudgetExceeded:
        raise
    except Exception as e:
        r["loss_bf16_vs_fp32"] = {"error": _err(e)}
    r.update(count_flops(w))
    try:
        r["sdpa"] = sdpa_report(w)
    except BudgetExceeded:
        raise
    except Exception as e:
        r["sdpa"] = {"error": _err(e)}
    try:
        r["kernels"] = kernel_report(w)
    except BudgetExceeded:
        raise
    except Exception as e:
        r["kernels"] = {"error": _err(e)}
    if device.type == "cuda":
        try:
            r["host_syncs"] = count_host_syncs(w, ns.sync_steps)
        except BudgetExceeded:
            raise
        except Exception as e:
            r["host_syncs"] = {"error": _err(e)}
    else:
        r["host_syncs"] = None
    spent = time.perf_counter() - t_cfg
    flops = {"flops_per_step": r["flops_per_step"]}
    try:
        r["runs"] = {"eager": run_mode(w, "eager", ns, max(5.0, share - spent), flops, peak)}
    except torch.OutOfMemoryError as e:
        r["runs"] = {"eager": {"status": "error", "error": _err(e) + " (lower the batch flag)"}}
    r["config_wall_s"] = time.perf_counter() - t_cfg
    del w
    _release()
    return r


def _compile(model: Data2Vec2, mode: str | None):
    """``train.compile=true``'s compilation when this tree has it (``d2v.train.compile.compile_model``:
    the step's tensor work as one graph, the eager prelude, optimizer and EMA as they are); else
    ``torch.compile`` of the whole model. Returns ``(net, how, core)``."""
    try:
        from d2v.train.compile import compile_model
    except ImportError:
        return torch.compile(model, mode=mode), "torch.compile(model)", None
    compile_model(model, True, mode=mode)
    core = getattr(model, "_compiled_core", None)
    return model, "d2v.train.compile.compile_model (Data2Vec2._step, fullgraph, dynamic=False)", core


def bench_compiled(spec: dict, ns, device, bf16: bool, peak, share: float, r: dict) -> dict:
    cfg = load_config([f"experiment={spec['experiment']}"])
    w = Workload(cfg, spec["modality"], spec["batch"], device, ns.seed, ns)
    w.bf16 = bf16
    net = core = None
    try:
        import torch._dynamo

        torch._dynamo.reset()
        with contextlib.suppress(Exception):
            torch._dynamo.utils.counters.clear()
        net, how, core = _compile(w.model, None if ns.compile_mode == "default" else ns.compile_mode)
        with warnings.catch_warnings(record=True) as caught:  # compile_model warns once when it falls back
            warnings.simplefilter("always")
            res = run_mode(w, "compiled", ns, share, {"flops_per_step": r["flops_per_step"]}, peak, compile_net=net)
        res["how"] = how
        if core is not None:
            res["compiled_calls"], res["eager_calls"] = core.compiled_calls, core.eager_calls
            if core.failure is not None:  # it ran, but eager: the numbers are not compiled ones
                res["status"] = "error: compile failed, the steps ran eager"
                res["error"] = core.failure
        fallbacks = [str(c.message)[:400] for c in caught if "train.compile" in str(c.message)]
        if fallbacks:
            res["warnings"] = fallbacks[:3]
        eager = r["runs"].get("eager", {})
        if eager.get("median_step_s") and res.get("median_step_s"):
            res["speedup_vs_eager"] = eager["median_step_s"] / res["median_step_s"]
    except BudgetExceeded:
        raise
    except Exception as e:  # a compile failure is a result, not the end of the run
        res = {"status": "error", "error": _err(e), "traceback_tail": traceback.format_exc()[-1500:]}
    finally:
        with contextlib.suppress(Exception):
            from d2v.train.compile import compile_model

            compile_model(w.model, False)
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
    del w, net, core
    _release()
    return res


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"{m['gpu'] or m['cpu']} ({report['precision']}), torch {report['torch']}, peak: {report['peak_note']}")
    print(f"{'config':<12} {'mode':<8} {'B':>4} {'M':>3} {'median s':>9} {'samples/s':>10} {'copies/s':>9} "
          f"{'GFLOP/sample':>12} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8} {'sdpa':>10} {'syncs/step':>10}")
    for r in report["results"]:
        for mode, x in r.get("runs", {}).items():
            if x.get("status") != "ok":
                err = f": {x['error'][:100]}" if x.get("error") else ""
                print(f"{r['config']:<12} {mode:<8} {x.get('status')}{err}")
                continue
            syncs = (r.get("host_syncs") or {}).get("per_step")
            sd = ",".join((r.get("sdpa") or {}).get("ran", [])) or "-"
            print(f"{r['config']:<12} {mode:<8} {r['batch']:>4} {r['clones']:>3} {x['median_step_s']:>9.4f} "
                  f"{x['samples_per_s']:>10.1f} {x['copies_per_s']:>9.1f} {r['flops_per_sample'] / 1e9:>12.2f} "
                  f"{x['achieved_tflops']:>8.2f} {_fmt(x['mfu'], '.1%'):>6} {_fmt(x['peak_mem_gb'], '.1f'):>8} "
                  f"{sd:>10} {_fmt(syncs, '.1f'):>10}")
        lp = r.get("loss_bf16_vs_fp32") or {}
        if "rel_diff" in lp:
            print(f"{'':<12} loss bf16 {lp['loss_bf16']:.5f} fp32 {lp['loss_fp32']:.5f} rel diff {lp['rel_diff']:.2e}")
        kr = r.get("kernels") or {}
        if kr.get("top"):
            tops = ", ".join(f"{k['name'][:40]} {k['share']:.0%}" for k in kr["top"][:3] if k.get("share") is not None)
            print(f"{'':<12} device busy {kr['device_busy_fraction']:.0%} of a profiled step; top: {tops}")
        for s in (r.get("host_syncs") or {}).get("sources", [])[:4]:
            print(f"{'':<12} sync x{s['count']} at {s['where']}")
    d = report.get("ddp") or {}
    ok = d.get("status") == "ok"
    detail = (f", {d['samples_per_s']:.1f} samples/s over {d['world_size']} processes ({d['backend']})" if ok
              else f" {d.get('error', '')}")
    print(f"DDP: {d.get('status')}{detail}")
    g = report["goal"]
    print(f"goal: {g['text']}; measured MFU {_fmt(g['measured_mfu'], '.1%')}, met: {g['met']}")


if __name__ == "__main__":
    raise SystemExit(main())
