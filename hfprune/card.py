"""Model cards (README.md with a Hub YAML header) for pruned checkpoints."""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from hfprune.arch.discovery import LAYER_TYPE_ORDER
from hfprune.report import public_command, public_value
from hfprune.structured.checkpoint import PRUNED_SHAPES_KEY

logger = logging.getLogger(__name__)

__all__ = ["write_model_card", "render_model_card", "layer_type_sparsity", "hub_model_id"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

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


def _read_config(output_dir: Path) -> dict:
    """The saved ``config.json`` (``{}`` when missing or unreadable)."""
    try:
        return json.loads((output_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def hub_model_id(name: str | None) -> str | None:
    """``name`` when it is a Hub model id (``org/name`` or ``name``), ``None`` for a local path (absolute,
    relative, ``~``, an existing folder) or anything else: a card links to and lists only Hub ids."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or not isinstance(name, str):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    try:
        if Path(name).expanduser().exists():
            return None
    except OSError:
        return None
    return name


def _public_record(pc: dict, base_name: str | None) -> dict:
    """The pruning record as the card shows it: local paths cut (:func:`public_value`), in earlier runs' too."""
    out = public_value(pc)
    for original, entry in zip(_chain(pc), _chain(out)):
        if isinstance(entry.get("command"), str):
            entry["command"] = public_command(entry["command"])
        if original.get("base_model") and not hub_model_id(original["base_model"]):
            entry["base_model"] = base_name if original is pc else public_value(original["base_model"])
    return out


def _has_zeros(entry: dict) -> bool:
    """An unstructured / N:M record (weights zeroed in place), not a structured one (weights removed)."""
    return entry.get("achieved_sparsity") is not None or not any(
        k in entry for k in ("params_after", "reload_with", "experts_kept", "removed_blocks", "hidden_after"))


def _chain(pc: dict) -> list[dict]:
    """The pruning record and the records of earlier runs it keeps under ``previous``, newest first."""
    out, entry = [], pc
    while isinstance(entry, dict) and entry and len(out) < 16:
        out.append(entry)
        entry = entry.get("previous")
    return out


def _quantization(qc: dict) -> tuple[int | None, int | None]:
    """(bits, group size) of a saved ``quantization_config`` (hfprune-sparse or compressed-tensors)."""
    if qc.get("quant_method") == "compressed-tensors":
        weights = next(iter((qc.get("config_groups") or {}).values()), {}).get("weights") or {}
        return weights.get("num_bits"), weights.get("group_size")
    return qc.get("bits"), qc.get("group_size")


def _int_desc(bits: int, group_size: int | None) -> str:
    grouping = f"one scale per group of {group_size} inputs" if group_size else "one scale per output row"
    return f"int{bits} (symmetric, {grouping})"


_ZEROS_NOTE = ("Zeros buy size, not speed, with today's inference stacks: in the compressed `hfprune-sparse` "
               "format (`--format sparse`) a checkpoint is smaller on disk, but every engine runs it as a dense "
               "model at dense speed (vLLM removed its 2:4 sparse kernels in 2026-03 and compressed-tensors 0.15 "
               "dropped its sparse compressors). Structured pruning (fewer heads, neurons, blocks) and "
               "quantization are what make a model faster.")


def _describe(pc: dict, ckpt: dict, quant: str | None, bits, group_size) -> tuple[list[str], list[str]]:
    """(what is in the checkpoint, how it is stored), one markdown paragraph per entry."""
    chain = _chain(pc)
    zeros = next((e for e in chain if _has_zeros(e)), None)
    shrunk = next((e for e in chain if e.get("params_after") is not None), None)
    content: list[str] = []
    if shrunk is not None:
        before, after = int(shrunk["params_before"]), int(shrunk["params_after"])
        parts, experts = [], False
        for e in chain:
            if e.get("removed_blocks") is not None:
                parts.append(f"decoder blocks {e['removed_blocks']} removed")
            if e.get("hidden_after") is not None:
                parts.append(f"hidden size {e['hidden_before']} -> {e['hidden_after']}")
            if e.get("experts_kept") is not None or str(e.get("method", "")).startswith("experts"):
                experts = True
                kept = sorted({len(v) for v in (e.get("experts_kept") or {}).values() if isinstance(v, list)})
                parts.append("MoE experts removed" + (f" ({' or '.join(map(str, kept))} kept per MoE layer; the "
                                                      "router chooses among those only)" if kept else ""))
            if str(e.get("method", "")).startswith("structured") or e.get("heads_ratio") is not None:
                parts.append("attention heads and MLP neurons removed"
                             + (", a different number in each block (`config.pruned_shapes`)"
                                if ckpt.get(PRUNED_SHAPES_KEY) else ", the same in every block"))
        content.append(
            f"A smaller dense model: {after:,} parameters instead of {before:,} "
            f"({100 * (1 - after / max(1, before)):.1f}% removed"
            + (f": {'; '.join(dict.fromkeys(parts))}" if parts else "") + "). The removed weights are gone, not "
            "zeroed, so there are no zeros to exploit: "
            + ("it needs less memory in any engine, but each token still runs as many experts as before, so "
               "compute per token barely changes." if experts and len(parts) == 1 else
               "the smaller matrices run faster in any engine, with no sparse kernel needed."))
    if zeros is not None:
        pattern = zeros.get("pattern") or "unstructured"
        kind = ("{0}:{1} pattern: at most {0} non-zeros in every {1} consecutive inputs".format(
            *str(pattern).split(":", 1)) if ":" in str(pattern) else "unstructured")
        if zeros.get("achieved_sparsity") is not None:
            text = (f"{_pct(float(zeros['achieved_sparsity']))} of the weights of the pruned Linear layers are exact "
                    f"zeros ({kind}), counted in the saved weights.")
        else:
            target = zeros.get("sparsity")
            text = (f"The pruned Linear layers hold exact zeros ({kind}"
                    + (f", target sparsity {_pct(float(target))}" if isinstance(target, (int, float)) else "")
                    + "; the achieved sparsity is not recorded).")
        if zeros.get("achieved_sparsity_when_pruned") is not None:
            text += (f" When the model was pruned it had {_pct(float(zeros['achieved_sparsity_when_pruned']))}: "
                     f"its weights were changed since (e.g. a merged adapter).")
        if shrunk is None:
            text += " The shapes and the parameter count are the base model's."
        content.append(text)
    if quant == "hfprune-sparse":
        stored = ("Stored in the compressed `hfprune-sparse` format: the kept values of each pruned layer plus a "
                  "bitmask or N:M index of their positions"
                  + (f", the values as {_int_desc(bits, group_size)}" if bits else "")
                  + ". Loading decompresses it to an ordinary dense model.")
    elif quant == "compressed-tensors":
        stored = (f"Stored as compressed-tensors `pack-quantized`: the Linear weights as {_int_desc(bits, group_size)}, "
                  "packed in int32 words; the output head is not quantized. Pruned zeros are stored as quantized "
                  "zeros: they take the same space and time as any other weight.")
    else:
        stored = ("Stored as an ordinary transformers safetensors checkpoint"
                  + (": the zeros are stored densely, so it is as large on disk as the base model." if zeros is not None
                     and shrunk is None else "."))
    storage = [stored]
    if zeros is not None and quant != "compressed-tensors":
        storage.append(_ZEROS_NOTE)
    elif quant == "compressed-tensors":
        storage.append(f"The int{bits} Linear weights are about {16 // int(bits or 16)}x smaller than 16-bit ones, "
                       "and faster in engines with quantized kernels (vLLM reads this format).")
    return content, storage


def _how_to_load(repo: str, tokenizer_repo: str, quant: str | None, bits, non_uniform: bool) -> list[str]:
    lines = ["## How to load", ""]
    if quant == "compressed-tensors":
        lines += ["Needs the `compressed-tensors` package (0.15 or newer); transformers decompresses the "
                  f"int{bits} weights to the model's dtype:", "", "```bash", 'pip install "compressed-tensors>=0.15"'
                  + (" hfprune" if non_uniform else ""), "```", ""]
    code = ["```python"]
    if non_uniform:
        code += ["from hfprune.structured import AutoPrunedModelForCausalLM  # pip install hfprune",
                 "from transformers import AutoTokenizer", "",
                 f'model = AutoPrunedModelForCausalLM.from_pretrained("{repo}")']
    else:
        if quant == "hfprune-sparse":
            code.append("import hfprune  # pip install hfprune: registers the hfprune-sparse decoder")
        code += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 f'model = AutoModelForCausalLM.from_pretrained("{repo}")']
    code += [f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_repo}")', "```", ""]
    lines += code
    if non_uniform:
        lines += ["hfprune is needed: the blocks have different numbers of attention heads or MLP neurons (listed "
                  "in `config.pruned_shapes`), which a stock transformers config cannot state (it has one value "
                  "per model). Stock `AutoModelForCausalLM` raises on the size mismatch, and its hint "
                  "`ignore_mismatched_sizes=True` would load random weights. `AutoPrunedModelForCausalLM` builds "
                  "each block with its own shape and loads the weights (safetensors only, no remote code)."
                  + (" It also decodes the `hfprune-sparse` weights." if quant == "hfprune-sparse" else ""), ""]
    elif quant == "hfprune-sparse":
        lines += ["hfprune is needed: `import hfprune` registers the decoder of the `hfprune-sparse` format with "
                  "transformers, and `from_pretrained` then returns the dense model. Without it, transformers "
                  "raises an error that names hfprune (it cannot decode the compressed weights).", ""]
    elif quant is None:
        lines += ["Stock transformers loads it; hfprune is not needed.", ""]
    return lines


def render_model_card(*, base_model: str | None, pruning_config: dict, report: dict | None = None,
                      eval_results: dict | None = None, command: str | None = None,
                      license: str | None = None, repo_id: str | None = None,
                      sparse_format: bool = False, checkpoint_config: dict | None = None,
                      has_tokenizer: bool = False) -> str:
    """The README.md text (see :func:`write_model_card`). ``checkpoint_config`` is the saved ``config.json``
    (its ``quantization_config`` and ``pruned_shapes`` say how the checkpoint loads); ``sparse_format=True``
    without it stands for an hfprune-sparse checkpoint."""
    pc = dict(pruning_config or {})
    ckpt = dict(checkpoint_config or {})
    qc = ckpt.get("quantization_config") or ({"quant_method": "hfprune-sparse"} if sparse_format else {})
    quant = qc.get("quant_method") if qc.get("quant_method") in ("hfprune-sparse", "compressed-tensors") else None
    bits, group_size = _quantization(qc)
    non_uniform = bool(ckpt.get(PRUNED_SHAPES_KEY))
    method = pc.get("method")
    pattern = pc.get("pattern")
    license = license or pc.get("license")
    base_id = hub_model_id(base_model)
    base_name = base_id or (Path(str(base_model).rstrip("/\\")).name or None if base_model else None)
    has_zeros = any(_has_zeros(e) for e in _chain(pc))
    tags = []
    for tag in ("pruned", "hfprune", "sparse" if has_zeros else None, method, pattern if has_zeros else None,
                f"int{bits}" if bits else None, quant):
        if tag and str(tag) not in tags:
            tags.append(str(tag))
    header: dict[str, Any] = {}
    if base_id:
        header["base_model"] = base_id
    header["library_name"] = "transformers"
    if license:
        header["license"] = str(license)
    header["pipeline_tag"] = "text-generation"
    header["tags"] = tags
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip(), "---", ""]

    title = repo_id or (f"{base_name} (pruned)" if base_name else "Pruned model")
    lines += [f"# {title}", ""]
    sparsity = pc.get("sparsity")
    summary = "This model was pruned with [hfprune](https://pypi.org/project/hfprune/)"
    if base_id:
        summary += f" from [{base_id}](https://huggingface.co/{base_id})"
    elif base_name:
        summary += f" from a local model (`{base_name}`)"
    lines += [summary + ".", ""]
    content, storage = _describe(pc, ckpt, quant, bits, group_size)
    lines += ["## What is in it", ""]
    for paragraph in content + storage:
        lines += [paragraph, ""]

    lines += ["## Pruning", "", "| setting | value |", "|---|---|"]
    lines.append(f"| method | {_fmt(method or 'unknown')} |")
    if has_zeros:
        lines.append(f"| pattern | {_fmt(pattern or 'unstructured')} |")
    if sparsity is not None:
        lines.append(f"| target sparsity | {_pct(float(sparsity))} |")
    if pc.get("achieved_sparsity") is not None:
        lines.append(f"| sparsity of the saved weights | {_pct(float(pc['achieved_sparsity']))} |")
    skip = {"method", "pattern", "sparsity", "calibration", "per_layer_sparsity", "layers", "license",
            "achieved_sparsity", "base_model", "command", "stages"}
    for key, value in pc.items():
        if key not in skip and value is not None and not isinstance(value, dict):
            lines.append(f"| {key} | {_fmt(public_value(value))} |")
    if bits:
        lines.append(f"| stored weights | {_int_desc(bits, group_size)} |")
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

    calib = public_value(pc.get("calibration"))
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
            lines += ["### Zero-shot accuracy", ""] + zeroshot_rows(zeroshot.get("before"), zeroshot.get("after"))
            lines.append("")

    if command:
        lines += ["## Reproduce", "", "```bash", public_command(command.strip()), "```", ""]

    repo = repo_id or "<this-repo>"
    lines += _how_to_load(repo, repo if has_tokenizer or not base_id else base_id, quant, bits, non_uniform)
    lines += ["Pruning configuration (`config.pruning_config`):", "", "```json",
              json.dumps(_public_record(pc, base_name), indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def write_model_card(output_dir, *, base_model: str | None, pruning_config: dict, report: dict | None = None,
                     eval_results: dict | None = None, command: str | None = None,
                     license: str | None = None, repo_id: str | None = None) -> Path:
    """Write ``output_dir/README.md`` (overwriting it) and return its path.

    Args:
        base_model: the model that was pruned: a Hub id becomes the YAML ``base_model`` and a link; a local
            path is named only by its folder name, without link or metadata (:func:`hub_model_id`).
        pruning_config: the ``config.pruning_config`` dict (method, pattern, sparsity, calibration...).
        report: optional pruning report; ``report["layers"]`` maps layer name to
            ``{"sparsity": float, "numel": int}`` and is aggregated by layer type.
        eval_results: optional ``{"before": {"perplexity": x}, "after": {...}}`` or flat
            ``{"perplexity_before": x, "perplexity_after": y}``; a ``"zeroshot": {"before": r, "after": r}``
            entry (``r`` from :func:`hfprune.eval.zeroshot.zeroshot_evaluate`) adds a zero-shot table.
        command: the command line that produced the model.
        license: license id for the YAML header (defaults to ``pruning_config.get("license")``).
        repo_id: Hub repo the card is for (used in the title and loading snippet).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = render_model_card(base_model=base_model, pruning_config=pruning_config, report=report,
                             eval_results=eval_results, command=command, license=license, repo_id=repo_id,
                             checkpoint_config=_read_config(output_dir),
                             has_tokenizer=any((output_dir / f).is_file() for f in _TOKENIZER_FILES))
    path = output_dir / "README.md"
    path.write_text(text, encoding="utf-8")
    logger.info("Wrote model card %s", path)
    return path


def metric_cell(value, spec: str = ".4f") -> str:
    """A metric for a table: ``spec``-formatted, empty for a missing or NaN value."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def zeroshot_rows(before: dict | None, after: dict | None) -> list[str]:
    """Markdown table (task, metric, before, after) of two :func:`hfprune.eval.zeroshot.zeroshot_evaluate`
    results, then the suites' means."""
    before, after = before or {}, after or {}
    lines = ["| task | metric | before | after |", "|---|---|---:|---:|"]
    tasks = list(dict.fromkeys([*(before.get("tasks") or {}), *(after.get("tasks") or {})]))
    for task in tasks:
        b, a = (before.get("tasks") or {}).get(task, {}), (after.get("tasks") or {}).get(task, {})
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric in a or metric in b:
                spec = ".3f" if metric == "perplexity" else ".4f"
                cell = [f"{metric_cell(m.get(metric), spec)}" + (f" ± {metric_cell(m[metric + '_stderr'], spec)}"
                                                          if m.get(metric + "_stderr") is not None else "")
                        for m in (b, a)]
                lines.append(f"| {task} | {metric} | {cell[0]} | {cell[1]} |")
    for suite in dict.fromkeys([*(before.get("means") or {}), *(after.get("means") or {})]):
        means = [(r.get("means") or {}).get(suite) or {} for r in (before, after)]
        for metric in dict.fromkeys(k for m in means for k in m if k != "tasks"):  # the suite's mean metric
            cells = [metric_cell(m.get(metric)) for m in means]
            lines.append(f"| **mean {suite}** | {metric} | {cells[0]} | {cells[1]} |")
    limit = (after or before).get("limit")
    lines.append("")
    lines.append(f"lm-evaluation-harness {(after or before).get('lm_eval_version')}, zero-shot, "
                 + (f"first {limit} documents per task." if limit else "full splits (HellaSwag: 1,000-item subset)."))
    return lines
