"""Structured checkpoints: record the pruned shapes in ``model.config`` and reload them."""

from __future__ import annotations

import copy
import logging
from typing import Mapping

import torch
from torch import nn

from hfprune.arch import (ArchSpec, get_blocks, get_spec, head_dim_configurable, num_heads_of, num_kv_heads_of)
from hfprune.arch.resize import PRUNED_SHAPES_KEY
from hfprune.structured.surgery import block_shapes, parent, set_attention_attrs, set_mlp_attrs, slice_attention, slice_mlp

logger = logging.getLogger(__name__)

_SHAPES_FORMAT = "hfprune.structured/1"


def _config_rejects(config, fields: Mapping[str, object]) -> str | None:
    """Why ``config`` with ``fields`` set would fail transformers' own validation (e.g. Llama
    demands ``hidden_size % num_attention_heads == 0`` even with an explicit ``head_dim``), or
    ``None`` when it is accepted."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return None
    candidate = copy.deepcopy(config)
    try:
        for key, value in fields.items():
            setattr(candidate, key, value)
        candidate.validate()
    except Exception as err:  # transformers raises its own StrictDataclass* errors
        return str(getattr(err, "__cause__", None) or err).strip().splitlines()[-1].strip()
    return None


def write_config(model: nn.Module, spec: ArchSpec, blocks) -> str:
    """Record the new shapes in ``model.config``; returns ``"transformers"`` when stock
    ``from_pretrained`` can reload the model, ``"hfprune"`` when it needs
    :class:`AutoPrunedModelForCausalLM`."""
    config = model.config
    shapes = [block_shapes(b, spec, config) for b in blocks]
    head_dim = shapes[0][2]
    layer_entries = [{"num_attention_heads": h, "num_key_value_heads": kv, "intermediate_size": m}
                     for h, kv, _, m in shapes]
    all_same = all(s == shapes[0] for s in shapes)
    # Families without a head_dim field derive it as hidden // num_heads, so their global head
    # counts can only describe blocks whose head counts did not change.
    heads_as_config = (shapes[0][0] == num_heads_of(config, spec)
                       and shapes[0][1] == (num_kv_heads_of(config, spec) if spec.kv_heads_attr else shapes[0][0]))
    expressible = all_same and (head_dim_configurable(spec) or spec.o is None or heads_as_config)
    if spec.head_dim_attr:
        setattr(config, spec.head_dim_attr, head_dim)
    if expressible:
        n_heads, n_kv, _, inter = shapes[0]
        fields = {}
        if spec.o is not None:
            fields[spec.heads_attr] = n_heads
            if spec.kv_heads_attr:
                fields[spec.kv_heads_attr] = n_kv
        if spec.intermediate_attr and inter is not None:
            fields[spec.intermediate_attr] = inter
        problem = _config_rejects(config, fields)
        if problem is None:
            for key, value in fields.items():
                setattr(config, key, value)
            if hasattr(config, PRUNED_SHAPES_KEY):
                delattr(config, PRUNED_SHAPES_KEY)
            return "transformers"
        logger.warning("The stock %s cannot state the pruned shapes (%s); storing them in config.%s instead, so "
                       "reload with hfprune.structured.AutoPrunedModelForCausalLM. Choose a heads_ratio that "
                       "keeps hidden_size divisible by the number of heads to get a stock checkpoint.",
                       type(config).__name__, problem, PRUNED_SHAPES_KEY)
    setattr(config, PRUNED_SHAPES_KEY, {"format": _SHAPES_FORMAT, "head_dim": head_dim, "layers": layer_entries})
    for block, (n_heads, n_kv, hd, inter) in zip(blocks, shapes):
        if spec.o is not None:
            set_attention_attrs(parent(block, spec.o), spec, n_heads, n_kv, hd, per_block_config=True)
        if inter is not None:
            set_mlp_attrs(parent(block, spec.down), spec, inter, per_block_config=True)
    return "hfprune"


@torch.no_grad()
def apply_pruned_shapes(model: nn.Module) -> nn.Module:
    """Resize a freshly built model's blocks to ``config.pruned_shapes`` (weights are not
    meaningful afterwards: load the checkpoint into it). Works on the meta device."""
    shapes = getattr(model.config, PRUNED_SHAPES_KEY, None)
    if not shapes:
        return model
    if not isinstance(shapes, Mapping) or not isinstance(shapes.get("layers"), list):
        raise ValueError(f"config.{PRUNED_SHAPES_KEY} must be a dict with a 'layers' list (written by "
                         f"hfprune.structured.prune_structured); got {shapes!r}.")
    spec = get_spec(model)
    blocks = list(get_blocks(model, spec))
    if len(shapes["layers"]) != len(blocks):
        raise ValueError(f"config.{PRUNED_SHAPES_KEY} describes {len(shapes['layers'])} blocks but the model has "
                         f"{len(blocks)}; the config does not belong to this checkpoint.")
    for block, target in zip(blocks, shapes["layers"]):
        n_heads, n_kv, hd, inter = block_shapes(block, spec, model.config)
        t_heads = int(target.get("num_attention_heads", n_heads))
        t_kv = int(target.get("num_key_value_heads", n_kv))
        t_inter = target.get("intermediate_size", inter)
        if spec.o is not None and (t_heads, t_kv) != (n_heads, n_kv):
            if t_heads > n_heads or t_kv > n_kv:
                raise ValueError(f"config.{PRUNED_SHAPES_KEY} asks for {t_heads} heads / {t_kv} KV heads but the "
                                 f"config builds only {n_heads} / {n_kv}.")
            slice_attention(block, spec, n_heads, n_kv, hd, torch.arange(t_heads), torch.arange(t_kv))
        if spec.o is not None:
            set_attention_attrs(parent(block, spec.o), spec, t_heads, t_kv, hd, per_block_config=True)
        if t_inter is not None and inter is not None:
            t_inter = int(t_inter)
            if t_inter != inter:
                if t_inter > inter:
                    raise ValueError(f"config.{PRUNED_SHAPES_KEY} asks for {t_inter} MLP neurons but the config "
                                     f"builds only {inter}.")
                slice_mlp(block, spec, inter, torch.arange(t_inter))
            set_mlp_attrs(parent(block, spec.down), spec, t_inter, per_block_config=True)
    return model


_PRUNED_CLASSES: dict[type, type] = {}


def _pruned_class(cls: type) -> type:
    """A subclass of ``cls`` that resizes its blocks to ``config.pruned_shapes`` right after
    construction, so transformers' own ``from_pretrained`` (meta-device init, safetensors
    loading, dtype/device_map handling, weight tying) loads the smaller tensors."""
    if cls not in _PRUNED_CLASSES:
        def __init__(self, config, *args, **kwargs):
            cls.__init__(self, config, *args, **kwargs)
            apply_pruned_shapes(self)

        # Same name as the stock class so save_pretrained keeps the stock "architectures" entry.
        _PRUNED_CLASSES[cls] = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                                           "__qualname__": cls.__qualname__})
    return _PRUNED_CLASSES[cls]


class AutoPrunedModelForCausalLM:
    """Load checkpoints written after :func:`prune_structured`.

    Checkpoints without ``config.pruned_shapes`` load exactly like
    ``AutoModelForCausalLM.from_pretrained``. Otherwise the stock model class for the config is
    built on the meta device, resized per block, and the safetensors weights are loaded into it
    (``use_safetensors=True``; no pickle, no remote code).
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("Use AutoPrunedModelForCausalLM.from_pretrained(path) or .from_config(config).")

    @staticmethod
    def _model_class(config) -> type:
        from transformers import AutoModelForCausalLM

        mapping = AutoModelForCausalLM._model_mapping
        try:
            return mapping[type(config)]
        except KeyError:
            raise ValueError(f"No causal-LM class is registered in transformers for config {type(config).__name__}.") from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM

        if kwargs.get("trust_remote_code"):
            raise ValueError("AutoPrunedModelForCausalLM does not run remote code; drop trust_remote_code.")
        config = kwargs.pop("config", None)
        if config is None:
            config_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only",
                                                    "subfolder") if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
        if not getattr(config, PRUNED_SHAPES_KEY, None):
            return AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
        kwargs.setdefault("use_safetensors", True)
        model_cls = _pruned_class(cls._model_class(config))
        return model_cls.from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        """Build a randomly initialised model with the per-block shapes of ``config``."""
        from transformers import AutoModelForCausalLM

        if not getattr(config, PRUNED_SHAPES_KEY, None):
            return AutoModelForCausalLM.from_config(config, **kwargs)
        return _pruned_class(cls._model_class(config))._from_config(config, **kwargs)
