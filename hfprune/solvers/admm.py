"""ADMM pruning: layer-wise reconstruction solved by ADMM with a gradually growing mask.

References:

* V. Boža, "Fast and Effective Weight Update for Pruned Large Language Models", TMLR 2024
  (arXiv:2401.02938): ADMM weight update with a precomputed ``(H + rho I)^-1`` and a mask that
  grows over the first iterations (Algorithm 1 and Sec. 3.2, "gradual pruning").
* X. Meng et al., "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for Large
  Language Models", NeurIPS 2024 (arXiv:2406.07831): after ADMM has fixed the support, the kept
  weights are solved with (preconditioned) conjugate gradient (Sec. 3.3).

The problem is SparseGPT's (Eq. 1 there): for one linear layer with weight ``W`` ([out, in]) and
calibration inputs ``X``, find ``W'`` in the sparse set ``S`` (unstructured with an exact count,
or N:M) minimising

    || W X - W' X ||_F^2 = tr((W - W') H (W - W')^T),   H = 2/n X X^T .

ADMM (Boyd et al. 2011, scaled form) splits ``W'`` into a free copy ``B`` and a sparse copy ``Z``
with the constraint ``B = Z`` and the scaled dual ``U``:

    Z <- Proj_S(B + U)                          (keep the largest |B + U|, exact count / N:M)
    U <- U + B - Z
    B <- (W H + rho (Z - U)) (H + rho I)^-1     (one matmul with a matrix inverted once)

Everything runs in the normalised coordinates of Boža's code: ``W~ = W diag(d)``,
``H~ = diag(d)^-1 H diag(d)^-1`` with ``d = sqrt(diag H)`` (unit diagonal), so ``|W~|`` is the
Wanda score ``|W_ij| ||X_j||``, the Euclidean projection compares like with like, and ``rho`` and
the dampening are relative to the (unit) diagonal. Dampening adds ``lambda I`` to ``H~``, which
acts as a ridge penalty ``lambda ||W~ - W'~||^2`` pulling the solution towards the dense weights.

Everything here is pure torch on whatever device the inputs live on; nothing touches a model.
"""

from __future__ import annotations

import logging
import math

import torch

from hfprune.solvers.masks import Pattern, layer_mask, lowest_k_indices, nm_mask, prune_count, row_mask
from hfprune.solvers.sparsegpt import check_layer_args, sparsegpt_prune

__all__ = ["admm_prune", "gradual_sparsity", "project"]

logger = logging.getLogger(__name__)


def gradual_sparsity(step: int, steps: int, sparsity: float, power: float = 3.0) -> float:
    """Sparsity of the mask at gradual-pruning step ``step`` (1-based) of ``steps``: the cubic
    schedule of Zhu & Gupta (2017) that Boža uses, ``s (1 - (1 - step/steps)^power)``; equal to
    ``sparsity`` from ``step >= steps`` on."""
    if steps <= 0 or step >= steps:
        return sparsity
    return sparsity * (1.0 - (1.0 - step / steps) ** power)


_SAMPLE = 1 << 16
"""Entries looked at to place the threshold of an intermediate (not final) gradual mask."""


def _sampled_threshold(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``fraction`` quantile of ``score``'s last dimension (or of all of it when 1-D),
    estimated from an evenly strided sample: the intermediate masks of the gradual schedule need
    about the right size, not an exact count, and a full selection costs as much as a matmul."""
    n = score.shape[-1]
    stride = max(1, (score.numel() if score.dim() == 1 else n * 8) // _SAMPLE)
    sample = score[..., ::stride] if score.dim() > 1 else score[::stride]
    k = min(sample.shape[-1], max(1, int(round(fraction * sample.shape[-1]))))
    return torch.kthvalue(sample, k, dim=-1, keepdim=score.dim() > 1).values


def _nth_largest(groups: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n``-th largest entry of each group (last dimension), keeping that dimension. For 2 of 4
    a sorting network (elementwise max/min), several times faster on CPU than ``topk`` over a
    dimension of 4; otherwise ``topk``."""
    if n == 2 and groups.shape[-1] == 4:
        a, b, c, d = groups.unbind(-1)
        hi1, lo1, hi2, lo2 = torch.maximum(a, b), torch.minimum(a, b), torch.maximum(c, d), torch.minimum(c, d)
        return torch.maximum(torch.minimum(hi1, hi2), torch.maximum(lo1, lo2)).unsqueeze(-1)
    return torch.topk(groups, n, dim=-1).values[..., -1:]


def project(V: torch.Tensor, sparsity: float, pattern: Pattern, scope: str = "layer",
            exact: bool = True) -> torch.Tensor:
    """Pruned-mask of the Euclidean projection of ``V`` onto the sparse set: the entries with the
    smallest ``|V|`` are removed, exactly ``round(sparsity * numel)`` of them when ``exact``
    (otherwise about that many: everything under a sampled threshold).

    ``scope`` is ``"layer"`` (one comparison over the matrix) or ``"row"`` (the same count in every
    row, :func:`hfprune.masks.row_mask`). For an N:M ``pattern`` the final set keeps the ``N``
    largest of every group of ``M``; during the gradual phase (``sparsity`` below the pattern's
    ``1 - N/M``) only entries outside those top ``N`` are candidates, the smallest first over
    the whole matrix (Boža's N:M schedule), so the last step is exactly the N:M mask.
    """
    score = V.abs()
    if sparsity <= 0:
        return torch.zeros_like(V, dtype=torch.bool)
    if pattern.is_nm:
        full = sparsity >= pattern.sparsity - 1e-12
        if full:
            return nm_mask(score, pattern.n, pattern.m)
        rows, cols = V.shape
        groups = score.reshape(rows, cols // pattern.m, pattern.m)
        candidate = (groups < _nth_largest(groups, pattern.n)).reshape(rows, cols)  # outside the group's top N
        cand_score = torch.where(candidate, score, float("inf"))
        if exact:
            pruned = torch.zeros(V.numel(), dtype=torch.bool, device=V.device)
            pruned[lowest_k_indices(cand_score, prune_count(V.numel(), sparsity))] = True
            return pruned.view_as(V)
        return candidate & (score < _sampled_threshold(cand_score.reshape(-1), sparsity))
    if exact:
        return row_mask(score, sparsity) if scope == "row" else layer_mask(score, sparsity)
    if scope == "row":
        return score < _sampled_threshold(score, sparsity)
    return score < _sampled_threshold(score.reshape(-1), sparsity)


def _masked_cg(B: torch.Tensor, C: torch.Tensor, A: torch.Tensor, keep: torch.Tensor, iterations: int,
               rtol: float = 1e-4) -> torch.Tensor:
    """Minimise ``tr(B A B^T) - 2 tr(C B^T)`` over ``B`` supported on ``keep`` (each row its own
    quadratic, i.e. ``B_S A_SS = C_S`` per row) by conjugate gradient from ``B``, all rows at once
    (ALPS' back-solve). ``A`` has a unit-scale diagonal here, so Jacobi preconditioning is the
    identity and plain CG is PCG."""
    keepf = keep.to(B.dtype)
    B = B * keepf
    R = (C - B @ A) * keepf
    P = R.clone()
    rr = (R * R).sum(1, keepdim=True)
    stop = (rtol ** 2) * (C * C * keepf).sum(1, keepdim=True)
    for _ in range(iterations):
        AP = (P @ A) * keepf
        pap = (P * AP).sum(1, keepdim=True)
        alpha = torch.where(pap > 0, rr / pap.clamp_min(1e-30), torch.zeros_like(rr))
        B.addcmul_(alpha, P)
        R.addcmul_(alpha, AP, value=-1.0)
        rr_new = (R * R).sum(1, keepdim=True)
        if bool((rr_new <= stop).all()):
            break
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(1e-30), torch.zeros_like(rr))
        P = R + beta * P
        rr = rr_new
    return B


def admm_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: str | Pattern = "unstructured",
    *,
    scope: str = "layer",
    iterations: int = 20,
    prune_iterations: int = 15,
    rho: float = 1.0,
    dampening: float = 0.1,
    refine_iterations: int = 0,
    bits: int | None = None,
    group_size: int | None = None,
    sym: bool = True,
    act_order: bool = False,
    return_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prune one linear layer by ADMM with a gradual mask (Boža 2024), then (optionally) re-solve
    the kept weights by conjugate gradient on the final support (ALPS) and quantize them jointly.

    Args:
        W: weight ``[out_features, in_features]``, any floating dtype. Not modified.
        H: Hessian ``2/n X X^T`` ``[in_features, in_features]`` (see ``HessianStats``).
        sparsity: fraction pruned (unstructured); ignored for N:M (``1 - N/M``).
        pattern: ``"unstructured"`` or ``"N:M"``.
        scope: comparison group of the unstructured projection, ``"layer"`` or ``"row"``.
        iterations: ADMM iterations in all.
        prune_iterations: of these, how many grow the mask (cubic schedule); the mask is fixed after.
        rho: ADMM penalty, relative to the unit diagonal of the normalised Hessian (constant, as
            in Boža's code; the proxy in docs/BENCHMARKS.md found 0.3 much worse at 10 iterations).
        dampening: ``lambda`` added to the normalised Hessian's diagonal (ridge towards ``W``).
        refine_iterations: conjugate-gradient iterations on the final support (0: keep ``Z``).
        bits, group_size, sym, act_order: joint quantization of the kept weights, done by
            SparseGPT's column sweep (GPTQ) with the ADMM mask held fixed (see
            :func:`hfprune.solvers.sparsegpt.sparsegpt_prune`).

        return_scale: also return the quantization grid (see :func:`hfprune.solvers.sparsegpt.sparsegpt_prune`).

    Returns:
        ``(new_W, pruned)`` in ``W``'s dtype and shape; ``pruned`` is True where a weight is removed.
        With ``return_scale``, a third element: the symmetric grid's ``[out, groups]`` scales, or ``None``.
    """
    pat = check_layer_args("admm_prune", W, H, sparsity, pattern, dampening, bits, group_size)
    if pat.is_nm:
        sparsity = pat.sparsity
    if scope not in ("layer", "row", "global"):
        raise ValueError(f"scope must be 'layer' or 'row', got {scope!r}.")
    scope = "layer" if scope == "global" else scope
    if iterations < 1 or prune_iterations < 0 or prune_iterations > iterations:
        raise ValueError(f"need 1 <= iterations and 0 <= prune_iterations <= iterations, got {iterations} "
                         f"and {prune_iterations}.")
    if not (rho > 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a positive number, got {rho}.")
    if refine_iterations < 0:
        raise ValueError(f"refine_iterations must be >= 0, got {refine_iterations}.")

    Wf = W.detach().float()
    Hf = H.detach().to(device=W.device, dtype=torch.float32)
    diag = torch.diagonal(Hf).clone()
    dead = diag <= 0
    d = torch.where(dead, torch.ones_like(diag), diag.clamp_min(0).sqrt())
    A = Hf / d[:, None] / d[None, :]
    A[dead, :] = 0.0
    A[:, dead] = 0.0
    A.diagonal().add_(dampening)
    What = (Wf * d).masked_fill(dead[None, :], 0.0)   # inputs that never fire are pruned first
    C = What @ A

    # (H~ + lambda I + rho I)^-1, once: A is positive definite (lambda > 0, or H~ full rank), so Cholesky.
    K = A.clone()
    K.diagonal().add_(float(rho))
    Kinv = torch.cholesky_inverse(torch.linalg.cholesky(K))
    del K

    B = What.clone()
    U = torch.zeros_like(B)
    pruned = project(What, sparsity if prune_iterations == 0 else 0.0, pat, scope)
    r = float(rho)
    keep = (~pruned).float()  # multiplying by a 0/1 float mask is several times faster than masked_fill on CPU
    for t in range(1, iterations + 1):
        if t <= prune_iterations:
            pruned = project(B + U, gradual_sparsity(t, prune_iterations, sparsity), pat, scope,
                             exact=t == prune_iterations)
            keep = (~pruned).float()
        Z = (B + U).mul_(keep)
        U += B - Z
        B = (C + r * (Z - U)) @ Kinv
    Z = (B + U).mul_(keep)
    if refine_iterations:
        Z = _masked_cg(Z, C, A, ~pruned, refine_iterations)
    new_w = Z / d
    new_w.masked_fill_(pruned, 0.0)
    grid = None
    if bits is not None:
        new_w, pruned, grid = sparsegpt_prune(new_w, H, sparsity, pat, bits=bits, group_size=group_size, sym=sym,
                                              act_order=act_order, mask=pruned, return_scale=True)
    return (new_w.to(W.dtype), pruned, grid) if return_scale else (new_w.to(W.dtype), pruned)
