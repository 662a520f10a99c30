"""YAML recipes: the same dataclass configs as the Python API, written down.

A recipe looks like::

    method: wanda
    pattern: "2:4"
    calibration:
      dataset: c4
      nsamples: 128
      seqlen: 2048
      seed: 0

Every top-level key except ``calibration`` and ``description`` is a field of the method's
config; an unknown key is an error that names it. Several methods in order, on one calibration set,
are a ``stages:`` list of such mappings::

    stages:
      - {method: structured, mlp_ratio: 0.25}
      - {method: admm, pattern: "2:4"}
      - {method: sparsegpt, sparsity: 0, bits: 4, group_size: 128}   # quantization only
    calibration: {dataset: c4, nsamples: 128, seqlen: 2048}

Structured heads / MLP pruning may also be written the older way: ``target: heads,mlp`` with
``method`` naming the importance (obs, magnitude, wanda or fluctuation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hfprune.config import CalibrationConfig, PruningConfig, config_from_dict
from hfprune.registry import get_pruner_cls

__all__ = ["load_recipe", "read_recipe", "build_configs", "stage_config"]

_META_KEYS = ("description",)


def read_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe {path} does not exist: pass the path of a YAML file (see recipes/).")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.constructor.ConstructorError as err:  # e.g. !!python/object: never executed
        raise ValueError(f"Recipe {path} uses a YAML tag that is not allowed ({err.problem} {err.problem_mark}): "
                         f"recipes hold plain keys and values only; remove the tag.") from None
    except yaml.YAMLError as err:
        raise ValueError(f"Recipe {path} is not valid YAML: {err}. Fix the line it names.") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"Recipe {path} is not UTF-8 text ({err.reason}): save it as UTF-8.") from None
    if not isinstance(data, dict):
        raise ValueError(f"Recipe {path} must be a YAML mapping of config keys, got {type(data).__name__}.")
    return data


def build_configs(data: dict[str, Any], overrides: dict[str, Any] | None = None,
                  calibration_overrides: dict[str, Any] | None = None) -> tuple[Any, CalibrationConfig]:
    """(method config, calibration config) from recipe data plus overrides (``None`` values ignored);
    with a ``stages:`` list, (list of method configs, calibration config)."""
    data = {k: v for k, v in data.items() if k not in _META_KEYS}
    calibration = dict(data.pop("calibration", None) or {})
    calibration.update({k: v for k, v in (calibration_overrides or {}).items() if v is not None})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "stages" in data:
        stages = data.pop("stages")
        if not isinstance(stages, list) or not stages or not all(isinstance(st, dict) for st in stages):
            raise ValueError("`stages` must be a non-empty list of method mappings (each with a `method` key).")
        if data:
            raise ValueError(f"Recipe key(s) {sorted(data)} sit beside `stages:`: move them into the stage they "
                             f"belong to.")
        if overrides:
            raise ValueError(f"--{sorted(overrides)[0].replace('_', '-')} cannot say which stage of the recipe it "
                             f"sets: edit the recipe's `stages:` instead.")
        return [stage_config(st, where=f"stage {k + 1}") for k, st in enumerate(stages)], \
            CalibrationConfig.from_dict(calibration)
    data.update(overrides)
    return stage_config(data), CalibrationConfig.from_dict(calibration)


_STRUCTURED_KEYS = ("heads_ratio", "mlp_ratio", "non_uniform", "gqa_mode", "bias_compensation", "compensation",
                    "dense_targets", "dampening", "compensation_target", "damp")
_SPARSITY_KEYS = ("sparsity", "pattern", "scope", "layer_sparsity")


def stage_config(data: dict[str, Any], where: str = "the recipe"):
    """The config of one method from recipe / CLI keys (``method`` plus that method's fields)."""
    data = dict(data)
    if not data.get("method"):
        raise ValueError(f"{where} needs a `method` key (for example `method: wanda`; see `hfprune methods`), or "
                         f"pass --method.")
    if data.get("target"):
        return structured_config(data)
    data.pop("target", None)
    fields = set(get_pruner_cls(data["method"]).config_cls.field_names())
    if "non_uniform" in data:
        value = data.pop("non_uniform")
        if value and "uniform" not in fields:
            raise ValueError("`non_uniform` is a structured-pruning option: use `method: structured` (or `target: "
                             "heads,mlp`).")
        if "uniform" in fields and value is not None:
            data["uniform"] = not value
    for key in _STRUCTURED_KEYS:
        if key not in fields and data.get(key) not in (None, False):
            raise ValueError(f"`{key}` is a structured-pruning option: use `method: structured` (--method "
                             f"structured), or add `target: heads,mlp` (--target) with the importance as method.")
    return config_from_dict(data)


def structured_config(data: dict[str, Any]):
    """A :class:`~hfprune.methods.structured.StructuredConfig` from recipe/CLI keys: ``method`` (the
    importance: obs, magnitude, wanda or fluctuation), ``target`` (heads, mlp or both), ``heads_ratio``,
    ``mlp_ratio``, ``non_uniform``, ``gqa_mode``, ``bias_compensation``, ``compensation``, ``dense_targets``,
    ``dampening`` (the old names ``compensation_target``, ``damp`` still load, with a warning), ``targets`` /
    ``ignore`` (the blocks whose heads / neurons are removed). Keys of a sparsity method are refused: they are
    a second stage, not part of this one."""
    from hfprune.methods.structured import StructuredConfig

    data = dict(data)
    target = data.pop("target")
    targets = [t.strip() for t in (target.split(",") if isinstance(target, str) else target)]
    unknown_targets = sorted(set(targets) - {"heads", "mlp"})
    if unknown_targets:
        raise ValueError(f"Unknown structured target(s) {unknown_targets}: use heads, mlp or heads,mlp.")
    sparsity_keys = sorted(k for k in _SPARSITY_KEYS if data.get(k) not in (None, "unstructured", [], [".*"]))
    if sparsity_keys:
        raise ValueError(
            f"{', '.join('`' + k + '`' for k in sparsity_keys)} belong to a sparsity method, not to structured "
            f"heads/MLP pruning (`target`), which removes whole heads/neurons: run them as a second "
            f"stage, with a recipe (hfprune prune --recipe) such as\n"
            f"  stages:\n    - {{method: structured, importance: {data.get('method')}, "
            f"mlp_ratio: ..., heads_ratio: ...}}\n    - {{method: wanda, pattern: '2:4', ignore: [...]}}")
    heads_ratio = float(data.pop("heads_ratio", None) or 0.0)
    mlp_ratio = float(data.pop("mlp_ratio", None) or 0.0)
    if "heads" in targets and heads_ratio == 0.0:
        raise ValueError("target includes heads: set heads_ratio (--heads-ratio), the fraction of heads removed.")
    if "mlp" in targets and mlp_ratio == 0.0:
        raise ValueError("target includes mlp: set mlp_ratio (--mlp-ratio), the fraction of MLP neurons removed.")
    if "heads" not in targets and heads_ratio:
        raise ValueError("heads_ratio is set but target does not include heads: use --target heads,mlp.")
    if "mlp" not in targets and mlp_ratio:
        raise ValueError("mlp_ratio is set but target does not include mlp: use --target heads,mlp.")
    importance = data.pop("method")
    if data.get("importance") not in (None, importance):
        raise ValueError(f"With `target`, `method` is the importance ({importance!r}); `importance: "
                         f"{data['importance']}` contradicts it: give one of them.")
    data.pop("importance", None)
    uniform = data.pop("uniform", None)
    kwargs = {"importance": importance, "heads_ratio": heads_ratio, "mlp_ratio": mlp_ratio,
              "uniform": not bool(data.pop("non_uniform", False)) if uniform is None else bool(uniform),
              "gqa_mode": data.pop("gqa_mode", None) or "per_group",
              "bias_compensation": bool(data.pop("bias_compensation", False))}
    for key in ("compensation", "dense_targets", "dampening", "compensation_target", "damp", "targets", "ignore"):
        if data.get(key) is not None:
            kwargs[key] = data.pop(key)
        data.pop(key, None)
    leftover = {k: v for k, v in data.items() if v is not None and k not in _SPARSITY_KEYS}
    if leftover:
        raise ValueError(f"Unknown key(s) {sorted(leftover)} for structured pruning; allowed: method, target, "
                         f"{', '.join(_STRUCTURED_KEYS)}, targets, ignore, calibration.")
    return StructuredConfig(**kwargs)


def load_recipe(path: str | Path, **overrides) -> tuple[Any, CalibrationConfig]:
    """Load a YAML recipe into (method config, calibration config) (a list of configs for ``stages:``);
    keyword arguments override it."""
    return build_configs(read_recipe(path), overrides)
