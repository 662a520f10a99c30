"""Quantization: the round-to-nearest grid (GPTQ's, per row or group of inputs), SparseGPT's fake
quantization on it, and the integer codes the checkpoint formats store (exact when the weights already
lie on a grid). Pure tensor functions."""

from __future__ import annotations

import torch

__all__ = ["check_quant_args", "quant_grid", "quantize_weight", "quantize", "grid_for"]


def check_quant_args(bits: int | None, group_size: int | None) -> None:
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
        raise ValueError(f"bits must be an integer from 2 to 8 (typically 4 or 8) or None, got {bits!r}.")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}.")


def _grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``scale`` and ``zero`` ([rows, 1]) of a ``2**bits``-level grid covering ``w``.

    The range always contains 0 (``min <= 0 <= max``), so zero is exactly representable and
    pruned weights are on the grid. Symmetric grids use ``zero = 2**(bits-1)`` (values
    ``scale * {-2^(b-1), ..., 2^(b-1)-1}``), the convention GPTQ checkpoints use.
    """
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        scale = (xmax - xmin) / maxq
        zero = torch.zeros_like(scale)
    empty = scale == 0
    scale = torch.where(empty, torch.ones_like(scale), scale)
    if not sym:
        zero = torch.round(-xmin / scale)
    return scale[:, None], zero[:, None]


def _fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def quantize_weight(W: torch.Tensor, bits: int, group_size: int | None = None,
                    sym: bool = True) -> torch.Tensor:
    """Round-to-nearest fake quantization of ``W`` ([out_features, in_features]).

    One grid per output row, or per row and per ``group_size`` consecutive input columns
    (the last group may be narrower). The result has ``W``'s dtype and shape and holds at
    most ``2**bits`` distinct values per row-group, zero among them.
    """
    check_quant_args(bits, group_size)
    if bits is None:
        raise ValueError("quantize_weight needs bits (for example 4 or 8).")
    if W.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight, got shape {tuple(W.shape)}.")
    w = W.float()
    scale, zero = quant_grid(w, bits, group_size, sym)
    col = torch.arange(w.shape[1], device=w.device) // (group_size or w.shape[1])
    return _fake_quant(w, scale[:, col], zero[:, col], bits).to(W.dtype)


def quant_grid(w: torch.Tensor, bits: int, group_size: int | None = None,
               sym: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` and ``zero`` ([rows, groups], see :func:`_grid`) of every row and ``group_size``
    consecutive input columns (``None``: the whole row) of a float ``w``, computed once."""
    g = _group_view(w, group_size or w.shape[1])
    rows, groups, size = g.shape
    scale, zero = _grid(g.reshape(-1, size), bits, sym)
    return scale.view(rows, groups), zero.view(rows, groups)


def _group_view(w: torch.Tensor, group: int) -> torch.Tensor:
    """float32 ``[rows, groups, group]`` view of ``w``, the last group padded with zeros."""
    rows, cols = w.shape
    pad = (-cols) % group
    wf = w.float()
    if pad:
        wf = torch.cat([wf, wf.new_zeros(rows, pad)], dim=1)
    return wf.view(rows, -1, group)


def grid_for(grid: torch.Tensor | None, w: torch.Tensor, group_size: int | None) -> torch.Tensor | None:
    """``grid`` when it has one scale per row and group of ``w`` (``[rows, groups]``), else ``None``:
    a pruning method's grid for a layer whose shape changed since (a later structured step) no longer
    applies, like a grid for weights changed since, and the grid is then found from the values."""
    if grid is None:
        return None
    rows, cols = w.shape
    return grid if tuple(grid.shape) == (rows, -(-cols // (group_size or cols))) else None


def quantize(w: torch.Tensor, bits: int, group_size: int | None,
             grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Symmetric quantization of a dense ``[rows, cols]`` weight.

    Returns ``(q int32 [rows, cols], scale float32 [rows, groups], exact_groups)``. Groups whose
    values already lie on a symmetric grid that fits ``bits`` are stored exactly (the scale is
    chosen so that ``(q * scale).to(dtype) == w``); the rest are rounded to the symmetric grid of
    :func:`quant_grid` (SparseGPT's, and the compressed-tensors ``minmax`` observer's).

    ``grid``: the ``[rows, groups]`` scales the weight was quantized on, when known (SparseGPT /
    ADMM with ``bits`` return it: :attr:`hfprune.report.PruneReport.quant_scales`). Groups on it
    are stored on it as they are; the grid is only searched for in the others (a weight read back
    from a checkpoint, or quantized elsewhere).
    """
    rows, cols = w.shape
    group = group_size or cols
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g = _group_view(w, group)                             # [rows, G, group] float32
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
    if grid is not None:
        if tuple(grid.shape) != tuple(absmax.shape):
            raise ValueError(f"grid of shape {tuple(grid.shape)} does not match the {tuple(absmax.shape)} groups of a "
                             f"{rows} x {cols} weight with group_size={group_size}.")
        given = grid.to(device=g.device, dtype=torch.float32)
        q_given, on_given = roundtrip_ok(given)
        scale = torch.where(on_given, given, scale)
        q = torch.where(on_given[..., None], q_given, q)
        done |= on_given
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
    done |= absmax == 0
    # The other groups are not on a grid: round them to the one of :func:`quant_grid`.
    rtn = _grid(g.reshape(-1, group), bits, sym=True)[0].view(rows, -1)  # quant_grid's, on the view at hand
    scale = torch.where(done, scale, rtn)
    q = torch.where(done[..., None], q, torch.round(g / rtn[..., None]))
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
