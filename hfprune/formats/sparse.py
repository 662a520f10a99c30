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
``device_map``; :func:`load_sparse` is the explicit entry point that registers first. Without
the import, transformers only warns "Unknown quantization type" and the compressed weights are
reported as missing, so always load such checkpoints with hfprune imported.

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

import itertools
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hfprune.solvers.masks import check_nm, parse_pattern

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HfpruneSparseConfig",
    "save_sparse",
    "load_sparse",
    "sizes_report",
    "register",
    "compress_weight",
    "decompress_weight",
]

FORMAT_NAME = "hfprune-sparse"
FORMAT_VERSION = 1

_SUFFIXES = ("weight_values", "weight_bitmask", "weight_nm_index", "weight_nm_code", "weight_scale", "weight_shape")
# Only compress when the compressed form is below this fraction of the dense bytes.
_MIN_GAIN = 0.9


# --------------------------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------------------------

def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat tensor of small non-negative ints (< 2**bits) into uint8, LSB first."""
    per_byte = 8 // bits
    flat = values.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    flat = flat.view(-1, per_byte)
    out = torch.zeros(flat.shape[0], dtype=torch.uint8, device=flat.device)
    for i in range(per_byte):
        out |= flat[:, i] << (i * bits)
    return out


def _unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    per_byte = 8 // bits
    p = packed.reshape(-1).to(torch.uint8)
    mask = (1 << bits) - 1
    parts = [(p >> (i * bits)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=1).reshape(-1)[:count]


def _nm_code_layout(n: int, m: int) -> tuple[torch.Tensor, int] | None:
    """``(combinations [C, n] in lexicographic order, codes per byte)`` for the N:M code, or
    ``None`` when the combinatorial code does not apply (more than 256 patterns or M > 12)."""
    count = math.comb(m, n)
    if m > 12 or count > 256:
        return None
    per_byte = 1
    while count ** (per_byte + 1) <= 256:
        per_byte += 1
    combos = torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.long)
    return combos, per_byte


def _encode_nm_code(order: torch.Tensor, m: int, combos: torch.Tensor, per_byte: int) -> torch.Tensor:
    """Pack the ascending kept positions ``order`` ([..., n]) of every group as combination ranks."""
    weights = (1 << torch.arange(m, dtype=torch.long))
    lookup = torch.zeros(1 << m, dtype=torch.long)
    lookup[(weights[combos]).sum(-1)] = torch.arange(combos.shape[0])
    codes = lookup[(weights.to(order.device)[order]).sum(-1).reshape(-1).cpu()]
    pad = (-codes.numel()) % per_byte
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    codes = codes.view(-1, per_byte)
    base = combos.shape[0] ** torch.arange(per_byte, dtype=torch.long)
    return (codes * base).sum(-1).to(torch.uint8).to(order.device)


def _decode_nm_code(packed: torch.Tensor, groups: int, combos: torch.Tensor, per_byte: int) -> torch.Tensor:
    """Inverse of :func:`_encode_nm_code`: ``[groups, n]`` kept positions."""
    count = combos.shape[0]
    p = packed.reshape(-1).long().cpu()
    base = count ** torch.arange(per_byte, dtype=torch.long)
    codes = ((p[:, None] // base) % count).reshape(-1)[:groups]
    return combos[codes].to(packed.device)


def _index_bits(m: int) -> int:
    need = max(1, math.ceil(math.log2(m)))
    for b in (2, 4, 8):
        if need <= b:
            return b
    raise ValueError(f"N:M index for M={m} does not fit in 8 bits; use M <= 256.")


# --------------------------------------------------------------------------------------------
# quantization of kept values
# --------------------------------------------------------------------------------------------

def _group_view(w: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    rows, cols = w.shape
    pad = (-cols) % group
    wf = w.float()
    if pad:
        wf = torch.cat([wf, wf.new_zeros(rows, pad)], dim=1)
    return wf.view(rows, -1, group), pad


def _quantize(w: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Symmetric quantization of a dense ``[rows, cols]`` weight.

    Returns ``(q int32 [rows, cols], scale float32 [rows, groups], exact_groups)``. Groups whose
    values already lie on a symmetric grid that fits ``bits`` are stored exactly (the scale is
    chosen so that ``(q * scale).to(dtype) == w``); the rest use round-to-nearest with
    ``scale = absmax / (2**(bits-1) - 1)``.
    """
    rows, cols = w.shape
    group = group_size or cols
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g, pad = _group_view(w, group)                        # [rows, G, group] float32
    absmax = g.abs().amax(-1)                             # [rows, G]
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    target = w.dtype

    def roundtrip_ok(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.round(g / scale[..., None])
        fits = ((q >= qmin) & (q <= qmax)).all(-1)
        back = (q * scale[..., None]).to(target).float()
        return q, fits & (back == g).all(-1)

    scale = safe / qmax
    q, done = roundtrip_ok(scale)
    # Grid detection for groups that RTN with absmax->qmax does not reproduce exactly: a group
    # with at most 2**bits distinct values may come from a grid whose absmax sits on a lower level.
    todo = ~done & (absmax > 0)
    if bool(todo.any()):
        # On a grid every magnitude is a multiple of the step, so the smallest gap between sorted
        # magnitudes (0 included) is the step or a small multiple of it: absmax / gap gives the
        # level k of the absmax (or a divisor of it). Random weights give a huge k and are skipped.
        mags = torch.sort(torch.cat([g.abs(), g.new_zeros(g.shape[:-1] + (1,))], dim=-1), dim=-1).values
        gaps = mags[..., 1:] - mags[..., :-1]
        # Necessary condition (cheap, exact): on a grid the magnitudes are |q| * step with
        # |q| <= qmax + 1, so a group has at most qmax + 2 distinct magnitudes (0 included).
        # Skipping the rest keeps real (off-grid) weights from running the costly fit below.
        todo &= (gaps > 0).sum(-1) + 1 <= qmax + 2
        tol = absmax[..., None] * 2.0 ** -(_MANTISSA.get(target, 23) - 1)
        min_gap = torch.where(gaps > tol, gaps, torch.full_like(gaps, float("inf"))).amin(-1)
        k0 = torch.round(absmax / min_gap)
        g64 = lo_gap = hi_gap = None
        for mult in (1, 2, 3, 4):
            k = k0 * mult
            todo_k = todo & (k >= 1) & (k <= qmax + 1)
            if not bool(todo_k.any()):
                continue
            if g64 is None:
                g64 = g.double()
                lo_gap, hi_gap = _rounding_gaps(g64, target)
            guess = safe.double() / torch.where(todo_k, k, torch.ones_like(k)).double()
            fit = _fit_scale(g64, torch.round(g64 / guess[..., None]), lo_gap, hi_gap, guess).float()
            ok = torch.zeros_like(todo)
            qk, fit_ok = q, fit
            for step in (0, 1, -1, 2, -2):
                cand = fit
                for _ in range(abs(step)):
                    cand = torch.nextafter(cand, torch.full_like(cand, float("inf") if step > 0 else 0.0))
                q_c, ok_c = roundtrip_ok(cand)
                new = ok_c & ~ok
                qk = torch.where(new[..., None], q_c, qk)
                fit_ok = torch.where(new, cand, fit_ok)
                ok |= ok_c
            ok &= todo_k
            if bool(ok.any()):
                scale = torch.where(ok, fit_ok, scale)
                q = torch.where(ok[..., None], qk, q)
                done |= ok
                todo &= ~ok
    zero_groups = absmax == 0
    done |= zero_groups
    q = q.clamp(qmin, qmax).reshape(rows, -1)[:, :cols].to(torch.int32)
    return q, scale.contiguous(), int(done.sum())


_MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7, torch.float64: 52}


def _rounding_gaps(g: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the distance from each value to its lower/upper neighbour in ``dtype`` (float32)."""
    bits = _MANTISSA.get(dtype, 23)
    mant, exp = torch.frexp(g)
    ulp = torch.ldexp(torch.ones_like(g), exp - 1 - bits)
    at_power = mant.abs() == 0.5
    below = torch.where(at_power, ulp / 4, ulp / 2)
    # toward zero the gap is the one below the magnitude
    lo = torch.where(g > 0, below, ulp / 2)
    hi = torch.where(g > 0, ulp / 2, below)
    return lo * 0.999, hi * 0.999


def _fit_scale(g: torch.Tensor, q: torch.Tensor, lo_gap: torch.Tensor, hi_gap: torch.Tensor,
               fallback: torch.Tensor) -> torch.Tensor:
    """Per group, the middle of the scales ``s`` for which every ``q*s`` rounds back to ``g``
    (each value constrains ``s`` to ``[g-lo, g+hi]/q``); ``fallback`` where that set is empty."""
    nz = q != 0
    qs = torch.where(nz, q, torch.ones_like(q))
    a = (g - lo_gap) / qs
    b = (g + hi_gap) / qs
    s_lo = torch.where(nz, torch.minimum(a, b), torch.full_like(a, -float("inf"))).amax(-1)
    s_hi = torch.where(nz, torch.maximum(a, b), torch.full_like(a, float("inf"))).amin(-1)
    ok = (s_lo <= s_hi) & torch.isfinite(s_lo) & torch.isfinite(s_hi) & (s_lo > 0)
    return torch.where(ok, (s_lo + s_hi) / 2, fallback)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, cols_idx: torch.Tensor | None, rows_idx: torch.Tensor | None,
                shape: tuple[int, int], group_size: int | None = None) -> torch.Tensor:
    """float32 values ``q * scale`` for entries at (rows_idx, cols_idx), or a full matrix.

    ``group_size`` (the checkpoint's ``quantization_config.group_size``) is needed when it does not
    divide ``cols`` (the last group is padded): ``ceil(cols / groups)`` is then not the group size.
    """
    rows, cols = shape
    groups = scale.shape[1]
    group = group_size if group_size and math.ceil(cols / group_size) == groups else math.ceil(cols / groups)
    if rows_idx is None:
        gidx = torch.arange(cols, device=q.device) // group
        return q.float() * scale[:, gidx]
    return q.float() * scale[rows_idx, cols_idx // group]


def _store_q(q: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return q.to(torch.int8)
    return _pack((q + 8).to(torch.uint8), 4)


def _load_q(stored: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    if stored.dtype == torch.int8:
        return stored.reshape(-1)[:count].to(torch.int32)
    return _unpack(stored, 4, count).to(torch.int32) - 8


# --------------------------------------------------------------------------------------------
# one weight
# --------------------------------------------------------------------------------------------

def compress_weight(w: torch.Tensor, *, pattern=None, bits: int | None = None,
                    group_size: int | None = None, force: bool = False) -> dict[str, torch.Tensor]:
    """Encode one 2-D weight. Returns the tensors to store under ``<module>.<key>`` (keys are
    ``weight`` for a weight kept as is, else some of ``weight_values``/``weight_bitmask``/
    ``weight_nm_index``/``weight_scale``/``weight_shape``)."""
    if bits not in (None, 4, 8):
        raise ValueError(f"bits must be None, 4 or 8, got {bits!r}.")
    w = w.detach().contiguous()
    rows, cols = w.shape
    pat = parse_pattern(pattern) if pattern is not None else None
    dbits = w.element_size() * 8
    vbits = bits or dbits
    nonzero = w != 0
    nnz = int(nonzero.sum())
    numel = w.numel()
    out: dict[str, torch.Tensor] = {"weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}

    if bits is not None:
        q, scale, _ = _quantize(w, bits, group_size)
        out["weight_scale"] = scale

    # N:M
    if pat is not None and pat.is_nm and cols % pat.m == 0 and check_nm(w, pat.n, pat.m):
        n, m = pat.n, pat.m
        ib = _index_bits(m)
        groups = nonzero.view(rows, cols // m, m)
        # positions of N entries per group: non-zeros first (stable), then sorted ascending
        order = torch.sort((~groups).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
        order = torch.sort(order, dim=-1).values                      # [rows, G, n]
        cols_idx = (order + torch.arange(0, cols, m, device=w.device).view(1, -1, 1)).reshape(rows, -1)
        src = q if bits is not None else w
        vals = torch.gather(src, 1, cols_idx)
        layout = _nm_code_layout(n, m)
        if layout is not None:
            out["weight_nm_code"] = _encode_nm_code(order, m, *layout)
        else:
            out["weight_nm_index"] = _pack(order.reshape(-1), ib)
        out["weight_values"] = _store_q(vals, bits) if bits is not None else vals.contiguous()
        return out

    # unstructured bitmask
    bitmask_bits = numel + nnz * vbits
    if force or bitmask_bits < _MIN_GAIN * numel * vbits:
        out["weight_bitmask"] = _pack(nonzero.reshape(-1), 1)
        src = q if bits is not None else w
        vals = src.reshape(-1)[nonzero.reshape(-1)]
        out["weight_values"] = _store_q(vals, bits) if bits is not None else vals.contiguous()
        return out

    if bits is not None:
        out["weight_values"] = _store_q(q.reshape(-1), bits)
        return out
    return {"weight": w}


def decompress_weight(tensors: dict[str, torch.Tensor], *, pattern=None, bits: int | None = None,
                      dtype: torch.dtype | None = None, group_size: int | None = None) -> torch.Tensor:
    """Inverse of :func:`compress_weight`."""
    if "weight_values" not in tensors:
        w = tensors["weight"]
        return w if dtype is None else w.to(dtype)
    rows, cols = (int(x) for x in tensors["weight_shape"].tolist())
    vals = tensors["weight_values"]
    scale = tensors.get("weight_scale")
    quant = scale is not None
    if quant:
        bits = 8 if vals.dtype == torch.int8 else 4
    out_dtype = dtype or (torch.float32 if quant else vals.dtype)
    dev = vals.device

    if "weight_nm_index" in tensors or "weight_nm_code" in tensors:
        pat = parse_pattern(pattern)
        n, m = pat.n, pat.m
        kept = rows * cols // m * n
        if "weight_nm_code" in tensors:
            layout = _nm_code_layout(n, m)
            if layout is None:
                raise ValueError(f"weight_nm_code cannot encode pattern {pat}: the checkpoint is inconsistent.")
            idx = _decode_nm_code(tensors["weight_nm_code"], rows * cols // m, *layout).view(rows, cols // m, n)
        else:
            idx = _unpack(tensors["weight_nm_index"], _index_bits(m), kept).long().view(rows, cols // m, n)
        cols_idx = (idx + torch.arange(0, cols, m, device=dev).view(1, -1, 1)).reshape(rows, -1)
        if quant:
            q = _load_q(vals, bits, kept).view(rows, -1)
            rows_idx = torch.arange(rows, device=dev)[:, None].expand_as(cols_idx)
            v = _dequantize(q, scale, cols_idx, rows_idx, (rows, cols), group_size).to(out_dtype)
        else:
            v = vals.view(rows, -1).to(out_dtype)
        dense = torch.zeros(rows, cols, dtype=out_dtype, device=dev)
        dense.scatter_(1, cols_idx, v)
        return dense

    if "weight_bitmask" in tensors:
        mask = _unpack(tensors["weight_bitmask"], 1, rows * cols).bool()
        count = int(mask.sum())
        dense = torch.zeros(rows * cols, dtype=out_dtype, device=dev)
        if quant:
            pos = mask.nonzero().squeeze(1)
            q = _load_q(vals, bits, count)
            v = _dequantize(q, scale, pos % cols, pos // cols, (rows, cols), group_size)
        else:
            v = vals.reshape(-1)[:count]
        dense[mask] = v.to(out_dtype)
        return dense.view(rows, cols)

    # dense quantized
    q = _load_q(vals, bits, rows * cols).view(rows, cols)
    return _dequantize(q, scale, None, None, (rows, cols), group_size).to(out_dtype)


# --------------------------------------------------------------------------------------------
# transformers integration
# --------------------------------------------------------------------------------------------

from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402
from transformers.quantizers.base import HfQuantizer  # noqa: E402
from transformers.core_model_loading import ConversionOps  # noqa: E402


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
    serialized_names = {"weight": ["weight", *_SUFFIXES]}

    def get_load_operations(self):
        return {"dequantize": _SparseDecompress}

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
# saving
# --------------------------------------------------------------------------------------------

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


def _compress_targets(model) -> set[str]:
    """Names of the Linear weights that may be compressed/quantized (output head excluded)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not out_emb and module.weight.dim() == 2:
            names.add(f"{name}.weight" if name else "weight")
    return names


def _state_dict_untied(model) -> dict[str, torch.Tensor]:
    seen = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            continue  # tied to an earlier tensor (e.g. lm_head -> embed_tokens)
        seen.add(key)
        out[name] = tensor
    return out


def _write_shards(tensors: dict[str, torch.Tensor], save_directory: Path, max_shard_size: int | str,
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
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    files = []
    if len(shards) == 1:
        fname = "model.safetensors"
        save_file({n: tensors[n].contiguous().cpu() for n in shards[0]}, str(save_directory / fname),
                  metadata={"format": "pt"})
        return [fname]
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous().cpu() for n in names}, str(save_directory / fname),
                  metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        files.append(fname)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (save_directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def _pattern_from_model(model) -> str | None:
    pc = getattr(model.config, "pruning_config", None)
    if isinstance(pc, dict) and pc.get("pattern"):
        return str(pc["pattern"])
    return None


@torch.no_grad()
def save_sparse(model, save_directory, *, pattern: str | None = None, bits: int | None = None,
                group_size: int | None = None, max_shard_size: int | str = "5GB") -> dict[str, Any]:
    """Save ``model`` in the compressed hfprune-sparse format.

    Args:
        model: a transformers ``PreTrainedModel`` whose pruned weights are exact zeros.
        save_directory: directory to write into (created if missing).
        pattern: ``"2:4"``/``"N:M"`` or ``"unstructured"``; default: ``config.pruning_config["pattern"]``,
            else unstructured. N:M layers that do not satisfy the pattern fall back to the bitmask.
        bits: ``None`` (values kept exactly), ``8`` or ``4`` (symmetric int with float32 scales;
            values already on such a grid are stored exactly).
        group_size: quantization group along the input dimension; ``None`` = one scale per row.
        max_shard_size: shard size limit (``"5GB"``, ``"200MB"``, bytes).

    Returns:
        ``{"files": [...], "encodings": {module_weight: "nm"|"bitmask"|"dense"|"quant"|"raw"}}``.
    """
    if bits not in (None, 4, 8):
        raise ValueError(f"bits must be None, 4 or 8, got {bits!r}.")
    if group_size is not None and (bits is None or group_size < 1):
        raise ValueError("group_size needs bits=4 or bits=8 and must be a positive integer.")
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    pattern = pattern or _pattern_from_model(model) or "unstructured"
    pat = parse_pattern(pattern)
    targets = _compress_targets(model)

    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, str] = {}
    encodings: dict[str, str] = {}
    exact_note = []
    for name, tensor in _state_dict_untied(model).items():
        if name not in targets:
            tensors[name] = tensor.detach()
            continue
        prefix = name[: -len("weight")]
        enc = compress_weight(tensor, pattern=pat if pat.is_nm else None, bits=bits, group_size=group_size)
        if "weight" in enc:
            encodings[name] = "raw"
        elif "weight_nm_index" in enc or "weight_nm_code" in enc:
            encodings[name] = "nm"
        elif "weight_bitmask" in enc:
            encodings[name] = "bitmask"
        else:
            encodings[name] = "quant"
        if bits is not None:
            exact_note.append(name)
        for key, value in enc.items():
            tensors[prefix + key] = value
            groups[prefix + key] = prefix
        if pat.is_nm and encodings[name] == "bitmask":
            logger.info("%s does not satisfy %s; stored with a bitmask", name, pat)

    files = _write_shards(tensors, save_directory, max_shard_size, groups)

    qcfg = HfpruneSparseConfig(
        pattern=str(pat), bits=bits, group_size=group_size,
        compressed_modules=sorted(n for n, e in encodings.items() if e != "raw"),
    )
    config_dict = model.config.to_dict()
    config_dict["quantization_config"] = qcfg.to_dict()
    # sanity: the pruning description travels with the checkpoint
    pc = getattr(model.config, "pruning_config", None)
    if pc is not None:
        config_dict["pruning_config"] = pc
    (save_directory / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(save_directory)
        except Exception as exc:  # generation config is optional
            logger.warning("Could not save generation_config.json: %s", exc)
    logger.info("Saved %s checkpoint to %s (%d files)", FORMAT_NAME, save_directory, len(files))
    return {"files": files, "encodings": encodings}


def load_sparse(save_directory, **kwargs):
    """Load an hfprune-sparse (or ordinary) checkpoint as a dense ``AutoModelForCausalLM``.

    Keyword arguments go to ``from_pretrained`` (``dtype``, ``device_map``, ``revision`` ...).
    """
    from transformers import AutoModelForCausalLM

    register()
    return AutoModelForCausalLM.from_pretrained(save_directory, **kwargs)


# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------

def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n))


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
            for name, info in _safetensors_header(path).items():
                if name == "__metadata__":
                    continue
                nbytes = info["data_offsets"][1] - info["data_offsets"][0]
                suffix = name.rpartition(".")[2]
                kind = suffix[len("weight_"):] if suffix in _SUFFIXES else "dense"
                by_kind[kind] += nbytes
    weights = sum(v for k, v in files.items() if k.endswith(".safetensors"))
    return {"total_bytes": sum(files.values()), "weights_bytes": weights, "files": files, "by_kind": by_kind}
