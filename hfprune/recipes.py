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
config; an unknown key is an error that names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hfprune.config import CalibrationConfig, PruningConfig
from hfprune.methods.structured import StructuredConfig

__all__ = ["load_recipe", "read_recipe", "build_configs"]

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
                  calibration_overrides: dict[str, Any] | None = None) -> tuple[PruningConfig, CalibrationConfig]:
    """(method config, calibration config) from recipe data plus overrides (``None`` values ignored)."""
    data = {k: v for k, v in data.items() if k not in _META_KEYS}
    calibration = dict(data.pop("calibration", None) or {})
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    calibration.update({k: v for k, v in (calibration_overrides or {}).items() if v is not None})
    if "method" not in data:
        raise ValueError("The recipe needs a `method` key (for example `method: wanda`), or pass --method.")
    if data.get("target"):
        return structured_config(data), CalibrationConfig.from_dict(calibration)
    data.pop("target", None)
    for key in _STRUCTURED_KEYS:
        if data.get(key) not in (None, False):
            raise ValueError(f"`{key}` is a structured-pruning option: add `target: heads,mlp` (--target) to use it.")
        data.pop(key, None)
    return PruningConfig.from_dict(data), CalibrationConfig.from_dict(calibration)


_STRUCTURED_KEYS = ("heads_ratio", "mlp_ratio", "non_uniform", "gqa_mode", "bias_compensation", "compensation",
                    "compensation_target", "damp")


def structured_config(data: dict[str, Any]):
    """A :class:`~hfprune.methods.structured.StructuredConfig` from recipe/CLI keys: ``method`` (the
    importance: obs, magnitude, wanda or fluctuation), ``target`` (heads, mlp or both), ``heads_ratio``,
    ``mlp_ratio``, ``non_uniform``, ``gqa_mode``, ``bias_compensation``, ``compensation``, ``compensation_target``,
    ``damp``."""
    data = dict(data)
    target = data.pop("target")
    targets = [t.strip() for t in (target.split(",") if isinstance(target, str) else target)]
    unknown_targets = sorted(set(targets) - {"heads", "mlp"})
    if unknown_targets:
        raise ValueError(f"Unknown structured target(s) {unknown_targets}: use heads, mlp or heads,mlp.")
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
    kwargs = {"importance": data.pop("method"), "heads_ratio": heads_ratio, "mlp_ratio": mlp_ratio,
              "uniform": not bool(data.pop("non_uniform", False)), "gqa_mode": data.pop("gqa_mode", None) or "per_group",
              "bias_compensation": bool(data.pop("bias_compensation", False))}
    for key in ("compensation", "compensation_target", "damp"):
        if data.get(key) is not None:
            kwargs[key] = data.pop(key)
        data.pop(key, None)
    leftover = {k: v for k, v in data.items() if v is not None and k not in ("sparsity", "pattern", "scope", "targets", "ignore")}
    if leftover:
        raise ValueError(f"Unknown key(s) {sorted(leftover)} for structured pruning; allowed: method, target, "
                         f"{', '.join(_STRUCTURED_KEYS)}, calibration.")
    return StructuredConfig(**kwargs)


def load_recipe(path: str | Path, **overrides) -> tuple[PruningConfig, CalibrationConfig]:
    """Load a YAML recipe into (method config, calibration config); keyword arguments override it."""
    return build_configs(read_recipe(path), overrides)
