"""Train-time gradual pruning (Zhu & Gupta 2017): :func:`cubic_sparsity`, :class:`GradualPruner`
(plain torch) and :class:`GradualPruningCallback` (``Trainer``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from hfprune.report import zero_counts
from transformers import TrainerCallback
from transformers.pytorch_utils import Conv1D

from hfprune.solvers.masks import global_budgets, layer_mask, nm_mask, parse_pattern, row_mask
from hfprune.training.masks import _matches, _MaskSet, _prunable_weights

logger = logging.getLogger(__name__)


def cubic_sparsity(step: int, initial_sparsity: float, final_sparsity: float, start_step: int,
                   end_step: int) -> float:
    """Cubic sparsity schedule of Zhu & Gupta (2017):
    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0))^3`` for ``t0 <= t <= end``,
    ``s_i`` before ``t0`` and ``s_f`` after ``end`` (``end - t0`` is the paper's ``n * Δt``)."""
    for value, label in ((initial_sparsity, "initial_sparsity"), (final_sparsity, "final_sparsity")):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{label} must be in [0, 1], got {value}.")
    if end_step < start_step:
        raise ValueError(f"end_step ({end_step}) must not be before start_step ({start_step}).")
    if step >= end_step:
        return float(final_sparsity)
    if step <= start_step:
        return float(initial_sparsity)
    frac = (step - start_step) / (end_step - start_step)
    return float(final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3)


_SCORES = ("magnitude", "movement", "taylor")
_SCOPES = ("layer", "row", "global")


class _Target:
    """A prunable weight seen as a ``[out, in]`` matrix (Conv2d flattened to ``[out, in*kh*kw]``,
    ``transformers`` Conv1D transposed from its ``[in, out]`` storage)."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.weight: torch.Tensor = module.weight
        self.bias = getattr(module, "bias", None)
        self.transposed = isinstance(module, Conv1D)

    def to2d(self, t: torch.Tensor) -> torch.Tensor:
        return t.t() if self.transposed else t.reshape(t.shape[0], -1)

    def from2d(self, t: torch.Tensor) -> torch.Tensor:
        return t.t().contiguous() if self.transposed else t.reshape(self.weight.shape)

    @property
    def shape2d(self) -> tuple[int, int]:
        w = self.to2d(self.weight)
        return int(w.shape[0]), int(w.shape[1])


class GradualPruner:
    """Train-time gradual pruning for any ``nn.Module`` with Linear / Conv2d (/ Conv1D) layers.

    Call :meth:`step` with the number of optimizer steps done so far, after every
    ``optimizer.step()``. Every ``frequency`` steps from ``start_step`` (and once more at
    ``end_step``) it prunes to :func:`cubic_sparsity`; every call re-applies the masks, and
    gradient hooks zero pruned gradients, so pruned weights stay exactly zero. Masks only grow:
    already-pruned entries score ``-inf`` and are chosen first.

    Args:
        model: the model; targets are its Linear / Conv2d / Conv1D weights, minus peft adapter
            weights and the output embedding (``get_output_embeddings()``), filtered by
            ``include`` / ``exclude`` regexes searched in the module name.
        final_sparsity, initial_sparsity, start_step, end_step, frequency: the schedule.
        pattern: ``"unstructured"``; ``"N:M"`` (keep N of every M consecutive inputs of a row;
            there is no ramp: the final N:M pattern is applied at ``start_step`` and kept, the
            sparsity arguments are ignored); or ``"rows"`` (structured, MLP-neuron style: whole
            output rows / output channels, with their bias entries).
        score: ``"magnitude"`` |W| (row L2 norm for ``rows``); ``"movement"`` accumulated
            ``-W * grad`` (Sanh et al. 2020); ``"taylor"`` accumulated ``|W * grad|``. Gradient
            scores accumulate over every backward since the last prune and fall back to
            magnitude for weights that saw no gradient (frozen, or no step yet).
        scope: ``"layer"`` (each matrix to the target), ``"row"`` (every output row to the
            target, unstructured only) or ``"global"`` (one budget over all targets via
            :func:`hfprune.solvers.masks.global_budgets`; for ``rows`` the budget counts rows).
        optimizer: optional; its per-element state (Adam moments) is zeroed where weights are
            newly pruned. Conv2d rows are flattened in (in, kh, kw) order for N:M groups.
    """

    def __init__(self, model: nn.Module, final_sparsity: float = 0.5, *, initial_sparsity: float = 0.0,
                 start_step: int = 0, end_step: int = 1000, frequency: int = 100,
                 pattern: str = "unstructured", score: str = "magnitude", scope: str = "layer",
                 include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                 optimizer=None):
        self.structured = str(pattern).strip().lower() == "rows"
        self.pattern = None if self.structured else parse_pattern(pattern)
        if score not in _SCORES:
            raise ValueError(f"Unknown score {score!r}: use one of {_SCORES}.")
        if scope not in _SCOPES:
            raise ValueError(f"Unknown scope {scope!r}: use one of {_SCOPES}.")
        if self.structured and scope == "row":
            raise ValueError("scope='row' does not apply to pattern='rows'; use 'layer' or 'global'.")
        if frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {frequency}.")
        cubic_sparsity(start_step, initial_sparsity, final_sparsity, start_step, end_step)  # validates
        if final_sparsity >= 1.0:
            raise ValueError("final_sparsity must be < 1.")
        self.model = model
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.start_step, self.end_step, self.frequency = int(start_step), int(end_step), int(frequency)
        self.score, self.scope, self.optimizer = score, scope, optimizer
        if self.pattern is not None and self.pattern.is_nm and final_sparsity not in (0.5, self.pattern.sparsity):
            logger.info("GradualPruner: pattern %s fixes sparsity at %.3f; final_sparsity=%.3f is ignored.",
                        self.pattern, self.pattern.sparsity, final_sparsity)

        self.targets: dict[str, _Target] = {}
        self.skipped: list[str] = []
        self._find_targets(include, exclude)
        if not self.targets:
            raise ValueError("GradualPruner found no Linear / Conv2d / Conv1D weight to prune.")

        self._masks = _MaskSet()
        self._scores: dict[str, torch.Tensor] = {}
        self.last_prune_step: int | None = None
        self._warned_fallback = False
        for name, t in self.targets.items():
            self._masks.set(name, t.weight, torch.zeros_like(t.weight, dtype=torch.bool))
            self._masks.add_hook(name, self._accumulate if score != "magnitude" else None)
            if self.structured and isinstance(t.bias, torch.Tensor):
                key = f"{name}#bias"
                self._masks.set(key, t.bias, torch.zeros_like(t.bias, dtype=torch.bool))
                self._masks.add_hook(key)

    # -- setup --------------------------------------------------------------------------------
    def _find_targets(self, include, exclude) -> None:
        include = list(include) if include is not None else None
        exclude = list(exclude or ())
        out_emb = None
        if hasattr(self.model, "get_output_embeddings"):
            try:
                out_emb = self.model.get_output_embeddings()
            except (AttributeError, NotImplementedError):
                out_emb = None
        out_ids = {id(p) for p in out_emb.parameters()} if isinstance(out_emb, nn.Module) else set()
        for param_name, module, weight in _prunable_weights(self.model):
            mod_name = param_name[: -len(".weight")] if param_name.endswith(".weight") else ""
            if id(weight) in out_ids or not weight.is_floating_point():
                continue
            if (include is not None and not _matches(mod_name, include)) or _matches(mod_name, exclude):
                continue
            target = _Target(mod_name, module)
            if self.pattern is not None and self.pattern.is_nm and target.shape2d[1] % self.pattern.m:
                logger.warning("GradualPruner: skipping %s: input width %d is not a multiple of %d.",
                               mod_name, target.shape2d[1], self.pattern.m)
                self.skipped.append(mod_name)
                continue
            self.targets[mod_name] = target

    def _accumulate(self, key: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            contrib = param.detach().float() * grad.detach().float()
            contrib = -contrib if self.score == "movement" else contrib.abs()
            acc = self._scores.get(key)
            self._scores[key] = contrib if acc is None else acc.add_(contrib)

    # -- schedule -----------------------------------------------------------------------------
    def target_sparsity(self, step: int) -> float:
        """The sparsity the schedule asks for after ``step`` optimizer steps."""
        if self.pattern is not None and self.pattern.is_nm:
            return float(self.pattern.sparsity)
        return cubic_sparsity(step, self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step)

    def _due(self, step: int) -> bool:
        if step < self.start_step:
            return False
        last = self.last_prune_step
        if last is None:
            return True
        if last >= self.end_step:
            return False
        return step - last >= self.frequency or step >= self.end_step

    def step(self, global_step: int) -> bool:
        """Prune if the schedule says so at ``global_step``, then re-apply all masks.
        Returns whether it pruned."""
        pruned = False
        if self._due(global_step):
            self.prune(self.target_sparsity(global_step))
            self.last_prune_step = int(global_step)
            pruned = True
        self.apply_masks()
        return pruned

    # -- pruning ------------------------------------------------------------------------------
    def _score2d(self, name: str, target: _Target) -> torch.Tensor:
        acc = self._scores.get(name)
        if self.score == "magnitude" or acc is None:
            if self.score != "magnitude" and not self._warned_fallback:
                logger.warning("GradualPruner: no gradient seen for %s (frozen or before the first backward); "
                               "using magnitude scores for it.", name)
                self._warned_fallback = True
            base = target.weight.detach().float().abs()
            if self.structured:
                return target.to2d(base).pow(2).sum(1).sqrt()
            score = base
        else:
            score = acc.float()
            if self.structured:
                return target.to2d(score).sum(1)
        return target.to2d(score).clone()

    @torch.no_grad()
    def prune(self, sparsity: float) -> None:
        """Grow the masks to ``sparsity`` (ignored for N:M) and zero the newly pruned weights."""
        is_nm = self.pattern is not None and self.pattern.is_nm
        if sparsity <= 0.0 and not is_nm:
            return  # nothing to prune yet (the schedule starts at 0)
        old = {n: self._masks.entries[n].mask for n in self.targets}
        scores = {}
        for name, target in self.targets.items():
            s = self._score2d(name, target)
            old2d = target.to2d(old[name])
            if self.structured:
                s = s.masked_fill(old2d.all(1), float("-inf"))
            else:
                s = s.masked_fill(old2d, float("-inf"))
            scores[name] = s
        if self.scope == "global" and not is_nm:
            budgets = global_budgets(scores, sparsity)
            fractions = {n: budgets[n] / scores[n].numel() for n in scores}
        else:
            fractions = {n: sparsity for n in scores}

        newly = []
        for name, target in self.targets.items():
            s = scores[name]
            if self.structured:
                rows_pruned = layer_mask(s, fractions[name])
                mask2d = rows_pruned[:, None].expand(*target.shape2d)
            elif self.pattern.is_nm:
                mask2d = nm_mask(s, self.pattern.n, self.pattern.m)
            elif self.scope == "row":
                mask2d = row_mask(s, fractions[name])
            else:
                mask2d = layer_mask(s, fractions[name])
            mask = target.from2d(mask2d.to(old[name].device)) | old[name]
            self._masks.entries[name].mask = mask
            newly.append(name)
            if self.structured and f"{name}#bias" in self._masks.entries:
                self._masks.entries[f"{name}#bias"].mask = rows_pruned.to(target.bias.device)
                newly.append(f"{name}#bias")
        self._masks.apply()
        self._masks.clear_optimizer_state(self.optimizer, newly)
        if self.score == "taylor":
            self._scores.clear()  # Taylor importance is a window since the last prune
        if self._scores and self.score == "movement":
            for name, acc in self._scores.items():  # pruned entries no longer compete
                acc.masked_fill_(self._masks.entries[name].mask.to(acc.device), 0)
        logger.info("GradualPruner: pruned to %.4f (target %.4f, %s, score=%s, scope=%s).",
                    self.sparsity(), sparsity, "rows" if self.structured else self.pattern,
                    self.score, self.scope)

    # -- enforcement & inspection ---------------------------------------------------------------
    def apply_masks(self) -> None:
        """Zero every pruned weight (and pruned-row bias)."""
        self._masks.apply()

    def mask_grads(self) -> None:
        self._masks.mask_grads()

    def resume(self, global_step: int) -> None:
        """Rebuild masks from the model's zeros (e.g. after loading a checkpoint) and continue the
        schedule from ``global_step``."""
        with torch.no_grad():
            for name, target in self.targets.items():
                self._masks.entries[name].mask = target.weight == 0
        if global_step >= self.start_step:
            done = (min(global_step, self.end_step) - self.start_step) // self.frequency
            self.last_prune_step = self.start_step + done * self.frequency
            if global_step >= self.end_step:
                self.last_prune_step = self.end_step

    def remove_hooks(self) -> None:
        self._masks.remove_hooks()

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{module name: pruned-mask}`` of the weights (same shape as the weight)."""
        return {n: self._masks.entries[n].mask for n in self.targets}

    def layer_sparsity(self) -> dict[str, float]:
        return {n: v["sparsity"] for n, v in zero_counts((n, t.weight) for n, t in self.targets.items())["layers"].items()}

    def sparsity(self) -> float:
        """Fraction of exact zeros over all targeted weights."""
        return zero_counts((n, t.weight) for n, t in self.targets.items())["sparsity"]


class GradualPruningCallback(TrainerCallback):
    """Run a :class:`GradualPruner` inside ``Trainer``.

    The pruner is built at ``on_train_begin`` (when the model and optimizer exist). Pruning steps
    happen at ``on_step_end`` with ``state.global_step`` (optimizer steps done); masks are
    re-applied at ``on_optimizer_step`` and pruned gradients are zeroed by hooks and again at
    ``on_pre_optimizer_step``. ``end_step=None`` ends the ramp at 75% of ``max_steps`` so the
    remaining quarter fine-tunes at the final sparsity. When training resumes from a checkpoint
    (``global_step > 0``) the masks are rebuilt from the model's zeros. Other arguments are those
    of :class:`GradualPruner`; the pruner is available as ``self.pruner``.
    """

    def __init__(self, final_sparsity: float = 0.5, *, initial_sparsity: float = 0.0, start_step: int = 0,
                 end_step: int | None = None, frequency: int = 100, pattern: str = "unstructured",
                 score: str = "magnitude", scope: str = "layer", include: Iterable[str] | None = None,
                 exclude: Iterable[str] | None = None):
        self.kwargs = dict(final_sparsity=final_sparsity, initial_sparsity=initial_sparsity, start_step=start_step,
                           frequency=frequency, pattern=pattern, score=score, scope=scope, include=include,
                           exclude=exclude)
        self.end_step = end_step
        self.pruner: GradualPruner | None = None
        cubic_sparsity(start_step, initial_sparsity, final_sparsity, start_step,
                       end_step if end_step is not None else start_step)  # validate early

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("GradualPruningCallback needs the model passed to on_train_begin.")
        end = self.end_step
        if end is None:
            end = max(self.kwargs["start_step"], int(round(0.75 * state.max_steps)))
        if self.pruner is not None:
            self.pruner.remove_hooks()
        self.pruner = GradualPruner(model, end_step=end, optimizer=optimizer, **self.kwargs)
        if state.global_step > 0:
            self.pruner.resume(state.global_step)
        else:
            self.pruner.step(0)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.pruner is not None:
            self.pruner.mask_grads()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.pruner is not None:
            self.pruner.apply_masks()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.pruner is not None:
            if optimizer is not None:
                self.pruner.optimizer = optimizer
            self.pruner.step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.pruner is not None:
            self.pruner.apply_masks()
            self.pruner.remove_hooks()
            logger.info("GradualPruningCallback: final sparsity %.4f over %d layers.",
                        self.pruner.sparsity(), len(self.pruner.targets))
