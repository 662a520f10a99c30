"""Structured Optimal Brain Surgeon: remove whole input-column groups of a layer and compensate.

References: E. Kurtic, E. Frantar, D. Alistarh, "ZipLM: Inference-Aware Structured Pruning of
Language Models", NeurIPS 2023 (arXiv:2302.04089), Sec. 3.1; G. Ling et al., "SlimGPT:
Layer-wise Structured Pruning for Large Language Models", NeurIPS 2024 (arXiv:2412.18110),
Sec. 3.2; the structured case of SparseGPT's update (Frantar & Alistarh 2023, Eq. 2-3).

A linear layer ``Y = W X`` (``W`` is ``[out, in]``, ``X`` the ``[in, n]`` calibration inputs)
reads the outputs of attention heads (``o_proj``) or MLP neurons (``down_proj``). Removing the
set ``S`` of input columns and re-fitting the kept columns ``K`` by least squares,

    argmin_{W'_K} || W X - W'_K X_K ||_F^2 ,

has the closed form (normal equations with ``H = X X^T``)

    W'_K = W_K + W_S H_SK H_KK^{-1}                                         (1)

and the output error that is left, with ``H^{-1}`` the inverse of the full Hessian, is

    E(S) = tr( W_S [(H^{-1})_SS]^{-1} W_S^T )                               (2)

(the group form of OBS's ``w_m^2 / [H^-1]_mm``; ZipLM Eq. 3-4). Greedy removal (ZipLM
Algorithm 1, SlimGPT's greedy pruning) removes the group with the smallest (2), applies the
OBS update ``W <- W - W_g [(H^-1)_gg]^-1 (H^-1)_{g,:}`` and downdates the inverse
``H^-1 <- H^-1 - (H^-1)_{:,g} [(H^-1)_gg]^-1 (H^-1)_{g,:}``; the weights after the last step
equal (1) for the groups it removed, so the choice and the update are one computation.

A bias is handled by appending a constant input (``X`` gets a row of ones, so ``H`` gets the
column sums and the token count): its column is never removed and (1) then also re-fits the
bias, which contains FLAP's bias compensation (``b += W_S mean(x_S)``) as the special case
``H_SK = 0``.

(1) itself, and its generalisation to a target from the dense model, is
:func:`hfprune.solvers.lstsq.lstsq_fit`; damping as in SparseGPT (:func:`hfprune.solvers.lstsq.ridge`),
with which (1) is a ridge regression towards the original weights. Everything is computed in
float64 and returned in the dtype of ``W``. Pure torch; nothing here touches a model.
"""

from __future__ import annotations

import logging

import torch

from hfprune.solvers.lstsq import damped_hessian

__all__ = ["augment_bias", "group_errors", "greedy_remove"]

logger = logging.getLogger(__name__)


def augment_bias(H: torch.Tensor, column_sum: torch.Tensor, count: int,
                 row_sum: torch.Tensor | None = None) -> torch.Tensor:
    """The Hessian of ``[X; 1]``: ``[[X X^T, X 1], [1^T X^T, n]]`` (the last input is the bias).
    For the cross moment ``X X_d^T`` pass ``row_sum = X_d 1`` (the last row; default ``column_sum``)."""
    n = H.shape[0]
    out = H.new_zeros(n + 1, n + 1, dtype=torch.float64)
    out[:n, :n] = H.double()
    s = column_sum.to(out.device, torch.float64)
    out[:n, n] = s
    out[n, :n] = s if row_sum is None else row_sum.to(out.device, torch.float64)
    out[n, n] = float(count)
    return out


def _inverse(Hd: torch.Tensor) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        raise ValueError("The Hessian is not positive definite even after damping; raise the dampening.")
    return torch.cholesky_inverse(L)


def group_errors(W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Eq. (2) for each group alone: ``tr(W_g [(H^{-1})_gg]^{-1} W_g^T)``.

    ``groups`` is ``[n_groups, group_size]`` column indices; returns ``[n_groups]`` (float64).
    """
    Wd = W.detach().double()
    if groups.shape[1] == 1:  # single columns: OBS's w^2 / [H^-1]_mm summed over the rows
        cols = groups[:, 0]
        d = Hinv.diagonal()[cols]
        err = Wd[:, cols].pow(2).sum(0) / d
        return torch.where(d > 0, err, torch.full_like(err, float("inf")))
    blocks = Hinv[groups[:, :, None], groups[:, None, :]]  # [G, s, s]
    Wg = Wd[:, groups].permute(1, 0, 2)  # [G, out, s]
    L, info = torch.linalg.cholesky_ex(blocks)
    sol = torch.cholesky_solve(Wg.transpose(1, 2), L)  # [G, s, out] = B^-1 W_g^T
    err = (Wg.transpose(1, 2) * sol).sum((1, 2))
    bad = info != 0
    if bool(bad.any()):  # a block made singular by earlier removals: never chosen
        err[bad] = float("inf")
    return err


def greedy_remove(W: torch.Tensor, H: torch.Tensor, groups: torch.Tensor, n_remove: int, *, dampening: float = 0.01,
                  buckets: torch.Tensor | None = None, per_bucket: int | None = None,
                  steps: int | None = None) -> tuple[torch.Tensor, list[float]]:
    """ZipLM / SlimGPT greedy structured OBS: remove ``n_remove`` of ``groups`` one at a time,
    each time the one whose removal (with the OBS update of the rest) raises the output error
    least.

    Args:
        W: ``[out, in]`` weights (a bias column may be appended; it is in no group).
        H: ``[in, in]`` Hessian of the layer inputs (see :func:`augment_bias`).
        groups: ``[n_groups, group_size]`` input-column indices of each removable group (heads:
            ``head_dim`` columns each; neurons: one column each).
        n_remove: how many groups go.
        dampening: ridge, as a fraction of the mean diagonal of ``H`` (:func:`~hfprune.solvers.lstsq.ridge`).
        buckets, per_bucket: optional constraint: at most ``per_bucket`` groups removed from each
            bucket (``buckets[g]`` is group ``g``'s bucket; GQA: the KV group of a query head).
        steps: greedy rounds (default: one per removed group). Fewer rounds remove the
            ``n_remove / steps`` cheapest groups of a round together, with one joint OBS update
            (SlimGPT's batched greedy pruning): much faster for hundreds of neurons, nearly the
            same choice. Not combined with ``buckets``.

    Returns:
        ``(removed, errors)``: removed group indices in removal order, and the output-error
        increase of each step (Eq. 2 at the time of removal).
    """
    n_groups = groups.shape[0]
    if not 0 <= n_remove < n_groups:
        raise ValueError(f"Cannot remove {n_remove} of {n_groups} groups; keep at least one.")
    device = W.device
    groups = groups.to(device)
    Wd = W.detach().double().clone()
    Hinv = _inverse(damped_hessian(H.to(device), dampening))
    alive = torch.ones(n_groups, dtype=torch.bool, device=device)
    taken = None
    if buckets is not None:
        buckets = buckets.to(device)
        taken = torch.zeros(int(buckets.max()) + 1, dtype=torch.long, device=device)
    steps = n_remove if steps is None else max(1, min(int(steps), n_remove))
    if steps < n_remove and buckets is not None:
        raise ValueError("greedy_remove: steps < n_remove (batched rounds) cannot be combined with buckets.")
    removed: list[int] = []
    errors: list[float] = []
    for step in range(steps):
        err = group_errors(Wd, Hinv, groups)
        err[~alive] = float("inf")
        if taken is not None and per_bucket is not None:
            err[taken[buckets] >= per_bucket] = float("inf")
        k = (n_remove * (step + 1)) // steps - (n_remove * step) // steps  # groups this round
        chosen = torch.topk(err, k, largest=False).indices
        if not bool(torch.isfinite(err[chosen]).all()):
            raise ValueError("No group can be removed under the per-bucket limit; check per_bucket.")
        cols = groups[chosen].reshape(-1)
        B = Hinv[cols][:, cols]
        rows = Hinv[cols]  # [s, in]
        Binv_rows = torch.linalg.solve(B, rows)  # [(H^-1)_gg]^-1 (H^-1)_{g,:}
        Wd -= Wd[:, cols] @ Binv_rows
        Hinv -= rows.T @ Binv_rows
        Wd[:, cols] = 0
        # The removed block of H^-1 is now (numerically) zero; a unit diagonal keeps later blocks
        # solvable without coupling to the others (ZipLM does the same).
        Hinv[cols, :] = 0
        Hinv[:, cols] = 0
        Hinv[cols, cols] = 1
        alive[chosen] = False
        if taken is not None:
            taken.index_add_(0, buckets[chosen], torch.ones_like(chosen))
        removed.extend(chosen.tolist())  # one device sync per round, not one per group
        errors.extend(err[chosen].tolist())
    return torch.tensor(removed, dtype=torch.long), errors
