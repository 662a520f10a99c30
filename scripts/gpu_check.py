"""One prepared device check: every pruning method on a random Llama-shaped model on one device.

Needs only torch, transformers, accelerate, safetensors and this repository's source (no network,
no ``datasets``): the model is built from a config with random weights and calibrated on random
token windows. For each method, on a fresh copy of the model:

- exact counts: every pruned row holds exactly ``round(sparsity * in_features)`` zeros
  (unstructured, per-row scope) or every group of M exactly M - N zeros (N:M); structured runs keep
  exactly the planned heads / neurons / blocks and still give finite logits;
- time: seconds per decoder block, and the ratio of the whole prune to one forward pass of the
  model over the same calibration windows (synchronised on CUDA);
- peak memory: ``torch.cuda.max_memory_allocated`` (reset per method; weights included) on CUDA,
  the process's peak RSS on the CPU;
- device agreement: the same methods on a small model on the device and on the CPU (same dtype,
  same windows); the fraction of weights (structured: heads / neurons / blocks) whose keep/prune
  decision agrees. Not identity: CUDA and CPU kernels round differently.

Default (GPU): a ~1.1B model (hidden 2048, intermediate 5632, 22 blocks, 32 heads / 4 KV heads,
vocab 32000) in bf16 on ``cuda``, 32 x 512 calibration tokens, sized to finish within about 8 minutes
on one H100; ``--offload`` also prunes it with half of its blocks offloaded to the CPU
(``device_map`` through Accelerate: the runner onloads one block at a time).

    python scripts/gpu_check.py --output gpu_check.json            # on a machine with a GPU
    python scripts/gpu_check.py --device cpu --small --output x.json  # seconds, on the CPU (tests)

Exit status 0 when every check passed, 1 otherwise; the JSON has ``ok`` and per-method ``ok``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

# name -> (kind, config kwargs)
METHODS = {
    "magnitude-50": ("magnitude", {"sparsity": 0.5}),
    "wanda-50": ("wanda", {"sparsity": 0.5}),
    "wanda-2:4": ("wanda", {"pattern": "2:4"}),
    "sparsegpt-50": ("sparsegpt", {"sparsity": 0.5}),
    "sparsegpt-2:4": ("sparsegpt", {"pattern": "2:4"}),
    "admm-50": ("admm", {"sparsity": 0.5}),
    "admm-2:4": ("admm", {"pattern": "2:4"}),
    "obs-heads-mlp": ("structured", {"heads_ratio": 0.25, "mlp_ratio": 0.25, "importance": "obs"}),
    "depth": ("depth", {"num_blocks": 1}),
}

# hidden, intermediate, blocks, heads, kv heads, vocab
SHAPES = {
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B's shape
    "small": (64, 128, 3, 8, 2, 256),
}


def llama_config(shape: str):
    from transformers import LlamaConfig

    h, i, n, heads, kv, vocab = SHAPES[shape]
    return LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def random_model(shape: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A Llama of ``SHAPES[shape]`` with N(0, 0.02) weights and unit norms, built on the CPU (no init pass)."""
    return random_llama(llama_config(shape), dtype, seed).eval()


def random_llama(cfg, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A Llama of config ``cfg`` with N(0, 0.02) weights and unit norms, built on the CPU without an init pass
    (scripts/bench_memory.py builds its large checkpoints with it too)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg)  # its buffers are not parameters: rebuilt
    return model


def method_config(name: str):
    import hfprune

    kind, kwargs = METHODS[name]
    cls = {"magnitude": hfprune.MagnitudeConfig, "wanda": hfprune.WandaConfig, "sparsegpt": hfprune.SparseGPTConfig,
           "admm": hfprune.ADMMConfig, "structured": hfprune.StructuredConfig,
           "depth": hfprune.DepthPruningConfig}[kind]
    return kind, cls(**kwargs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


@torch.no_grad()
def forward_seconds(model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """One forward pass of the whole model over the calibration windows (logits included)."""
    model(ids[:1].to(device))  # warm-up (kernels, allocator)
    sync(device)
    start = time.perf_counter()
    for s in range(0, ids.shape[0], batch_size):
        model(ids[s:s + batch_size].to(device))
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def finite_logits(model: nn.Module, ids: torch.Tensor, device: torch.device) -> bool:
    return bool(torch.isfinite(model(ids[:1, :64].to(device)).logits.float()).all())


def target_weights(model: nn.Module):
    """``(name, [out, in] weight)`` of every linear layer inside the decoder blocks, one block at a
    time on its execution device (an offloaded block is onloaded while its weights are read)."""
    from hfprune.arch import find_linears, get_blocks, weight_matrix
    from hfprune.core.runner import LayerRunner

    runner = LayerRunner(model)
    for i, block in enumerate(get_blocks(model)):
        with runner.onload(i):
            for name, module in find_linears(block).items():
                yield f"{i}.{name}", weight_matrix(module)


def check_counts(weights, config, kind: str) -> dict:
    """Exact zeros in every pruned layer: per group of M (N:M), per row (unstructured, ``scope="row"``)
    or per layer (``scope="layer"``, and SparseGPT, whose mask is chosen per block of columns over all
    rows with the layer total exact)."""
    from hfprune.solvers.masks import check_nm, parse_pattern, prune_count

    pat = parse_pattern(config.pattern)
    bad_counts, bad_nm = [], []
    zeros = numel = 0
    n_layers = 0
    for name, W in (weights.items() if isinstance(weights, dict) else weights):
        n_layers += 1
        z = (W == 0)
        zeros += int(z.sum())
        numel += W.numel()
        if pat.is_nm:
            rows, cols = W.shape
            per_group = z.reshape(rows, cols // pat.m, pat.m).sum(-1)
            if not check_nm(W, pat.n, pat.m):
                bad_nm.append(name)
            if not bool((per_group == pat.m - pat.n).all()):
                bad_counts.append(name)
        elif config.scope == "row" and kind != "sparsegpt":
            if not bool((z.sum(1) == prune_count(W.shape[1], config.sparsity)).all()):
                bad_counts.append(name)
        elif int(z.sum()) != prune_count(W.numel(), config.sparsity):
            bad_counts.append(name)
    return {"layers_checked": n_layers, "sparsity": zeros / max(1, numel), "counts_ok": not bad_counts,
            "bad_count_layers": bad_counts[:10], "nm_ok": (not bad_nm) if pat.is_nm else None,
            "bad_nm_layers": bad_nm[:10]}


def structured_shapes(model: nn.Module) -> list[dict]:
    from hfprune.arch import get_blocks

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return [{"heads": b.self_attn.q_proj.out_features // head_dim, "kv_heads": b.self_attn.k_proj.out_features // head_dim,
             "neurons": b.mlp.up_proj.out_features} for b in get_blocks(model)]


def check_structured(model: nn.Module, before: list[dict], config, kind: str) -> dict:
    after = structured_shapes(model)
    if kind == "depth":
        ok = len(after) == len(before) - config.num_blocks
        return {"blocks_before": len(before), "blocks_after": len(after), "counts_ok": ok}
    want = [{"heads": b["heads"] - round(config.heads_ratio * b["heads"]), "kv_heads": b["kv_heads"],
             "neurons": b["neurons"] - round(config.mlp_ratio * b["neurons"])} for b in before]
    return {"kept": after[0], "counts_ok": after == want, "expected": want[0]}


def kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> set[int]:
    """Indices of the rows of ``original`` that survive in ``pruned`` (rows are sliced, not changed)."""
    index = {row.numpy().tobytes(): i for i, row in enumerate(original.detach().float().cpu())}
    return {index[row.numpy().tobytes()] for row in pruned.detach().float().cpu()}


def decisions(model: nn.Module, dense: nn.Module, kind: str, report) -> torch.Tensor:
    """A flat boolean tensor of keep/prune decisions, comparable between two runs of one method."""
    from hfprune.arch import get_blocks

    if kind == "depth":
        removed = set(report.depth.removed)
        return torch.tensor([i in removed for i in range(len(get_blocks(dense)))])
    if kind == "structured":
        cfg = dense.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        out = []
        for bd, bp in zip(get_blocks(dense), get_blocks(model)):
            neurons = kept_rows(bd.mlp.up_proj.weight, bp.mlp.up_proj.weight)
            rows = kept_rows(bd.self_attn.q_proj.weight, bp.self_attn.q_proj.weight)
            heads = {r // head_dim for r in rows}
            out.append(torch.tensor([i in neurons for i in range(bd.mlp.up_proj.out_features)]))
            out.append(torch.tensor([h in heads for h in range(cfg.num_attention_heads)]))
        return torch.cat(out)
    return torch.cat([(W == 0).reshape(-1).cpu() for _name, W in target_weights(model)])


def prune_once(name: str, dense: nn.Module, ids: torch.Tensor, device: torch.device, *, offload: bool = False):
    """Prune a fresh copy of ``dense`` (on the CPU) on ``device``; returns (model, report, row)."""
    import hfprune

    kind, config = method_config(name)
    model = copy.deepcopy(dense)
    if offload:  # the first half of the blocks on the device, the rest offloaded (CPU RAM; on a CPU run, disk)
        import tempfile

        from accelerate import dispatch_model

        from hfprune.arch import get_blocks

        n = len(get_blocks(model))
        here = (device.index or 0) if device.type == "cuda" else "cpu"
        away = "cpu" if device.type == "cuda" else "disk"
        device_map = {"model.embed_tokens": here, "model.rotary_emb": here, "model.norm": here, "lm_head": here}
        device_map.update({f"model.layers.{i}": here if i < n // 2 else away for i in range(n)})
        offload_dir = None
        if away == "disk":
            import atexit
            import shutil

            offload_dir = tempfile.mkdtemp(prefix="gpu_check_offload_")
            atexit.register(shutil.rmtree, offload_dir, True)
        model = dispatch_model(model, device_map=device_map, main_device=device, offload_dir=offload_dir)
    else:
        model = model.to(device)
    from hfprune.core.runner import is_offloaded

    offloaded = is_offloaded(model)
    before = structured_shapes(model)
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    report = hfprune.prune(model, config=config, calibration=ids, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    row = {"method": kind, "config": config.to_dict(), "seconds": seconds,
           "seconds_per_block": seconds / len(before), "peak_gpu_mb": peak_mb(device),
           "report_peak_cuda_mb": report.peak_cuda_mb, "peak_rss_mb": report.peak_rss_mb,
           "batch_size": (report.calibration or {}).get("batch_size")}
    if kind in ("structured", "depth"):
        row.update(check_structured(model, before, config, kind))
    else:
        row.update(check_counts(target_weights(model), config, kind))
    devices = {p.device.type for p in model.parameters()}
    row["weights_on"] = sorted(devices)
    row["offloaded"] = offloaded
    return model, report, row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu.")
    ap.add_argument("--small", action="store_true", help="A tiny model and 4 x 32 tokens (seconds on a CPU).")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated subset of {', '.join(METHODS)}.")
    ap.add_argument("--nsamples", type=int, default=None, help="Calibration windows (default 32; --small 4).")
    ap.add_argument("--seqlen", type=int, default=None, help="Tokens per window (default 512; --small 32).")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-compare", action="store_true", help="Skip the small-model device vs CPU mask comparison.")
    ap.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                    help="Also prune Wanda with half the blocks offloaded through Accelerate: to CPU memory on CUDA "
                         "(the default there), to disk on a CPU run.")
    ap.add_argument("--output", help="Write the JSON here (it is also printed).")
    args = ap.parse_args(argv)

    import transformers

    import hfprune  # noqa: F401  (registers the methods)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                         "run with --device cpu --small on a machine without a GPU.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}: choose from {', '.join(METHODS)}.")
    dtype = getattr(torch, args.dtype)
    shape = "small" if args.small else "1b"
    nsamples = args.nsamples or (4 if args.small else 32)
    seqlen = args.seqlen or (32 if args.small else 512)
    offload = args.offload if args.offload is not None else device.type == "cuda"
    t_all = time.perf_counter()

    dense = random_model(shape, dtype)
    vocab = dense.config.vocab_size
    ids = torch.randint(3, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(1))
    h, i, n, heads, kv, _ = SHAPES[shape]
    result = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": args.dtype,
        "model": {"shape": shape, "params": sum(p.numel() for p in dense.parameters()), "hidden": h,
                  "intermediate": i, "blocks": n, "heads": heads, "kv_heads": kv, "vocab": vocab},
        "calibration": {"nsamples": nsamples, "seqlen": seqlen, "tokens": "random ids, seed 1"},
        "methods": {}, "agreement": {},
    }
    model = copy.deepcopy(dense).to(device)
    reset_peak(device)
    fwd_bs = 8 if device.type == "cuda" else 2
    result["forward_seconds"] = forward_seconds(model, ids, fwd_bs, device)
    result["forward_batch_size"] = fwd_bs
    result["dense_peak_gpu_mb"] = peak_mb(device)
    del model

    compare = not args.no_compare
    kept: dict[str, tuple] = {}  # --small: the main runs are the small model's device side of the comparison
    runs = [(name, False) for name in names]
    if offload and "wanda-50" in names:
        runs.append(("wanda-50", True))
    for name, off in runs:
        key = name + (" (offloaded)" if off else "")
        try:
            model, report, row = prune_once(name, dense, ids, device, offload=off)
            if compare and args.small and not off:
                kept[name] = (decisions(model, dense, METHODS[name][0], report), row["counts_ok"])
            row["finite"] = finite_logits(model, ids, device)
            row["ratio_to_forward"] = row["seconds"] / result["forward_seconds"]
            row["ok"] = bool(row["counts_ok"] and row["finite"] and row.get("nm_ok") is not False)
            del model
        except Exception as err:  # a failed method is a finding: record it and go on
            row = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        result["methods"][key] = row
        print(json.dumps({key: row}), file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if compare:
        # The same runs on a small model on the device and on the CPU: how often the decisions agree.
        small = dense if args.small else random_model("small", dtype)
        sids = ids if args.small else torch.randint(3, small.config.vocab_size, (8, 64),
                                                              generator=torch.Generator().manual_seed(1))
        for name in names:
            kind = METHODS[name][0]
            try:
                got = [kept[name]] if name in kept else []
                for dev in (device, torch.device("cpu"))[len(got):]:
                    model, report, row = prune_once(name, small, sids, dev)
                    got.append((decisions(model, small, kind, report), row["counts_ok"]))
                    del model
                (a, ok_a), (b, ok_b) = got
                result["agreement"][name] = {"agreement": float((a == b).float().mean()), "decisions": int(a.numel()),
                                             "counts_ok": bool(ok_a and ok_b)}
            except Exception as err:
                result["agreement"][name] = {"error": f"{type(err).__name__}: {err}"}
    result["total_seconds"] = time.perf_counter() - t_all
    result["ok"] = all(r.get("ok") for r in result["methods"].values()) and \
        all("error" not in r and r["counts_ok"] for r in result["agreement"].values())
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
