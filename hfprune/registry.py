"""One registry type for every extension axis that registers code: pruning methods, checkpoint formats
and architectures. (Zero-shot tasks are lm-evaluation-harness YAML files in ``hfprune/eval/tasks/``,
found by the harness's ``TaskManager``; they need no registry.)

A plug-in is one file that registers itself when its package is imported (``hfprune/methods/``,
``hfprune/formats/``, ...); user code registers its own the same way, e.g.
``METHODS.register("mine", MyPruner)`` or the decorator ``@register_pruner("mine", MyConfig)``.
This module imports nothing from hfprune, so it cannot be part of an import cycle.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Registry", "METHODS", "FORMATS", "ARCHITECTURES", "register_pruner", "get_pruner_cls",
           "available_methods", "describe_methods"]


class Registry(dict):
    """A named table of plug-ins: ``register`` refuses duplicates, ``get`` names the known entries."""

    def __init__(self, kind: str, how: str):
        super().__init__()
        self.kind, self.how = kind, how

    def register(self, name: str, obj: Any = None, *, overwrite: bool = False):
        """Register ``obj`` under ``name``; without ``obj`` this is a decorator."""
        if obj is None:
            return lambda o: self.register(name, o, overwrite=overwrite)
        if name in self and not overwrite:
            raise ValueError(f"A {self.kind} named {name!r} is already registered ({self[name]!r}); "
                             f"pass overwrite=True to replace it.")
        self[name] = obj
        return obj

    def get(self, name: str, default: Any = KeyError) -> Any:  # type: ignore[override]
        if name in self:
            return self[name]
        if default is not KeyError:
            return default
        raise ValueError(f"Unknown {self.kind} {name!r}; available: {', '.join(sorted(self))}. {self.how}")


METHODS = Registry("pruning method", "Register one with @hfprune.register_pruner(name, ConfigClass).")
FORMATS = Registry("checkpoint format", "Register one with hfprune.formats.register_format(name, Format()).")
ARCHITECTURES = Registry("architecture", "Add it with hfprune.register_architecture(model_type, ArchSpec(...)).")


def register_pruner(name: str, config_cls: type):
    """Class decorator that registers a pruner under ``name``; duplicate names raise."""

    def wrap(cls):
        if config_cls.method != name:
            raise ValueError(f"{config_cls.__name__}.method is {config_cls.method!r}, expected {name!r}.")
        METHODS.register(name, cls)
        cls.name, cls.config_cls = name, config_cls
        return cls

    return wrap


def get_pruner_cls(name: str) -> type:
    return METHODS.get(name)


def available_methods() -> list[str]:
    return sorted(METHODS)


def describe_methods() -> dict[str, str]:
    """``{method: one line}``: the first line of each registered pruner's docstring (else its config's)."""
    out = {}
    for name in sorted(METHODS):
        cls = METHODS[name]
        doc = cls.__dict__.get("__doc__") or getattr(cls, "config_cls", cls).__doc__ or ""
        out[name] = doc.strip().splitlines()[0].rstrip(".") if doc.strip() else ""
    return out
