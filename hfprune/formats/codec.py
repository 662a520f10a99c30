"""The ``hfprune-sparse`` codec of one weight: bit packing, N:M position codes, symmetric int4/int8
values (see :mod:`hfprune.formats.sparse` for the on-disk layout). Pure tensor functions."""

from __future__ import annotations

import functools
import itertools
import math

import torch

from hfprune.solvers.masks import check_nm, parse_pattern
from hfprune.solvers.quant import grid_for, quantize

__all__ = ["SUFFIXES", "compress_weight", "decompress_weight"]

SUFFIXES = ("weight_values", "weight_bitmask", "weight_nm_index", "weight_nm_code", "weight_scale", "weight_shape")
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


def _index_bits(m: int) -> int:
    need = max(1, math.ceil(math.log2(m)))
    for b in (2, 4, 8):
        if need <= b:
            return b
    raise ValueError(f"N:M index for M={m} does not fit in 8 bits; use M <= 256.")


def _dequantize(q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int],
                group_size: int | None = None) -> torch.Tensor:
    """float32 ``q * scale`` of a full ``[rows, cols]`` integer matrix.

    ``group_size`` (the checkpoint's ``quantization_config.group_size``) is needed when it does not
    divide ``cols`` (the last group is padded): ``ceil(cols / groups)`` is then not the group size.
    """
    rows, cols = shape
    groups = scale.shape[1]
    group = group_size if group_size and math.ceil(cols / group_size) == groups else math.ceil(cols / groups)
    if groups == 1:
        return q.float() * scale
    return q.float() * scale[:, torch.arange(cols, device=q.device) // group]


def _store_q(q: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return q.to(torch.int8)
    return _pack((q + 8).to(torch.uint8), 4)


def _stored_count(stored: torch.Tensor, count: int, what: str) -> None:
    """The checkpoint holds exactly the ``count`` values its mask or pattern keeps (int4: two a byte)."""
    have = stored.numel() * (2 if stored.dtype == torch.uint8 else 1)
    if not count <= have <= count + (1 if stored.dtype == torch.uint8 else 0):
        raise ValueError(f"Damaged hfprune-sparse checkpoint: {what} keeps {count} values but {have} are stored; "
                         f"the file was altered or truncated. Save the model again.")


def _load_q(stored: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    _stored_count(stored, count, "a quantized weight")
    if stored.dtype == torch.int8:
        return stored.reshape(-1)[:count].to(torch.int32)
    return _unpack(stored, 4, count).to(torch.int32) - 8


# --------------------------------------------------------------------------------------------
# one weight
# --------------------------------------------------------------------------------------------

def compress_weight(w: torch.Tensor, *, pattern=None, bits: int | None = None,
                    group_size: int | None = None, force: bool = False,
                    grid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Encode one 2-D weight. Returns the tensors to store under ``<module>.<key>`` (keys are
    ``weight`` for a weight kept as is, else some of ``weight_values``/``weight_bitmask``/
    ``weight_nm_index``/``weight_scale``/``weight_shape``). ``grid``: the quantization scales the
    pruning method rounded ``w`` to, if any (see :func:`hfprune.solvers.quant.quantize`)."""
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
        q, scale, _ = quantize(w, bits, group_size, grid=grid_for(grid, w, group_size))
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
    """Inverse of :func:`compress_weight` (it runs once per weight while ``from_pretrained`` loads,
    which decodes on one intra-op thread: :meth:`hfprune.formats.sparse.HfpruneSparseQuantizer.one_thread`).

    The stored sizes and codes are checked first (a bitmask's value count while its slices are
    decoded; the half-built weight is dropped when it does not match). Then :func:`_scatter_kept`
    fills the dense weight slice by slice from a 256-entry byte table (the bits of a bitmask byte,
    or the kept positions of the N:M groups a code byte names) and one gather from the stored
    values, in the row-major order they were stored in; its buffers are slice-sized, so the only
    full-size allocation is the returned weight. Quantized values are placed as integers and scaled
    afterwards on the whole matrix.
    """
    if "weight_values" not in tensors:
        w = tensors["weight"]
        return w if dtype is None else w.to(dtype)
    rows, cols = (int(x) for x in tensors["weight_shape"].tolist())
    numel = rows * cols
    vals = tensors["weight_values"]
    scale = tensors.get("weight_scale")
    quant = scale is not None
    if quant:
        bits = 8 if vals.dtype == torch.int8 else 4
    out_dtype = dtype or (torch.float32 if quant else vals.dtype)

    if "weight_nm_index" in tensors or "weight_nm_code" in tensors:
        pat = parse_pattern(pattern)
        n, m = pat.n, pat.m
        kept = numel // m * n
        groups = numel // m
        if "weight_nm_code" in tensors:
            layout = _nm_code_layout(n, m)
            if layout is None:
                raise ValueError(f"weight_nm_code cannot encode pattern {pat}: the checkpoint is inconsistent.")
            packed = tensors["weight_nm_code"].reshape(-1)
            limit = layout[0].shape[0] ** layout[1]
            if packed.numel() * layout[1] < groups or (packed.numel() and int(packed.max()) >= limit):
                raise ValueError(f"Damaged hfprune-sparse checkpoint: an N:M code holds {packed.numel()} bytes for "
                                 f"{groups} groups, or a byte out of range (>= {limit}). Save the model again.")
            table, mask = _nm_code_table(n, m), None
        else:
            packed = tensors["weight_nm_index"]
            if packed.numel() * (8 // _index_bits(m)) < kept:
                raise ValueError(f"Damaged hfprune-sparse checkpoint: an N:M index is shorter than its {kept} "
                                 f"positions. Save the model again.")
            idx = _unpack(packed, _index_bits(m), kept).long().view(groups, n)
            if int(idx.max()) >= m:
                raise ValueError(f"Damaged hfprune-sparse checkpoint: an N:M index names a position outside its "
                                 f"group of {m}. Save the model again.")
            mask = torch.zeros(groups, m, dtype=torch.bool, device=packed.device).scatter_(1, idx, True).view(-1)
            if int(mask.sum()) != kept:
                raise ValueError(f"Damaged hfprune-sparse checkpoint: an N:M index names the same position twice "
                                 f"in a group of {m}. Save the model again.")
            table = None
        _stored_count(vals, kept, "a quantized weight" if quant else f"a {pat} weight")
        what = f"a {pat} weight"
    elif "weight_bitmask" in tensors:
        packed = tensors["weight_bitmask"].reshape(-1)
        if packed.numel() * 8 < numel:
            raise ValueError(f"Damaged hfprune-sparse checkpoint: a bitmask holds {packed.numel() * 8} "
                             f"bits for {numel} weights. Save the model again.")
        table, mask, what = _BIT_TABLE, None, "a bitmask"
    else:  # dense quantized
        q = _load_q(vals, bits, numel).view(rows, cols)
        return _dequantize(q, scale, (rows, cols), group_size).to(out_dtype)

    if quant:   # every stored integer (an int4 byte holds two), placed first, scaled on the whole matrix
        src = vals.reshape(-1).to(torch.int32) if bits == 8 else _unpack(vals, 4, 2 * vals.numel()).to(torch.int32) - 8
    else:
        src = vals.reshape(-1)
    dense = torch.empty(numel, dtype=torch.int32 if quant else out_dtype, device=vals.device)
    if mask is not None:   # N:M index (M > 12)
        dense.zero_().masked_scatter_(mask, src[:kept] if src.dtype == dense.dtype else src[:kept].to(dense.dtype))
    else:
        used = _scatter_kept(dense, table, packed, src)
        _stored_count(vals, used, "a quantized weight" if quant else what)
    if quant:
        return _dequantize(dense.view(rows, cols), scale, (rows, cols), group_size).to(out_dtype)
    return dense.view(rows, cols)


# Packed bytes decoded per slice by decompress_weight (16 KiB: 128 Ki bitmask weights, 192 Ki 2:4 weights;
# the slice's buffers stay in cache).
_CHUNK_BYTES = 1 << 14

# Per byte value: for each of the positions the byte describes (8 bitmask bits, or the groups of an
# N:M code byte), 1 + its rank among the byte's kept positions, or _NOT_KEPT; and the byte's kept count.
_NOT_KEPT = -(1 << 30)


def _rank_table(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``kept`` [256, E] bool -> (int32 [256, E] ranks as above, int32 [256] kept counts)."""
    rank = kept.to(torch.int32).cumsum(1, dtype=torch.int32)
    return torch.where(kept, rank, _NOT_KEPT).to(torch.int32).contiguous(), kept.sum(1, dtype=torch.int32)


# bit i of byte b (least significant first)
_BIT_TABLE = _rank_table(((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool())


@functools.lru_cache(maxsize=None)
def _nm_code_table(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank table of the N:M code bytes: the kept positions of the ``per_byte`` groups one byte
    names (bytes past the last code give meaningless rows; :func:`decompress_weight` refuses them first)."""
    combos, per_byte = _nm_code_layout(n, m)
    count = combos.shape[0]
    masks = torch.zeros(count, m, dtype=torch.bool)
    masks.scatter_(1, combos, True)                                       # [C, m]
    digits = (torch.arange(256)[:, None] // count ** torch.arange(per_byte)) % count
    return _rank_table(masks[digits].reshape(256, per_byte * m))


def _scatter_kept(dense: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor], packed: torch.Tensor,
                  src: torch.Tensor) -> int:
    """Write the stored values ``src`` (row-major kept order) into every entry of the flat ``dense``
    (zeros elsewhere); returns how many values the packed bytes keep.

    Branch-free: per slice of :data:`_CHUNK_BYTES` bytes, each position's index into ``[0, *values]``
    is its byte's table rank plus the values kept by the bytes before it (a cumulative sum over
    bytes, not weights), clamped at 0 for the positions not kept; one gather then fills the slice.
    Buffers are reused across slices. Stops (returning more than ``src`` holds) when the bytes keep
    more values than are stored, so the caller's count check refuses the file.
    """
    numel = dense.numel()
    rank, pop = (t.to(packed.device) for t in table)
    per_byte = rank.shape[1]
    nbytes = min(-(-numel // per_byte), packed.numel())
    chunk = min(_CHUNK_BYTES, nbytes)
    if chunk == 0:
        return 0
    dev = packed.device
    idx = torch.empty(chunk, dtype=torch.int32, device=dev)
    pos = torch.empty(chunk, per_byte, dtype=torch.int32, device=dev)
    before = torch.empty(chunk + 1, dtype=torch.int32, device=dev)
    before[0] = 0
    pad = torch.empty(chunk * per_byte + 1, dtype=dense.dtype, device=dev)
    pad[0] = 0
    used = 0
    for start in range(0, nbytes, chunk):
        stop = min(start + chunk, nbytes)
        lo, hi = start * per_byte, min(numel, stop * per_byte)
        i = idx[: stop - start]
        i.copy_(packed[start:stop])
        p = pos[: stop - start]
        torch.index_select(rank, 0, i, out=p)
        torch.index_select(pop, 0, i, out=before[1: stop - start + 1])
        before[1: stop - start + 1].cumsum_(0)
        p.add_(before[: stop - start, None]).clamp_(min=0)
        flat = p.view(-1)[: hi - lo]
        # values kept by the slice: its bytes' total, except in the last slice, whose last byte may
        # describe positions past the weight (bitmask padding bits, padding groups of a code byte)
        k = int(before[stop - start]) if hi - lo == (stop - start) * per_byte else int(flat.max())
        if used + k > src.numel():
            return used + k
        part = pad[: k + 1]
        part[1:].copy_(src[used:used + k])
        torch.index_select(part, 0, flat, out=dense[lo:hi])
        used += k
    return used
