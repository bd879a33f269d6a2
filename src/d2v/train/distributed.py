"""Process-group helpers: ``torchrun`` detection (nanoGPT style), rank queries, small collectives.

``torchrun --nproc_per_node N ...`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) starts N copies of the same command; each
calls :func:`init_from_env`, which joins the default process group when ``WORLD_SIZE > 1``:

* backend ``nccl`` on CUDA, each process on ``cuda:LOCAL_RANK`` (``torch.cuda.set_device`` too);
* backend ``gloo`` on the CPU (``train.device=cpu``, or no GPU), which is how the tests run DDP.

Without those variables (a plain ``d2v pretrain``), or with ``WORLD_SIZE=1``, nothing is
initialised and every helper behaves as the single process of a world of one, so the training
code has one path. A group that the caller initialised already is reused and left to the caller
to destroy; one initialised here is destroyed by :func:`cleanup` (``process_group`` does it on
error too).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from d2v.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size``, its device and the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: not distributed
    owned: bool = False  # the group was created by init_from_env (so cleanup destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={v!r} is not an integer") from e


def env_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` ((0, 1, 0) if unset)."""
    if "RANK" not in os.environ:  # nanoGPT: ddp = int(os.environ.get('RANK', -1)) != -1
        return 0, 1, 0
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def resolve_device(name: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """``train.device`` to a device: ``auto`` = CUDA when there is one; under DDP every CUDA
    process uses ``cuda:LOCAL_RANK`` (one GPU per process)."""
    dev = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {name!r} asked for CUDA but no CUDA device is available")
        if distributed:
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                                  f"are visible: start at most that many processes per node")
            dev = torch.device("cuda", local_rank)
        # Training shapes are static (fixed crops and blocks, the same mask count in every row):
        # let cuDNN time its algorithms once per shape and keep the fastest (MAE's main_pretrain
        # does the same). On an H200 it dropped the layout transforms around the decoders' grouped
        # convolutions, though the decoder alone was no faster (BENCHMARKS.md, "GPU benchmark").
        torch.backends.cudnn.benchmark = True
    return dev


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the default process group if launched by torchrun with ``WORLD_SIZE > 1``.

    ``device`` is ``train.device``; the backend follows it (nccl for CUDA, gloo otherwise).
    """
    if dist.is_available() and dist.is_initialized():  # set up by the caller (e.g. a test harness)
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        dev = resolve_device(device, local, world > 1)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank, world, local, dev, dist.get_backend(), owned=False)
    rank, world, local = env_ranks()
    dev = resolve_device(device, local, world > 1)
    if world == 1:
        return DistInfo(0, 1, 0, dev, None, owned=False)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kw: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if dev.type == "cuda":
        kw["device_id"] = dev  # binds the communicator to this GPU (no guessing in barrier())
    dist.init_process_group(**kw)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, backend, owned=True)


def cleanup(info: DistInfo | None = None) -> None:
    """Destroy the process group if :func:`init_from_env` created it (safe to call twice)."""
    if info is not None and not info.owned:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistInfo]:
    """``with process_group(cfg.train.device) as info:`` init from the environment, always clean up."""
    info = init_from_env(device)
    try:
        yield info
    finally:
        cleanup(info)


# ------------------------------------------------------------------------------ queries
def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


# ------------------------------------------------------------------------------ collectives
def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (returns ``t``); a no-op in a world of one."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (returns ``t``): for logging per-rank numbers as one value."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a world of one)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ------------------------------------------------------------------------------ training helpers
def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` in a world of several processes, else ``model`` itself.

    Round robin means a step uses one modality encoder and the shared blocks, not the other
    modalities' encoders, so DDP runs with ``find_unused_parameters=True``. The alternatives do
    not fit: ``static_graph`` needs the same graph every step; one DDP wrapper per modality would
    all-reduce the shared blocks' gradients in several bucket orders; and a dummy ``0 * p.sum()``
    over unused parameters would hand AdamW zero gradients where a single process has ``None``
    (weight decay and momentum would move those parameters). The teacher's parameters do not
    require gradients, so DDP does not reduce them (it broadcasts them from rank 0 once, at wrap
    time); ``update_teacher`` then moves identical copies on every rank.
    """
    if not info.distributed:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # No per-forward buffer broadcast (the buffers are identical: the EMA counter, fixed
    # positions); newer torch spells it forward_sync_buffers. Both still sync at wrap time.
    no_buf = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
              else {"broadcast_buffers": False})
    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
               find_unused_parameters=True, **no_buf)


def rank_loss(out: Any, world_size: int) -> torch.Tensor:
    """This rank's share of the global-batch loss, scaled by W because DDP averages gradients.

    The regression terms are summed over masked tokens and divided by the masked-token count of
    the whole global batch; the image CLS term is a sum over instances (``* sample_size`` in the
    model undoes the division), so it is taken as this rank's sum. In a world of one: ``out.loss``.
    """
    if world_size == 1 or getattr(out, "sample_size", None) is None:
        # a baseline (d2v.models.baselines) has no sample size: DDP's mean of the ranks' mean losses
        return out.loss
    local = out.sample_size.detach().float()
    total = all_reduce_sum(local.clone()).clamp_min(1)
    terms = out.loss_terms or {"regression": out.loss_sum}
    cls = terms.get("cls")
    tokens = sum(v for k, v in terms.items() if k != "cls")
    loss = tokens * (world_size / total)
    if cls is not None:
        loss = loss + cls * (world_size / local.clamp_min(1))
    return loss


@torch.no_grad()
def check_replicas(model: torch.nn.Module) -> None:
    """Every rank must hold the same student, teacher and buffers: compare per-tensor sums."""
    sd = model.state_dict()
    names = list(sd)
    fp = torch.stack([v.detach().double().sum() for v in sd.values()])
    hi, lo = fp.clone(), fp.clone()
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    bad = (hi != lo).nonzero().flatten().tolist()
    if bad:
        raise RuntimeError(f"DDP replicas diverged: {len(bad)} tensor(s) differ between ranks, e.g. "
                           f"{', '.join(names[i] for i in bad[:5])}")
