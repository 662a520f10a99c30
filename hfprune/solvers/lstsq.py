"""The one ridge least-squares fit of a linear layer, its damping rule and its error measures.

Every compensation in hfprune is the same problem: given the layer's inputs ``X`` on the pruned
model (``[in, n]``), fit the kept input columns ``K`` of ``W'`` to a target output ``T``:

    argmin_{W'_K} ||T - W'_K X_K||^2 + lambda ||W'_K - W_K||^2
    W'_K^T = (H_KK + lambda I)^{-1} (C_K + lambda W_K^T),      H = X X^T,  C = X T^T

The target is always the layer's own (original) weights on some inputs ``X_d``: ``T = W X_d``, so
``C = G W^T`` with the cross moment ``G = X X_d^T`` (:class:`~hfprune.stats.CrossStats`).

* ``X_d = X`` (``G = H``; the pruned model's own outputs): structured OBS compensation of the
  removed columns, ``W'_K = W_K + W_S H_SK (H_KK + lambda I)^{-1}`` (ZipLM / SlimGPT).
* ``X_d`` = the dense model's inputs: the fit corrects the drift earlier pruned layers left.
  With every column kept it is the dense-target weight ``W_t = W + W (G - H)^T (H + lambda I)^{-1}``
  that a Hessian solver (SparseGPT, ADMM) then prunes: ``||W X_d - W' X||^2 = ||(W_t - W') X||^2 +
  const``; with columns removed it is structured compensation to the dense model's outputs.

Damping (:func:`ridge`) is SparseGPT's rule for every solver: ``lambda = dampening * mean(diag H)``
over the channels that fired; it pulls the fit towards ``W``. Float64 throughout; pure torch.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ridge", "damped_hessian", "lstsq_fit", "relative_output_error", "squared_output_error",
           "target_error"]


def ridge(H: torch.Tensor, dampening: float) -> float:
    """The ridge ``lambda = dampening * mean(diag H)``, the mean over the channels that fired
    (``diag > 0``); with none, ``dampening``. Every Hessian solver damps by this rule."""
    diag = H.diagonal()
    live = diag > 0
    if bool(live.all()):
        return float(dampening) * float(diag.mean())
    return float(dampening) * (float(diag[live].mean()) if bool(live.any()) else 1.0)


def damped_hessian(H: torch.Tensor, dampening: float) -> torch.Tensor:
    """``H + lambda I`` (:func:`ridge`) as a float64 copy; channels that never fired get a unit
    diagonal first (their rows and columns are zero, which would make ``H`` singular)."""
    if not 0.0 <= dampening:
        raise ValueError(f"dampening must be >= 0 (a fraction of the mean Hessian diagonal), got {dampening}.")
    H = H.detach().double().clone()
    lam = ridge(H, dampening)
    diag = H.diagonal()
    diag[diag <= 0] = 1.0
    diag += lam
    return H


def lstsq_fit(W: torch.Tensor, H: torch.Tensor, G: torch.Tensor | None = None, keep: torch.Tensor | None = None,
              dampening: float = 0.01) -> torch.Tensor:
    """The kept columns of the ridge least-squares fit of ``W`` to the target ``W X_d`` (module doc):

        W'_K = W_K + [(G - H)_K: W^T + H_KS W_S^T]^T (H_KK + lambda I)^{-1}

    Args:
        W: ``[out, in]`` weights (with a bias, ``[W, b]`` and the Hessians of ``[X; 1]``).
        H: ``[in, in]`` Hessian ``X X^T`` of the pruned model's inputs (any positive scale).
        G: ``[in, in]`` cross moment ``X X_d^T`` on the same scale (``None``: ``G = H``, the fit to
            the layer's own outputs).
        keep: indices of the kept columns (sorted); ``None`` keeps all.
        dampening: ``lambda`` as a fraction of the mean diagonal of ``H`` (:func:`ridge`).

    Returns:
        ``[out, len(keep)]`` fitted weights in ``W``'s dtype and device.
    """
    n = W.shape[1]
    if H.shape != (n, n) or (G is not None and G.shape != (n, n)):
        raise ValueError(f"H {tuple(H.shape)} / G {None if G is None else tuple(G.shape)} do not fit W "
                         f"{tuple(W.shape)}: both must be [{n}, {n}].")
    Wd = W.detach().double()
    Hd = damped_hessian(H.to(W.device), dampening)
    if keep is None:  # every column kept: no copies of the n x n blocks
        rhs, H_KK, W_K = Wd.new_zeros(n, W.shape[0]), Hd, Wd
    else:
        keep = keep.to(W.device)
        removed = torch.ones(n, dtype=torch.bool, device=W.device)
        removed[keep] = False
        rhs, H_KK, W_K = Wd.new_zeros(len(keep), W.shape[0]), Hd[keep][:, keep], Wd[:, keep]
        if bool(removed.any()):
            rhs += (Wd[:, removed] @ Hd[removed][:, keep]).T
        elif G is None:
            return W.detach().clone()
    if G is not None:
        shift = (G.to(W.device, torch.float64) - H.to(W.device, torch.float64)) @ Wd.T  # X (X_d - X)^T W^T
        rhs += shift if keep is None else shift[keep]
    elif keep is None:
        return W.detach().clone()
    L, info = torch.linalg.cholesky_ex(H_KK)
    if int(info) != 0:
        raise ValueError("The kept-column Hessian is not positive definite even after damping; raise the dampening.")
    return (W_K + torch.cholesky_solve(rhs, L).T).to(W.dtype)


def squared_output_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T)``: the squared output error ``||W X - W' X||^2`` on the calibration
    inputs, on ``H``'s scale (``W_new`` has the full width, zeros in removed columns); float64."""
    D = W.detach().double() - W_new.detach().double()
    return float(((D @ H.double().to(D.device)) * D).sum())


def relative_output_error(W: torch.Tensor, new_W: torch.Tensor, H: torch.Tensor) -> float:
    """Relative layer-output error ``||(W - W') X|| / ||W X||`` on the calibration inputs, from the
    Hessian alone (the scale of ``H`` cancels); float32, as the per-layer report records it."""
    H = H.to(device=W.device, dtype=torch.float32)
    W = W.float()
    D = W - new_W.to(device=W.device, dtype=torch.float32)
    num = float(((D @ H) * D).sum())
    den = float(((W @ H) * W).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def target_error(W_K: torch.Tensor, H_KK: torch.Tensor, C_K: torch.Tensor, target_energy: float) -> float:
    """``||T - W_K X_K||^2 = tr(T T^T) - 2 tr(W_K C_K) + tr(W_K H_KK W_K^T)`` (same scale as ``H``)."""
    W_K = W_K.double()
    return float(target_energy - 2 * (W_K * C_K.double().T).sum() + ((W_K @ H_KK.double()) * W_K).sum())
