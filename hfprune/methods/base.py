"""Base class of the unstructured / N:M pruning methods.

A pruner answers three questions for one linear layer, and never touches devices or hooks
(the runner does that):

* :meth:`Pruner.make_stats`: which calibration statistic to accumulate from the layer's inputs
  (:attr:`Pruner.stats_cls`, ``None`` for data-free methods);
* :meth:`Pruner.score`: the importance of every weight (used for masks and global budgets);
* :meth:`Pruner.prune_weight`: the pruned-mask and, for methods that also update the kept
  weights (SparseGPT), the new weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from hfprune.config import PruningConfig
from hfprune.report import PruneResult
from hfprune.solvers.masks import parse_pattern, prune_count, select_mask
from hfprune.solvers.lstsq import lstsq_fit, relative_output_error
from hfprune.stats import CrossStats, HessianStats

__all__ = ["Pruner", "ModelPruner", "PruneResult", "HessianPruner", "check_quant_config", "check_dense_targets", "DENSE_TARGETS",
           "dense_targets_field"]

DENSE_TARGETS = {
    "off": "its own dense weights' outputs on its pruned inputs (the paper's objective)",
    "block": "the dense block's outputs, the dense block run on the same pruned-model input (corrects the layers "
             "pruned before it in the block; Hessian methods need true_sequential)",
    "model": "the dense model's outputs (a second activation stream)",
}
"""What a Hessian method, or structured compensation, fits each layer to (``dense_targets``)."""


def dense_targets_field(default: str):
    """The ``dense_targets`` config field of a Hessian method or of structured compensation (one help text and
    choice list for all)."""
    text = "; ".join(f"'{k}' {v}" for k, v in DENSE_TARGETS.items())
    # One flag serves every method (the CLI), so the help names each method's default.
    return field(default=default, metadata={"help": f"What each layer is fit to: {text}. Default: 'block' for admm, "
                                                    f"'off' for sparsegpt and structured.", "choices": tuple(DENSE_TARGETS)})

ROW_CHUNK_ELEMENTS = 1 << 20
"""Scores are computed for at most this many weights at a time when the mask is chosen row by row
(N:M, or row scope with the same count in every row): the transient memory of pruning one layer
is then a few MB plus its boolean mask, not several float32/int64 copies of the matrix."""


class Pruner:
    """A layer-wise pruner: :func:`hfprune.prune` runs its per-linear loop
    (:func:`hfprune.core.layerwise.prune_layers`) and asks the pruner for statistics, scores and
    pruned weights, one linear layer at a time."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[PruningConfig]] = PruningConfig
    requires_calibration: ClassVar[bool] = False
    model_level: ClassVar[bool] = False
    """False: layer-wise (this class); True: a :class:`ModelPruner` (plan, then apply, on the whole model)."""
    structured: ClassVar[bool] = False
    """True for methods that change tensor shapes (heads, neurons, blocks, channels, experts) instead of masking weights."""
    stats_cls: ClassVar[type | None] = None
    """Calibration statistic accumulated from each layer's inputs (``None``: none)."""

    def __init__(self, config: PruningConfig):
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}.")
        self.config = config

    @property
    def needs_data(self) -> bool:
        """Whether this run reads calibration data (OWL needs a dense pass even for magnitude)."""
        return self.requires_calibration or bool(getattr(self.config, "owl", False))

    @property
    def report_name(self) -> str:
        """The ``method`` of the report (e.g. ``structured-obs``: the method and its importance)."""
        return self.config.method

    # What a stage does, for the checks of a multi-stage run (hfprune.core.stages).
    refits_weights: ClassVar[bool] = False
    """True when kept weights are re-solved (SparseGPT, ADMM, compensated structured pruning)."""

    @property
    def removes_weights(self) -> bool:
        """Layer-wise: the stage zeroes weights (``sparsity > 0`` or an N:M pattern)."""
        return bool(self.config.sparsity) or parse_pattern(self.config.pattern).is_nm

    @property
    def quantizes(self) -> bool:
        """The stage rounds the kept weights to a grid (``bits``)."""
        return getattr(self.config, "bits", None) is not None

    def make_stats(self, in_features: int, device: torch.device) -> Any | None:
        """A fresh statistics accumulator for a layer with ``in_features`` inputs."""
        return None if self.stats_cls is None else self.stats_cls(in_features, device=device)

    def score(self, W: torch.Tensor, stats: Any | None) -> torch.Tensor:
        raise NotImplementedError

    def prune_weight(self, W: torch.Tensor, stats: Any | None, sparsity: float, scope: str) -> PruneResult:
        """Default: mask the lowest scores with the configured pattern and scope.

        When every row's choice is independent of the others (N:M; row scope with the same
        count in every row) the score is computed and selected in chunks of rows, with the same
        result as one call.
        """
        pattern = parse_pattern(self.config.pattern)
        rows, cols = W.shape
        step = max(1, ROW_CHUNK_ELEMENTS // max(1, cols))
        chunk_sparsity = sparsity
        separable = pattern.is_nm
        if not separable and scope == "row":
            k = prune_count(rows * cols, sparsity)
            separable = k % rows == 0
            chunk_sparsity = (k // rows) / cols
        if not separable or rows <= step:
            return PruneResult(pruned=select_mask(self.score(W, stats), sparsity, pattern, scope))
        pruned = torch.empty(rows, cols, dtype=torch.bool, device=W.device)
        for r in range(0, rows, step):
            pruned[r:r + step] = select_mask(self.score(W[r:r + step], stats), chunk_sparsity, pattern, scope)
        return PruneResult(pruned=pruned)


class ModelPruner(Pruner):
    """A model-level pruner (heads / MLP neurons, whole blocks, residual channels, experts): it plans
    on calibration statistics of the whole model, then applies the plan (tensor shapes and the
    config change). :func:`hfprune.prune` calls :meth:`check` before any calibration, then
    :meth:`prune_model`; the wrapper there sets eval mode and ``use_cache``, counts parameters,
    times the run and writes the report and ``pruning_config``."""

    model_level = True
    structured = True
    requires_calibration = True

    removes_weights = False

    def check(self, model) -> None:
        """Every refusal that does not need calibration data (raise ``ValueError`` naming the fix)."""

    def input_widths(self, model) -> dict[str, int]:
        """The input width of the block's linear layers (names inside a block, e.g. ``mlp.down_proj``)
        that this method changes, as they will be after it ran (``{}``: none change); raise a
        ``ValueError`` when that depends on the calibration data (a non-uniform plan)."""
        return {}

    def prune_model(self, model, ids, calib, *, progress: bool = True) -> dict[str, Any]:
        """Prune ``model`` in place. ``ids``: the calibration token windows (``None`` when
        :attr:`needs_data` is False); ``calib``: the :class:`~hfprune.config.CalibrationConfig`
        (batch size, seed). Returns :class:`~hfprune.report.PruneReport` fields: ``structured``
        (``params_before`` / ``params_after`` are filled in by the caller), and ``blocks``,
        ``depth`` or ``hidden`` where they apply."""
        raise NotImplementedError


class HessianPruner(Pruner):
    """Base of the methods whose solver reconstructs each layer from its Hessian (one per layer input,
    merged across processes) and chooses the mask itself (SparseGPT, ADMM): a subclass gives
    :meth:`solve`; the report of every layer is its relative output error."""

    requires_calibration = True
    stats_cls = HessianStats
    refits_weights = True
    fixed_mask_solver: ClassVar[bool] = False
    """:meth:`solve` takes ``mask=`` (a fixed pruned-mask): a quantization-only run (``sparsity=0``
    with ``bits``) then keeps the zeros already in the weights."""

    def score(self, W, stats):
        # The solvers' saliency is block-adaptive; for global budgets the engine uses Wanda scores instead.
        raise NotImplementedError(f"{self.name} chooses masks inside its solver.")

    def solve(self, W: torch.Tensor, H: torch.Tensor, sparsity: float, scope: str) -> tuple:
        """``(new_W, pruned)`` or ``(new_W, pruned, scale)`` of one layer from its weight and Hessian
        (``scale``: the quantization grid, see :attr:`PruneResult.scale`)."""
        raise NotImplementedError

    @property
    def dense_targets(self) -> str:
        """``config.dense_targets``: ``"off"``, ``"block"`` or ``"model"`` (see :data:`DENSE_TARGETS`)."""
        return getattr(self.config, "dense_targets", "off")

    def make_stats(self, in_features, device, dense_inputs=None):
        if dense_inputs is None:
            return super().make_stats(in_features, device)
        return CrossStats(in_features, device=device, dense_inputs=dense_inputs)

    def prune_weight(self, W, stats, sparsity, scope):
        H = stats.hessian()
        target, info = W, {}
        if getattr(stats, "has_target", False):
            target = lstsq_fit(W, H, stats.cross())  # W X_d fitted on the pruned inputs: W + W (G - H)^T H^-1
            info["dense_target_shift"] = relative_output_error(W, target, H)  # how far the dense fit moved the layer
        kw = {}
        if sparsity == 0 and self.quantizes and self.fixed_mask_solver:
            zeros = W == 0  # quantization only, on weights an earlier stage pruned: their zeros stay zeros
            if bool(zeros.any()):
                kw["mask"] = zeros
        solved = self.solve(target, H, sparsity, scope, **kw)
        new_w, pruned, scale = solved if len(solved) == 3 else (*solved, None)
        info["output_error"] = relative_output_error(target, new_w, H)
        return PruneResult(pruned=pruned, weight=new_w, info=info, scale=scale)


def check_dense_targets(config) -> None:
    """Raise for a ``dense_targets`` value other than the names in :data:`DENSE_TARGETS`."""
    if config.dense_targets not in DENSE_TARGETS:
        raise ValueError(f"dense_targets must be one of {', '.join(map(repr, DENSE_TARGETS))}, got "
                         f"{config.dense_targets!r}.")
    if config.dense_targets == "block" and not config.true_sequential:
        raise ValueError("dense_targets='block' corrects the layers pruned before each layer in its block, and "
                         "without true_sequential no layer sees a pruned one: add true_sequential=True "
                         "(--true-sequential), or use dense_targets='model' or 'off'.")


@dataclass
class HessianPrunerConfig(PruningConfig):
    """The options every Hessian method (SparseGPT, ADMM) shares: joint quantization of the kept weights.
    Subclasses declare ``dense_targets`` (their defaults differ) and call ``super().__post_init__()``."""

    bits: int | None = field(default=None, metadata={
        "help": "Jointly quantize kept weights to 4 or 8 bits (GPTQ sweep on the mask, fake-quantized in the model "
                "dtype; with sparsity 0: quantization only)."})
    group_size: int | None = field(default=None, metadata={
        "help": "Quantization group size along the input (None: per output channel)."})
    sym: bool = field(default=True, metadata={"help": "Symmetric quantization grid."})
    act_order: bool = field(default=False, metadata={
        "help": "Quantization sweep in order of decreasing Hessian diagonal (N:M: whole groups)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_quant_config(self)
        check_dense_targets(self)


def check_quant_config(config) -> None:
    """The joint-quantization options (``bits``, ``group_size``, ``act_order``) of a Hessian method's config."""
    if config.bits is not None and config.bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 4 or 8 (or 2/3), got {config.bits}.")
    if config.group_size is not None and config.group_size < 1:
        raise ValueError(f"group_size must be positive or None, got {config.group_size}.")
    if config.act_order and config.bits is not None and config.group_size is not None:
        raise ValueError("act_order cannot be combined with group_size quantization (groups would not be "
                         "consecutive inputs); drop one of them.")
