"""Export to the compressed-tensors ``pack-quantized`` format (what vLLM and llm-compressor read).

Written by hand, without the ``compressed-tensors`` package, following its layout:

* every quantized Linear ``<m>`` stores ``<m>.weight_packed`` (int32, ``[rows, ceil(cols*bits/32)]``:
  each signed value plus ``2**(bits-1)`` packed least significant bits first, 8 int4 / 4 int8 per
  word), ``<m>.weight_scale`` (model dtype, ``[rows, cols/group_size]`` or ``[rows, 1]`` per
  channel) and ``<m>.weight_shape`` (int64 ``[rows, cols]``); symmetric, so no zero point;
  dequantized weight = ``q * scale``;
* ``config.json`` gets ``quantization_config`` with ``quant_method: compressed-tensors``,
  ``format: pack-quantized``, ``quantization_status: compressed``, one config group targeting
  ``Linear`` and ``ignore: ["lm_head"]`` (the output head is left unquantized).

The weights stay dense (pruned zeros are stored as quantized zeros): compressed-tensors has no
sparse + int4 packed layout that vLLM reads for arbitrary sparsity. ``pruning_config`` is kept.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hfprune.formats.base import compress_targets, register_format, state_dict_untied, write_config, write_shards
from hfprune.solvers.quant import grid_for, quantize

logger = logging.getLogger(__name__)

__all__ = ["save_compressed_tensors", "pack_int32", "unpack_int32"]

CT_FORMAT_VERSION = "0.19.0"


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit ints ``[rows, cols]`` into int32 words (bits must divide 32)."""
    if 32 % bits:
        raise ValueError(f"pack_int32 supports bits dividing 32 (4 or 8), got {bits}.")
    per_word = 32 // bits
    rows, cols = q.shape
    u = (q.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    pad = (-cols) % per_word
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.view(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (u << shifts).sum(-1)                    # < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32` (returns int32 signed values ``[rows, cols]``)."""
    per_word = 32 // bits
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    u = (w[..., None] >> shifts) & ((1 << bits) - 1)
    return (u.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int32)


@torch.no_grad()
def save_compressed_tensors(model, save_directory, *, bits: int = 4, group_size: int | None = 128,
                            max_shard_size: int | str = "5GB", grids: dict[str, torch.Tensor] | None = None) -> dict:
    """Write ``model`` as a compressed-tensors ``pack-quantized`` checkpoint (W4A16/W8A16).

    ``group_size=None`` uses one scale per output channel. ``grids``: ``{weight name: scales}`` of
    the grid a pruning method quantized each weight on (:meth:`hfprune.report.PruneReport.scales_for`). A Linear whose input width is not a
    multiple of ``group_size`` raises (one config group covers all Linears). Returns ``{"files": [...], "quantized": [module names]}``.
    """
    if bits not in (4, 8):
        raise ValueError(f"compressed-tensors pack-quantized export supports bits=4 or 8, got {bits!r}.")
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    targets = compress_targets(model)
    tensors, groups, quantized = {}, {}, []
    for name, tensor in state_dict_untied(model).items():
        if name not in targets:
            tensors[name] = tensor.detach()
            continue
        rows, cols = tensor.shape
        if group_size is not None and cols % group_size:
            raise ValueError(
                f"{name} has {cols} inputs, not a multiple of group_size={group_size}; "
                f"use a group_size that divides every Linear input width, or group_size=None (per channel)."
            )
        q, scale, _ = quantize(tensor, bits, group_size, grid=grid_for((grids or {}).get(name), tensor, group_size))
        prefix = name[: -len("weight")]
        scale_dtype = tensor.dtype if tensor.dtype in (torch.float16, torch.bfloat16) else torch.float32
        tensors[prefix + "weight_packed"] = pack_int32(q, bits)
        tensors[prefix + "weight_scale"] = scale.to(scale_dtype)
        tensors[prefix + "weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        for key in ("weight_packed", "weight_scale", "weight_shape"):
            groups[prefix + key] = prefix
        quantized.append(prefix[:-1])
    files = write_shards(tensors, save_directory, max_shard_size, groups)

    weights = {
        "num_bits": bits, "type": "int", "symmetric": True,
        "strategy": "group" if group_size else "channel", "group_size": group_size,
        "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
        "observer_kwargs": {},
    }
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    ignore = [n for n, m in model.named_modules() if m is out_emb and n] or ["lm_head"]
    qcfg = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "version": CT_FORMAT_VERSION,
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                        "output_activations": None, "format": "pack-quantized"},
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
    write_config(model, save_directory, qcfg)
    logger.info("Saved compressed-tensors pack-quantized (int%d) checkpoint to %s", bits, save_directory)
    return {"files": files, "quantized": quantized}


class CompressedTensorsFormat:
    """``format="compressed-tensors"``: ``pack-quantized`` int4/int8 (vLLM); needs ``bits``."""

    def validate(self, model, bits, group_size, record) -> None:
        if bits is None:
            raise ValueError("format='compressed-tensors' writes quantized weights: pass bits=4 or bits=8.")
        targets = compress_targets(model)
        for name, param in model.named_parameters():
            if group_size is not None and name in targets and param.shape[1] % group_size:
                raise ValueError(
                    f"{name} has {param.shape[1]} inputs, not a multiple of group_size={group_size}: choose a "
                    f"group_size that divides every Linear input width, or group_size=None (one scale per channel).")

    def save(self, model, directory, *, record, bits, group_size, max_shard_size) -> None:
        save_compressed_tensors(model, directory, bits=bits, group_size=group_size, max_shard_size=max_shard_size,
                                grids=record.scales_for(bits, group_size) if record is not None else None)


register_format("compressed-tensors", CompressedTensorsFormat(), aliases=("ct",))
