"""The typed record of what was pruned (:class:`PruneReport`) and the one zero counter.

:func:`hfprune.prune` returns the record; :func:`hfprune.save_pretrained`, the model card and the
streaming / CLI paths take it explicitly. It is serialised into ``config.json`` as
``pruning_config`` (:meth:`PruneReport.pruning_config`) so a reloaded checkpoint still describes
itself; a reloaded dict is parsed back into a record once (:meth:`PruneReport.from_model`).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch

__all__ = ["PruneReport", "DepthRemoval", "HiddenRemoval", "peak_rss_mb", "peak_cuda_mb", "reset_peak_cuda", "count_zeros", "zero_counts", "layer_sparsity_report"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    On Linux this reads ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` can carry a parent
    process's peak into a child started with exec, which would overstate a CLI run's memory.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / (1024.0 * 1024.0)


def _cuda_in_use() -> bool:
    # A process that never touched CUDA allocated nothing there; asking would create a CUDA context
    # (hundreds of MB of host and device memory) on a GPU machine running a CPU prune.
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def reset_peak_cuda() -> None:
    """Start a new peak for :func:`peak_cuda_mb` on every visible CUDA device (no-op without CUDA in use)."""
    if _cuda_in_use():
        for device in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(device)


def peak_cuda_mb() -> float | None:
    """Peak CUDA memory held by tensors (``torch.cuda.max_memory_allocated``) since the last
    :func:`reset_peak_cuda`, in MiB: the largest over the visible devices (a model split across
    GPUs with ``device_map`` reports its fullest GPU). ``None`` when this process has not used CUDA."""
    if not _cuda_in_use():
        return None
    return max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**20


def count_zeros(t: torch.Tensor, chunk: int = 1 << 20) -> int:
    """Exact zeros in ``t``, a slice at a time (a whole-tensor comparison costs several bytes per element)."""
    flat = t.detach().reshape(-1)
    return sum(int((flat[s:s + chunk] == 0).sum().item()) for s in range(0, flat.numel(), chunk))


def zero_counts(named: Iterable[tuple[str, torch.Tensor]], shape: bool = False) -> dict[str, Any]:
    """``{"layers": {name: {"sparsity", "zeros", "numel"[, "shape"]}}, "zeros", "numel", "sparsity"}``."""
    layers = {}
    for name, t in named:
        zeros = count_zeros(t)
        layers[name] = {"sparsity": zeros / max(1, t.numel()), "zeros": zeros, "numel": t.numel(),
                        **({"shape": list(t.shape)} if shape else {})}
    zeros, numel = sum(v["zeros"] for v in layers.values()), sum(v["numel"] for v in layers.values())
    return {"layers": layers, "zeros": zeros, "numel": numel, "sparsity": zeros / max(1, numel)}


def layer_sparsity_report(model: torch.nn.Module, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Sparsity of the weight of every named module in ``names`` (all linear layers when ``None``)."""
    from hfprune.arch import is_linear, weight_matrix

    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if is_linear(m)]
    return zero_counts(((n, weight_matrix(modules[n])) for n in names), shape=True)["layers"]


@dataclass
class DepthRemoval:
    """What depth pruning removed (:mod:`hfprune.structured.depth`)."""

    criterion: str
    blocks_before: int
    blocks_after: int
    removed: list[int]
    """Indices (in the model before pruning) of the decoder blocks removed."""
    scores: list[float]
    """The criterion's score of every candidate (per block; ``angular``: per start of a run)."""
    config_changes: dict[str, Any] = field(default_factory=dict)
    """``{field: {"before", "after"}}`` of every config field rewritten (layer count, per-layer lists)."""
    block_influence: list[float] | None = None
    angular_distance: list[float] | None = None


@dataclass
class HiddenRemoval:
    """What hidden-size (embedding-channel) pruning removed (:mod:`hfprune.structured.hidden`)."""

    hidden_before: int
    hidden_after: int
    removed_channels: list[int]
    """Indices of the residual-stream channels removed."""
    resized: list[str] = field(default_factory=list)
    """Parameters that lost hidden channels (``name: old shape -> new shape``)."""
    config_changes: dict[str, Any] = field(default_factory=dict)
    norm_scale: dict[str, float] | None = None
    """Norm weight corrections applied (``norm_correction``): module name -> factor."""


@dataclass
class PruneReport:
    method: str
    config: dict[str, Any]
    calibration: dict[str, Any] | None
    layers: dict[str, dict[str, Any]]
    prune_seconds: float
    peak_rss_mb: float
    peak_cuda_mb: float | None = None
    sparsity: float = 0.0
    """Zeros over all weights of the pruned layers."""
    model_sparsity: float = 0.0
    """Zeros over all parameters of the model (tied tensors counted once)."""
    blocks: list[dict[str, Any]] = field(default_factory=list)
    """Per decoder block: its index and sparsity over its pruned layers (structured: kept shapes)."""
    structured: dict[str, Any] | None = None
    """Structured pruning only: parameters before/after and what each block kept."""
    pattern: str = "unstructured"
    """``"unstructured"`` or ``"N:M"``: what the formats encode (structured: unstructured)."""
    base_model: str | None = None
    """Where the dense model came from (the model card's ``base_model``)."""
    command: str | None = None
    """The command line that produced the model (for the card)."""

    experts: dict[str, Any] | None = None
    """MoE models: calibration tokens per expert weight (``tokens``) and the expert weights that saw
    fewer than their input width or ``min_expert_tokens`` (``few_tokens``)."""

    depth: DepthRemoval | None = None
    """Depth pruning: the blocks removed and the criterion's scores."""
    hidden: HiddenRemoval | None = None
    """Hidden-size pruning: the residual channels removed."""
    quant_scales: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """Joint quantization (``bits`` in :attr:`config`): per pruned layer, the float32 ``[out, groups]``
    scales of the symmetric grid its kept weights lie on (``weight = scale * q``); the formats store
    the integers on exactly this grid. In memory only (not in ``config.json`` or :meth:`to_dict`): a
    record read back from a checkpoint has none, and the formats then find the grid from the values."""

    def scales_for(self, bits: int | None, group_size: int | None) -> dict[str, torch.Tensor]:
        """:attr:`quant_scales` by weight name (``<module>.weight``) when this run quantized to
        ``bits`` with ``group_size`` (what a format is asked to store), else ``{}``."""
        if not self.quant_scales or bits is None or self.config.get("bits") != bits \
                or self.config.get("group_size") != group_size:
            return {}
        return {f"{name}.weight": scale for name, scale in self.quant_scales.items()}

    def save_to_model(self, model) -> None:
        """Set ``model.config.pruning_config`` to this run's entry; an earlier run's entry (a model
        pruned in several steps, e.g. width then depth) is kept under ``"previous"``."""
        earlier = getattr(model.config, "pruning_config", None)
        entry = self.pruning_config()
        if isinstance(earlier, dict) and earlier:
            entry["previous"] = earlier
        model.config.pruning_config = entry

    def pruning_config(self) -> dict[str, Any]:
        """The ``config.pruning_config`` entry written to ``config.json`` (serialisation only)."""
        if self.structured is not None:
            s = self.structured
            out = {**self.config, "params_before": s["params_before"], "params_after": s["params_after"],
                   "reload_with": s["reload_with"], "calibration": self.calibration}
            if self.depth is not None:
                out["removed_blocks"] = list(self.depth.removed)
            if self.hidden is not None:
                out.update(hidden_before=self.hidden.hidden_before, hidden_after=self.hidden.hidden_after)
        else:
            out = {**self.config, "achieved_sparsity": self.sparsity,
                   "layer_sparsity": {n: round(v["sparsity"], 6) for n, v in self.layers.items()},
                   "calibration": self.calibration}
        out.update({k: v for k, v in (("command", self.command), ("base_model", self.base_model)) if v})
        return out

    def save_to(self, config) -> None:
        """Serialise into ``config.pruning_config`` (keys already there, e.g. edited by hand, win)."""
        config.pruning_config = {**self.pruning_config(), **(getattr(config, "pruning_config", None) or {})}

    @classmethod
    def from_model(cls, model) -> "PruneReport | None":
        """The record of a model reloaded from a pruned checkpoint (its ``config.pruning_config``), or ``None``."""
        pc = getattr(getattr(model, "config", None), "pruning_config", None)
        if not isinstance(pc, dict):
            return None
        return cls(method=str(pc.get("method", "")), config=pc, calibration=pc.get("calibration"), layers={},
                   prune_seconds=0.0, peak_rss_mb=0.0, sparsity=float(pc.get("achieved_sparsity") or 0.0),
                   pattern=str(pc.get("pattern") or "unstructured"), base_model=pc.get("base_model"),
                   command=pc.get("command"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(dataclasses.replace(self, quant_scales={}))
        out.pop("quant_scales")
        return out

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text

    def by_layer_type(self) -> dict[str, float]:
        """Sparsity aggregated by the last component of the layer name (``q_proj``, ``down_proj``...)."""
        agg: dict[str, list[int]] = {}
        for name, info in self.layers.items():
            key = name.rsplit(".", 1)[-1]
            zeros_numel = agg.setdefault(key, [0, 0])
            zeros_numel[0] += info["zeros"]
            zeros_numel[1] += info["numel"]
        return {k: z / n for k, (z, n) in agg.items()}

    def __str__(self) -> str:
        if self.structured is not None:
            s = self.structured
            lines = [f"hfprune {self.method}: parameters {s['params_before']:,} -> {s['params_after']:,} "
                     f"({100 * self.sparsity:.1f}% removed), {self.prune_seconds:.1f} s, peak RSS {self.peak_rss_mb:.0f} MiB, "
                     f"reload with {s['reload_with']}"]
            if self.depth is not None:
                d = self.depth
                lines.append(f"  blocks {d.blocks_before} -> {d.blocks_after} ({d.criterion}), removed {d.removed}")
            if self.hidden is not None:
                h = self.hidden
                lines.append(f"  hidden size {h.hidden_before} -> {h.hidden_after}")
            for b in self.blocks[:3]:
                lines.append("  block %d: %s" % (b["index"], ", ".join(f"{k}={v}" for k, v in b.items() if k != "index")))
            if len(self.blocks) > 3:
                lines.append(f"  ... {len(self.blocks) - 3} more blocks")
            return "\n".join(lines)
        lines = [
            f"hfprune {self.method} ({self.config.get('pattern')}, scope={self.config.get('scope')}): "
            f"sparsity {self.sparsity:.4f} over {len(self.layers)} layers "
            f"(whole model {self.model_sparsity:.4f}), {self.prune_seconds:.1f} s, peak RSS {self.peak_rss_mb:.0f} MiB"
            + (f", peak CUDA {self.peak_cuda_mb:.0f} MiB" if self.peak_cuda_mb else ""),
            "  by layer type: " + ", ".join(f"{k} {v:.4f}" for k, v in self.by_layer_type().items()),
        ]
        if self.blocks and "sparsity" in self.blocks[0]:
            lines.append("  by block: " + " ".join(f"{b['index']}:{b['sparsity']:.3f}" for b in self.blocks))
        if self.experts:
            tokens = list(self.experts["tokens"].values())
            lines.append(f"  experts ({self.experts['calibration']} tokens): {len(tokens)} expert weights, calibration "
                         f"tokens min {min(tokens)} / mean {sum(tokens) / len(tokens):.0f} / max {max(tokens)}, "
                         f"{len(self.experts['few_tokens'])} with too few")
        return "\n".join(lines)
