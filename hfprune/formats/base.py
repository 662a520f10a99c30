"""The checkpoint-format protocol and registry, and the helpers every format shares.

A format is one file in ``hfprune/formats/`` with an object that has ``validate(model, bits,
group_size, record)`` (raise before anything is written) and ``save(model, directory, *, record,
bits, group_size, max_shard_size)``, registered with :func:`register_format`; ``hfprune.save_pretrained``,
the CLI's ``--format`` choices and streaming all look formats up in :data:`~hfprune.registry.FORMATS`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from hfprune.registry import FORMATS

logger = logging.getLogger(__name__)

__all__ = ["Format", "FORMATS", "register_format", "get_format", "compress_targets", "state_dict_untied",
           "write_shards", "write_config"]

_ALIASES: dict[str, str] = {}


class Format(Protocol):
    def validate(self, model, bits: int | None, group_size: int | None, record) -> None: ...

    def save(self, model, directory: Path, *, record, bits: int | None, group_size: int | None,
             max_shard_size: int | str) -> None: ...


def register_format(name: str, fmt: Format, *, aliases: tuple[str, ...] = (), overwrite: bool = False) -> Format:
    """Make ``fmt`` available as ``save_pretrained(..., format=name)`` and ``--format name``."""
    FORMATS.register(name, fmt, overwrite=overwrite)
    _ALIASES.update({a: name for a in aliases})
    return fmt


def get_format(name: str) -> tuple[str, Format]:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key if key in FORMATS else key.replace("_", "-"))
    if key not in FORMATS:
        raise ValueError(f"Unknown format {name!r}: use one of {', '.join(repr(f) for f in FORMATS)}.")
    return key, FORMATS[key]


def compress_targets(model) -> set[str]:
    """Names of the Linear weights that may be compressed/quantized (output head excluded)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not out_emb and module.weight.dim() == 2:
            names.add(f"{name}.weight" if name else "weight")
    return names


def state_dict_untied(model) -> dict[str, torch.Tensor]:
    seen = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            continue  # tied to an earlier tensor (e.g. lm_head -> embed_tokens)
        seen.add(key)
        out[name] = tensor
    return out


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = _SIZE_RE.match(str(size))
    if not match:
        raise ValueError(f"Cannot parse max_shard_size {size!r}; use e.g. '5GB', '500MB' or a byte count.")
    unit = (match.group(2) or "B").upper()
    return int(float(match.group(1)) * _UNITS[unit])


def write_shards(tensors: dict[str, torch.Tensor], save_directory: Path, max_shard_size: int | str,
                 groups: dict[str, str]) -> list[str]:
    """Write ``tensors`` as safetensors shards; tensors with the same ``groups`` value stay
    together. Returns the file names written."""
    limit = _parse_size(max_shard_size)
    blocks: dict[str, list[str]] = {}
    for name in tensors:
        blocks.setdefault(groups.get(name, name), []).append(name)
    shards: list[list[str]] = [[]]
    current = 0
    for names in blocks.values():
        size = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
        if shards[-1] and current + size > limit:
            shards.append([])
            current = 0
        shards[-1].extend(names)
        current += size
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for fname, names in zip(files, shards):
        save_file({k: tensors[k].contiguous().cpu() for k in names}, str(save_directory / fname),
                  metadata={"format": "pt"})
    if n > 1:
        weight_map = {k: fname for fname, names in zip(files, shards) for k in names}
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (save_directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": ...}``."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n))


def write_config(model, directory: Path, quantization_config: dict[str, Any], **fields: Any) -> None:
    """``config.json`` with ``quantization_config`` (the pruning record travels in it) and ``fields``, and the
    generation config. Like transformers' own ``save_pretrained``, it leaves out ``_name_or_path`` (where the
    model was loaded from: a local path is the user's, not the checkpoint's) and ``transformers_weights``."""
    config_dict = model.config.to_dict()
    for key in ("_name_or_path", "transformers_weights"):
        config_dict.pop(key, None)
    config_dict["quantization_config"] = quantization_config
    config_dict.update(fields)
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(directory)
        except Exception as exc:  # generation config is optional
            logger.warning("Could not save generation_config.json: %s", exc)
