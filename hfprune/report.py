"""The typed record of what was pruned (:class:`PruneReport`) and the one zero counter.

:func:`hfprune.prune` returns the record; :func:`hfprune.save_pretrained`, the model card and the
streaming / CLI paths take it explicitly. It is serialised into ``config.json`` as
``pruning_config`` (:meth:`PruneReport.pruning_config`) so a reloaded checkpoint still describes
itself; a reloaded dict is parsed back into a record once (:meth:`PruneReport.from_model`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import resource
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from hfprune.arch import is_linear, weight_matrix

__all__ = ["PruneReport", "PruneResult", "DepthRemoval", "HiddenRemoval", "peak_rss_mb", "peak_cuda_mb", "reset_peak_cuda",
           "count_zeros", "zero_counts", "layer_sparsity_report", "recount_sparsity", "public_value",
           "public_command"]


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
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if is_linear(m)]
    return zero_counts(((n, weight_matrix(modules[n])) for n in names), shape=True)["layers"]


def recount_sparsity(model, record: "PruneReport | None", report_dict: dict | None = None) -> dict | None:
    """Count the zeros of the pruned layers in the weights about to be saved, and make the record say so.

    A model whose weights changed after pruning (a LoRA adapter merged without the masks, further
    training) no longer has the sparsity its record states. For an unstructured / N:M record,
    ``config.pruning_config``'s ``achieved_sparsity`` and ``layer_sparsity``, ``record.sparsity`` and
    the layer rows of ``report_dict`` (``pruning_report.json``, the card's table) are set to what the
    weights hold; when that differs from the recorded value, the recorded one is kept as
    ``achieved_sparsity_when_pruned`` and a warning says so. Structured records (parameters removed,
    not zeroed) are left as they are. Returns ``report_dict`` (a copy when changed).
    """
    import logging

    from hfprune.arch import is_linear

    pc = getattr(getattr(model, "config", None), "pruning_config", None)
    if record is None or not isinstance(pc, dict) or "params_after" in pc or record.structured is not None:
        return report_dict
    modules = dict(model.named_modules())
    recorded = [n for n in (pc.get("layer_sparsity") or {}) if n in modules and is_linear(modules[n])]
    if not recorded:
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        recorded = [n for n, m in modules.items() if is_linear(m) and m is not out_emb]
    if not recorded or any(p.device.type == "meta" for n in recorded for p in modules[n].parameters()):
        return report_dict
    layers = layer_sparsity_report(model, recorded)
    zeros, numel = sum(v["zeros"] for v in layers.values()), sum(v["numel"] for v in layers.values())
    measured = zeros / max(1, numel)
    before = pc.get("achieved_sparsity")
    if before is not None and abs(float(before) - measured) > 0.5 / max(1, numel):
        logging.getLogger(__name__).warning(
            "The pruned layers hold %.2f%% zeros, not the %.2f%% recorded when the model was pruned: its weights "
            "changed since (e.g. a LoRA adapter merged without the masks). The checkpoint's config and model card "
            "state the %.2f%% the saved weights hold.", 100 * measured, 100 * float(before), 100 * measured)
        pc.setdefault("achieved_sparsity_when_pruned", float(before))
    pc["achieved_sparsity"] = measured
    pc["layer_sparsity"] = {n: round(v["sparsity"], 6) for n, v in layers.items()}
    record.sparsity = measured
    if isinstance(report_dict, dict):
        report_dict = {**report_dict, "sparsity": measured}
        if isinstance(report_dict.get("layers"), dict):
            report_dict["layers"] = {n: ({**row, **{k: layers[n][k] for k in ("sparsity", "zeros", "numel")}}
                                         if n in layers and isinstance(row, dict) else row)
                                     for n, row in report_dict["layers"].items()}
    return report_dict



_LOCAL_PATH = re.compile(r"^(~|/|\\|\.{1,2}[/\\]|[A-Za-z]:[/\\])")


def public_value(value: Any) -> Any:
    """``value`` with every local path (absolute, ``~``, ``./``, ``../``) cut to its last component, in strings,
    lists and dicts: a card shows no one's folders."""
    if isinstance(value, str):
        if _LOCAL_PATH.match(value):
            return Path(value.replace("\\", "/").rstrip("/")).name or "<local path>"
        return value
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_value(v) for v in value]
    return value


def public_command(command: str) -> str:
    """The command line with its local paths cut to their last component (``--flag=PATH`` too)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return " ".join(public_value(w) for w in command.split())
    out = []
    for word in words:
        flag, eq, rest = word.partition("=")
        out.append(f"{flag}={public_value(rest)}" if eq and flag.startswith("-") else public_value(word))
    return shlex.join(out)


@dataclass
class PruneResult:
    """What a layer-wise pruner returns for one weight (see :class:`hfprune.methods.Pruner`)."""

    pruned: torch.Tensor
    """Boolean ``[out, in]`` mask, True where the weight is removed."""
    weight: torch.Tensor | None = None
    """New ``[out, in]`` weight for methods that update kept weights; ``None`` keeps them."""
    info: dict | None = None
    """Per-layer numbers for the report (``report.layers[name]``), e.g. a reconstruction error."""
    scale: torch.Tensor | None = None
    """Joint quantization: the float32 ``[out, groups]`` scales of the symmetric grid the kept weights
    were rounded to (the formats store the integers on it); ``None`` otherwise."""


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
    stages: list[dict[str, Any]] | None = None
    """A run of several methods (:func:`hfprune.prune` with a list of configs): each stage's summary
    (:meth:`summary`), in order."""
    quant_scales: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """Joint quantization (``bits`` in :attr:`config`): per pruned layer, the float32 ``[out, groups]``
    scales of the symmetric grid its kept weights lie on (``weight = scale * q``); the formats store
    the integers on exactly this grid. In memory only (not in ``config.json`` or :meth:`to_dict`): a
    record read back from a checkpoint has none, and the formats then find the grid from the values."""

    def scales_for(self, bits: int | None, group_size: int | None) -> dict[str, torch.Tensor]:
        """:attr:`quant_scales` by weight name (``<module>.weight``) when this run quantized to
        ``bits`` with ``group_size`` (what a format is asked to store), else ``{}``."""
        config = next((st["config"] for st in reversed(self.stages or []) if st["config"].get("bits")), self.config)
        if not self.quant_scales or bits is None or config.get("bits") != bits \
                or config.get("group_size") != group_size:
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

    def summary(self) -> dict[str, Any]:
        """One stage of a multi-stage run: method, config, time, and what it changed."""
        out = {"method": self.method, "config": self.config, "prune_seconds": self.prune_seconds}
        if self.structured is not None:
            out.update(params_before=self.structured.get("params_before"),
                       params_after=self.structured.get("params_after"))
        if self.layers:
            out.update(sparsity=self.sparsity, pattern=self.pattern)
        return out

    def pruning_config(self) -> dict[str, Any]:
        """The ``config.pruning_config`` entry written to ``config.json`` (serialisation only)."""
        out = {**self.config}
        if self.structured is not None:
            s = self.structured
            out.update(params_before=s["params_before"], params_after=s["params_after"], reload_with=s["reload_with"])
            if s.get("experts_kept"):
                out["experts_kept"] = s["experts_kept"]
            if self.depth is not None:
                out["removed_blocks"] = list(self.depth.removed)
            if self.hidden is not None:
                out.update(hidden_before=self.hidden.hidden_before, hidden_after=self.hidden.hidden_after)
        if self.structured is None or self.layers:
            out.update(achieved_sparsity=self.sparsity,  # not `layer_sparsity`: that is the config's field
                       per_layer_sparsity={n: round(v["sparsity"], 6) for n, v in self.layers.items()})
        # config.json travels with the checkpoint (push, sharing): no local path goes into it. A local base
        # model is kept as its folder name under base_model_folder (base_model is for Hub ids only).
        out["calibration"] = public_value(self.calibration)
        if self.command:
            out["command"] = public_command(self.command)
        if self.base_model:
            local = bool(_LOCAL_PATH.match(str(self.base_model))) or Path(str(self.base_model)).expanduser().exists()
            if local:
                out["base_model_folder"] = public_value(str(Path(str(self.base_model)).expanduser().resolve()))
            else:
                out["base_model"] = self.base_model
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
        if self.stages:
            lines = [f"hfprune {len(self.stages)} stages, {self.prune_seconds:.1f} s, peak RSS {self.peak_rss_mb:.0f} MiB:"]
            for k, st in enumerate(self.stages, 1):
                parts = [f"  {k}. {st['method']}"]
                if st.get("params_before") is not None:
                    parts.append(f"parameters {st['params_before']:,} -> {st['params_after']:,}")
                if "sparsity" in st:
                    parts.append(f"sparsity {st['sparsity']:.4f} ({st['pattern']})")
                if st["config"].get("bits"):
                    parts.append(f"int{st['config']['bits']} g{st['config'].get('group_size') or 'channel'}")
                lines.append(", ".join(parts) + f", {st['prune_seconds']:.1f} s")
            return "\n".join(lines)
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
