"""One generator for command-line flags: every flag and its help come from a config dataclass's
fields (``metadata["help"]``, and ``metadata["choices"]`` where the values are fixed), the same
metadata :class:`transformers.HfArgumentParser` reads."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

__all__ = ["add_fields", "add_method_fields", "model_command", "positive_int", "local_config"]


def _scalar(tp):
    """The scalar type of an annotation (``Optional[int]`` -> ``int``) and whether it is a list."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = args[0] if len(args) == 1 else str
        args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return (args[0] if args else str), True
    return (tp if tp in (int, float, str, bool) else str), False


def _optional(tp):
    def parse(text: str):
        return None if text.strip().lower() in ("none", "null") else tp(text)

    parse.__name__ = tp.__name__
    return parse


def add_fields(parser, cls, *, only=None, skip=(), flags=None, extra=None, default=None,
               show_default=False) -> list[str]:
    """Add one flag per field of dataclass ``cls`` (``--field-name``; ``flags`` renames, ``extra``
    adds or overrides ``add_argument`` keywords per field). Flags default to ``default`` (``None``:
    "not given", so recipe values and the dataclass defaults stay in charge); fields that already
    have a flag in ``parser`` are skipped, so several configs can share one parser. Returns the
    destinations added."""
    hints = typing.get_type_hints(cls)
    taken, added = {a.dest for a in parser._actions}, []
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip or f.name in taken:
            continue
        tp, is_list = _scalar(hints[f.name])
        help_text = f.metadata.get("help", "")
        if show_default:
            shown = f.default_factory() if f.default is dataclasses.MISSING and \
                f.default_factory is not dataclasses.MISSING else f.default
            help_text += f" (default: {shown})"
        kw = {"dest": f.name, "help": help_text, "default": default}
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif is_list:
            kw.update(nargs="+", type=tp)
        else:
            kw.update(type=_optional(tp) if tp is not hints[f.name] else tp, metavar=f.name.upper())
        kw.update((extra or {}).get(f.name, {}))
        if default is argparse.SUPPRESS:
            kw.pop("default")
        parser.add_argument(*(flags or {}).get(f.name, ["--" + f.name.replace("_", "-")]), **kw)
        added.append(f.name)
    return added


def add_method_fields(parser, configs: dict[str, type], *, extra=None) -> list[str]:
    """One flag per field of every method config in ``configs`` (``{method: config class}``, e.g. from
    the method registry), so a newly registered method gets its flags with nothing else to edit.
    A field several methods share is one flag: its choices are the union of theirs (none when one of
    them takes any value) and its help names each method whose text differs. Fields hidden from the
    repr (internal sizes, renamed fields) and deprecated fields get no flag. Returns the destinations added."""
    by_name: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for method, cls in configs.items():
        for f in dataclasses.fields(cls):
            if f.repr and not f.metadata.get("deprecated"):
                by_name.setdefault(f.name, []).append((method, f))
    merged = {}
    for name, entries in by_name.items():
        helps: dict[str, list[str]] = {}
        for method, f in entries:
            helps.setdefault(f.metadata.get("help", ""), []).append(method)
        text = next(iter(helps)) if len(helps) == 1 else " | ".join(
            f"{'/'.join(m for m in methods if m) or 'every method'}: {h}" for h, methods in helps.items())
        choices = [f.metadata.get("choices") for _, f in entries]
        kw = dict((extra or {}).get(name, {}))
        if all(choices):
            kw.setdefault("choices", list(dict.fromkeys(c for cs in choices for c in cs)))
        merged[name] = (entries[0][1], text, kw)
    added = []
    for cls in configs.values():  # old names: still accepted, not shown (the config warns and says the new one)
        for f in dataclasses.fields(cls):
            if (f.metadata.get("renamed_to") or f.metadata.get("deprecated")) and f.name not in by_name:
                by_name[f.name] = []
                merged[f.name] = (f, argparse.SUPPRESS, {})
    hints = {}
    for cls in configs.values():
        hints.update({k: v for k, v in typing.get_type_hints(cls).items() if k not in hints})
    taken = {a.dest for a in parser._actions}
    for name, (f, text, kw) in merged.items():
        if name in taken:
            continue
        tp, is_list = _scalar(hints[name])
        args = {"dest": name, "help": text, "default": None}
        if tp is bool:
            args["action"] = argparse.BooleanOptionalAction
        elif is_list:
            args.update(nargs="+", type=tp)
        else:
            args.update(type=_optional(tp) if tp is not hints[name] else tp, metavar=name.upper())
        args.update(kw)
        parser.add_argument("--" + name.replace("_", "-"), **args)
        added.append(name)
    return added


def model_command(subparsers, name: str, **kw):
    """``subparsers.add_parser(name, **kw)`` for a command on one model: its first flag is the required ``--model``."""
    parser = subparsers.add_parser(name, **kw)
    parser.add_argument("--model", required=True, help="Local checkpoint folder, Hub id, or alias (smollm2-135m).")
    return parser


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (``--seqlen 0`` is a usage error, not a traceback later)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def local_config(model: str):
    """The ``PretrainedConfig`` of a local checkpoint folder, read without its weights (``None`` for a Hub id,
    an alias, or a folder without a readable ``config.json``: then the checks wait for the loaded model)."""
    import os
    from pathlib import Path

    path = Path(os.fspath(model)).expanduser()
    if not (path / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception:  # noqa: BLE001 - an unreadable config is reported by the loader, with its own message
        return None
