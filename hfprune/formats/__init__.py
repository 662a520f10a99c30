"""Checkpoint formats: the compressed ``hfprune-sparse`` format (importing this package registers
its transformers quantizer, so ``from_pretrained`` reloads such checkpoints as dense models) and
the compressed-tensors ``pack-quantized`` export."""

from hfprune.formats.compressed_tensors import save_compressed_tensors
from hfprune.formats.sparse import (
    FORMAT_NAME,
    HfpruneSparseConfig,
    compress_weight,
    decompress_weight,
    load_sparse,
    register,
    save_sparse,
    sizes_report,
)

__all__ = [
    "save_compressed_tensors",
    "FORMAT_NAME",
    "HfpruneSparseConfig",
    "compress_weight",
    "decompress_weight",
    "load_sparse",
    "register",
    "save_sparse",
    "sizes_report",
]
