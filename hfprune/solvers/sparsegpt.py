"""SparseGPT: one-shot pruning by approximate layer-wise reconstruction.

Reference: E. Frantar and D. Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML 2023 (arXiv:2301.00774). Equation and algorithm numbers below refer
to that paper.

For one linear layer with weights ``W`` ([out_features, in_features]) and calibration inputs
``X`` ([in_features, n] in the paper's notation), SparseGPT approximately solves the
layer-wise reconstruction problem (Eq. 1)

    argmin_{M, W'}  || W X - (M ⊙ W') X ||_2^2 ,

whose Hessian with respect to every row is the same matrix ``H = 2 X X^T`` (Section 3.1;
we also divide by the token count ``n``, which changes nothing but the scale). Each row is
handled with Optimal Brain Surgeon (OBS) updates: removing weight ``w_m`` costs
``w_m^2 / [H^-1]_mm`` (Eq. 3) and is compensated by changing the remaining weights by
``delta = -w_m / [H^-1]_mm * H^-1_{:,m}`` (Eq. 2). The key trick (Section 3.2, Fig. 3) is to
process the columns left to right and only ever update the columns to the right, so that all
rows share the sequence of inverse Hessians ``(H_{F_j})^-1``; their needed rows are exactly
the rows of the upper Cholesky factor of ``H^-1`` (Section 3.3, "Cholesky"), which is what
Algorithm 1 uses.

Everything here is pure torch on whatever device the inputs live on; nothing touches a model.
"""

from __future__ import annotations

import logging
import math

import torch

from hfprune.solvers.lstsq import ridge
from hfprune.solvers.masks import Pattern, lowest_k_mask, parse_pattern, prune_count
from hfprune.solvers.quant import _fake_quant, check_quant_args, quant_grid

__all__ = ["sparsegpt_prune", "check_layer_args"]

logger = logging.getLogger(__name__)

_MAX_DAMPING_RETRIES = 5
_ZERO_DAMPING_FALLBACK = 1e-3


def check_layer_args(solver: str, W: torch.Tensor, H: torch.Tensor, sparsity: float, pattern: str | Pattern,
                     dampening: float, bits: int | None, group_size: int | None) -> Pattern:
    """The checks every Hessian solver (SparseGPT, ADMM) makes of one layer's arguments; returns the pattern."""
    pat = parse_pattern(pattern)
    check_quant_args(bits, group_size)
    if W.dim() != 2:
        raise ValueError(f"{solver} expects a 2-D weight [out, in], got shape {tuple(W.shape)}.")
    cols = W.shape[1]
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not match a weight with {cols} input features; "
                         f"it must be [{cols}, {cols}].")
    if not pat.is_nm and not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}; use e.g. 0.5 for 50%.")
    if pat.is_nm and cols % pat.m:
        raise ValueError(f"N:M pattern {pat} needs the input width to be a multiple of {pat.m}, but it is {cols}; "
                         f"exclude this layer or choose an M that divides {cols}.")
    if dampening < 0 or not math.isfinite(dampening):
        raise ValueError(f"dampening must be a non-negative number, got {dampening}.")
    return pat


def _upper_cholesky_of_inverse(H: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + lambda I)^-1`` with ``lambda = dampening * mean(diag H)``
    (:func:`hfprune.solvers.lstsq.ridge`).

    Section 3.3 ("Cholesky"): the rows of this factor are, up to scale, the rows of the
    successive inverses ``(H_{F_j})^-1`` that the column-wise OBS updates need, so one
    factorisation replaces all the Gaussian-elimination steps of Eq. 5. Dampening is the
    paper's 1% of the mean diagonal. When a factorisation fails (H singular or badly
    conditioned) the dampening is raised tenfold and the factorisation retried, with a warning.

    Computed with one factorisation and one triangular inverse instead of the usual
    factorise / invert / factorise again: with ``P`` the index reversal and
    ``P H P = L L^T`` (lower Cholesky of the reversed matrix), ``U = P L^-1 P`` is upper
    triangular with a positive diagonal and ``U^T U = H^-1``, so it is *the* upper Cholesky
    factor of ``H^-1`` (it is unique).
    """
    mean_diag = ridge(H, 1.0)
    rel = float(dampening)
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for attempt in range(_MAX_DAMPING_RETRIES + 1):
        damped = H.flip(0, 1)
        damped.diagonal().add_(rel * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            if bool(torch.isfinite(U).all()):
                return U
        if attempt == _MAX_DAMPING_RETRIES:
            break
        new_rel = rel * 10 if rel > 0 else _ZERO_DAMPING_FALLBACK
        logger.warning(
            "SparseGPT: Cholesky factorisation of the Hessian failed with dampening %.3g; "
            "retrying with %.3g (more calibration tokens or a larger dampening avoid this).",
            rel, new_rel,
        )
        rel = new_rel
    raise RuntimeError(
        f"SparseGPT: the Hessian could not be factorised even with dampening {rel:.3g}; it is "
        f"probably not finite. Check the calibration inputs of this layer for inf/NaN."
    )


def _cumulative_count(sparsity: float, rows: int, cols: int) -> int:
    """Prunes due in the first ``cols`` columns: ``round(sparsity * rows * cols)``."""
    return prune_count(rows * cols, sparsity)


def _nm_lowest(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """For every row of ``score`` ([rows, m]) mark the ``m - n`` lowest entries."""
    pruned = torch.zeros_like(score, dtype=torch.bool)
    pruned.scatter_(1, torch.topk(score, m - n, dim=1, largest=False).indices, True)
    return pruned


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: str | Pattern = "unstructured",
    block_size: int = 128,
    dampening: float = 0.01,
    bits: int | None = None,
    group_size: int | None = None,
    sym: bool = True,
    act_order: bool = False,
    mask: torch.Tensor | None = None,
    return_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prune (and optionally quantize) one linear layer with SparseGPT (Algorithm 1).

    Args:
        W: weight, ``[out_features, in_features]``, any floating dtype. Not modified.
        H: Hessian ``2/n X X^T``, ``[in_features, in_features]`` (see :class:`HessianStats`).
        sparsity: fraction of weights to prune for ``unstructured``; ignored for ``N:M``
            (the pattern fixes it at ``1 - N/M``).
        pattern: ``"unstructured"`` or ``"N:M"`` (keep N of every M consecutive inputs).
        block_size: lazy-batch width ``B`` (Sec. 3.4); also the adaptive-mask block ``B_s``.
            Rounded to a multiple of M and of ``group_size`` so no N:M group or quantization
            group straddles two blocks.
        dampening: ``lambda`` as a fraction of ``mean(diag H)`` added to the diagonal.
        bits: if set (4 or 8), kept weights are jointly quantized (Sec. 3.5).
        group_size: input columns per quantization group (``None``: one grid per row).
        sym: symmetric (``True``) or asymmetric quantization grid.
        act_order: process the input columns in order of decreasing Hessian diagonal (GPTQ's
            "act-order"), so the inputs that matter most are decided first and the later, less
            important ones absorb the compensation. N:M keeps its groups of M consecutive inputs
            and orders whole groups (by their summed diagonal). Meant for N:M (and per-channel
            joint quantization); for unstructured masks it is usually worse. Not with ``group_size``.
        mask: a fixed boolean pruned-mask (``[out, in]``, True = remove) to use instead of
            choosing one: the sweep then only compensates (and quantizes, GPTQ-style), and
            ``sparsity``/``pattern`` only serve the checks. Used by solvers that choose the mask
            themselves (:mod:`hfprune.solvers.admm`).
        return_scale: also return the quantization grid the kept weights were rounded to.

    Returns:
        ``(new_W, pruned)``: the pruned (fake-quantized) weight in ``W``'s dtype and shape, and
        the boolean mask that is ``True`` where a weight was pruned. With ``return_scale``, a third
        element: the float32 ``[out, groups]`` scales of the symmetric grid (``new_W`` is
        ``scale * q`` with integer ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``, one group per row or per
        ``group_size`` inputs), or ``None`` without ``bits`` or with ``sym=False``. The checkpoint
        formats store the integers on this grid (:func:`hfprune.solvers.quant.quantize`).

    Details, following Algorithm 1:

    * Work is done on a float32 copy. Inputs that never fire (``H_ii == 0``) get ``H_ii = 1``
      and their weights are zeroed (they cannot affect the output).
    * Mask selection (Sec. 3.3, "Adaptive Mask Selection"): at the start of each block of
      ``B_s`` columns the weights with the smallest OBS error ``w^2 / [H^-1]_cc^2`` over the
      whole block (all rows together) are pruned. The paper takes a quantile per block; here
      the block gets exactly ``round(s*rows*c_end) - round(s*rows*c_start)`` prunes chosen by
      a stable sort, so counts telescope and the layer total is exactly
      ``round(s * out * in)`` (:func:`hfprune.solvers.masks.prune_count`), ties and all.
    * N:M (Sec. 3.5, "Semi-Structured"): when entering each group of M columns, the ``M - N``
      weights with the smallest OBS error in every row are pruned.
    * Column update (Eq. 2 / Alg. 1): column ``j`` becomes its pruned/quantized value ``q``,
      the error ``(w - q) / [H^-1]_jj`` is spread over the remaining columns of the block with
      row ``j`` of the Cholesky factor; the accumulated errors of the block update all later
      columns in one matmul (lazy batch update, Sec. 3.4).
    * Joint quantization (Sec. 3.5): ``q`` is the kept weight rounded to the grid (pruned
      weights become 0, which is on the grid), so the OBS update compensates the rounding
      error too, as in GPTQ. Grids are per output row, computed from the weight at the start;
      or per ``group_size`` columns, computed from the current (already updated) weights when
      the group is entered.
    * ``sparsity == 0`` with ``bits is None`` (unstructured) returns a copy of ``W`` unchanged.
    """
    pat = check_layer_args("sparsegpt_prune", W, H, sparsity, pattern, dampening, bits, group_size)
    rows, cols = W.shape
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}.")

    if mask is not None and tuple(mask.shape) != (rows, cols):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the weight's {(rows, cols)}.")
    if mask is None and not pat.is_nm and sparsity == 0 and bits is None:
        kept = W.clone(), torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
        return (*kept, None) if return_scale else kept

    if act_order:
        if bits is not None and group_size is not None:
            raise ValueError("act_order reorders the input columns, so quantization groups would not be "
                             "consecutive inputs any more: use group_size=None (per-channel) with act_order.")
        diag = torch.diagonal(H).float()
        if pat.is_nm:
            group_order = torch.argsort(diag.reshape(-1, pat.m).sum(1), descending=True, stable=True)
            perm = (group_order[:, None] * pat.m + torch.arange(pat.m, device=diag.device)).reshape(-1)
        else:
            perm = torch.argsort(diag, descending=True, stable=True)
        perm = perm.to(W.device)
        new_w, pruned, grid = sparsegpt_prune(W[:, perm], H[perm][:, perm], sparsity, pat, block_size,
                                              dampening, bits, group_size, sym, act_order=False,
                                              mask=None if mask is None else mask[:, perm], return_scale=True)
        inv = torch.argsort(perm)
        out = new_w[:, inv], pruned[:, inv]  # one grid per row (no groups with act_order): order-free
        return (*out, grid) if return_scale else out

    unit = math.lcm(pat.m if pat.is_nm else 1, group_size if (bits and group_size) else 1)
    block = max(unit, (block_size // unit) * unit)

    work = W.detach().float().clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diagonal(H) == 0
    if bool(dead.any()):
        logger.debug("SparseGPT: %d of %d inputs never fire; their weights are zeroed.",
                     int(dead.sum()), cols)
        H[dead, dead] = 1.0
        work[:, dead] = 0.0
    hinv = _upper_cholesky_of_inverse(H, dampening)

    scale = zero = None
    scales: list[torch.Tensor] = []  # the grid of every quantization group, in column order
    if bits is not None and group_size is None:
        scale, zero = quant_grid(work, bits, sym=sym)
        scales.append(scale)

    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        count = i2 - i1
        # The block is handled transposed ([columns, rows]) so that each column is a contiguous
        # vector and the rank-1 OBS update is one BLAS ``ger`` (addr_) call. Row j of ``w1``
        # is final once column j is processed (later updates touch rows > j only), so ``w1``
        # ends up holding the pruned/quantized block.
        w1 = work[:, i1:i2].t().contiguous()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(hinv1)
        inv_d1 = (1.0 / d1)[:, None]

        if mask is not None:
            mask1 = mask[:, i1:i2].t().to(device=W.device, dtype=torch.bool).contiguous()
        elif pat.is_nm:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            k = _cumulative_count(sparsity, rows, i2) - _cumulative_count(sparsity, rows, i1)
            mask1 = lowest_k_mask(w1.pow(2) / d1.pow(2)[:, None], k)
        # Without quantization the error of column j is ``mask * w / d``: one fused multiply.
        nm_select = pat.is_nm and mask is None
        err_scale = None if (bits is not None or nm_select) else mask1 * inv_d1

        # Per-column views made once per block (indexing in the loop costs more than the math).
        w_rows, err_rows, mask_rows = w1.unbind(0), err1.unbind(0), mask1.unbind(0)
        h_rows = hinv1.unbind(0)
        scale_rows = err_scale.unbind(0) if err_scale is not None else None
        for j in range(count):
            col = i1 + j
            if nm_select and col % pat.m == 0:
                g = slice(j, j + pat.m)
                score = w1[g].pow(2) / d1[g].pow(2)[:, None]
                mask1[g] = _nm_lowest(score.t(), pat.n, pat.m).t()
                if bits is None:
                    err_g = (mask1[g] * inv_d1[g]).unbind(0)
            if bits is not None and group_size is not None and col % group_size == 0:
                scale, zero = quant_grid(w1[j:j + group_size].t(), bits, sym=sym)
                scales.append(scale)

            w = w_rows[j]
            if bits is None:
                # q = w with pruned entries zeroed; err = (w - q) / d.
                torch.mul(w, scale_rows[j] if scale_rows is not None else err_g[col % pat.m], out=err_rows[j])
                w.masked_fill_(mask_rows[j], 0.0)
            else:
                q = _fake_quant(w[:, None], scale, zero, bits)[:, 0].masked_fill_(mask_rows[j], 0.0)
                torch.mul(w - q, inv_d1[j], out=err_rows[j])
                w.copy_(q)
            # OBS update of the remaining columns of the block (Eq. 2 with the Cholesky row).
            if j + 1 < count:
                w1[j + 1:].addr_(h_rows[j][j + 1:], err_rows[j], alpha=-1.0)

        work[:, i1:i2] = w1.t()
        pruned[:, i1:i2] = mask1.t()
        # Lazy batch update of all later columns (Sec. 3.4).
        if i2 < cols:
            work[:, i2:] -= err1.t() @ hinv[i1:i2, i2:]

    if logger.isEnabledFor(logging.DEBUG):  # the count is a device sync: only when it is printed
        logger.debug("SparseGPT: pruned %d of %d weights (%s, block %d%s).", int(pruned.sum()),
                     pruned.numel(), pat, block, f", int{bits}" if bits else "")
    if not return_scale:
        return work.to(W.dtype), pruned
    grid = torch.cat(scales, dim=1) if (scales and sym) else None
    return work.to(W.dtype), pruned, grid
