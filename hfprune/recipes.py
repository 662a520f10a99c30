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

from .config import CalibrationConfig, PruningConfig

__all__ = ["load_recipe", "read_recipe", "build_configs"]

_META_KEYS = ("description",)


def read_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe {path} does not exist: pass the path of a YAML file (see recipes/).")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
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
    return PruningConfig.from_dict(data), CalibrationConfig.from_dict(calibration)


def load_recipe(path: str | Path, **overrides) -> tuple[PruningConfig, CalibrationConfig]:
    """Load a YAML recipe into (method config, calibration config); keyword arguments override it."""
    return build_configs(read_recipe(path), overrides)
