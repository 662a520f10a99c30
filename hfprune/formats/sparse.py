"""Compressed sparse checkpoints (``hfprune-sparse``) that reload as ordinary dense models.

Reload mechanism (decision)
---------------------------
Two options were prototyped against transformers 5.24:

1. A transformers quantizer registered with ``register_quantization_config`` /
   ``register_quantizer`` under the method name ``hfprune-sparse``. ``config.json`` carries a
   ``quantization_config`` whose ``quant_method`` is ``hfprune-sparse`` and ``dequantize: true``;
   the quantizer declares the serialized companions of every ``weight`` (``weight_values``,
   ``weight_bitmask`` ...) and a ``dequantize`` load operation. transformers' own loader then
   streams the shards (sharding, device_map, dtype, tied weights all handled by it), calls our
   op once per module to rebuild the dense weight, and, because ``dequantize`` is set, strips
   the quantization config at the end: the result is a plain dense model.
2. A separate ``hfprune.from_pretrained`` that rebuilds a state dict and calls
   ``from_pretrained(None, config=..., state_dict=...)``: it must reimplement sharded loading,
   device maps and low-memory loading, and users have to know to call it.

Option 1 is used: after ``import hfprune.formats`` (``import hfprune`` imports it),
``AutoModelForCausalLM.from_pretrained(dir)`` works unchanged, including from the Hub and with
``device_map``; :func:`load_sparse` is the explicit entry point that registers first.

Without hfprune (the guard)
---------------------------
Stock transformers only warns "Unknown quantization type" for a ``quant_method`` it does not
know, drops the quantization config and initialises every compressed weight at random. So
``config.json`` also carries ``transformers_weights`` set to :data:`LOAD_WITHOUT_HFPRUNE`, a
sentence that names hfprune and how to load the checkpoint. transformers reads that field as the
name of the weights file and raises ``ValueError`` for any name that does not end in
``.safetensors`` / ``.safetensors.index.json``, quoting the name: a load without hfprune fails
with our message instead of returning random weights. The registered quantizer removes the field
from the model's config before transformers resolves the weight files
(:meth:`HfpruneSparseQuantizer.update_attn_implementation`, the first hook that sees the config),
so with hfprune imported the load goes on as usual, and the loaded model's config (like every
config transformers saves) no longer has it.

On-disk layout (one entry per compressed ``<module>.weight``)
-------------------------------------------------------------
``<module>.weight_shape``   int64 ``[rows, cols]``
``<module>.weight_values``  kept values: model dtype, or int8 (``bits=8``), or uint8 holding two
                            int4 nibbles (``bits=4``, value+8, low nibble first)
``<module>.weight_bitmask`` (unstructured) uint8, the row-major ``rows*cols`` kept-mask packed
                            8 per byte, least significant bit first (``numpy.packbits(...,
                            bitorder="little")``); values are the kept weights in row-major order
``<module>.weight_nm_index`` (N:M) uint8, for every group of M inputs the positions (ascending)
                            of its N kept weights, ``ceil(log2 M)`` bits rounded up to 2/4/8,
                            packed least significant first (2:4: 4 indices per byte, i.e. 2 bits
                            per kept value); values are ``[rows, cols*N/M]``
``<module>.weight_nm_code``  (N:M with at most 256 patterns per group, M <= 12; used instead of
                            ``weight_nm_index``) uint8: each group's kept positions as the rank of
                            that combination among the C(M, N) possible ones, ``k`` ranks packed per
                            byte in base C(M, N) with the largest ``k`` such that C(M, N)^k <= 256
                            (2:4: 6 patterns, 3 groups per byte = 2.67 bits per group of 4)
``<module>.weight_scale``   float32 ``[rows, ceil(cols/group)]`` symmetric scales (quantized)
Layers where compression does not pay store ``<module>.weight`` as is (or int values + scale
when quantizing). Embeddings and the output head are never compressed or quantized.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from hfprune.formats.base import safetensors_header, compress_targets, register_format, state_dict_untied, write_config, write_shards
from hfprune.formats.codec import SUFFIXES, compress_weight, decompress_weight
from hfprune.report import PruneReport, zero_counts
from hfprune.solvers.masks import parse_pattern

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "LOAD_WITHOUT_HFPRUNE", "HfpruneSparseConfig", "SparseFormat", "save_sparse", "load_sparse",
           "sizes_report", "register"]

FORMAT_NAME = "hfprune-sparse"
FORMAT_VERSION = 1
LOAD_WITHOUT_HFPRUNE = (
    "hfprune-sparse checkpoint: its Linear weights are stored compressed (kept values + bitmask or N:M index), "
    "which transformers alone cannot decode (it would load random weights). Load it with hfprune: "
    "`pip install hfprune`, then `import hfprune` before `AutoModelForCausalLM.from_pretrained(...)`, "
    "or `hfprune.formats.load_sparse(path)`.")
"""``config.json``'s ``transformers_weights`` in an hfprune-sparse checkpoint: the error a load without hfprune
raises (see the module docstring). It must not end in ``.safetensors``."""
# format="sparse" on a model without a pruning record needs at least this fraction of zeros in its
# decoder Linear weights (below it the bitmask encoding barely pays).
_MIN_SPARSITY_WITHOUT_RECORD = 0.1


# --------------------------------------------------------------------------------------------
# transformers integration
# --------------------------------------------------------------------------------------------


class HfpruneSparseConfig(QuantizationConfigMixin):
    """``quantization_config`` entry of an hfprune-sparse checkpoint (see module docstring)."""

    def __init__(self, format_version: int = FORMAT_VERSION, pattern: str = "unstructured",
                 bits: int | None = None, group_size: int | None = None,
                 compressed_modules: list[str] | None = None, dequantize: bool = True, **kwargs):
        self.quant_method = FORMAT_NAME
        self.format_version = int(format_version)
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses hfprune-sparse format version {self.format_version}, newer than the "
                f"installed hfprune understands ({FORMAT_VERSION}); upgrade hfprune."
            )
        self.pattern = str(pattern)
        self.bits = bits
        self.group_size = group_size
        self.compressed_modules = list(compressed_modules or [])
        # Always decompress to a dense model on load.
        self.dequantize = True
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)


class _SparseDecompress(ConversionOps):
    """Load op: rebuild one module's dense ``weight`` from its serialized companions."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo):
        # transformers deep-copies the WeightConverter holding this op once per checkpoint key; the op
        # is stateless, so the copy shares the quantizer (copying it cost ~6 ms a key, most of the load).
        return type(self)(self.hf_quantizer)

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None,
                model=None, **kwargs):
        tensors = {}
        for key, value in input_dict.items():
            name = key.rpartition(".")[2] if "." in key else key
            tensors[name] = value[0] if isinstance(value, list) else value
        dtype = None
        if model is not None and full_layer_name is not None:
            try:
                dtype = model.get_parameter(full_layer_name).dtype
            except AttributeError:
                dtype = None
        if any(t.device.type == "cpu" for t in tensors.values()):
            self.hf_quantizer.one_thread()
        cfg = self.hf_quantizer.quantization_config
        dense = decompress_weight(tensors, pattern=cfg.pattern, dtype=dtype, group_size=cfg.group_size)
        return {full_layer_name if full_layer_name is not None else "weight": dense}

    @property
    def reverse_op(self):
        from transformers.core_model_loading import _IdentityOp

        return _IdentityOp()


class HfpruneSparseQuantizer(HfQuantizer):
    """Decompress-on-load quantizer: the loaded model is dense and carries no quantization config."""

    requires_calibration = True
    serialized_names = {"weight": ["weight", *SUFFIXES]}

    def get_load_operations(self):
        return {"dequantize": _SparseDecompress}

    _threads: int | None = None

    def one_thread(self) -> None:
        """From the first weight decoded on CPU to the end of the load, torch runs on one intra-op thread:
        every decoding op is a memory-bound pass over a slice that fits in cache, and on a machine whose
        cores are busy each parallel region waits for a descheduled thread (SmolLM2 on 2 busy cores:
        5-15 s with 2 threads, 0.5-0.8 s with one). The count is restored once, after the load
        (:func:`load_sparse` also restores it when the load fails)."""
        if self._threads is None and torch.get_num_threads() != 1:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(1)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None
        return model

    def update_attn_implementation(self, config):
        """Drop the guard of :data:`LOAD_WITHOUT_HFPRUNE` from the config being loaded: hfprune decodes the
        weights, so transformers may resolve the shards as usual (and the loaded model's config does not keep it)."""
        if getattr(config, "transformers_weights", None) == LOAD_WITHOUT_HFPRUNE:
            delattr(config, "transformers_weights")
        return super().update_attn_implementation(config)

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register the ``hfprune-sparse`` quantizer with transformers (idempotent)."""
    from transformers.quantizers import auto

    if FORMAT_NAME not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(FORMAT_NAME)(HfpruneSparseConfig)
    if FORMAT_NAME not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(FORMAT_NAME)(HfpruneSparseQuantizer)


register()


# --------------------------------------------------------------------------------------------

@torch.no_grad()
def save_sparse(model, save_directory, *, pattern: str | None = None, bits: int | None = None,
                group_size: int | None = None, max_shard_size: int | str = "5GB",
                grids: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Save ``model`` in the compressed hfprune-sparse format.

    Args:
        model: a transformers ``PreTrainedModel`` whose pruned weights are exact zeros.
        save_directory: directory to write into (created if missing).
        pattern: ``"2:4"``/``"N:M"`` or ``"unstructured"``; default: the pattern of the model's pruning record
            (``config.pruning_config``), else unstructured. N:M layers that do not satisfy the pattern fall back to the bitmask.
        bits: ``None`` (values kept exactly), ``8`` or ``4`` (symmetric int with float32 scales;
            values already on such a grid are stored exactly).
        group_size: quantization group along the input dimension; ``None`` = one scale per row.
        max_shard_size: shard size limit (``"5GB"``, ``"200MB"``, bytes).
        grids: ``{weight name: [rows, groups] scales}`` of the grid each weight was quantized on
            (:meth:`hfprune.report.PruneReport.scales_for`); the integers are then stored on it.

    Returns:
        ``{"files": [...], "encodings": {module_weight: "nm"|"bitmask"|"dense"|"quant"|"raw"}}``.
    """
    if bits not in (None, 4, 8):
        raise ValueError(f"bits must be None, 4 or 8, got {bits!r}.")
    if group_size is not None and (bits is None or group_size < 1):
        raise ValueError("group_size needs bits=4 or bits=8 and must be a positive integer.")
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    record = PruneReport.from_model(model)
    pat = parse_pattern(pattern or (record.pattern if record is not None else "unstructured"))
    targets = compress_targets(model)

    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, str] = {}
    encodings: dict[str, str] = {}
    for name, tensor in state_dict_untied(model).items():
        if name not in targets:
            tensors[name] = tensor.detach()
            continue
        prefix = name[: -len("weight")]
        enc = compress_weight(tensor, pattern=pat if pat.is_nm else None, bits=bits, group_size=group_size,
                              grid=(grids or {}).get(name))
        kinds = [k for k, key in (("raw", "weight"), ("nm", "weight_nm_index"), ("nm", "weight_nm_code"),
                                  ("bitmask", "weight_bitmask")) if key in enc]
        encodings[name] = kinds[0] if kinds else "quant"
        for key, value in enc.items():
            tensors[prefix + key] = value
            groups[prefix + key] = prefix
        if pat.is_nm and encodings[name] == "bitmask":
            logger.info("%s does not satisfy %s; stored with a bitmask", name, pat)

    files = write_shards(tensors, save_directory, max_shard_size, groups)
    qcfg = HfpruneSparseConfig(pattern=str(pat), bits=bits, group_size=group_size,
                               compressed_modules=sorted(n for n, e in encodings.items() if e != "raw"))
    write_config(model, save_directory, qcfg.to_dict(), transformers_weights=LOAD_WITHOUT_HFPRUNE)
    logger.info("Saved %s checkpoint to %s (%d files)", FORMAT_NAME, save_directory, len(files))
    return {"files": files, "encodings": encodings}


class SparseFormat:
    """``format="sparse"``: kept values + bitmask / N:M codes, optionally int8/int4; reloads dense."""

    def validate(self, model, bits, group_size, record) -> None:
        if group_size is not None and bits is None:
            raise ValueError("group_size needs bits=4 or bits=8 (it is the quantization group); pass bits or drop "
                             "group_size.")
        if record is None:
            targets = compress_targets(model)
            sparsity = zero_counts((n, p) for n, p in model.named_parameters() if n in targets)["sparsity"]
            if sparsity < _MIN_SPARSITY_WITHOUT_RECORD:
                raise ValueError(
                    f"format='sparse' needs a pruned model, but this one has no config.pruning_config and only "
                    f"{100 * sparsity:.1f}% zeros in its decoder Linear weights: prune it first (hfprune.prune(...)) "
                    f"or save it with format='dense'.")

    def save(self, model, directory, *, record, bits, group_size, max_shard_size) -> None:
        save_sparse(model, directory, pattern=record.pattern if record is not None else None, bits=bits,
                    group_size=group_size, max_shard_size=max_shard_size,
                    grids=record.scales_for(bits, group_size) if record is not None else None)


register_format("sparse", SparseFormat(), aliases=("hfprune-sparse",))


def load_sparse(save_directory, **kwargs):
    """Load an hfprune-sparse (or ordinary) checkpoint as a dense ``AutoModelForCausalLM``.

    Keyword arguments go to ``from_pretrained`` (``dtype``, ``device_map``, ``revision`` ...).
    """
    from transformers import AutoModelForCausalLM

    register()
    threads = torch.get_num_threads()
    try:
        return AutoModelForCausalLM.from_pretrained(save_directory, **kwargs)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------

def sizes_report(save_directory) -> dict[str, Any]:
    """Bytes on disk of a saved checkpoint directory.

    Returns ``{"total_bytes", "weights_bytes" (all .safetensors), "files": {name: bytes},
    "by_kind": {"values", "bitmask", "nm_index", "nm_code", "scale", "shape", "dense"}: tensor bytes}``.
    """
    root = Path(save_directory)
    files = {}
    by_kind = {"values": 0, "bitmask": 0, "nm_index": 0, "nm_code": 0, "scale": 0, "shape": 0, "dense": 0}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        files[rel] = path.stat().st_size
        if path.suffix == ".safetensors":
            for name, info in safetensors_header(path).items():
                if name == "__metadata__":
                    continue
                nbytes = info["data_offsets"][1] - info["data_offsets"][0]
                suffix = name.rpartition(".")[2]
                kind = suffix[len("weight_"):] if suffix in SUFFIXES else "dense"
                by_kind[kind] += nbytes
    weights = sum(v for k, v in files.items() if k.endswith(".safetensors"))
    return {"total_bytes": sum(files.values()), "weights_bytes": weights, "files": files, "by_kind": by_kind}
