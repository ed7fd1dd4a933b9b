"""Scale-out on ``torch.distributed``: one process per GPU (or per CPU share), launched by torchrun.

DM's per-class losses are independent given the embedding network, so a distillation shards by
class: every process (rank) owns a contiguous block of classes (:meth:`World.shard`), draws the
same embedding network every iteration (one shared seed) and per-class random streams that do
not depend on which rank owns a class, so the gathered set equals the single-process one. Only
the loss history (summed every ``log_every`` iterations), checkpoints and the final set
(gathered) cross ranks. Rank 0 does all run-folder I/O (:meth:`World.on_main`): nothing needs a
shared file system.

    torchrun --nproc_per_node=8 -m sgs_cuda.cli run --preset imagenette-128 --data-root /data/imagenet
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m sgs_cuda.cli run --preset imagenette-128 --data-root /data/imagenet

:func:`init_from_env` reads torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and starts the process group: NCCL for the tensors of processes
that use GPUs (GPU ``LOCAL_RANK`` each), gloo on CPUs (on a machine with GPUs the group has both,
``cpu:gloo,cuda:nccl``, so small CPU-side exchanges need no GPU). Without them (a plain
``python``/``sgs-dgdd`` start) the pipeline runs as one process: :data:`SOLO`, whose collectives
are no-ops.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
import pickle
from typing import Any, Callable

import torch

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(RuntimeError):
    """Raised on the other ranks when a step that one rank ran alone failed there."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks, and the collectives the pipeline uses.

    With ``world_size == 1`` every method is a local no-op, so callers need no special case.
    """
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # what carries this process's tensors: "gloo" (CPU) or "nccl" (GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be for this backend's collectives."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def shard(self, n: int) -> range:
        """This rank's contiguous block of ``n`` items (classes): sizes differ by at most one,
        and the blocks of ranks 0, 1, ... concatenate to ``range(n)``."""
        return range(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    # --- collectives --------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.sharded:
            _dist().barrier()

    def broadcast(self, obj: Any = None, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (pickled; for metadata and results)."""
        if not self.sharded:
            return obj
        box = [obj if self.rank == src else None]
        _dist().broadcast_object_list(box, src=src, device=self.comm_device)
        return box[0]

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only (run-folder I/O, decisions) and return its result on every
        rank. If it raises, every rank raises the same exception, so no rank is left waiting in
        a collective."""
        if not self.sharded:
            return fn()
        result = error = None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 (re-raised on every rank)
                error = _picklable(exc)
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def local_first(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the first rank of each node, then on the others (a cache built by the
        first is then only read). A failure anywhere is raised on every rank."""
        if not self.sharded:
            return fn()
        result = error = None
        if self.local_rank == 0:
            result, error = _try(fn)
        self._raise_any(error)
        if self.local_rank != 0:
            result, error = _try(fn)
        self._raise_any(error)
        return result

    def _raise_any(self, error: Exception | None) -> None:
        """Collective: raise ``error`` here, or a :class:`RankFailure` naming the first failed rank."""
        errors = [None] * self.world_size
        _dist().all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
        if failed is not None:
            raise RankFailure(f"rank {failed[0]} failed: {failed[1]}")

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over the ranks (a new tensor on ``tensor``'s device)."""
        if not self.sharded:
            return tensor
        work = tensor.detach().to(self.comm_device, copy=True)
        _dist().all_reduce(work)
        return work.to(tensor.device)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 in rank order, on every rank (on
        ``tensor``'s device). Row counts may differ between ranks; the other dims may not."""
        if not self.sharded:
            return tensor
        counts = [None] * self.world_size
        _dist().all_gather_object(counts, int(tensor.shape[0]))
        most = max(counts)
        padded = tensor.detach().new_zeros((most, *tensor.shape[1:]), device=self.comm_device)
        padded[:tensor.shape[0]] = tensor.detach()
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        _dist().all_gather(pieces, padded)
        return torch.cat([p[:n] for p, n in zip(pieces, counts)]).to(tensor.device)

    def gather(self, obj: Any) -> list | None:
        """Every rank's ``obj`` (pickled), in rank order, on rank 0; ``None`` on the others."""
        if not self.sharded:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        _dist().gather_object(obj, out, dst=0)
        return out


SOLO = World()


def _dist():
    import torch.distributed as dist
    return dist


def _picklable(exc: Exception) -> Exception:
    """``exc``, or a :class:`RankFailure` with its message when it cannot cross processes."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RankFailure(f"{type(exc).__name__}: {exc}")


def _try(fn):
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 (re-raised by the caller on every rank)
        return None, exc


def launched_by_torchrun() -> bool:
    """Whether torchrun's variables say this process is one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"torchrun variable {name}={value!r} is not an integer") from None


def init_from_env(device: str = "auto", timeout_minutes: float = 30.0) -> tuple[World, torch.device | None]:
    """The :class:`World` of this process and, under torchrun, its device.

    Under torchrun (``WORLD_SIZE > 1``): start the process group (once; an already started one
    is reused): NCCL when ``device`` is ``auto`` or ``cuda`` and CUDA is available, each rank
    on GPU ``LOCAL_RANK``; gloo on CPUs (``device="cpu"``, or no GPU). Otherwise
    ``(SOLO, None)``: one process, on the device the caller resolves.
    """
    if not launched_by_torchrun():
        return SOLO, None
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but torchrun's {missing} are not: launch with "
                         "`torchrun --nproc_per_node=N -m sgs_cuda.cli ...`")
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"under torchrun each process takes the GPU of its LOCAL_RANK: use --device auto, "
                         f"cuda or cpu, not {device!r}")
    have_cuda = torch.cuda.is_available()
    use_cuda = device != "cpu" and have_cuda
    if device == "cuda" and not use_cuda:
        raise ValueError("--device cuda was asked for but CUDA is not available (use --device auto or cpu)")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                             "start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    dist = _dist()
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group("cpu:gloo,cuda:nccl" if have_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    elif backend not in str(dist.get_backend()):
        raise ValueError(f"a {dist.get_backend()} process group is already running; this run needs {backend}")
    return World(rank, world_size, local_rank, backend), dev


def shutdown() -> None:
    """Destroy the process group if one was started (end of a torchrun command)."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
