"""Configuration dataclasses: one per pruning method, plus calibration settings.

Configs round-trip through JSON (``to_dict`` / ``from_dict``) and YAML recipes. Help text lives
only in ``metadata["help"]`` so :class:`transformers.HfArgumentParser` can build CLI flags from it.
Validation happens in ``__post_init__`` and every error says what to change.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hfprune.registry import METHODS as _METHODS, get_pruner_cls
from hfprune.solvers.masks import parse_pattern

__all__ = ["ConfigDictMixin", "config_from_dict", "renamed", "resolve_renamed", "check_keep_or_ratio", "check_choice", "PruningConfig", "CalibrationConfig", "SCOPES", "__version__"]

__version__ = "0.1.0"
"""Stamped into every saved config (``hfprune_version``); ``hfprune.__version__`` is this value."""

SCOPES = ("row", "layer", "global")


_SIMPLE_TYPES = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}


def check_field_types(config) -> None:
    """Fields annotated with plain ``float``/``int``/``bool``/``str`` (or ``X | None``) hold such
    values, so a recipe typo (``owl_m: abc``) is a message naming the key, not a traceback later."""
    for f in dataclasses.fields(config):
        parts = {t.strip() for t in str(f.type).split("|")}
        simple = parts - {"None"}
        if not simple or not simple <= set(_SIMPLE_TYPES):
            continue
        value = getattr(config, f.name)
        if value is None and "None" in parts:
            continue
        ok = any(isinstance(value, _SIMPLE_TYPES[t]) and (t == "bool" or not isinstance(value, bool)) for t in simple)
        if not ok:
            raise ValueError(f"`{f.name}` must be {' or '.join(sorted(parts))}, got {value!r} "
                             f"({type(value).__name__}): fix it in the recipe or on the command line.")


def _registered() -> set[str]:
    return set(_METHODS)


def check_keep_or_ratio(config, keep: str, ratio: str, unit: str, *others: str) -> None:
    """The one convention of the structured amounts: exactly one of ``keep`` (how many ``unit`` are kept, at
    least 1) or ``ratio`` (the fraction of ``unit`` removed, in (0, 1)); ``others``: deprecated names of the
    same amount that count as given too."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    given = [k for k in (keep, ratio, *others) if getattr(config, k) is not None]
    if len(given) != 1:
        raise ValueError(f"Give exactly one of {keep} ({flag(keep)}, {unit} kept) or {ratio} ({flag(ratio)}, the "
                         f"fraction of {unit} removed)" + (f"; got {given}." if given else "."))
    kept, removed = getattr(config, keep), getattr(config, ratio)
    if kept is not None and kept < 1:
        raise ValueError(f"{keep} must be at least 1 ({unit} kept), got {kept}.")
    if removed is not None and not 0.0 < removed < 1.0:
        raise ValueError(f"{ratio} must be in (0, 1) (the fraction of {unit} removed), got {removed}.")


def check_name_regexes(config, keys=("targets", "ignore")) -> None:
    """``config``'s layer-name regex lists (a single string or a tuple becomes a list), each compiled here so
    a typo fails on construction, naming the flag to fix."""
    for key in keys:
        value = getattr(config, key)
        if isinstance(value, (str, tuple)):
            value = [value] if isinstance(value, str) else list(value)
            setattr(config, key, value)
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list of regexes over layer names, got {value!r}.")
        for regex in value:
            try:
                re.compile(regex)
            except (re.error, TypeError) as err:
                raise ValueError(f"{key} regex {regex!r} is not valid ({err}): fix --{key} "
                                 f"(a Python regular expression over layer names, e.g. '.*mlp.*').") from None


def check_choice(config, name: str, choices) -> None:
    """``config.<name>`` is one of ``choices``, else a ``ValueError`` listing them."""
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; use one of {', '.join(choices)}.")


def renamed(new: str):
    """A config field kept under its old name as a deprecated alias of field ``new`` (saved configs and
    recipes still load; a ``FutureWarning`` names the new key). Not shown in ``to_dict`` or the CLI."""
    return field(default=None, repr=False, metadata={"renamed_to": new})


def resolve_renamed(config) -> None:
    """Move every deprecated alias's value (see :func:`renamed`) to its new field, with a warning."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    for f in fields.values():
        new = f.metadata.get("renamed_to")
        value = getattr(config, f.name)
        if new is None or value is None:
            continue
        warnings.warn(f"`{f.name}` is deprecated: use `{new}` (the {type(config).__name__} field it now "
                      f"is).", FutureWarning, stacklevel=4)
        current, default = getattr(config, new), fields[new].default
        if current is not None and current != default and current != value:
            raise ValueError(f"`{f.name}` is the old name of `{new}`: give only `{new}`.")
        setattr(config, new, value)
        setattr(config, f.name, None)


class ConfigDictMixin:
    """The dict / JSON round trip of every method config dataclass: ``to_dict`` is ``method``, the fields
    shown in the repr and ``hfprune_version``; ``from_dict`` builds the config of ``data["method"]`` (through
    the method registry when it names another method) and names unknown keys, so a recipe typo never
    goes unnoticed."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        shown = {f.name for f in dataclasses.fields(self)
                 if f.repr and not (f.metadata.get("deprecated") and getattr(self, f.name) is None)}
        return {"method": self.method, **{k: v for k, v in dataclasses.asdict(self).items() if k in shown},
                "hfprune_version": __version__}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_saved(cls, data: dict[str, Any]):
        """The config a saved ``config.pruning_config`` (or ``pruning_report.json``'s ``config``) was made
        with. Keys this version does not know (the run's record: ``achieved_sparsity``, ``calibration``,
        ...; fields of a newer hfprune) are dropped with one warning, as peft does for adapter configs;
        a ``user``'s dict or recipe goes through :meth:`from_dict`, which refuses them. A multi-stage
        record gives the list of its stages' configs."""
        data = dict(data)
        if data.get("stages") is not None:
            return [cls.from_saved(st) for st in data["stages"]]
        method = str(data.get("method") or cls.method)
        if method not in _registered():  # e.g. "structured-obs", "experts-reap": the method and its importance
            method = method.split("-", 1)[0]
        config_cls = get_pruner_cls(method).config_cls
        allowed = set(config_cls.field_names())
        dropped = sorted(k for k in data if k not in allowed and k not in ("method", "hfprune_version"))
        if dropped:
            warnings.warn(f"Keys {dropped} of the saved {method!r} config are not {config_cls.__name__} fields "
                          f"(the run's record, or a newer hfprune's options); they were ignored.", stacklevel=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # a saved config may use old names: that is fine
            return config_cls.from_dict({**{k: v for k, v in data.items() if k in allowed}, "method": method})

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Inverse of :meth:`to_dict` (the config of ``data["method"]``, or ``cls`` without one)."""
        data = dict(data)
        data.pop("hfprune_version", None)
        method = data.pop("method", None) or cls.method
        config_cls = get_pruner_cls(method).config_cls if method and method != cls.method else cls
        if not config_cls.method:
            raise ValueError("The config needs a `method` (for example 'wanda' or 'magnitude').")
        allowed = config_cls.field_names()
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            current = [f.name for f in dataclasses.fields(config_cls)
                       if not (f.metadata.get("renamed_to") or f.metadata.get("deprecated"))]
            raise ValueError(
                f"Unknown key(s) {unknown} for method {config_cls.method!r}; allowed keys: {sorted(current)}."
            )
        try:
            return config_cls(**data)
        except TypeError as err:  # e.g. a list where a number belongs, found by a comparison in validation
            raise ValueError(f"Bad value in the {config_cls.method!r} config {data}: {err}.") from None


class KeepOrRatioConfig(ConfigDictMixin):
    """Base of the model-level configs with one amount (depth, hidden, experts): exactly one of a count kept
    or a fraction removed (:func:`check_keep_or_ratio`), an ``importance`` from ``importances``, renamed
    keys resolved and field types checked on construction. Subclasses are dataclasses that set the class
    variables and call ``super().__post_init__()`` before their own checks."""

    amount: ClassVar[tuple[str, str, str]] = ("", "", "")  # (keep field, ratio field, what is counted)
    deprecated_amounts: ClassVar[tuple[str, ...]] = ()  # old fields of the same amount
    importances: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        resolve_renamed(self)
        check_field_types(self)
        check_keep_or_ratio(self, *self.amount, *self.deprecated_amounts)
        check_choice(self, "importance", self.importances)


def config_from_dict(data: dict[str, Any]):
    """The config of any registered method from a dict with a ``method`` key (``to_dict``'s output,
    a recipe's keys, a user's dict)."""
    if not isinstance(data, dict):
        raise TypeError(f"A method config dict is needed, got {type(data).__name__}.")
    if not data.get("method"):
        raise ValueError("The config needs a `method` (for example 'wanda' or 'magnitude'; see `hfprune methods`).")
    return ConfigDictMixin.from_dict(data)


@dataclass
class PruningConfig(ConfigDictMixin):
    """Settings shared by every unstructured / N:M pruning method.

    Subclasses set ``method`` and add their own fields. ``sparsity`` is the fraction of weights
    removed from every targeted linear layer; with an N:M ``pattern`` it is implied
    (``1 - N/M``) and may be left unset.
    """

    sparsity: float | None = field(
        default=None,
        metadata={"help": "Fraction of weights to remove from each pruned layer, in [0, 1). Default 0.5; implied by an N:M pattern."},
    )
    pattern: str = field(
        default="unstructured",
        metadata={"help": "'unstructured' or 'N:M' (keep N of every M consecutive input weights, e.g. '2:4')."},
    )
    scope: str = field(
        default="row",
        metadata={"help": "Comparison group for unstructured masks: 'row' (per output row), 'layer' (per matrix) or 'global' (all pruned layers).",
                  "choices": SCOPES},
    )
    targets: list[str] = field(
        default_factory=lambda: [r".*"],
        metadata={"help": "Regexes over linear-layer names inside the decoder blocks to prune (full match)."},
    )
    ignore: list[str] = field(
        default_factory=list,
        metadata={"help": "Regexes over linear-layer names to leave dense (full match); wins over targets."},
    )
    layer_sparsity: list[float] | dict[str, float] | None = field(
        default=None,
        metadata={"help": "Explicit non-uniform sparsity: a list with one value per decoder block, or a dict from layer-name regex (or block index) to sparsity."},
    )

    true_sequential: bool = field(
        default=True,
        metadata={"help": "Prune the layers of a block in call order, each from inputs that went through the already pruned layers (GPTQ's true-sequential); False uses the dense block's inputs for all (the Wanda/SparseGPT reference)."},
    )
    owl: bool = field(
        default=False,
        metadata={"help": "OWL non-uniform sparsity: blocks with more activation outliers get lower sparsity (mean stays `sparsity`)."},
    )
    owl_m: float = field(default=5.0, metadata={"help": "OWL outlier threshold: |W|*||X|| above owl_m x its layer mean."})
    owl_lambda: float = field(default=0.08, metadata={"help": "OWL: block sparsities lie in [sparsity - owl_lambda, sparsity + owl_lambda]."})
    expert_calibration: str = field(
        default="routed",
        metadata={"help": "MoE experts: 'routed' (each expert's statistics from the tokens its router sent it) or 'all' "
                          "(every expert calibrated on every token; the block output still uses the routed tokens)."},
    )
    min_expert_tokens: int | None = field(
        default=None,
        metadata={"help": "MoE report: flag expert weights that saw fewer calibration tokens than this (default: "
                          "their input width, below which a SparseGPT Hessian is rank-deficient)."},
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        check_name_regexes(self)
        pat = parse_pattern(self.pattern)
        self.pattern = str(pat)
        if pat.is_nm:
            implied = pat.sparsity
            if self.sparsity is not None and abs(float(self.sparsity) - implied) > 1e-9:
                raise ValueError(
                    f"pattern={self.pattern!r} keeps {pat.n} of every {pat.m} weights, i.e. sparsity "
                    f"{implied:g}, but sparsity={self.sparsity} was given: drop `sparsity` or set it to {implied:g}."
                )
            self.sparsity = implied
            if self.scope != "row":
                raise ValueError(
                    f"scope={self.scope!r} has no meaning for an N:M pattern (the comparison group is each "
                    f"block of {pat.m} weights): leave scope at 'row'."
                )
            if self.layer_sparsity is not None:
                raise ValueError("layer_sparsity cannot be combined with an N:M pattern: use pattern='unstructured'.")
        if self.sparsity is None:
            self.sparsity = 0.5
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}.")
        self.sparsity = float(self.sparsity)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(
                f"sparsity={self.sparsity} is outside [0, 1): it is the fraction of weights removed, "
                f"e.g. 0.5 for half of them."
            )
        if self.scope not in SCOPES:
            raise ValueError(f"Unknown scope {self.scope!r}: use one of {', '.join(SCOPES)}.")
        if self.expert_calibration not in ("routed", "all"):
            raise ValueError(f"expert_calibration must be 'routed' or 'all', got {self.expert_calibration!r}.")
        if self.layer_sparsity is not None:
            values = self.layer_sparsity.values() if isinstance(self.layer_sparsity, dict) else self.layer_sparsity
            for v in values:
                if not 0.0 <= float(v) < 1.0:
                    raise ValueError(f"layer_sparsity value {v} is outside [0, 1): fix the per-layer list.")
        if self.owl:
            if pat.is_nm:
                raise ValueError("owl=True allocates unstructured sparsity per block: use pattern='unstructured'.")
            if self.scope == "global" or self.layer_sparsity is not None:
                raise ValueError("owl=True chooses the per-block sparsities itself: drop scope='global' / layer_sparsity.")
            if not 0.0 <= self.owl_lambda < 1.0 or self.owl_m <= 0:
                raise ValueError(f"owl_lambda must be in [0, 1) and owl_m > 0 (got {self.owl_lambda}, {self.owl_m}).")

@dataclass
class CalibrationConfig:
    """Which data to calibrate on and how to sample it (the papers' protocol by default:
    ``nsamples`` random windows of ``seqlen`` tokens, fixed ``seed``)."""

    dataset: Any = field(
        default="c4",
        metadata={"help": "'c4', 'wikitext2', 'self' (text sampled from the model), a local file (txt/json/jsonl/parquet/csv, .gz ok), a Hub data set name, a list of strings or a token tensor."},
    )
    nsamples: int = field(default=128, metadata={"help": "Number of calibration windows."})
    seqlen: int = field(default=2048, metadata={"help": "Tokens per calibration window."})
    seed: int = field(default=0, metadata={"help": "Seed for the window sampling."})
    split: str = field(default="train", metadata={"help": "Data set split (Hub data sets and local files)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    config_name: str | None = field(default=None, metadata={"help": "Hub data set configuration name."})
    batch_size: int = field(default=0, metadata={"help": "Calibration windows run through a block at once; 0 chooses: for a true-sequential run in one process, as many as fit a memory budget (all of them when they fit, which lets each block be pruned in one pass); otherwise about 2048 tokens on CPU (faster), the memory budget on GPU."})

    def __post_init__(self) -> None:
        for name in ("nsamples", "seqlen", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "batch_size" else 1):
                raise ValueError(f"calibration {name} must be a positive integer, got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not isinstance(self.dataset, (str, type(None))):
            out["dataset"] = f"<{type(self.dataset).__name__}>"
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CalibrationConfig":
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"Unknown calibration key(s) {unknown}; allowed keys: {sorted(allowed)}.")
        return cls(**data)
