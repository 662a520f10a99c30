"""Pruning a safetensors checkpoint block by block, straight to an output checkpoint, resumably.

:func:`prune_checkpoint` (``hfprune prune --low-memory`` and/or ``--resume``):

* ``low_memory=True``: the model is loaded with every decoder block on Accelerate's ``"disk"``
  device (the offload index points into the input shards, which are memory-mapped, nothing is
  copied); embeddings, final norm and ``lm_head`` stay in RAM. The layer runner onloads one block
  at a time, prunes it and writes it straight into its own output shard
  (``model-0000{i+1}-of-0000{N}.safetensors``), which the offload index then points at. Peak RSS
  is about one block plus the calibration activations (plus the embeddings), whatever the
  number of blocks.
* ``low_memory=False``: the model is in RAM, finished blocks are still written to their shards
  as they complete (so the run can be resumed).

Work in progress lives in ``.<output>.hfprune-partial/`` beside the output: the finished block
shards, the calibration activations entering the next block (one file per process) and
``state.json`` (next block, batch size, per-layer sparsities and report rows, a fingerprint of
model + settings), each replaced atomically after every block. ``resume=True`` continues from
there after an interruption and gives the same result as an uninterrupted run; without it the
folder is started afresh. At the end the shards, the non-block tensors (tied embeddings stay
tied: the output has exactly the input's tensor names), ``model.safetensors.index.json``,
config, tokenizer, report and model card are put into the output inside
:func:`hfprune.fs.atomic_output_dir`, and the work folder is removed.

With several processes (``accelerate launch``) only process 0 writes shards and the output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from hfprune.arch import get_blocks, get_spec
from hfprune.config import PruningConfig
from hfprune.core.distributed import get_context
from hfprune.core.engine import prune, resolve_calibration
from hfprune.core.runner import LayerRunner
from hfprune.formats.base import safetensors_header
from hfprune.fs import atomic_output_dir, atomic_write, check_output_dir, output_lock
from hfprune.io import write_companions
from hfprune.models import _parse_dtype, load_tokenizer, resolve_model_path
from hfprune.report import PruneReport, peak_cuda_mb, peak_rss_mb

logger = logging.getLogger(__name__)

__all__ = ["prune_checkpoint", "work_dir_for"]

_STATE = "state.json"
_INDEX = "model.safetensors.index.json"
_EXIT_ENV = "HFPRUNE_TEST_EXIT_AFTER_BLOCK"  # test hook: os._exit right after this block is saved


def work_dir_for(output: str | os.PathLike) -> Path:
    """The folder where a run into ``output`` keeps its progress (beside ``output``)."""
    out = Path(output).resolve()
    return out.parent / f".{out.name}.hfprune-partial"


def _weight_map(path: Path) -> dict[str, str]:
    index = path / _INDEX
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as fh:
            return {k: "model.safetensors" for k in fh.keys()}
    raise FileNotFoundError(
        f"{path} has no model.safetensors or {_INDEX}: --low-memory / --resume read a local safetensors "
        f"checkpoint (convert it with `model.save_pretrained(dir)` first)."
    )


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def _fingerprint(model_path: Path, config, calibration, dtype, world_size: int) -> str:
    calib = resolve_calibration(calibration)
    cal = calib.to_dict()
    if isinstance(calib.dataset, torch.Tensor):
        cal["dataset"] = hashlib.sha256(calib.dataset.cpu().contiguous().numpy().tobytes()).hexdigest()
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    blob = {
        "config": cfg, "calibration": cal, "dtype": str(dtype), "world_size": world_size,
        "model": str(model_path.resolve()),
        "model_config": (model_path / "config.json").read_text() if (model_path / "config.json").is_file() else "",
        "weight_map": _weight_map(model_path),
        "weights": _files_identity(model_path, sorted(set(_weight_map(model_path).values()))),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _files_identity(folder: Path, names: list[str], sample: int = 1 << 20) -> dict[str, str]:
    """Size, modification time and a hash of the first and last MiB of each weight file: rewritten
    weights (same names and shapes, other values) give another fingerprint, without reading GBs."""
    out = {}
    for name in names:
        path = folder / name
        st = path.stat()
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            h.update(fh.read(sample))
            if st.st_size > sample:
                fh.seek(max(sample, st.st_size - sample))
                h.update(fh.read(sample))
        out[name] = f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}"
    return out


def _readable_safetensors(path: Path) -> str | None:
    """``None`` when ``path`` is a complete safetensors file, else why not."""
    try:
        size = path.stat().st_size
        header = safetensors_header(path)
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            return f"it holds {size} bytes where its header needs {8 + n + end} (truncated?)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"its header is missing or damaged ({type(err).__name__})"
    return None


class _Session:
    """Persists finished blocks and resume state for :func:`hfprune.core.engine.prune`."""

    def __init__(self, work: Path, ctx, fingerprint: str, layers_prefix: str, n_blocks: int,
                 expected: list[set[str]], low_memory: bool, resume: bool):
        self.work = work
        self.ctx = ctx
        self.fingerprint = fingerprint
        self.prefix = layers_prefix
        self.n_blocks = n_blocks
        self.n_files = n_blocks + 1
        self.expected = expected
        self.low_memory = low_memory
        self.resume = resume
        self.batch_size: int | None = None  # set by the engine
        self.model = None

    def shard_name(self, i: int) -> str:
        """File of block ``i``; ``i == n_blocks`` is the file of the tensors outside the blocks."""
        return f"model-{i + 1:05d}-of-{self.n_files:05d}.safetensors"

    def block_path(self, index, loader) -> Path | None:
        """Where the runner writes a disk-offloaded block back: process 0 straight into its output shard."""
        if index is None or not self.ctx.is_main:
            return None
        return self.work / self.shard_name(index)

    def _hidden_path(self, i: int, rank: int) -> Path:
        return self.work / f"hidden-after-{i:05d}-rank{rank}.safetensors"

    # ------------------------------------------------------------------ engine protocol
    def load(self) -> dict[str, Any] | None:
        state_path = self.work / _STATE
        if not self.resume:
            return None
        if not state_path.is_file():
            logger.info("No saved progress in %s: starting from the first block.", self.work)
            return None
        try:
            state = json.loads(state_path.read_text())
            int(state["next_block"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"The saved progress {state_path} is damaged ({type(err).__name__}: {err}): drop --resume "
                             f"to start over (the progress folder is then replaced).") from None
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"The interrupted run in {self.work} used another model, settings or process count; resume with "
                f"exactly the same command, or drop --resume to start over (the folder is then replaced)."
            )
        nxt = int(state["next_block"])
        # Every saved file is checked now, before any block is redone, not when the output is assembled.
        needed = [self.work / self.shard_name(i) for i in range(nxt)] if self.ctx.is_main else []
        if nxt < self.n_blocks and state.get("has_hidden", True):
            needed.append(self._hidden_path(nxt - 1, self.ctx.rank))
        for path in needed:
            problem = "it is missing" if not path.is_file() else _readable_safetensors(path)
            if problem:
                raise ValueError(f"Saved progress in {self.work} has a bad {path.name}: {problem}. Drop --resume to "
                                 f"start over.")
        hidden, dense_hidden = [], []
        if nxt < self.n_blocks and state.get("has_hidden", True):
            from safetensors.torch import load_file

            data = load_file(str(self._hidden_path(nxt - 1, self.ctx.rank)))
            hidden = [data[f"b{j}"] for j in range(sum(k.startswith("b") for k in data))]
            dense_hidden = [data[f"d{j}"] for j in range(sum(k.startswith("d") for k in data))]
        logger.info("Resuming from %s: blocks 0-%d are done.", self.work, nxt - 1)
        return {"next_block": nxt, "batch_size": state["batch_size"], "sparsities": state["sparsities"],
                "layers": state["layers"], "block_counts": state["block_counts"], "hidden": hidden,
                "dense_hidden": dense_hidden}

    def block_done(self, i: int, runner, *, sparsities, layers, block_counts) -> None:
        ctx = self.ctx
        if ctx.is_main:
            self._write_block_shard(i)
        has_hidden = runner is not None
        if has_hidden and i < self.n_blocks - 1:
            tensors = {f"b{j}": h for j, h in enumerate(runner.hidden)}
            tensors.update({f"d{j}": h for j, h in enumerate(runner.dense_hidden or [])})  # dense targets' stream
            _save_tensors(tensors, self._hidden_path(i, ctx.rank))
        ctx.barrier()
        if ctx.is_main:
            state = {"fingerprint": self.fingerprint, "next_block": i + 1, "n_blocks": self.n_blocks,
                     "batch_size": self.batch_size, "world_size": ctx.world_size, "has_hidden": has_hidden,
                     "sparsities": sparsities, "layers": layers, "block_counts": block_counts}
            atomic_write(self.work / _STATE, json.dumps(state, default=float))
        ctx.barrier()
        for old in self.work.glob(f"hidden-after-*-rank{ctx.rank}.safetensors"):
            if old != self._hidden_path(i, ctx.rank):
                old.unlink(missing_ok=True)
        if os.environ.get(_EXIT_ENV) == str(i):
            logging.shutdown()
            os._exit(17)

    # ------------------------------------------------------------------ files
    def _write_block_shard(self, i: int) -> None:
        path = self.work / self.shard_name(i)
        block = self._blocks[i]
        prefix = f"{self.prefix}.{i}."
        expected = self.expected[i]
        if path.is_file() and self.low_memory:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                have = set(fh.keys())
            missing = expected - have
            if missing:  # tensors the offload hooks did not manage (e.g. persistent buffers kept in RAM)
                extra = {k: v for k, v in block.state_dict(prefix=prefix).items() if k in missing}
                if set(extra) != missing or any(v.device.type == "meta" for v in extra.values()):
                    raise RuntimeError(f"Block {i} lacks {sorted(missing)[:3]} after pruning; please report this.")
                from safetensors.torch import load_file

                _save_tensors({**load_file(str(path)), **extra}, path)
            return
        state = block.state_dict(prefix=prefix)
        state = {k: v for k, v in state.items() if k in expected}
        if set(state) != expected or any(v.device.type == "meta" for v in state.values()):
            raise RuntimeError(
                f"Block {i}'s tensors {sorted(expected - set(state))[:3]} are not in memory or not named as in the "
                f"checkpoint; --resume without --low-memory needs a model whose state dict names match its files."
            )
        _save_tensors(state, path)


def prune_checkpoint(model: str | os.PathLike, output: str | os.PathLike, config, calibration: Any = "c4", *,
                     tokenizer=None, dtype=None, low_memory: bool = True, resume: bool = False,
                     overwrite: bool = False, progress: bool = False, command: str | None = None,
                     after_prune: Callable[[Any, Any], dict[str, Any]] | None = None):
    """Prune the safetensors checkpoint ``model`` into ``output`` block by block; returns the report.

    Args:
        model: a local checkpoint folder (sharded or single ``model.safetensors``) or an alias.
        output: the output folder (written atomically at the end).
        tokenizer: default: the checkpoint's own, when it has one (saved with the output).
        config, calibration: as for :func:`hfprune.prune`.
        dtype: ``None``/``"auto"`` keeps the checkpoint's dtype.
        low_memory: keep the decoder blocks on disk and onload one at a time (see the module docstring).
        resume: continue an interrupted run into the same ``output`` with the same settings.
        command: recorded in ``config.pruning_config["command"]``.
        after_prune: ``f(model, tokenizer) -> {file name: JSON object}`` run before saving (e.g. evaluation).
    """
    if isinstance(config, dict):
        config = PruningConfig.from_dict(config)
    ctx = get_context()
    path = Path(resolve_model_path(model))
    if not path.is_dir():
        raise FileNotFoundError(f"{model} is not a local folder: --low-memory / --resume need a local safetensors "
                                f"checkpoint folder.")
    weight_map = _weight_map(path)
    from transformers import AutoConfig

    from hfprune.core.checks import check_checkpoint_combination

    check_checkpoint_combination(AutoConfig.from_pretrained(path), "low_memory")  # before any work
    check_output_dir(output, overwrite, inputs=(path,))
    # One run at a time per output: its progress folder beside the output is shared by name.
    with output_lock(output) if ctx.is_main else contextlib.nullcontext():
        return _prune_checkpoint(path, model, output, config, calibration, ctx, weight_map, tokenizer=tokenizer,
                                 dtype=dtype, low_memory=low_memory, resume=resume, overwrite=overwrite,
                                 progress=progress, command=command, after_prune=after_prune)


def _prune_checkpoint(path: Path, model, output, config, calibration, ctx, weight_map, *, tokenizer, dtype,
                      low_memory, resume, overwrite, progress, command, after_prune):
    work = work_dir_for(output)
    if ctx.is_main:
        if work.exists() and not resume:
            logger.info("Removing the progress of an earlier run in %s (pass --resume to continue it instead).", work)
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    try:
        return _prune_into(path, model, output, config, calibration, ctx, weight_map, work, tokenizer=tokenizer,
                           dtype=dtype, low_memory=low_memory, resume=resume, overwrite=overwrite, progress=progress,
                           command=command, after_prune=after_prune)
    except BaseException:
        # The offload copies are only scratch; the progress is kept only when it holds a finished block.
        for scratch in work.glob(f"offload-rank{ctx.rank}-*"):
            shutil.rmtree(scratch, ignore_errors=True)
        if ctx.is_main and work.is_dir():
            if (work / _STATE).is_file():
                logger.error("Progress up to the last finished block is kept in %s: rerun the same command with "
                             "--resume to continue.", work)
            else:
                shutil.rmtree(work, ignore_errors=True)
        raise


def _prune_into(path: Path, model, output, config, calibration, ctx, weight_map, work: Path, *, tokenizer, dtype,
                low_memory, resume, overwrite, progress, command, after_prune):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = _parse_dtype(dtype)

    # The module layout (no weights) tells which tensors belong to which block.
    from accelerate import init_empty_weights

    hf_config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    spec = get_spec(skeleton)
    n_blocks = len(get_blocks(skeleton, spec))
    expected = [{k for k in weight_map if k.startswith(f"{spec.layers}.{i}.")} for i in range(n_blocks)]
    if not all(expected):
        raise ValueError(f"The checkpoint's tensor names do not start with {spec.layers}.<i>.: this checkpoint "
                         f"layout is not supported by --low-memory / --resume.")
    offload_dir = None
    if low_memory:
        device_map = _disk_device_map(skeleton, spec.layers, n_blocks)
        offload_dir = Path(tempfile.mkdtemp(prefix=f"offload-rank{ctx.rank}-", dir=work))
    del skeleton
    fingerprint = _fingerprint(path, config, calibration, torch_dtype, ctx.world_size)
    session = _Session(work, ctx, fingerprint, spec.layers, n_blocks, expected, low_memory, resume)
    if ctx.is_main:
        logger.info("Progress is saved in %s; after an interruption rerun the same command with --resume.", work)

    if low_memory:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device_map,
                                                   offload_folder=str(offload_dir))
    else:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    session._blocks = get_blocks(net, spec)
    if tokenizer is None and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                 "tokenizer.model")):
        tokenizer = load_tokenizer(path)
    report = prune(net, tokenizer, config, calibration, progress=progress, session=session)
    report.base_model, report.command = str(model), command or None
    report.save_to(net.config)
    extra = after_prune(net, tokenizer) if after_prune is not None else {}

    report.peak_rss_mb = max(report.peak_rss_mb, peak_rss_mb())  # includes loading and evaluation
    if peak_cuda_mb() is not None:  # since the prune started, evaluation included
        report.peak_cuda_mb = max(report.peak_cuda_mb or 0.0, peak_cuda_mb())
    if ctx.is_main:
        _finalize(net, tokenizer, report, session, weight_map, output, overwrite, extra, inputs=(path,))
        shutil.rmtree(work, ignore_errors=True)
    ctx.barrier()
    return report


_SMALL = 1 << 20  # modules beside the blocks with fewer parameters stay in RAM (norms, rotary embeddings)


def _disk_device_map(skeleton, layers: str, n_blocks: int) -> dict[str, str]:
    """Blocks and large modules beside them (embeddings, ``lm_head``) on ``"disk"``, small ones on ``"cpu"``."""
    device_map: dict[str, str] = {}
    parts = layers.split(".")
    module, prefix = skeleton, ""
    for part in parts:
        for name, _child in module.named_children():
            if name != part:
                size = sum(p.numel() for p in _child.parameters())
                device_map[prefix + name] = "disk" if size >= _SMALL else "cpu"
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            raise ValueError("--low-memory needs a model whose tensors all live in submodules; load it in memory.")
        module = getattr(module, part)
        prefix += part + "."
    for i in range(n_blocks):
        device_map[f"{layers}.{i}"] = "disk"
    return device_map


def _finalize(model, tokenizer, report, session: _Session, weight_map: dict[str, str], output, overwrite: bool,
              extra: dict[str, Any], inputs=()) -> None:
    """Move the block shards into the output with the other tensors, index, config and tokenizer."""
    work = session.work
    in_blocks = set().union(*session.expected)
    rest_keys = [k for k in weight_map if k not in in_blocks]
    # Tensors outside the blocks, onloaded one module at a time when offloaded (embeddings).
    runner = LayerRunner(model)
    modules = dict(model.named_modules())
    rest: dict[str, torch.Tensor] = {}
    for owner in dict.fromkeys(k.rsplit(".", 1)[0] for k in rest_keys):
        module = modules.get(owner)
        if module is None:
            raise RuntimeError(f"The checkpoint tensor {owner}.* has no module of that name; this layout is not "
                               f"supported by --low-memory / --resume.")
        with runner.materialize(module):
            for name, t in module.state_dict(prefix=owner + ".").items():
                if name in rest_keys:
                    if t.device.type == "meta":
                        raise RuntimeError(f"Tensor {name} is not loaded; please report this.")
                    # No copy: the materialized tensor outlives its module's offload (the module gets a new
                    # meta tensor), and a copy of a large embedding was the run's peak.
                    rest[name] = t.detach().to("cpu")
    missing = [k for k in rest_keys if k not in rest]
    if missing:
        raise RuntimeError(f"Tensors {missing[:3]} outside the decoder blocks were not found; please report this.")
    index: dict[str, str] = {}
    total = 0
    with atomic_output_dir(output, overwrite, inputs) as tmp:
        for i in range(session.n_blocks):
            name = session.shard_name(i)
            src = work / name
            try:
                os.link(src, tmp / name)  # the work copy stays until the output is complete
            except OSError:
                shutil.copyfile(src, tmp / name)
            for key, info in safetensors_header(tmp / name).items():
                if key != "__metadata__":
                    index[key] = name
                    total += info["data_offsets"][1] - info["data_offsets"][0]
        last = session.shard_name(session.n_blocks)
        _save_tensors(rest, tmp / last)
        for key, value in rest.items():
            index[key] = last
            total += value.numel() * value.element_size()
        if set(index) != set(weight_map):
            raise RuntimeError(f"The output tensors differ from the input's: {sorted(set(index) ^ set(weight_map))[:5]}.")
        (tmp / _INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                              "weight_map": dict(sorted(index.items()))}, indent=2) + "\n")
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        write_companions(tmp, model, tokenizer=tokenizer, record=PruneReport.from_model(model),
                         report_dict=report.to_dict(), eval_results=extra.get("eval_results.json"), extra_files=extra)
    logger.info("Saved the pruned checkpoint (%d shards) to %s.", session.n_files, output)

