"""Checkpoint formats behind one protocol (:mod:`hfprune.formats.base`), one file each: ``dense``,
``sparse`` (the compressed ``hfprune-sparse`` format; its codec is :mod:`hfprune.formats.codec`;
importing it registers its transformers quantizer, so ``from_pretrained`` reloads such checkpoints
as dense models) and ``compressed-tensors`` (``pack-quantized`` export)."""

from hfprune.formats.base import FORMATS, Format, get_format, register_format
from hfprune.formats import dense  # noqa: F401  (registers "dense")
from hfprune.formats.sparse import FORMAT_NAME, HfpruneSparseConfig, load_sparse, register, save_sparse, sizes_report
from hfprune.formats.compressed_tensors import save_compressed_tensors
from hfprune.formats.codec import compress_weight, decompress_weight

__all__ = ["FORMATS", "Format", "get_format", "register_format", "save_compressed_tensors", "FORMAT_NAME",
           "HfpruneSparseConfig", "compress_weight", "decompress_weight", "load_sparse", "register", "save_sparse",
           "sizes_report"]
