"""The layer runner: the only module that moves tensors between devices.

It feeds calibration activations through the decoder blocks one block at a time:

1. :meth:`LayerRunner.capture` runs the model once with every decoder block replaced by a
   pass-through that records the exact positional and keyword arguments the model gives that
   block (position embeddings, attention masks per attention type, cache positions, ...), so no
   per-model code is needed, and stops before the final norm and ``lm_head``;
2. :meth:`LayerRunner.run` runs one block over all calibration batches, optionally with
   statistics hooks on some of its linear layers (:meth:`LayerRunner.hooks`), and optionally
   replaces the stored activations by the block's outputs (to feed the *pruned* outputs to the
   next block).

Memory: the model plus ``nsamples x seqlen x hidden`` activations (one copy, updated in place),
never a buffer sized by ``max_position_embeddings``.

Offloaded models (Accelerate ``AlignDevicesHook`` with ``offload=True``: ``device_map="auto"`` with
``max_memory``/``offload_folder``, ``cpu_offload``, disk offload): :meth:`LayerRunner.onload` brings one
block's weights onto its execution device for the whole time the engine works on it and yields a
handle whose ``write_back()`` stores the (pruned) tensors through Accelerate's storage: in place into
the hook's ``weights_map`` for CPU offload, or as a new safetensors file that the offload index then
points at for disk offload (never kept in RAM). Leaving the context offloads the block again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from hfprune.arch import ArchSpec, get_blocks, get_spec
from hfprune.fs import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["LayerRunner", "module_device", "is_offloaded", "OnloadedBlock"]

# Keyword arguments that would make a block read or write a KV cache during calibration.
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


class _StopForward(Exception):
    """Ends a block call early once everything needed from it was seen (statistics collected, or
    the last block's pass-through: nothing after the blocks is needed)."""


def module_device(module: nn.Module) -> torch.device:
    """Execution device of ``module``: Accelerate's hook device when offloaded, else its weights'."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _offload_hooks(module: nn.Module) -> list:
    """Accelerate ``AlignDevicesHook``-like hooks attached to ``module`` (also inside a ``SequentialHook``)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = getattr(hook, "hooks", None)
    hooks = list(hooks) if hooks is not None else [hook]
    return [h for h in hooks if hasattr(h, "weights_map") and hasattr(h, "offload")]


def is_offloaded(module: nn.Module) -> bool:
    """True when some weights of ``module`` live in Accelerate offload storage (CPU map or disk)."""
    return any(h.offload for m in module.modules() for h in _offload_hooks(m))


def _split_weights_map(weights_map) -> tuple[str, Any]:
    """``(prefix, underlying mapping)`` of a hook's weights map (Accelerate wraps it in a PrefixedDataset)."""
    prefix = ""
    while hasattr(weights_map, "prefix") and hasattr(weights_map, "dataset"):
        prefix = weights_map.prefix + prefix
        weights_map = weights_map.dataset
    return prefix, weights_map


def _get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
    return getattr(module, name.rsplit(".", 1)[-1])


class OnloadedBlock:
    """One block (or module) whose offloaded weights are materialized; see :meth:`LayerRunner.onload`."""

    def __init__(self, module: nn.Module, index: int | None, write_path: Callable[[int | None, Any], Path] | None):
        self.module = module
        self.index = index
        self._write_path = write_path
        self._entries: list[tuple[nn.Module, Any, list[str]]] = []
        self.written_to: Path | None = None

    @property
    def offloaded(self) -> bool:
        return bool(self._entries)

    def _onload(self) -> None:
        from accelerate.utils import named_module_tensors, set_module_tensor_to_device

        for sub in self.module.modules():
            for hook in _offload_hooks(sub):
                if not hook.offload:
                    continue
                names = [n for n, _ in named_module_tensors(sub, include_buffers=hook.offload_buffers,
                                                            recurse=hook.place_submodules, remove_non_persistent=True)]
                device = hook.execution_device if hook.execution_device is not None else "cpu"
                for n in names:
                    set_module_tensor_to_device(sub, n, device, value=hook.weights_map[n])
                # While onloaded, the hook neither reloads (which would drop pruned values) nor offloads.
                hook.offload = False
                self._entries.append((sub, hook, names))

    def _offload(self) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for sub, hook, names in self._entries:
            for n in names:
                set_module_tensor_to_device(sub, n, "meta")
            hook.offload = True
        self._entries = []

    def write_back(self) -> None:
        """Store the current (pruned) tensors where Accelerate will load them from next time.

        CPU offload: copied in place into the hook's ``weights_map``. Disk offload: written to a new
        safetensors file (one per block) and the offload index entries point at it. No-op for
        weights that are not offloaded (they were changed in place already).
        """
        from safetensors.torch import save_file

        disk: dict[str, torch.Tensor] = {}
        loader = None
        for sub, hook, names in self._entries:
            prefix, store = _split_weights_map(hook.weights_map)
            in_ram = getattr(store, "state_dict", store if isinstance(store, dict) else {})
            for n in names:
                value = _get_tensor(sub, n).detach()
                key = prefix + n
                if key in in_ram:
                    target = in_ram[key]
                    if target.data_ptr() != value.data_ptr():
                        target.copy_(value.to(device=target.device, dtype=target.dtype))
                elif hasattr(store, "index"):
                    if loader is not None and loader is not store:
                        raise RuntimeError("This block's offloaded weights use two different disk stores; "
                                           "offload it with a single offload_folder.")
                    loader = store
                    disk[key] = value.to("cpu").contiguous()
                else:
                    raise RuntimeError(f"Cannot write back {key}: its offload storage {type(store).__name__} is "
                                       f"neither an in-memory map nor an Accelerate OffloadedWeightsLoader.")
        if not disk:
            return
        path = self._write_path(self.index, loader) if self._write_path is not None else None
        if path is None:
            folder = getattr(loader, "save_folder", None)
            if folder is None:
                raise RuntimeError("The disk-offloaded weights have no offload folder to write the pruned block to: "
                                   "load the model with offload_folder=... .")
            name = f"hfprune-block-{self.index:05d}.safetensors" if self.index is not None else \
                f"hfprune-{abs(hash(tuple(disk))) % 10**8:08d}.safetensors"
            path = Path(folder) / name
        path = Path(path)
        atomic_write(path, lambda tmp, tensors=disk: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        for key, value in disk.items():
            loader.index[key] = {"safetensors_file": str(path), "weight_name": key,
                                 "dtype": str(value.dtype).replace("torch.", "")}
        self.written_to = path
        del disk


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device) if obj.device != device else obj
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _model_inputs(model: nn.Module, inputs: torch.Tensor | list[dict], batch_size: int,
                  device: torch.device) -> Iterator[dict]:
    """Keyword arguments of the model call for each calibration batch (see :meth:`LayerRunner.capture`)."""
    import inspect

    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    extra = {"use_cache": False} if "use_cache" in accepted or takes_any else {}
    if isinstance(inputs, torch.Tensor):
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        for start in range(0, inputs.shape[0], batch_size):
            batch = inputs[start:start + batch_size].to(device)
            # An encoder-decoder reads the window on both sides (the decoder stack needs its own inputs).
            yield {"input_ids": batch, **({"decoder_input_ids": batch} if encoder_decoder else {}), **extra}
        return
    for batch in inputs:
        yield {**extra, **_to(dict(batch), device)}


# Calibration activations stay on a CUDA device while all batches together take at most this
# fraction of its free memory (the block's own working memory and the solvers need the rest);
# otherwise they are kept in CPU memory and each batch is moved to the block's device when it runs.
ACTIVATION_CUDA_FRACTION = 0.25


def activation_storage(device: torch.device, total_bytes: int) -> torch.device:
    """Where :meth:`LayerRunner.capture` keeps ``total_bytes`` of activations first seen on ``device``."""
    if device.type != "cuda":
        return device
    free, _total = torch.cuda.mem_get_info(device)
    if total_bytes <= ACTIVATION_CUDA_FRACTION * free:
        return device
    logger.info("Calibration activations (%.0f MiB) exceed %.0f%% of the free memory of %s (%.0f MiB): keeping them "
                "in CPU memory; each batch moves to the GPU when its block runs.", total_bytes / 2**20,
                100 * ACTIVATION_CUDA_FRACTION, device, free / 2**20)
    return torch.device("cpu")


class LayerRunner:
    """Runs calibration activations through the decoder blocks of ``model`` one at a time.

    Args:
        model: a transformers causal LM.
        spec: its :class:`~hfprune.arch.ArchSpec` (looked up when ``None``).
        batch_size: calibration windows per block call.
        storage_device: where activations live between blocks (default: where the model's
            first block receives them, or CPU memory when they would take more than
            :data:`ACTIVATION_CUDA_FRACTION` of that CUDA device's free memory).
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None, *, batch_size: int = 1,
                 storage_device: torch.device | str | None = None):
        self.model = model
        self.spec = spec or get_spec(model)
        self.blocks = get_blocks(model, self.spec)
        self.batch_size = batch_size
        self.storage_device = torch.device(storage_device) if storage_device is not None else None
        self.hidden: list[torch.Tensor] = []
        # The dense model's activations of the same windows (methods fitting dense targets), or None.
        self.dense_hidden: list[torch.Tensor] | None = None
        self.calls: list[list[tuple[tuple, dict]]] = []
        self._out_tuple_len: int | None = None
        # Global calibration batch index of each stored batch (several processes each hold a share)
        # and the one being run, read by chunked statistics (hfprune.core.distributed.ChunkedStats).
        self.batch_ids: list[int] | None = None
        self.current_batch: int = 0
        # Where write_back() puts a disk-offloaded block: ``f(index, loader) -> path`` or None.
        self.write_path: Callable[[int | None, Any], Path | None] | None = None

    def __len__(self) -> int:
        return len(self.blocks)

    # ------------------------------------------------------------------ capture
    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor | list[dict]) -> None:
        """Record what every block receives for each calibration batch of ``input_ids``: a
        ``[n, seqlen]`` token tensor (run in batches of ``batch_size``), or a list of model-input
        dicts, each one batch (``pixel_values`` for a vision model, ``input_ids`` and ``labels``
        for an encoder-decoder, ...)."""
        n_blocks = len(self.blocks)
        self.hidden = []
        self.calls = [[] for _ in range(n_blocks)]
        self._out_tuple_len = None
        stateful = []  # set when a block returns state later blocks read (T5's position bias)
        if isinstance(input_ids, torch.Tensor):
            n_batches = -(-input_ids.shape[0] // max(1, self.batch_size))
        else:
            input_ids = list(input_ids)
            n_batches = len(input_ids)
        as_list: list[bool] = []
        originals = {}

        def make_passthrough(index: int, block: nn.Module, original: Callable):
            def passthrough(*args, **kwargs):
                if args:
                    hidden, rest = args[0], tuple(args[1:])
                else:
                    hidden, rest = kwargs.pop("hidden_states"), ()
                for key in _CACHE_KWARGS:
                    if key in kwargs:
                        kwargs[key] = None
                if "use_cache" in kwargs:
                    kwargs["use_cache"] = False
                if "output_attentions" in kwargs:
                    kwargs["output_attentions"] = False
                if index == 0:
                    if self.storage_device is None:  # decided once, from the first batch's size
                        self.storage_device = activation_storage(
                            hidden.device, hidden.numel() * hidden.element_size() * n_batches)
                    self.hidden.append(hidden.detach().to(self.storage_device))
                self.calls[index].append((rest, kwargs))
                out = None
                if self._out_tuple_len is None:
                    # Learn the block's output structure once, so the pass-through returns the same.
                    out = original(hidden, *rest, **kwargs)
                    self._out_tuple_len = len(out) if isinstance(out, (tuple, list)) else 0
                    as_list.append(isinstance(out, list))  # OpenAI-GPT blocks return lists
                    if self._out_tuple_len and any(isinstance(o, torch.Tensor) for o in out[1:]):
                        stateful.append(True)
                if index == n_blocks - 1:
                    raise _StopForward
                if stateful:
                    # The extra outputs (e.g. a relative position bias) are inputs of the next blocks.
                    out = out if out is not None else original(hidden, *rest, **kwargs)
                    result = (hidden,) + tuple(out[1:])
                elif self._out_tuple_len:
                    result = (hidden,) + (None,) * (self._out_tuple_len - 1)
                else:
                    return hidden
                return list(result) if as_list[0] else result

            return passthrough

        for index, block in enumerate(self.blocks):
            originals[index] = block.forward
            block.forward = make_passthrough(index, block, block.forward)
        device = module_device(self.model.get_input_embeddings())
        try:
            for kwargs in _model_inputs(self.model, input_ids, self.batch_size, device):
                try:
                    self.model(**kwargs)
                except _StopForward:
                    pass
        finally:
            for index, block in enumerate(self.blocks):
                # Remove the instance attribute so the class's forward is used again.
                if "forward" in block.__dict__:
                    del block.forward
        if len(self.hidden) == 0 or any(len(c) != len(self.hidden) for c in self.calls):
            raise RuntimeError(
                "Calibration capture saw the decoder blocks a different number of times than there are "
                "batches; this model calls its blocks in an unusual way. Please report the model type."
            )

    # ------------------------------------------------------------------ residency
    @contextlib.contextmanager
    def onload(self, index: int) -> Iterator[OnloadedBlock]:
        """Block ``index`` with all its weights materialized on its execution device while active.

        Yields an :class:`OnloadedBlock`; call its ``write_back()`` after changing weights so the
        offload storage holds them. A block that is not offloaded is yielded as is (no copies).
        """
        with self.materialize(self.blocks[index], index) as handle:
            yield handle

    @contextlib.contextmanager
    def materialize(self, module: nn.Module, index: int | None = None) -> Iterator[OnloadedBlock]:
        """Like :meth:`onload` for any submodule of the model (embeddings, norms, ...)."""
        handle = OnloadedBlock(module, index, self.write_path)
        try:
            handle._onload()
            yield handle
        finally:
            handle._offload()

    # ------------------------------------------------------------------ running
    @property
    def num_batches(self) -> int:
        return len(self.hidden)

    @contextlib.contextmanager
    def hooks(self, modules: dict[str, nn.Module], stats: dict[str, Any]) -> Iterator[None]:
        """Feed the input of each module in ``modules`` to ``stats[name].add_batch`` while active."""
        handles = []
        for name, module in modules.items():
            acc = stats.get(name)
            if acc is None:
                continue

            def hook(mod, inputs, _acc=acc):
                _acc.add_batch(inputs[0].detach())

            handles.append(module.register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def shared_input_hooks(self, index: int, modules: dict[str, nn.Module], make_stats: Callable[[nn.Module], Any],
                           on_input: Callable[[str, nn.Module, Any], None] | None = None,
                           stop_when_seen: bool = False) -> Iterator[dict[str, Any]]:
        """Accumulate input statistics for ``modules``, once per distinct input tensor.

        Layers that read the same tensor (q/k/v, gate/up) share one accumulator, so statistics
        such as Hessians are computed once. Yields ``{name: stats}``, filled as layers are called.
        ``on_input(name, module, stats)`` is called after a layer's statistics were updated,
        before the layer runs (used to prune a layer just before its first use).
        With ``stop_when_seen`` a statistics-only :meth:`run` ends each block call as soon as every
        module has read its input, before the last one computes (nothing after it is needed).
        """
        module_stats: dict[str, Any] = {}
        seen: dict[tuple, Any] = {}
        called: set[str] = set()
        names = {id(m): n for n, m in modules.items()}

        def reset(_block, _args, _kwargs=None):
            seen.clear()
            called.clear()

        def hook(mod, inputs):
            x = inputs[0]
            name = names[id(mod)]
            # Layers reading the same tensor object share statistics. The tensor is kept
            # referenced in `seen` until the next block call, so its id cannot be reused.
            entry = seen.get(id(x))
            if entry is None:
                acc = module_stats.get(name) or make_stats(mod)
                acc.add_batch(x.detach())
                seen[id(x)] = (x, acc)
            else:
                acc = entry[1]
            module_stats.setdefault(name, acc)
            if on_input is not None:
                on_input(name, mod, module_stats[name])
            called.add(name)
            if stop_when_seen and len(called) == len(names):
                raise _StopForward

        handles = [self.blocks[index].register_forward_pre_hook(reset)]
        handles += [m.register_forward_pre_hook(hook) for m in modules.values()]
        try:
            yield module_stats
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def call_order(self, index: int, modules: dict[str, nn.Module]) -> list[list[str]]:
        """Groups of ``modules`` that read the same input, in the order the block first calls them
        (run on the first calibration batch)."""
        order: list[str] = []
        key_of: dict[str, int] = {}
        alive: list[torch.Tensor] = []  # keeps inputs referenced so their ids stay unique
        names = {id(m): n for n, m in modules.items()}

        def hook(mod, inputs):
            x = inputs[0]
            name = names[id(mod)]
            if name not in key_of:
                order.append(name)
                key_of[name] = id(x)
                alive.append(x)

        handles = [m.register_forward_pre_hook(hook) for m in modules.values()]
        try:
            self.run(index, update=False, batches=[0])
        finally:
            for handle in handles:
                handle.remove()
        alive.clear()
        groups: dict[object, list[str]] = {}
        for name in order:
            groups.setdefault(key_of[name], []).append(name)
        missing = set(modules) - set(order)
        if missing:
            groups["never-called"] = sorted(missing)
        return list(groups.values())

    @torch.no_grad()
    def run(self, index: int, *, update: bool, batches: list[int] | None = None) -> None:
        """Run block ``index`` over the calibration batches (all, or ``batches``).

        With ``update=True`` the stored activations are replaced by the block's outputs, which
        become the inputs of block ``index + 1``. A statistics hook may end a ``update=False``
        call early (``shared_input_hooks(stop_when_seen=True)``).
        """
        if not self.hidden:
            raise RuntimeError("Call capture() before run().")
        block = self.blocks[index]
        device = module_device(block)
        for b in (range(len(self.hidden)) if batches is None else batches):
            self.current_batch = self.batch_ids[b] if self.batch_ids is not None else b
            hidden = self.hidden[b]
            rest, kwargs = self.calls[index][b]
            try:
                out = block(_to(hidden, device), *_to(rest, device), **_to(kwargs, device))
            except _StopForward:
                if update:
                    raise RuntimeError("run(update=True) needs the whole block; a hook stopped it early.") from None
                continue
            if isinstance(out, (tuple, list)):
                out = out[0]
            if update:
                self.hidden[b] = out.to(hidden.device)

    @torch.no_grad()
    def collect(self, ids: torch.Tensor | list[dict] | None, attach: Callable[[nn.Module], tuple] | None = None, *,
                around_block: Callable[[int], Any] | None = None,
                after_block: Callable[[int, list[torch.Tensor]], None] | None = None, update_last: bool = False,
                desc: str = "hfprune calibration", progress: bool = False, release: bool = True) -> Any:
        """One calibration pass over every block in order, each on the previous block's outputs: the
        loop behind every statistics pass (structured channel statistics, expert, channel and depth
        importance, global / OWL budgets); only the pruning loop itself is elsewhere.

        Args:
            ids: the calibration windows, captured first (``None``: use what :meth:`capture` recorded).
            attach: ``model -> (result, remove)``: hooks for the whole pass (e.g.
                :func:`hfprune.structured.attach_channel_stats`), attached after the capture and
                removed at the end; its ``result`` is returned.
            around_block: ``i -> context manager`` entered around running block ``i`` (onload,
                per-block hooks, work to do while the block is onloaded).
            after_block: ``(i, inputs)`` called after block ``i`` ran, with the block's inputs
                (one tensor per batch; ``self.hidden`` holds its outputs).
            update_last: also keep the last block's outputs (the final norm's inputs).
            release: drop the activations at the end (``False``: the caller goes on with them).
        """
        from tqdm.auto import tqdm

        if ids is not None:
            self.capture(ids)
        result, remove = attach(self.model) if attach is not None else (None, None)
        try:
            for i in tqdm(range(len(self)), desc=desc, disable=not progress, unit="block"):
                before = list(self.hidden) if after_block is not None else None
                with around_block(i) if around_block is not None else contextlib.nullcontext():
                    self.run(i, update=update_last or i < len(self) - 1)
                if after_block is not None:
                    after_block(i, before)
        finally:
            if remove is not None:
                remove()
            if release:
                self.release()
        return result

    def start_dense_stream(self) -> None:
        """Keep a second copy of the captured activations that only dense blocks will update
        (:meth:`record_dense_inputs`); call right after :meth:`capture`."""
        self.dense_hidden = [h.clone() for h in self.hidden]

    @torch.no_grad()
    def record_dense_inputs(self, index: int, modules: dict[str, nn.Module], *,
                            own_stream: bool = False) -> dict[str, collections.deque]:
        """Run block ``index``, still dense, and return the input of each module in ``modules``, one
        entry per call, in call order (layers that read the same tensor share it, no copy).

        ``own_stream=False``: over the dense stream (:meth:`start_dense_stream`), which it advances.
        ``own_stream=True``: over the stored (pruned-model) activations, which stay as they are.
        Memory: every distinct layer input of the block for all batches (for a Llama block about 6x its
        hidden states), kept where the stored activations are (``storage_device``, e.g. CPU)."""
        if not own_stream and self.dense_hidden is None:
            raise RuntimeError("Call start_dense_stream() before record_dense_inputs().")
        records: dict[str, collections.deque] = {name: collections.deque() for name in modules}
        names = {id(m): n for n, m in modules.items()}
        store = self.hidden[0].device if self.hidden else None
        last: list = [None, None]  # (input, its stored copy): q/k/v (gate/up) read one tensor, one copy

        def hook(mod, inputs):
            if last[0] is not inputs[0]:
                last[:] = [inputs[0], inputs[0].detach().to(store)]
            records[names[id(mod)]].append(last[1])

        handles = [m.register_forward_pre_hook(hook) for m in modules.values()]
        if not own_stream:
            self.hidden, self.dense_hidden = self.dense_hidden, self.hidden
        try:
            self.run(index, update=not own_stream)
        finally:
            if not own_stream:
                self.hidden, self.dense_hidden = self.dense_hidden, self.hidden
            for handle in handles:
                handle.remove()
        return records

    def release(self) -> None:
        """Drop the stored activations and captured arguments."""
        self.hidden = []
        self.dense_hidden = None
        self.calls = []
