"""Multi-process calibration with results that do not depend on the number of processes.

Under ``accelerate launch --num_processes N`` (or ``torchrun``; gloo on CPU, NCCL on GPU) every
process runs a share of the calibration windows through the blocks, and the statistics (Wanda
norms, SparseGPT Hessians) are reduced before a layer is pruned, so every process prunes to the
same masks and weights.

Bit-identical results for any process count come from a fixed summation order:

* the calibration windows are cut into batches of ``batch_size`` windows (the same for every
  process count) and the batches into at most :data:`MAX_CHUNKS` *chunks* of consecutive
  batches (:func:`chunk_batches`; this depends on the number of batches only, never on the
  number of processes, which can be at most the number of chunks);
* chunk ``c`` belongs to process ``c % N``; a chunk's statistics are summed (float64) over its
  batches in order, starting from zero, by whichever process owns it;
* the chunk sums are then added in chunk order, ``((c0 + c1) + c2) + ...``, on every process
  (each chunk is broadcast from its owner) -- and the single-process path does exactly the same
  additions, so 1 and N processes give the same bits.

A process keeps its own chunks' sums until the reduction: memory ``ceil(chunks / N)`` statistics
per distinct layer input (for SparseGPT ``8 * in_features^2`` bytes each); one process folds
them as it goes (two statistics).
Every process runs the same forward ops on the same batches, so CPU runs should use the same
thread count in every configuration (``OMP_NUM_THREADS``) for bitwise equality.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

__all__ = ["DistContext", "get_context", "ChunkedStats", "chunk_batches", "shard_windows", "finalize_stats",
           "MAX_CHUNKS"]

MAX_CHUNKS = int(os.environ.get("HFPRUNE_MAX_CHUNKS", "8"))
"""Most summation chunks (``$HFPRUNE_MAX_CHUNKS``, default 8): the most calibration processes, and
the number of statistics copies all processes together keep before the reduction."""


@dataclass
class DistContext:
    """This process's place among the calibration processes (``world_size == 1`` when alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the processes (e.g. a memory-based batch size)."""
        if not self.enabled:
            return value
        t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]


_warned: list = []


def _comm_device() -> torch.device:
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_context(init: bool = True) -> DistContext:
    """The process group from the environment (``WORLD_SIZE``/``RANK`` set by ``accelerate launch`` or
    ``torchrun``); initialises it (NCCL with CUDA, else gloo) when ``init`` and not done yet."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        # mpirun (``accelerate launch --cpu --mpirun_hostfile``) sets only its own variables.
        for size_var, rank_var in (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), ("PMI_SIZE", "PMI_RANK"),
                                   ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK")):
            if int(os.environ.get(size_var, "1")) > 1:
                world = int(os.environ[size_var])
                if init:
                    os.environ.setdefault("WORLD_SIZE", str(world))
                    os.environ.setdefault("RANK", os.environ.get(rank_var, "0"))
                    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                    os.environ.setdefault("MASTER_PORT", "29500")
                break
    if world <= 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") \
            and os.environ.get("MASTER_ADDR") and not _warned:
        _warned.append(True)
        logger.warning("Running as one process: `accelerate launch --cpu --num_processes N` starts N processes only "
                       "through mpirun (--mpirun_hostfile). Without MPI use `accelerate launch --multi_gpu "
                       "--num_processes N` (gloo on CPU) or `torchrun --nproc_per_node N`.")
    if world <= 1 or not init:
        return DistContext(0, 1)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed: run one process.")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    ctx = DistContext(dist.get_rank(), dist.get_world_size())
    logger.info("Calibration process %d of %d (%s).", ctx.rank, ctx.world_size, dist.get_backend())
    return ctx


def chunk_batches(n_batches: int) -> int:
    """Batches per summation chunk when there are ``n_batches`` calibration batches."""
    return max(1, -(-n_batches // max(1, MAX_CHUNKS)))


def shard_windows(n_windows: int, batch_size: int, ctx: DistContext) -> tuple[list[int], list[int], int, int]:
    """``(windows, batch_ids, n_chunks, chunk_size)`` for this process: the calibration window indices
    it runs (whole chunks, in order), the global index of each of its batches, the number of chunks
    and the batches per chunk."""
    n_batches = -(-n_windows // batch_size)
    k = chunk_batches(n_batches)
    n_chunks = -(-n_batches // k)
    if n_chunks < ctx.world_size:
        raise ValueError(
            f"{n_windows} calibration windows in batches of {batch_size} make {n_chunks} chunk(s) of {k} batch(es), "
            f"fewer than the {ctx.world_size} processes: use at most {n_chunks} processes, more --nsamples, or a "
            f"smaller --batch-size."
        )
    windows: list[int] = []
    batch_ids: list[int] = []
    for c in range(ctx.rank, n_chunks, ctx.world_size):
        for b in range(c * k, min((c + 1) * k, n_batches)):
            batch_ids.append(b)
            windows.extend(range(b * batch_size, min((b + 1) * batch_size, n_windows)))
    return windows, batch_ids, n_chunks, k


class ChunkedStats:
    """Statistics summed per chunk of calibration batches (see the module docstring).

    Wraps any accumulator with ``add_batch`` and ``merge`` (``RowNormStats``, ``HessianStats``);
    ``factory()`` makes an empty one. :func:`finalize_stats` turns it into the reduced total.
    """

    def __init__(self, factory: Callable[[], Any], runner, n_chunks: int, chunk_size: int, ctx: DistContext):
        self.factory = factory
        self.runner = runner
        self.n_chunks = n_chunks
        self.chunk_size = chunk_size
        self.ctx = ctx
        self.chunks: dict[int, Any] = {}
        self.total = None
        self._next = 0  # single process: chunks below this index are folded into total already

    def add_batch(self, x: torch.Tensor) -> None:
        c = self.runner.current_batch // self.chunk_size
        acc = self.chunks.get(c)
        if acc is None:
            if not self.ctx.enabled:
                self._fold(below=c)
            acc = self.chunks[c] = self.factory()
        acc.add_batch(x)

    def _fold(self, below: int) -> None:
        """Single process: add the finished chunks below ``below`` to the total, in order (bounded memory)."""
        while self._next < below:
            part = self.chunks.pop(self._next, None)
            if part is not None:
                self.total = part if self.total is None else self.total.merge(part) or self.total
            self._next += 1

    def finalize(self) -> Any:
        if not self.ctx.enabled:
            self._fold(below=self.n_chunks)
            return self.total if self.total is not None else self.factory()
        total = None
        for c in range(self.n_chunks):
            owner = c % self.ctx.world_size
            part = self.chunks.get(c) if owner == self.ctx.rank else None
            part = _broadcast_stats(part, self.factory, owner, self.ctx)
            total = part if total is None else total.merge(part) or total
        self.chunks = {}
        return total


def _tensors(stats) -> dict[str, torch.Tensor]:
    if hasattr(stats, "state"):
        return stats.state()
    if hasattr(stats, "sq_norm"):
        return {"sq_norm": stats.sq_norm, "tokens": torch.tensor([float(stats.tokens)], dtype=torch.float64,
                                                                  device=stats.sq_norm.device)}
    raise TypeError(f"Cannot reduce statistics of type {type(stats).__name__} across processes: give it "
                    f"state()/load_state() like HessianStats.")


def _load(stats, tensors: dict[str, torch.Tensor]) -> None:
    if hasattr(stats, "load_state"):
        stats.load_state(tensors)
    else:
        stats.sq_norm = tensors["sq_norm"].to(stats.sq_norm.device)
        stats.tokens = int(tensors["tokens"].item())


def _broadcast_stats(part, factory, owner: int, ctx: DistContext):
    """The statistics of one chunk from its owner process, on every process."""
    if part is None:
        part = factory()
    dev = _comm_device()
    local = _tensors(part)
    out = {}
    for key in sorted(local):
        t = local[key]
        buf = t.detach().to(dev).contiguous() if ctx.rank == owner else torch.empty_like(t, device=dev)
        torch.distributed.broadcast(buf, src=owner)
        out[key] = buf.to(t.device)
    if ctx.rank != owner:
        _load(part, out)
    return part


def finalize_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """``{name: ChunkedStats}`` (layers reading the same input share one) to ``{name: total}``, the
    shared ones finalized once, in a fixed order on every process."""
    done: dict[int, Any] = {}
    out = {}
    for name in sorted(stats):
        acc = stats[name]
        if not isinstance(acc, ChunkedStats):
            out[name] = acc
            continue
        if id(acc) not in done:
            done[id(acc)] = acc.finalize()
        out[name] = done[id(acc)]
    return out
