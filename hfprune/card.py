"""Model cards (README.md with a Hub YAML header) for pruned checkpoints."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from hfprune.arch.discovery import LAYER_TYPE_ORDER

logger = logging.getLogger(__name__)

__all__ = ["write_model_card", "render_model_card", "layer_type_sparsity"]

def layer_type_sparsity(layers: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Aggregate a per-layer report ``{name: {"sparsity", "numel"}}`` by layer type (last name
    component, e.g. ``q_proj``): ``{type: {"layers", "numel", "pruned", "sparsity"}}``, numel-weighted,
    plus a ``"total"`` entry."""
    agg: dict[str, dict[str, float]] = {}
    for name, info in layers.items():
        parts = [p for p in re.sub(r"\.weight$", "", str(name)).split(".") if p]
        ltype = parts[-1] if parts else str(name)
        numel = int(info.get("numel", 0) or 0)
        sparsity = float(info.get("sparsity", 0.0) or 0.0)
        entry = agg.setdefault(ltype, {"layers": 0, "numel": 0, "pruned": 0.0})
        entry["layers"] += 1
        entry["numel"] += numel
        entry["pruned"] += sparsity * numel
    order = LAYER_TYPE_ORDER  # listed first in this order, the rest alphabetically
    ordered = sorted(agg, key=lambda t: (order.index(t) if t in order else len(order), t))
    out = {}
    for t in ordered:
        e = agg[t]
        out[t] = {**e, "sparsity": e["pruned"] / e["numel"] if e["numel"] else 0.0}
    total_numel = sum(e["numel"] for e in agg.values())
    total_pruned = sum(e["pruned"] for e in agg.values())
    out["total"] = {"layers": sum(e["layers"] for e in agg.values()), "numel": total_numel,
                    "pruned": total_pruned, "sparsity": total_pruned / total_numel if total_numel else 0.0}
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, sort_keys=True) + "`"
    return str(value)


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}%"


def _perplexity_rows(eval_results: dict) -> list[tuple[str, Any, Any]]:
    """(metric, before, after) rows from either ``{"before": {...}, "after": {...}}`` or flat
    ``{"perplexity_before": x, "perplexity_after": y, ...}`` forms."""
    if isinstance(eval_results.get("before"), dict) or isinstance(eval_results.get("after"), dict):
        before, after = eval_results.get("before") or {}, eval_results.get("after") or {}
        keys = list(dict.fromkeys([*before, *after]))
        return [(k, before.get(k), after.get(k)) for k in keys]
    rows: dict[str, list] = {}
    for key, value in eval_results.items():
        m = re.match(r"^(.*?)[_\-]?(before|after|dense|pruned|base)$", key)
        if m and m.group(1):
            slot = 0 if m.group(2) in ("before", "dense", "base") else 1
            rows.setdefault(m.group(1), [None, None])[slot] = value
        else:
            rows.setdefault(key, [None, None])[1] = value
    return [(k, v[0], v[1]) for k, v in rows.items()]


def _is_hfprune_sparse(output_dir: Path) -> bool:
    cfg = output_dir / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return qc.get("quant_method") == "hfprune-sparse"


def render_model_card(*, base_model: str | None, pruning_config: dict, report: dict | None = None,
                      eval_results: dict | None = None, command: str | None = None,
                      license: str | None = None, repo_id: str | None = None,
                      sparse_format: bool = False) -> str:
    """The README.md text (see :func:`write_model_card`)."""
    pc = dict(pruning_config or {})
    method = pc.get("method")
    pattern = pc.get("pattern")
    license = license or pc.get("license")
    tags = []
    for tag in ("pruned", "hfprune", "sparse", method, pattern):
        if tag and str(tag) not in tags:
            tags.append(str(tag))
    header: dict[str, Any] = {}
    if base_model:
        header["base_model"] = str(base_model)
    header["library_name"] = "transformers"
    if license:
        header["license"] = str(license)
    header["pipeline_tag"] = "text-generation"
    header["tags"] = tags
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip(), "---", ""]

    title = repo_id or (f"{base_model} (pruned)" if base_model else "Pruned model")
    lines += [f"# {title}", ""]
    sparsity = pc.get("sparsity")
    summary = "This model was pruned with [hfprune](https://pypi.org/project/hfprune/)"
    if base_model:
        summary += f" from [{base_model}](https://huggingface.co/{base_model})"
    lines += [summary + ". Pruned weights are exact zeros in an ordinary transformers checkpoint.", ""]

    lines += ["## Pruning", "", "| setting | value |", "|---|---|"]
    lines.append(f"| method | {_fmt(method or 'unknown')} |")
    lines.append(f"| pattern | {_fmt(pattern or 'unstructured')} |")
    if sparsity is not None:
        lines.append(f"| target sparsity | {_pct(float(sparsity))} |")
    skip = {"method", "pattern", "sparsity", "calibration", "per_layer_sparsity", "layers", "license", "stages"}
    for key, value in pc.items():
        if key not in skip and value is not None and not isinstance(value, dict):
            lines.append(f"| {key} | {_fmt(value)} |")
    lines.append("")

    layers = (report or {}).get("layers") or {}
    if layers:
        agg = layer_type_sparsity(layers)
        lines += ["### Sparsity by layer type", "", "| layer type | layers | parameters | sparsity |",
                  "|---|---:|---:|---:|"]
        for ltype, e in agg.items():
            name = "**total**" if ltype == "total" else f"`{ltype}`"
            lines.append(f"| {name} | {e['layers']} | {e['numel']:,} | {_pct(e['sparsity'])} |")
        lines.append("")
    elif isinstance(pc.get("per_layer_sparsity"), dict):
        lines += ["### Per-layer sparsity", "", "| layer | sparsity |", "|---|---:|"]
        for name, value in pc["per_layer_sparsity"].items():
            lines.append(f"| `{name}` | {_pct(float(value))} |")
        lines.append("")

    calib = pc.get("calibration")
    lines += ["## Calibration data", ""]
    if not calib:
        lines += ["None (data-free method).", ""]
    elif isinstance(calib, dict):
        lines += [f"- {k}: {_fmt(v)}" for k, v in calib.items()] + [""]
    else:
        lines += [str(calib), ""]

    if eval_results:
        lines += ["## Evaluation", ""]
        rows = _perplexity_rows({k: v for k, v in eval_results.items() if k != "zeroshot"})
        if rows:
            lines += ["| metric | before | after |", "|---|---:|---:|"]
            for metric, before, after in rows:
                lines.append(f"| {metric} | {'' if before is None else _fmt(before)} | "
                             f"{'' if after is None else _fmt(after)} |")
            lines.append("")
        zeroshot = eval_results.get("zeroshot")
        if isinstance(zeroshot, dict):  # {"before": zeroshot_evaluate(...), "after": ...}
            from hfprune.eval.harness import markdown_rows

            lines += ["### Zero-shot accuracy", ""] + markdown_rows(zeroshot.get("before"), zeroshot.get("after"))
            lines.append("")

    if command:
        lines += ["## Reproduce", "", "```bash", command.strip(), "```", ""]

    repo = repo_id or "<this-repo>"
    lines += ["## How to load", "", "```python"]
    if sparse_format:
        lines.append("import hfprune  # registers the hfprune-sparse decompressor (pip install hfprune)")
    lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{base_model or repo}")', "```", ""]
    if sparse_format:
        lines += ["The weights are stored in the compressed `hfprune-sparse` format (kept values plus a "
                  "bitmask or N:M index); importing `hfprune` makes `from_pretrained` return the dense model.", ""]
    else:
        lines += ["The zeros are stored densely, so the checkpoint needs no extra library; sparse kernels "
                  "(e.g. 2:4 semi-structured) can exploit the pattern.", ""]
    lines += ["Pruning configuration (`config.pruning_config`):", "", "```json",
              json.dumps(pc, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def write_model_card(output_dir, *, base_model: str | None, pruning_config: dict, report: dict | None = None,
                     eval_results: dict | None = None, command: str | None = None,
                     license: str | None = None, repo_id: str | None = None) -> Path:
    """Write ``output_dir/README.md`` (overwriting it) and return its path.

    Args:
        base_model: Hub id of the model that was pruned (YAML ``base_model``).
        pruning_config: the ``config.pruning_config`` dict (method, pattern, sparsity, calibration...).
        report: optional pruning report; ``report["layers"]`` maps layer name to
            ``{"sparsity": float, "numel": int}`` and is aggregated by layer type.
        eval_results: optional ``{"before": {"perplexity": x}, "after": {...}}`` or flat
            ``{"perplexity_before": x, "perplexity_after": y}``; a ``"zeroshot": {"before": r, "after": r}``
            entry (``r`` from :func:`hfprune.eval.harness.zeroshot_evaluate`) adds a zero-shot table.
        command: the command line that produced the model.
        license: license id for the YAML header (defaults to ``pruning_config.get("license")``).
        repo_id: Hub repo the card is for (used in the title and loading snippet).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = render_model_card(base_model=base_model, pruning_config=pruning_config, report=report,
                             eval_results=eval_results, command=command, license=license, repo_id=repo_id,
                             sparse_format=_is_hfprune_sparse(output_dir))
    path = output_dir / "README.md"
    path.write_text(text, encoding="utf-8")
    logger.info("Wrote model card %s", path)
    return path
