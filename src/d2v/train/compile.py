"""``train.compile``: the data2vec 2.0 step through ``torch.compile``, eager when that fails.

:func:`compile_model` compiles ``Data2Vec2._step``, the tensor work of one pretraining forward
(local features, student, decoder, teacher targets, loss, variances), as one graph
(``fullgraph=True``, ``dynamic=False``: every mask row masks the same number of tokens, so the
shapes are static). AOTAutograd also compiles its backward, so the student's forward + backward
and the teacher's forward run compiled. The checks and the mask (``Data2Vec2._prelude``), the
optimizer and the EMA update stay eager. The state dict, checkpoints and the eager numerics do
not change (``model._compiled_core`` is a plain attribute, dropped from copies and pickles).

Graphs: one per (modality, train/eval mode, padding mask or none, autocast state, batch shape);
the first step of each pays the compilation (tens of seconds on a CPU; see BENCHMARKS.md). The
recompile limit is raised to :data:`RECOMPILE_LIMIT` so that the three modalities and both
modes fit.

Layerdrop: the student blocks' decisions are drawn before the step (``Data2Vec2._layerdrop_keep``,
the draw ``run_blocks`` makes) and a step that keeps every block runs the compiled graph; a step
that skips a block runs eager (one graph per skip pattern would be up to 2^depth compilations;
with the speech base config's 0.05 over 12 blocks, 54% of the steps keep every block). Prenet
layerdrop in training runs eager too (no released config has prenet blocks with layerdrop).

Fallback: when compiling fails (no C++ compiler, a backend or device that inductor does not
support, a graph break, an unsupported torch build), ONE warning says why and the model runs
eager from then on, with the eager numbers; nothing is silently wrong. The backward graph is
compiled together with the forward (``force_non_lazy_backward_lowering``), so its failures are
caught there too instead of surfacing in ``loss.backward()``. Errors of the compiled code at run
time (out of memory, bad input) are raised as they are.

Not covered here (no GPU in this task): CUDA graphs (``mode="reduce-overhead"``), bf16 autocast
under compile, and DDP (the compiled step runs inside the DDP-wrapped module: gradients are
synchronised after the whole backward, without DDP's bucket overlap).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

RECOMPILE_LIMIT = 32

# What a failed compilation raises: dynamo's errors (graph breaks under fullgraph, backend failures,
# inductor's InductorError among them) and inductor's own, should one escape unwrapped.
_COMPILE_ERRORS: tuple[type[BaseException], ...] = ()


def _compile_errors() -> tuple[type[BaseException], ...]:
    global _COMPILE_ERRORS
    if not _COMPILE_ERRORS:
        errs: list[type[BaseException]] = []
        try:
            import torch._dynamo.exc as dexc

            errs.append(dexc.TorchDynamoException)
        except ImportError:  # pragma: no cover - a torch build without dynamo
            pass
        try:
            import torch._inductor.exc as iexc

            errs += [iexc.InvalidCxxCompiler, iexc.CppCompileError, iexc.OperatorIssue]
        except ImportError:  # pragma: no cover
            pass
        _COMPILE_ERRORS = tuple(errs) or (RuntimeError,)
    return _COMPILE_ERRORS


def _reason(e: BaseException) -> str:
    """``Outer: Inner: first line``: a backend failure's own message only says which backend raised."""
    def first(x: BaseException) -> str:
        lines = [ln.strip() for ln in str(x).strip().splitlines() if ln.strip()]
        return f"{type(x).__name__}: {lines[0][:300] if lines else ''}"

    inner = getattr(e, "inner_exception", None) or e.__cause__
    return f"{type(e).__name__}, {first(inner)}" if inner is not None else first(e)


def _warn(reason: str) -> None:
    warnings.warn(
        f"train.compile: torch.compile is not usable here ({reason}); the model runs eager "
        f"(the numbers of train.compile=false)",
        RuntimeWarning, stacklevel=3,
    )


class CompiledCore:
    """``core(model, *args)``: ``Data2Vec2._step`` compiled, or eager after one warning once compiling failed."""

    def __init__(self, fn: Any, backend: Any = "inductor", mode: str | None = None, fullgraph: bool = True):
        import torch._functorch.config  # noqa: F401  (the patch in __call__)

        self._eager = fn
        self.compiled = torch.compile(fn, backend=backend, mode=mode, dynamic=False, fullgraph=fullgraph)
        self.failure: str | None = None  # why compiling failed (then everything runs eager)
        self.compiled_calls = 0
        self.eager_calls = 0

    @property
    def active(self) -> bool:
        return self.failure is None

    def __call__(self, model: torch.nn.Module, *args: Any) -> Any:
        if self.failure is None:
            try:
                # The backward is compiled with the forward, so that a failure there is caught here.
                with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                    out = self.compiled(model, *args)
                self.compiled_calls += 1
                return out
            except _compile_errors() as e:
                self.failure = _reason(e)
                _warn(self.failure)
        self.eager_calls += 1
        return self._eager(model, *args)


def compile_enabled(setting: str, device: torch.device) -> bool:
    """``train.compile``: ``true``, ``false``, or ``auto`` = on CUDA only (on an H200 the compiled
    base steps ran 1.34-1.49x faster for 45-86 s of compiling; on the 2-core CPU it did not pay)."""
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def compile_model(model: torch.nn.Module, enabled: bool, backend: Any = "inductor", mode: str | None = None,
                  fullgraph: bool = True) -> torch.nn.Module:
    """Make ``model`` (a ``Data2Vec2``) run its step compiled when ``enabled``; return ``model``.

    ``backend``/``mode``: ``torch.compile``'s (``mode=None`` is its default). Disabled, the model
    runs eager (an earlier compilation is dropped). Models other than ``Data2Vec2`` (the baselines)
    run eager, with a warning. Call before wrapping the model in DDP.
    """
    from d2v.models import Data2Vec2

    target = getattr(model, "module", model)  # a DDP-wrapped model, should one come here
    if not enabled:
        if isinstance(target, Data2Vec2):
            target._compiled_core = None
        return model
    if not isinstance(target, Data2Vec2):
        warnings.warn(f"train.compile: only the data2vec2 objective has a compiled step; "
                      f"{type(target).__name__} runs eager", RuntimeWarning, stacklevel=2)
        return model
    try:
        import torch._dynamo

        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
        core = CompiledCore(Data2Vec2._step, backend=backend, mode=mode, fullgraph=fullgraph)
    except Exception as e:  # torch.compile refused at once: no dynamo, an unknown backend, this Python
        _warn(_reason(e))
        target._compiled_core = None
        return model
    target._compiled_core = core
    return model
