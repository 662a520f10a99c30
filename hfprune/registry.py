"""Explicit registry of pruning methods.

A method is one file in ``hfprune/pruners/`` with one config dataclass and one
:class:`~hfprune.pruners.base.Pruner` subclass decorated with :func:`register_pruner`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import PruningConfig
    from .pruners.base import Pruner

__all__ = ["register_pruner", "get_pruner_cls", "available_methods", "PRUNERS"]

PRUNERS: dict[str, type["Pruner"]] = {}


def register_pruner(name: str, config_cls: type["PruningConfig"]):
    """Class decorator that registers a pruner under ``name``; duplicate names raise."""

    def wrap(cls):
        if name in PRUNERS:
            raise ValueError(f"A pruning method named {name!r} is already registered ({PRUNERS[name].__name__}).")
        if config_cls.method != name:
            raise ValueError(f"{config_cls.__name__}.method is {config_cls.method!r}, expected {name!r}.")
        cls.name = name
        cls.config_cls = config_cls
        PRUNERS[name] = cls
        return cls

    return wrap


def get_pruner_cls(name: str) -> type["Pruner"]:
    from . import pruners  # noqa: F401  (registers the built-in methods)

    if name not in PRUNERS:
        raise ValueError(f"Unknown pruning method {name!r}; available: {', '.join(available_methods())}.")
    return PRUNERS[name]


def available_methods() -> list[str]:
    from . import pruners  # noqa: F401

    return sorted(PRUNERS)
