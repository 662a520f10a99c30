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
           "MAX_CHUNKS", "requested_cpu_processes", "start_cpu_workers"]

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

_MPI_VARS = (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), ("PMI_SIZE", "PMI_RANK"),
             ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"))
"""(size, rank) variables that mpirun implementations set."""


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
        for size_var, rank_var in _MPI_VARS:
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


_LAUNCH_FLAGS = {"--cpu", "--multi_gpu", "--tpu", "--use_deepspeed", "--use_fsdp", "--use_megatron_lm", "-m",
                 "--module", "--no_python", "--debug", "-q", "--quiet", "--same_network", "--rdzv_conf",
                 "--enable_cpu_affinity", "--use_cpu", "--tpu_use_cluster", "--monitor_interval"}


def _num_processes_from_launch_args(cmd: list[str], script: str | None = None) -> int | None:
    """``N`` from an ``accelerate launch ... --num_processes N script ...`` command line, reading the
    launcher's own options only: parsing stops at ``script`` (compared by file name) or at the first
    token that is neither an option nor an option's value."""
    try:
        i = cmd.index("launch")
    except ValueError:
        return None
    tokens = cmd[i + 1:]
    expects_value = False
    for j, tok in enumerate(tokens):
        if script and os.path.basename(tok) == os.path.basename(script):
            break
        if expects_value:
            expects_value = False
            continue
        if not tok.startswith("-"):
            break  # the training script: what follows are its arguments
        name, eq, value = tok.partition("=")
        if name in ("--num_processes", "--num-processes"):
            if eq:
                return int(value)
            return int(tokens[j + 1]) if j + 1 < len(tokens) else None
        expects_value = not eq and name not in _LAUNCH_FLAGS
    return None


def requested_cpu_processes() -> int:
    """Processes a parent ``accelerate launch --cpu --num_processes N`` asked for but did not start.

    Accelerate starts several CPU processes only through mpirun (``--mpirun_hostfile``); without it
    ``--cpu --num_processes N`` runs the script once, with ``ACCELERATE_USE_CPU`` and ``MASTER_ADDR``
    set but no ``WORLD_SIZE``. This reads ``N`` from the launcher's command line (the parent process);
    1 when not in that situation.
    """
    if os.environ.get("WORLD_SIZE") or any(int(os.environ.get(v, "1")) > 1 for v, _ in _MPI_VARS):
        return 1
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true") or not os.environ.get("MASTER_ADDR"):
        return 1
    try:
        import psutil

        cmd = psutil.Process().parent().cmdline()
    except Exception:  # noqa: BLE001 - no parent information: behave as one process
        return 1
    if not any("accelerate" in os.path.basename(tok) for tok in cmd[:3]):
        return 1
    try:
        import sys

        n = _num_processes_from_launch_args(cmd, sys.argv[0])
    except ValueError:
        return 1
    return n if n and n > 1 else 1


def _die_with_parent() -> None:  # runs in the child before exec (Linux): SIGTERM when rank 0 exits
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the gloo timeout ends orphans instead
        pass


def start_cpu_workers(world_size: int, argv: list[str] | None = None) -> list:
    """Make this process rank 0 of ``world_size`` CPU calibration processes and start ranks
    1..N-1 as copies of this command (the same environment plus ``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK``), as ``torchrun`` would. Rank 0 exits with the first failing worker's code.
    Returns the worker handles (empty when ``world_size <= 1``)."""
    import atexit
    import subprocess
    import sys
    import threading

    if world_size <= 1:
        return []
    argv = list(sys.argv if argv is None else argv)
    base = dict(os.environ, WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    logger.info("`accelerate launch --cpu --num_processes %d` started one process (accelerate needs mpirun for "
                "more); hfprune starts the other %d calibration processes itself (gloo).", world_size, world_size - 1)
    workers = []
    for rank in range(1, world_size):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        workers.append(subprocess.Popen([sys.executable, *argv], env=env, preexec_fn=_die_with_parent))
    os.environ.update({k: base[k] for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")})
    os.environ.update(RANK="0", LOCAL_RANK="0")

    def watch() -> None:
        import time

        while True:
            for w in workers:
                code = w.poll()
                if code not in (None, 0):
                    logger.error("Calibration process (pid %d) failed with exit code %d; stopping.", w.pid, code)
                    os._exit(code if code > 0 else 1)
            if all(w.poll() is not None for w in workers):
                return
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()

    def wait() -> None:
        for w in workers:
            try:
                w.wait(timeout=600)
            except subprocess.TimeoutExpired:
                w.terminate()

    atexit.register(wait)
    return workers


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

    Wraps any :class:`~hfprune.stats.Stats` accumulator (``RowNormStats``, ``HessianStats``, ...);
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
                self.total = part if self.total is None else self.total.merge(part)
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
            total = part if total is None else total.merge(part)
        self.chunks = {}
        return total


def _broadcast_stats(part, factory, owner: int, ctx: DistContext):
    """The statistics of one chunk from its owner process, on every process."""
    if part is None:
        part = factory()
    dev = _comm_device()
    local = part.state()
    out = {}
    for key in sorted(local):
        t = local[key]
        buf = t.detach().to(dev).contiguous() if ctx.rank == owner else torch.empty_like(t, device=dev)
        torch.distributed.broadcast(buf, src=owner)
        out[key] = buf.to(t.device)
    if ctx.rank != owner:
        part.load_state(out)
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
