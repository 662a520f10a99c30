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

Damping as in SparseGPT: ``H + lambda I`` with ``lambda = damp * mean(diag H)``; with it, (1)
is a ridge regression towards the original weights. Everything is computed in float64 and
returned in the dtype of ``W``. Pure torch; nothing here touches a model.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["damped_hessian", "augment_bias", "compensate", "fit_to_target", "target_error", "group_errors",
           "greedy_remove", "output_error"]

logger = logging.getLogger(__name__)


def damped_hessian(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` in float64; channels that never fired get a unit diagonal
    (their rows and columns are zero, which would make ``H`` singular)."""
    if not 0.0 <= damp:
        raise ValueError(f"damp must be >= 0 (a fraction of the mean Hessian diagonal), got {damp}.")
    H = H.detach().double().clone()
    diag = H.diagonal()
    dead = diag <= 0
    mean = diag[~dead].mean() if bool((~dead).any()) else torch.tensor(1.0, dtype=H.dtype, device=H.device)
    diag[dead] = 1.0
    diag += damp * mean
    return H


def augment_bias(H: torch.Tensor, column_sum: torch.Tensor, count: int) -> torch.Tensor:
    """The Hessian of ``[X; 1]``: ``[[X X^T, X 1], [1^T X^T, n]]`` (the last input is the bias)."""
    n = H.shape[0]
    out = H.new_zeros(n + 1, n + 1, dtype=torch.float64)
    out[:n, :n] = H.double()
    s = column_sum.to(out.device, torch.float64)
    out[:n, n] = s
    out[n, :n] = s
    out[n, n] = float(count)
    return out


def compensate(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Eq. (1): the kept columns ``W'_K = W_K + W_S H_SK (H_KK + lambda I)^{-1}``.

    Args:
        W: ``[out, in]`` weights (for a bias, the ``[out, in + 1]`` matrix ``[W, b]``).
        H: ``[in, in]`` input Hessian ``X X^T`` (any positive scale; see :func:`augment_bias`).
        keep: indices of the kept columns (sorted); every other column is removed.
        damp: ridge, as a fraction of the mean diagonal of ``H``.

    Returns:
        ``[out, len(keep)]`` re-fitted weights (dtype of ``W``).
    """
    n = W.shape[1]
    if H.shape != (n, n):
        raise ValueError(f"H has shape {tuple(H.shape)} but W has {n} input columns.")
    keep = keep.to(W.device)
    removed = torch.ones(n, dtype=torch.bool, device=W.device)
    removed[keep] = False
    Hd = damped_hessian(H.to(W.device), damp)
    Wd = W.detach().double()
    if not bool(removed.any()):
        return W.detach().clone()
    H_KK = Hd[keep][:, keep]
    H_SK = Hd[removed][:, keep]
    L, info = torch.linalg.cholesky_ex(H_KK)
    if int(info) != 0:
        raise ValueError("The kept-column Hessian is not positive definite even after damping; raise damp.")
    delta = torch.cholesky_solve((Wd[:, removed] @ H_SK).T, L).T
    return (Wd[:, keep] + delta).to(W.dtype)


def fit_to_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, keep: torch.Tensor,
                  damp: float = 0.01) -> torch.Tensor:
    """Re-fit the kept columns to another layer's outputs ``T`` (the dense model's, on its own
    inputs): ``argmin ||T - W'_K X_K||^2 + lambda ||W'_K - W_K||^2``, i.e.

        W'_K^T = (H_KK + lambda I)^{-1} (C_K + lambda W_K^T),   C = X T^T   ([in, out])

    With ``T = W X`` (``C = H W^T``) this is :func:`compensate`. ``H`` and ``C`` must share their
    scale (both divided by the token count, say).
    """
    n = W.shape[1]
    if H.shape != (n, n) or C.shape != (n, W.shape[0]):
        raise ValueError(f"H {tuple(H.shape)} / C {tuple(C.shape)} do not fit W {tuple(W.shape)}.")
    keep = keep.to(W.device)
    Hd = damped_hessian(H.to(W.device), damp)
    lam = (Hd.diagonal() - H.to(W.device).double().diagonal()).clamp_min(0)  # the ridge added per column
    H_KK = Hd[keep][:, keep]
    rhs = C.to(W.device).double()[keep] + lam[keep, None] * W.detach().double()[:, keep].T
    L, info = torch.linalg.cholesky_ex(H_KK)
    if int(info) != 0:
        raise ValueError("The kept-column Hessian is not positive definite even after damping; raise damp.")
    return torch.cholesky_solve(rhs, L).T.to(W.dtype)


def target_error(W_K: torch.Tensor, H_KK: torch.Tensor, C_K: torch.Tensor, target_energy: float) -> float:
    """``||T - W_K X_K||^2 = tr(T T^T) - 2 tr(W_K C_K) + tr(W_K H_KK W_K^T)`` (same scale as ``H``)."""
    W_K = W_K.double()
    return float(target_energy - 2 * (W_K * C_K.double().T).sum() + ((W_K @ H_KK.double()) * W_K).sum())


def output_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T)``: the squared output error ``||W X - W' X||^2`` on the
    calibration inputs (``W_new`` has the full width, zeros in removed columns)."""
    D = W.detach().double() - W_new.detach().double()
    return float(((D @ H.double().to(D.device)) * D).sum())


def _inverse(Hd: torch.Tensor) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        raise ValueError("The Hessian is not positive definite even after damping; raise damp.")
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


def greedy_remove(W: torch.Tensor, H: torch.Tensor, groups: torch.Tensor, n_remove: int, *, damp: float = 0.01,
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
        damp: relative dampening of ``H``.
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
    Hinv = _inverse(damped_hessian(H.to(device), damp))
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
