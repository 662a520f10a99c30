"""The SparseGPT Hessian ``H = 2/n * X X^T`` of a layer's inputs (Frantar & Alistarh 2023, Sec. 3.1)."""

from __future__ import annotations

import torch

from hfprune.stats.moments import MomentStats

__all__ = ["HessianStats", "CrossStats"]


class HessianStats:
    """Running sum of ``X X^T`` over calibration tokens, giving ``H = 2/n * X X^T`` (Sec. 3.1).

    ``add_batch`` takes the layer input as it reaches the layer, shape ``[..., in_features]``
    and any floating dtype. Every leading dimension counts as tokens.

    Precision choice: each batch's ``X^T X`` is computed in float32 (a fast GEMM) and added to
    a running sum kept in ``precision`` (float64 by default), which avoids drift when hundreds
    of thousands of tokens are summed; the memory is ``8 * in_features^2`` bytes (about 1 GB
    for ``in_features=11008``).
    Pass ``precision=torch.float32`` to halve that or on GPUs with slow float64.
    The normalisation ``2/n`` is applied only when :meth:`hessian` is asked for, so raw sums
    from several processes can be all-reduced (``state()`` / ``load_state()`` or
    :meth:`merge`) before normalising.

    Args:
        in_features: width of the layer input.
        device: where the sum lives; ``None`` means the device of the first batch.
        precision: dtype of the running sum.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 precision: torch.dtype = torch.float64) -> None:
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}.")
        if not precision.is_floating_point:
            raise ValueError(f"precision must be a floating dtype, got {precision}.")
        self.in_features = int(in_features)
        self.precision = precision
        self.count = 0
        self.xtx: torch.Tensor | None = None
        if device is not None:
            self.xtx = torch.zeros(in_features, in_features, dtype=precision, device=device)

    @property
    def device(self) -> torch.device | None:
        return None if self.xtx is None else self.xtx.device

    def add_batch(self, x: torch.Tensor) -> None:
        """Add the tokens of one batch of layer inputs ``x`` (shape ``[..., in_features]``)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"HessianStats expects inputs with last dimension {self.in_features}, got shape "
                f"{tuple(x.shape)}; hook the input of the layer this accumulator was made for."
            )
        x = x.detach().reshape(-1, self.in_features)
        if self.xtx is None:
            self.xtx = torch.zeros(self.in_features, self.in_features, dtype=self.precision,
                                   device=x.device)
        # The product runs in float32 (fast GEMM); the running sum is kept in ``precision``.
        x = x.to(device=self.xtx.device, dtype=torch.float32)
        self.xtx += (x.T @ x).to(self.precision)
        self.count += x.shape[0]

    def merge(self, other: "HessianStats") -> "HessianStats":
        """Add the sums of ``other`` (for example from another data-parallel rank) into this one."""
        if other.in_features != self.in_features:
            raise ValueError(
                f"Cannot merge HessianStats of width {other.in_features} into width {self.in_features}."
            )
        if other.xtx is not None:
            if self.xtx is None:
                self.xtx = torch.zeros_like(other.xtx, dtype=self.precision)
            self.xtx += other.xtx.to(device=self.xtx.device, dtype=self.precision)
        self.count += other.count
        return self

    def state(self) -> dict[str, torch.Tensor]:
        """Raw sums as tensors, ready for ``torch.distributed.all_reduce`` (SUM) of each entry."""
        xtx = self.xtx
        if xtx is None:
            xtx = torch.zeros(self.in_features, self.in_features, dtype=self.precision)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=xtx.device)
        return {"xtx": xtx, "count": count}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the sums with ``state`` (the output of :meth:`state`, possibly all-reduced)."""
        xtx = state["xtx"]
        if tuple(xtx.shape) != (self.in_features, self.in_features):
            raise ValueError(
                f"State of shape {tuple(xtx.shape)} does not fit width {self.in_features}."
            )
        self.xtx = xtx.to(self.precision).clone()
        self.count = int(round(float(torch.as_tensor(state["count"]).reshape(-1)[0])))

    def hessian(self) -> torch.Tensor:
        """``H = 2/n * X X^T`` in float32 (Sec. 3.1), on the accumulator's device."""
        if self.xtx is None or self.count == 0:
            raise ValueError(
                "HessianStats has seen no calibration tokens; run calibration batches through the "
                "layer (add_batch) before asking for the Hessian."
            )
        return (self.xtx * (2.0 / self.count)).float()

    @property
    def H(self) -> torch.Tensor:  # noqa: N802 - the paper's name
        """Shorthand for :meth:`hessian`."""
        return self.hessian()


class CrossStats(HessianStats):
    """:class:`HessianStats` of the pruned model's layer inputs ``X`` plus their cross moment with the
    *dense* model's (or dense block's) inputs ``X_d`` of the same tokens, ``X^T X_d``, and the first
    moments ``sum x``, ``sum x_d`` (a bias is a constant input). The one statistics class of every
    fit to a dense target (:func:`hfprune.solvers.lstsq.lstsq_fit`): the target ``W X_d`` gives
    ``C = G W^T`` with ``G = X^T X_d``, for Hessian solvers (SparseGPT, ADMM: ``dense_targets``) and
    for structured compensation alike. It also answers the per-channel statistics of
    :class:`~hfprune.stats.MomentStats` (``mean``, ``var``, ``sq_norm``) that structured importances read.

    ``dense_inputs`` holds the dense inputs of this layer, one per call, in the order the
    runner makes the same calls on the pruned stream (:meth:`LayerRunner.record_dense_inputs`);
    each :meth:`add_batch` consumes one. The sums kept are the differences ``X^T (X_d - X)`` and
    ``sum (x_d - x)``, and only for batches whose two inputs differ (a layer at the block input sees
    the same tensor twice and costs nothing more). ``has_target`` is False when no batch differed,
    and when a call finds no dense input or one of another shape (a routed expert sees other tokens
    in the two streams): the layer then keeps the plain objective (``G = H``).
    """

    def __init__(self, in_features: int, device=None, precision: torch.dtype = torch.float64,
                 dense_inputs=None) -> None:
        super().__init__(in_features, device=device, precision=precision)
        self.dense_inputs = dense_inputs
        self.diff: torch.Tensor | None = None  # X^T (X_d - X), raw sum
        self.sum: torch.Tensor | None = None  # sum x
        self.dsum: torch.Tensor | None = None  # sum (x_d - x)
        self.ok = dense_inputs is not None

    @property
    def has_target(self) -> bool:
        return self.ok and self.diff is not None

    def add_batch(self, x: torch.Tensor) -> None:
        super().add_batch(x)
        xd = self.dense_inputs.popleft() if self.ok and self.dense_inputs else None
        if self.ok and (xd is None or xd.shape != x.shape):
            self.ok, self.diff, self.dsum = False, None, None
        x = x.detach().reshape(-1, self.in_features).to(device=self.xtx.device, dtype=torch.float32)
        part = x.sum(0).to(self.precision)
        self.sum = part if self.sum is None else self.sum + part
        if not self.ok:
            return
        xd = xd.detach().reshape(-1, self.in_features).to(device=self.xtx.device, dtype=torch.float32)
        if torch.equal(xd, x):
            return
        if self.diff is None:
            self.diff = torch.zeros_like(self.xtx)
            self.dsum = torch.zeros_like(self.sum)
        self.diff += (x.T @ (xd - x)).to(self.precision)
        self.dsum += (xd - x).sum(0).to(self.precision)

    def merge(self, other: "CrossStats") -> "CrossStats":
        super().merge(other)
        self.ok = self.ok and other.ok
        for name in ("sum",) + (("diff", "dsum") if self.ok else ()):
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs.clone() if mine is None else mine + theirs.to(mine))
        if not self.ok:
            self.diff = self.dsum = None
        return self

    def state(self) -> dict[str, torch.Tensor]:
        out = super().state()
        has = self.has_target
        zeros = torch.zeros(self.in_features, dtype=self.precision, device=out["xtx"].device)
        out["diff"] = self.diff if has else torch.zeros_like(out["xtx"])
        out["sum"] = self.sum if self.sum is not None else zeros
        out["dsum"] = self.dsum if has else zeros
        # Summed across processes: > 0 where any process saw a difference / all-reduce keeps "bad" as a count.
        out["moved"] = torch.tensor([1.0 if has else 0.0], dtype=torch.float64, device=out["xtx"].device)
        out["bad"] = torch.tensor([0.0 if self.ok else 1.0], dtype=torch.float64, device=out["xtx"].device)
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state(state)
        self.ok = float(torch.as_tensor(state["bad"]).reshape(-1)[0]) < 0.5
        moved = float(torch.as_tensor(state["moved"]).reshape(-1)[0]) > 0.5
        self.sum = state["sum"].to(self.precision).clone()
        self.diff = state["diff"].to(self.precision).clone() if self.ok and moved else None
        self.dsum = state["dsum"].to(self.precision).clone() if self.ok and moved else None

    def cross(self) -> torch.Tensor:
        """``G = 2/n * X^T X_d`` in float32 (the Hessian's normalisation)."""
        if not self.has_target:
            raise ValueError("No dense-model inputs that differ from the layer's own were recorded for this layer.")
        return ((self.xtx + self.diff) * (2.0 / self.count)).float()

    # The per-channel statistics of MomentStats, from the same sums (structured importances read them).
    _check = MomentStats._check
    mean = MomentStats.mean
    sq_norm = MomentStats.sq_norm
    var = MomentStats.var
