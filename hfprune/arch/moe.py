"""Mixture-of-experts layouts: expert weights as per-expert ``[out, in]`` matrices, wherever they live.

transformers 5 stores the experts of an MoE block as fused 3-D parameters of one module
(``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``); some families store them
transposed (``[E, in, out]``) and with biases (gpt-oss), or with ``up_proj`` only (no gate). The
modules decorated with ``transformers.integrations.moe.use_experts_implementation`` say which
(``has_gate``, ``has_bias``, ``is_transposed``, ``_apply_gate``, ``post_expert_norm``); older
layouts keep a ``ModuleList`` of per-expert MLPs of ``nn.Linear`` (those need nothing here: the
engine hooks them like any linear layer and each sees only the tokens routed to it).

:class:`ExpertLinear` is an ``nn.Linear`` whose weight (and bias) is a *view* of one expert's slice
of the fused parameter, so pruning it in place prunes the fused tensor and the checkpoint keeps
the model's own layout. :func:`linearized` (a context manager the engine enters around a pruning
run) makes these views and, for decorated modules, replaces the module's forward by the
per-expert loop of transformers' eager implementation written over the views, so forward hooks on
each view see exactly the tokens the router sent to that expert (or, with ``all_tokens=True``,
every token, while the output still uses the routed ones). The first call checks that the loop
reproduces the module's own forward; a module where it does not (or an undecorated fused module,
e.g. Llama-4's) keeps its own forward and its experts are marked ``data_free`` (the engine prunes
them by magnitude and says so). This is the same idea as llm-compressor's linearised experts.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

from hfprune.arch.modules import is_linear

logger = logging.getLogger(__name__)

__all__ = ["ExpertLinear", "FusedExperts", "find_expert_containers", "find_routers", "expert_linears",
           "linearized", "is_fused_experts"]

_PROJ_NAMES = ("gate_up_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
_FIRST = ("gate_up_proj", "gate_proj", "up_proj", "w1", "w3")
_LAST = ("down_proj", "w2")
_ROUTER_NAMES = ("gate", "router", "switch", "router_gate", "wg")


class ExpertLinear(nn.Linear):
    """One expert's slice of a fused 3-D parameter, as an ``nn.Linear`` (weight ``[out, in]`` view)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, expert: int, data_free: bool = False):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.expert = expert
        self.data_free = data_free
        self.tokens = 0

    def extra_repr(self) -> str:
        return f"expert={self.expert}, in_features={self.in_features}, out_features={self.out_features}"


def is_fused_experts(module: nn.Module) -> bool:
    """True for a module that holds expert weights as 3-D parameters (``[E, ., .]``)."""
    return _is_parallel(module) or \
        any(p.dim() == 3 and name in _PROJ_NAMES for name, p in module.named_parameters(recurse=False))


def _is_parallel(module: nn.Module) -> bool:
    """JetMoE-style parallel experts: one ``weight [E, out, in]``, ``forward(inputs, expert_size)`` on
    tokens already sorted by expert."""
    w = module._parameters.get("weight")
    return (w is not None and w.dim() == 3 and getattr(module, "num_experts", None) == w.shape[0]
            and getattr(module, "output_size", None) == w.shape[1] and getattr(module, "input_size", None) == w.shape[2])


def _is_decorated(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed"))


def find_expert_containers(block: nn.Module) -> list[str]:
    """Block-relative paths of expert containers: fused 3-D modules, or ``experts`` ModuleLists."""
    out = []
    for name, module in block.named_modules():
        if not name:
            continue
        if is_fused_experts(module):
            out.append(name)
        elif isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("experts", "local_experts") \
                and len(module) > 1:
            out.append(name)
    return out


def find_routers(block: nn.Module, containers: tuple[str, ...] | list[str]) -> list[str]:
    """Block-relative paths of the linear routers next to each expert container (kept dense)."""
    out = []
    modules = dict(block.named_modules())
    for path in containers:
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        n_experts = _num_experts(modules[path])
        owner = modules[parent] if parent else block
        names = [n for n in _ROUTER_NAMES if n in owner._modules]
        # gates of a shared expert (Qwen2-MoE's shared_expert_gate, one output) are routers too
        names += [n for n in owner._modules if "gate" in n and not n.endswith("_proj") and n not in names]
        for name in names:
            cand = f"{parent}.{name}" if parent else name
            sub = modules.get(cand)
            if sub is None:
                continue
            for rel, m in sub.named_modules():
                if is_linear(m) and m.weight.shape[0] in (1, n_experts, n_experts + 1):
                    out.append(f"{cand}.{rel}" if rel else cand)
    return sorted(set(out))


def _num_experts(module: nn.Module) -> int:
    if isinstance(module, nn.ModuleList):
        return len(module)
    n = getattr(module, "num_experts", None)
    if isinstance(n, int):
        return n
    return next(p.shape[0] for name, p in module.named_parameters(recurse=False) if p.dim() == 3)


def _hidden_size(module: nn.Module) -> int | None:
    for attr in ("hidden_dim", "hidden_size"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    cfg = getattr(module, "config", None)
    return getattr(cfg, "hidden_size", None)


class FusedExperts:
    """The fused 3-D parameters of one experts module, with their orientation."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.decorated = _is_decorated(module)
        self.num_experts = _num_experts(module)
        self.parallel = _is_parallel(module)
        self.params = {n: p for n, p in module.named_parameters(recurse=False)
                       if p.dim() == 3 and (n in _PROJ_NAMES or (self.parallel and n == "weight"))}
        # the stored experts (LongCat's num_experts also counts its parameter-free "zero experts")
        self.num_experts = min(p.shape[0] for p in self.params.values())

    def transposed(self, name: str) -> bool:
        """Whether ``name`` is stored ``[E, in, out]``."""
        if self.decorated:
            return bool(self.module.is_transposed)
        if self.parallel:
            return False
        shape = self.params[name].shape
        hidden = _hidden_size(self.module)
        if hidden is None or shape[1] == shape[2]:
            return False
        if name in _LAST:  # output is the hidden size
            return shape[2] == hidden and shape[1] != hidden
        return shape[1] == hidden and shape[2] != hidden

    def matrix(self, name: str, e: int) -> torch.Tensor:
        """Expert ``e`` of parameter ``name`` as an ``[out, in]`` view."""
        w = self.params[name].data[e]
        return w.t() if self.transposed(name) else w

    def bias(self, name: str, e: int) -> torch.Tensor | None:
        b = getattr(self.module, f"{name}_bias", None)
        return b.data[e] if isinstance(b, torch.Tensor) else None


def expert_linears(module: nn.Module, data_free: bool | None = None) -> dict[str, ExpertLinear]:
    """Per-expert views of a fused experts module, named ``"{e}.{param}"`` (e.g. ``"3.gate_up_proj"``)."""
    fused = FusedExperts(module)
    free = (not fused.decorated) if data_free is None else data_free
    return {f"{e}.{name}": ExpertLinear(fused.matrix(name, e), fused.bias(name, e), e, data_free=free)
            for e in range(fused.num_experts) for name in fused.params}


_ACTIVE = "_hfprune_expert_linears"


def active_expert_linears(module: nn.Module) -> dict[str, ExpertLinear] | None:
    """The views made by :func:`linearized` for ``module`` (``None`` outside it)."""
    return module.__dict__.get(_ACTIVE)


def _loop_forward(module: nn.Module, lins: dict[str, ExpertLinear], all_tokens: bool):
    fused_first = "gate_up_proj" if getattr(module, "has_gate", True) and "gate_up_proj" in module._parameters \
        else "up_proj"
    n_experts = _num_experts(module)

    def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        for e in range(n_experts):
            token_idx, k_pos = torch.where(top_k_index == e)
            first, last = lins[f"{e}.{fused_first}"], lins[f"{e}.down_proj"]
            x = hidden_states if all_tokens else hidden_states[token_idx]
            first.tokens += int(x.shape[0])
            h = first(x)
            h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
            last.tokens += int(h.shape[0])
            y = last(h)
            if getattr(module, "has_post_expert_norm", False):
                y = module.post_expert_norm(y)
            if all_tokens:
                y = y[token_idx]
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, k_pos, None]).to(out.dtype))
        return out

    return forward


@contextlib.contextmanager
def linearized(blocks: nn.ModuleList, containers: tuple[str, ...], *, all_tokens: bool = False,
               check: bool = True) -> Iterator[None]:
    """Per-expert :class:`ExpertLinear` views for every fused experts module in ``blocks``.

    While active, :func:`hfprune.arch.find_linears` lists the views (``experts.3.down_proj``)
    and decorated modules run the per-expert loop (see the module docstring).
    """
    touched: list[nn.Module] = []
    try:
        for block in blocks:
            for path in containers:
                try:
                    module = block.get_submodule(path)
                except AttributeError:
                    continue
                if not is_fused_experts(module):
                    continue
                if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
                    raise ValueError("Fused MoE experts cannot be pruned from offloaded (meta) weights yet: load the "
                                     "model in memory (no device_map offload / --low-memory).")
                decorated = _is_decorated(module) and ("down_proj" in module._parameters) and \
                    ("gate_up_proj" in module._parameters or "up_proj" in module._parameters)
                parallel = _is_parallel(module)
                lins = expert_linears(module, data_free=not (decorated or parallel))
                module.__dict__[_ACTIVE] = lins
                touched.append(module)
                if parallel:
                    module.forward = _parallel_forward(module, lins, all_tokens)
                elif decorated:
                    module.forward = _checked(module, _loop_forward(module, lins, all_tokens), lins, check)
                else:
                    logger.warning("%s is not a transformers experts module with a known layout: its experts are "
                                   "pruned without calibration statistics (by magnitude).", type(module).__name__)
        yield
    finally:
        for module in touched:
            module.__dict__.pop(_ACTIVE, None)
            module.__dict__.pop("forward", None)


def _parallel_forward(module: nn.Module, lins: dict[str, ExpertLinear], all_tokens: bool):
    """JetMoE's ``ParallelExperts.forward`` over the per-expert views (tokens arrive sorted by expert)."""
    views = [lins[f"{e}.weight"] for e in range(module.num_experts)]

    def forward(inputs, expert_size, *args, **kwargs):
        sizes = expert_size.tolist() if isinstance(expert_size, torch.Tensor) else list(expert_size)
        if all_tokens:
            starts = [sum(sizes[:e]) for e in range(len(sizes))]
            outs = [view(inputs)[s:s + n] for view, s, n in zip(views, starts, sizes)]
        else:
            outs = [view(x) for view, x in zip(views, inputs.split(sizes, dim=0))]
        return torch.cat(outs, dim=0)

    return forward


def _checked(module: nn.Module, loop, lins: dict[str, ExpertLinear], check: bool):
    """``loop``, compared once with the module's own forward; on a mismatch the module keeps its own
    forward and its experts become data-free."""
    state = {"checked": not check, "ok": True}
    original = type(module).forward

    def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        if not state["ok"]:
            return original(module, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        if not state["checked"]:
            state["checked"] = True
            with torch.no_grad():
                ref = original(module, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
                counts = {n: lin.tokens for n, lin in lins.items()}
                got = _silent(loop, lins, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
                for n, lin in lins.items():
                    lin.tokens = counts[n]
            scale = ref.float().abs().max().clamp_min(1e-6)
            if got.shape != ref.shape or (got.float() - ref.float()).abs().max() > 1e-3 * scale:
                state["ok"] = False
                for lin in lins.values():
                    lin.data_free = True
                logger.warning("The per-expert loop does not reproduce %s.forward; its experts are pruned without "
                               "calibration statistics (by magnitude).", type(module).__name__)
                return ref
        return loop(hidden_states, top_k_index, top_k_weights, *args, **kwargs)

    return forward


def _silent(loop, lins, *args, **kwargs):
    """Run ``loop`` with the views' forward hooks disabled (a check must not add statistics)."""
    saved = [(lin, lin._forward_pre_hooks.copy(), lin._forward_hooks.copy()) for lin in lins.values()]
    for lin, _, _ in saved:
        lin._forward_pre_hooks.clear()
        lin._forward_hooks.clear()
    try:
        return loop(*args, **kwargs)
    finally:
        for lin, pre, post in saved:
            lin._forward_pre_hooks.update(pre)
            lin._forward_hooks.update(post)


def expert_output(module: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Output of expert ``e`` of a decorated fused experts module for inputs ``x`` (before the router
    weight), by the same formula as transformers' eager implementation."""
    fused = FusedExperts(module)
    first = "gate_up_proj" if module.has_gate and "gate_up_proj" in fused.params else "up_proj"
    h = torch.nn.functional.linear(x, fused.matrix(first, e), fused.bias(first, e))
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    y = torch.nn.functional.linear(h, fused.matrix("down_proj", e), fused.bias("down_proj", e))
    if getattr(module, "has_post_expert_norm", False):
        y = module.post_expert_norm(y)
    return y
