"""Layout discovery: the decoder blocks and the roles of their weights, from what transformers knows.

Used by :func:`hfprune.arch.get_spec` for every model type that has no hand-written
:class:`~hfprune.arch.ArchSpec` (the table only keeps overrides for odd layouts such as
fused qkv row orders). What is read, in order:

1. the **text decoder**: ``model.get_decoder()`` (the language model inside image-text wrappers
   such as ``Gemma3ForConditionalGeneration``; the base model of a causal LM), so vision and audio
   towers are never walked (they stay dense unless named by an override);
2. the **repeated blocks**: the ``nn.ModuleList`` under the decoder whose entries are instances of
   the model's ``_no_split_modules`` classes (the unit transformers itself never splits across
   devices); without that list, the ``ModuleList`` of ``num_hidden_layers`` same-class modules;
3. **roles** of the first block's weights by their names (attention q/k/v/o or a fused qkv, MLP
   gate/up/down or a fused gate_up, expert containers, routers);
4. **sizes** from ``config.get_text_config()`` (heads, key/value heads, head_dim, MLP width).

An encoder-decoder (``config.is_encoder_decoder``) gets its encoder stack as ``layers`` and its
decoder stack in ``stacks`` (both are pruned, encoder first), or an error when the two cannot be
told apart; blocks made of 2-D/3-D convolutions (ConvNeXt) are refused.

A model whose layout cannot be found gets a :class:`ValueError` that lists the candidate module
lists and says what to register, e.g.
``hfprune.register_architecture("my_type", ArchSpec(layers="model.decoder.layers"))``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from torch import nn

from hfprune.arch import moe
from hfprune.arch.modules import is_linear
from hfprune.arch.spec import ArchSpec, block_list, head_dim_of, num_heads_of, num_kv_heads_of

logger = logging.getLogger(__name__)

__all__ = ["discover_spec", "activation_sizes", "text_config", "find_decoder_path", "find_block_lists", "find_roles",
           "LAYER_TYPE_ORDER"]

# Names of projections, per role, as transformers' modeling files spell them (first match wins).
_ATTN = ("self_attn", "attn", "attention", "self_attention", "mixer")
_MLP = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
_ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "query", "q"),
    "k": ("k_proj", "key", "k"),
    "v": ("v_proj", "value", "v"),
    "qkv": ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv"),
    "o": ("o_proj", "out_proj", "dense", "c_proj", "wo", "o"),
    "gate": ("gate_proj", "w1"),
    "up": ("up_proj", "w3", "fc1", "c_fc", "dense_h_to_4h", "fc_in"),
    "gate_up": ("gate_up_proj",),
    "down": ("down_proj", "w2", "fc2", "c_proj", "dense_4h_to_h", "fc_out"),
}
LAYER_TYPE_ORDER = tuple(_ROLE_NAMES[r][0] for r in ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down"))
"""The Llama-style projection names in block order (the model card's sparsity table lists these first)."""
_SIZE_FIELDS = {
    "heads_attr": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "kv_heads_attr": ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"),
    "intermediate_attr": ("intermediate_size", "ffn_dim", "n_inner", "d_ff"),
    "head_dim_attr": ("head_dim",),
    "hidden_attr": ("hidden_size", "n_embd", "d_model"),
}


def text_config(model: nn.Module):
    """The decoder's text config (``config.get_text_config(decoder=True)``), else ``model.config``."""
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    if getter is not None:
        try:
            return getter(decoder=True)
        except (TypeError, ValueError):
            return config
    return config


def _path_of(root: nn.Module, target: nn.Module) -> str | None:
    if target is root:
        return ""
    for name, module in root.named_modules():
        if module is target:
            return name
    return None


def find_decoder_path(model: nn.Module) -> str:
    """Dotted path of the text decoder inside ``model`` (``""`` when there is no wrapper to look into)."""
    for attr in ("language_model",):
        for owner in (model, getattr(model, "model", None)):
            sub = getattr(owner, attr, None) if owner is not None else None
            if isinstance(sub, nn.Module):
                path = _path_of(model, sub)
                if path is not None:
                    return path
    getter = getattr(model, "get_decoder", None)
    if getter is not None:
        try:
            decoder = getter()
        except Exception:  # noqa: BLE001 - some wrappers raise NotImplementedError / AttributeError
            decoder = None
        if isinstance(decoder, nn.Module):
            path = _path_of(model, decoder)
            if path is not None:
                return path
    return ""


def _no_split_classes(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        value = getattr(module, "_no_split_modules", None)
        if value:
            names.update(value)
    return names


def find_block_lists(model: nn.Module, under: str = "") -> list[tuple[str, nn.ModuleList]]:
    """Candidate decoder-block lists: ``ModuleList`` s under ``under`` holding ``_no_split_modules``
    classes (or, when the model declares none, ``num_hidden_layers`` modules of one class)."""
    root = model.get_submodule(under) if under else model
    prefix = f"{under}." if under else ""
    classes = _no_split_classes(model)
    lists = [(prefix + name, m) for name, m in root.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and name]
    hits = [(n, m) for n, m in lists if any(type(c).__name__ in classes for c in m)]
    if hits:
        # Nested lists (a block list inside a block) are part of a block, not the stack.
        return [(n, m) for n, m in hits if not any(n.startswith(o + ".") for o, _ in hits if o != n)]
    depth = _num_layers(text_config(model))
    return [(n, m) for n, m in lists
            if len({type(c) for c in m}) == 1 and (depth is None or len(m) == depth)
            and any(is_linear(x) for x in m[0].modules())]


def _num_layers(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


_TOWERS = ("vision", "visual", "image", "audio", "speech", "vqmodel", "vq_model")


def _tower(path: str) -> bool:
    return any(t in path.lower() for t in _TOWERS)


def _choose(model: nn.Module, candidates: list[tuple[str, nn.ModuleList]]) -> str | None:
    if len(candidates) == 1:
        return candidates[0][0]
    text = [c for c in candidates if not _tower(c[0])]
    if len(text) == 1:
        return text[0][0]
    candidates = text or candidates
    depth = _num_layers(text_config(model))
    same_depth = [c for c in candidates if depth is not None and len(c[1]) == depth]
    if len(same_depth) == 1:
        return same_depth[0][0]
    return None


def _child(block: nn.Module, names: tuple[str, ...]) -> str | None:
    children = dict(block.named_children())
    return next((n for n in names if n in children), None)


def find_roles(block: nn.Module) -> dict[str, str | None]:
    """Block-relative paths of the attention and MLP projections of ``block`` (``None`` when absent).

    Projections are looked up by their transformers names inside the block's attention child
    (``self_attn``, ``attn``, ...) and MLP child (``mlp``, ``feed_forward``, ...), then directly in the
    block (OPT's ``fc1``/``fc2``)."""
    roles: dict[str, str | None] = {k: None for k in _ROLE_NAMES}
    attn = _child(block, _ATTN)
    mlp = _child(block, _MLP)
    modules = dict(block.named_modules())

    def lookup(parent: str | None, role: str) -> str | None:
        for name in _ROLE_NAMES[role]:
            path = f"{parent}.{name}" if parent else name
            if path in modules and is_linear(modules[path]):
                return path
        return None

    for role in ("q", "k", "v", "qkv", "o"):
        roles[role] = lookup(attn, role) if attn else None
    for role in ("gate", "up", "gate_up", "down"):
        roles[role] = lookup(mlp, role) if mlp else None
        roles[role] = roles[role] or lookup(None, role)
    if roles["qkv"] and (roles["q"] or roles["k"]):
        roles["qkv"] = None
    if roles["o"] and roles["o"] == roles["down"]:
        roles["o"] = None
    return roles


def _is_field(config, name: str) -> bool:
    """A config value that can be set (a read-only property such as Falcon's ``head_dim`` is derived)."""
    prop = getattr(type(config), name, None)
    try:
        present = hasattr(config, name)
    except Exception:  # noqa: BLE001 - e.g. a per-layer value of a heterogeneous config (Gemma-4)
        return False
    return present and not (isinstance(prop, property) and prop.fset is None)


def _size_attrs(config) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for attr, names in _SIZE_FIELDS.items():
        out[attr] = next((n for n in names if _is_field(config, n)), None)
    return out


def activation_sizes(config) -> tuple[int, int, int]:
    """``(hidden, intermediate, heads)`` of a (text) config under whichever names its family uses,
    for sizing activation memory; 1024 / ``4 * hidden`` / 16 where the config does not say."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(names):
        return next((v for v in (getattr(cfg, n, None) for n in names) if isinstance(v, int) and v > 0), None)

    hidden = first(_SIZE_FIELDS["hidden_attr"]) or 1024
    return hidden, first(_SIZE_FIELDS["intermediate_attr"]) or 4 * hidden, first(_SIZE_FIELDS["heads_attr"]) or 16


def check_structured(model: nn.Module, spec, heads: bool, mlp: bool) -> None:
    """Raise a clear error before structured pruning of a *discovered* layout that it cannot handle:
    missing projections, or other tensors sized by the heads / MLP width (e.g. OLMo-2's ``q_norm``
    over all heads), which head or neuron removal would leave inconsistent."""
    cfg = text_config(model)
    model_type = getattr(model.config, "model_type", None)
    hint = (f"prune it unstructured, or describe it with hfprune.register_architecture({model_type!r}, "
            f"ArchSpec(...)) if the layout is known to work")
    block = block_list(model, spec)[0]
    if heads:
        if not spec.o or not (spec.qkv or (spec.q and spec.k and spec.v)):
            raise ValueError(f"Structured head pruning needs the q/k/v (or fused qkv) and output projections; the "
                             f"discovered layout of {model_type!r} has q={spec.q}, k={spec.k}, v={spec.v}, "
                             f"qkv={spec.qkv}, o={spec.o}: set heads_ratio=0, or {hint}.")
        hd = head_dim_of(cfg, spec)
        sizes = {num_heads_of(cfg, spec) * hd, num_kv_heads_of(cfg, spec) * hd}
        attn = block.get_submodule(spec.o.rsplit(".", 1)[0]) if "." in spec.o else block
        known = {id(block.get_submodule(p)) for p in (spec.q, spec.k, spec.v, spec.qkv, spec.o) if p}
        for name, sub in attn.named_modules():
            if id(sub) in known:
                continue
            for pname, p in sub.named_parameters(recurse=False):
                if any(d in sizes for d in p.shape):
                    raise ValueError(f"Structured head pruning of {model_type!r} would leave "
                                     f"{(name + '.' if name else '')}{pname} {tuple(p.shape)} (sized by the heads) "
                                     f"inconsistent: set heads_ratio=0, or {hint}.")
    if mlp:
        if not spec.down or not (spec.up or spec.gate_up):
            raise ValueError(f"Structured MLP pruning needs the up and down projections; the discovered layout of "
                             f"{model_type!r} has up={spec.up}, gate_up={spec.gate_up}, down={spec.down}: set "
                             f"mlp_ratio=0, or {hint}.")


_CONV = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _check_not_convolutional(model: nn.Module, blocks: nn.ModuleList, path: str) -> None:
    """Refuse, before any work, a convolutional network (ConvNeXt, ResNet): its repeated stages hold 2-D/3-D
    convolutions, not transformer blocks of linear layers."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for name, module in blocks.named_modules():
        if isinstance(module, _CONV):
            name = f"{path}.{name}"
            raise ValueError(
                f"{type(model).__name__} (model type {model_type!r}) is a convolutional network ({name} is a "
                f"{type(module).__name__}); hfprune prunes the linear layers of transformer blocks (decoder, encoder "
                f"or encoder-decoder language and vision transformers), not convolutions. Use a transformer model.")


def _stack_paths(found: list[tuple[str, nn.ModuleList]], side: str) -> list[str]:
    """Block lists whose path (not counting the list's own name) has a component naming ``side``."""
    return [n for n, _ in found if any(side in part for part in n.lower().split(".")[:-1]) and not _tower(n)]


def _encoder_decoder_stacks(model: nn.Module) -> tuple[str, tuple[str, ...]]:
    """``(encoder blocks, (decoder blocks,))`` of an encoder-decoder (T5's ``encoder.block``, BART's
    ``model.encoder.layers``): the encoder is pruned first, then the decoder on the pruned encoder's
    outputs. Raises when the two stacks cannot be told apart (pruning one would leave the other dense)."""
    found = find_block_lists(model)
    enc, dec = _stack_paths(found, "encoder"), _stack_paths(found, "decoder")
    dec = [n for n in dec if n not in enc]
    if len(enc) == 1 and len(dec) == 1:
        return enc[0], (dec[0],)
    model_type = getattr(model.config, "model_type", None)
    listed = _listed(found)
    raise ValueError(
        f"hfprune could not tell the encoder and decoder blocks of the encoder-decoder {model_type!r} "
        f"({type(model).__name__}) apart (candidate module lists: {listed}); pruning one stack only would leave "
        f"the other dense. Name both: `hfprune.register_architecture({model_type!r}, ArchSpec(layers='<encoder "
        f"blocks>', stacks=('<decoder blocks>',)))`.")


def _listed(candidates) -> str:
    """The candidate block lists of an error message: ``path (N x BlockClass)``, or ``none found``."""
    return ", ".join(f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in candidates) or "none found"


def discover_spec(model: nn.Module, layers: str | None = None):
    """An :class:`~hfprune.arch.ArchSpec` for ``model`` found from transformers metadata.

    ``layers`` forces the path of the block list (everything else is still discovered).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    stacks: tuple[str, ...] = ()
    if layers is None and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        layers, stacks = _encoder_decoder_stacks(model)
    if layers is None:
        decoder = find_decoder_path(model)
        candidates = find_block_lists(model, decoder) or (find_block_lists(model) if decoder else [])
        layers = _choose(model, candidates)
        if layers is None:
            listed = _listed(candidates)
            raise ValueError(
                f"hfprune could not find the decoder blocks of model type {model_type!r} "
                f"({type(model).__name__}); candidate module lists: {listed}. Name the one to prune: "
                f"`hfprune.register_architecture({model_type!r}, ArchSpec(layers='<path of the block "
                f"ModuleList>'))`.")
    try:
        blocks = model.get_submodule(layers)
    except AttributeError as err:
        raise ValueError(f"{type(model).__name__} has no module at {layers!r}; pass the dotted path of its "
                         f"decoder-block ModuleList.") from err
    for path in (layers, *stacks):
        _check_not_convolutional(model, model.get_submodule(path), path)
    block = blocks[0]
    roles = find_roles(block)
    cfg = text_config(model)
    sizes = _size_attrs(cfg)
    # MoE blocks may start after some dense ones (DeepSeek's first_k_dense_replace): look at every block.
    experts, routers = [], []
    for b in blocks:
        found = moe.find_expert_containers(b)
        experts += [p for p in found if p not in experts]
        routers += [p for p in moe.find_routers(b, found) if p not in routers]
    experts, routers = tuple(experts), tuple(routers)
    spec = ArchSpec(layers=layers, **roles, heads_attr=sizes["heads_attr"] or "num_attention_heads",
                    kv_heads_attr=sizes["kv_heads_attr"], intermediate_attr=sizes["intermediate_attr"],
                    head_dim_attr=sizes["head_dim_attr"], hidden_attr=sizes["hidden_attr"] or "hidden_size",
                    attention_bias_attr="attention_bias" if hasattr(cfg, "attention_bias") else None,
                    mlp_bias_attr="mlp_bias" if hasattr(cfg, "mlp_bias") else None,
                    experts=experts, routers=routers, stacks=stacks, discovered=True)
    logger.info("Discovered the layout of %s: %d blocks at %s%s.", type(model).__name__, len(blocks), layers,
                f", experts at {', '.join(experts)}" if experts else "")
    return spec


def with_layers(spec, layers: str):
    """``spec`` with another block-list path (an override of a discovered layout)."""
    return replace(spec, layers=layers)
