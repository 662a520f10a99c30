"""Pareto of structured pruning kinds on SmolLM2-135M: parameters and decode speed vs perplexity.

Kinds, each at about 0.9x, 0.8x and 0.7x of the dense parameters, no recovery:

* ``width``: heads + MLP neurons (hfprune's structured method, ``--width-importance``, by default
  OBS importance with least-squares compensation; every target is tried with one query head of
  every KV group removed, with MLP neurons only, and with one whole KV group removed, the rest
  from the MLP: ``--width-heads``);
* ``depth``: whole decoder blocks (``block_influence`` and ``angular``);
* ``hidden``: residual channels (Minitron activation importance);
* ``combo``: two kinds sharing the removed parameters half and half (width-MLP + depth,
  width-MLP + hidden, depth + hidden), applied in that order; the best is reported.

Protocol: calibration c4 64 x 512 seed 0 (one token tensor for every run), WikiText-2 perplexity
over the first 8 windows of 2048 tokens, float32. Decode speed: greedy decoding of
``--new-tokens`` tokens after a 32-token prompt at batch 1 with the KV cache, median of
``--repeats`` runs, interleaved with a dense re-measure (machine load drifts). ``--speed-fn
module:function`` replaces the timer with another one (e.g. a fuller ``hfprune bench``), called as
``function(model, prompt_ids, new_tokens)`` and returning decode tokens per second.

    flock /work/wt/heavy.lock nice -n 15 env OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_pareto.py
    # -> docs/results/pareto.json, docs/img/pareto.png
    .venv/bin/python scripts/bench_pareto.py --targets 0.8 --kinds depth,hidden   # a reduced grid
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import PROTOCOL, machine, unique_params, write_json  # noqa: E402

KINDS = ("width", "depth", "hidden", "combo")


def dims(config) -> dict:
    return dict(V=config.vocab_size, H=config.hidden_size, L=config.num_hidden_layers, nq=config.num_attention_heads,
                nkv=config.num_key_value_heads, hd=getattr(config, "head_dim", None) or config.hidden_size //
                config.num_attention_heads, I=config.intermediate_size, tied=config.tie_word_embeddings)


def llama_params(d: dict) -> int:
    """Parameters of a Llama-family model without biases (what SmolLM2 is)."""
    H, hd = d["H"], d["hd"]
    block = H * d["nq"] * hd * 2 + H * d["nkv"] * hd * 2 + 3 * H * d["I"] + 2 * H
    return d["V"] * H * (1 if d["tied"] else 2) + d["L"] * block + H


# ------------------------------------------------------------------------------------ plans


def width_plan(d: dict, target: float, heads: str) -> dict | None:
    """heads_ratio / mlp_ratio that bring the parameters closest to ``target`` x dense.

    ``heads``: ``none`` (MLP neurons only), ``per_group`` (one query head of every KV group) or
    ``whole_group`` (one whole KV group); the rest of the budget comes from the MLP.
    """
    base = llama_params(d)
    e = dict(d)
    heads_ratio = 0.0
    group = d["nq"] // d["nkv"]
    if heads == "per_group" and group > 1:
        heads_ratio = d["nkv"] / d["nq"]
        e.update(nq=d["nq"] - d["nkv"])
    elif heads == "whole_group" and d["nkv"] > 1:
        heads_ratio = 1 / d["nkv"]
        e.update(nq=d["nq"] - group, nkv=d["nkv"] - 1)
    elif heads != "none":
        return None
    per_neuron = d["L"] * 3 * d["H"]
    need = llama_params(e) - target * base
    neurons = int(round(need / per_neuron))
    if neurons < 0 or neurons >= d["I"]:
        return None
    return {"heads_ratio": heads_ratio, "mlp_ratio": neurons / d["I"],
            "gqa_mode": "whole_group" if heads == "whole_group" else "per_group"}


def depth_plan(d: dict, target: float) -> int:
    base = llama_params(d)
    per_block = (llama_params(d) - llama_params({**d, "L": 0})) / d["L"]
    return max(1, int(round((base - target * base) / per_block)))


def hidden_plan(d: dict, target: float) -> int:
    """Kept hidden size (a multiple of the head count: LlamaConfig validates hidden % heads)."""
    base = llama_params(d)
    best = None
    for h in range(d["nq"], d["H"], d["nq"]):
        err = abs(llama_params({**d, "H": h}) / base - target)
        if best is None or err < best[0]:
            best = (err, h)
    return best[1]


# ------------------------------------------------------------------------------------ measures


def decode_tps(model, prompt, new_tokens: int, repeats: int, speed_fn=None) -> float:
    if speed_fn is not None:
        return float(speed_fn(model, prompt, new_tokens))
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def stock_reload_ok(model, x) -> bool:
    """save_pretrained -> stock from_pretrained (no hfprune) gives the same logits."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded, info = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, output_loading_info=True)
        if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
            return False
        with torch.no_grad():
            return bool(torch.allclose(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-4, rtol=1e-4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=PROTOCOL["model"])
    parser.add_argument("--targets", default="0.8,0.9,0.7", help="in the order run (partial results are kept)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--grid", choices=("full", "reduced"), default="full",
                        help="reduced: width with a KV group removed, the angular criterion and the width+hidden / "
                             "depth+hidden combinations only at the first target (for a busy CPU)")
    parser.add_argument("--width-importance", default="obs",
                        help="StructuredConfig.importance of the width kind (obs: with least-squares compensation)")
    parser.add_argument("--width-heads", default="per_group,none,whole_group",
                        help="heads removed in the width kind: per_group, none (MLP only), whole_group")
    parser.add_argument("--combos", default="mlp+depth,mlp+hidden,depth+hidden")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="merge the points of several runs (e.g. two processes, one per core) into --output "
                             "and --plot, and exit; the dense record is the first file's")
    parser.add_argument("--depth-criteria", default="block_influence,angular")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed-fn", default=None, help="module:function timing decode tokens/s (see the doc)")
    parser.add_argument("--output", default="docs/results/pareto.json")
    parser.add_argument("--plot", default="docs/img/pareto.png")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --output and exit")
    args = parser.parse_args()
    if args.table:
        import json

        print(markdown(json.loads(Path(args.output).read_text())))
        return
    if args.merge:
        import json

        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        points, seen = [], set()
        for p in (p for part in parts for p in part["points"]):  # a point measured twice: the first one
            if (p["kind"], p["target"], p["variant"]) not in seen:
                seen.add((p["kind"], p["target"], p["variant"]))
                points.append(p)
        merged = dict(parts[0], points=points,
                      command=[part["command"] for part in parts], merged_from=args.merge,
                      seconds=[part.get("seconds") for part in parts])
        finish(merged, args)
        print(markdown(merged))
        return
    logging.basicConfig(level=logging.WARNING)

    import hfprune
    from hfprune import CalibrationConfig, DepthPruningConfig, HiddenPruningConfig, StructuredConfig
    from hfprune.core.calibration import get_calibration_ids
    from hfprune.eval.perplexity import eval_token_ids

    speed_fn = None
    if args.speed_fn:
        mod, _, fn = args.speed_fn.partition(":")
        speed_fn = getattr(importlib.import_module(mod), fn)
    targets = [float(t) for t in args.targets.split(",")]
    kinds = args.kinds.split(",")
    dense = hfprune.load_model(args.model, dtype=torch.float32).eval()
    tok = hfprune.load_tokenizer(args.model)
    calib = get_calibration_ids(CalibrationConfig(dataset="c4", nsamples=args.nsamples, seqlen=args.seqlen, seed=0),
                                tok, dense)
    eval_ids = eval_token_ids(tok, "wikitext2")
    prompt = eval_ids[:, :32]
    check_x = eval_ids[:, 100:164]
    d = dims(dense.config)
    base = unique_params(dense)
    assert base == llama_params(d), (base, llama_params(d))

    def ppl(model) -> float:
        return hfprune.perplexity(model, token_ids=eval_ids, seqlen=2048, max_windows=args.max_windows,
                                  progress=False)["perplexity"]

    result = {"protocol": {"model": args.model, "dtype": "float32", "calibration": "c4", "nsamples": args.nsamples,
                           "seqlen": args.seqlen, "seed": 0, "eval": "wikitext2", "eval_seqlen": 2048,
                           "max_windows": args.max_windows, "decode": f"greedy, batch 1, 32-token prompt, "
                                                                      f"{args.new_tokens} new tokens, median of "
                                                                      f"{args.repeats}"},
              "machine": machine(), "command": " ".join(["scripts/bench_pareto.py", *sys.argv[1:]]), "grid": args.grid, "points": []}
    start = time.perf_counter()
    dense_ppl = ppl(dense)
    dense_tps = decode_tps(dense, prompt, args.new_tokens, args.repeats, speed_fn)
    result["dense"] = {"params": base, "perplexity": dense_ppl, "decode_tokens_per_s": dense_tps}
    print(f"dense: {base:,} params, ppl {dense_ppl:.3f}, decode {dense_tps:.1f} tok/s", flush=True)

    def run(kind: str, target: float, name: str, steps: list) -> None:
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        records = []
        for cfg in steps:
            report = hfprune.prune(model, config=cfg, calibration=calib, progress=False)
            records.append({"method": report.method, "config": report.config,
                            "removed_blocks": report.depth.removed if report.depth else None,
                            "hidden_after": report.hidden.hidden_after if report.hidden else None})
        seconds = time.perf_counter() - t0
        params = unique_params(model)
        point = {"kind": kind, "target": target, "variant": name, "params": params, "ratio": params / base,
                 "prune_seconds": seconds, "steps": records, "perplexity": ppl(model)}
        dense_again = decode_tps(dense, prompt, args.new_tokens, args.repeats, speed_fn)
        point["decode_tokens_per_s"] = decode_tps(model, prompt, args.new_tokens, args.repeats, speed_fn)
        point["dense_decode_tokens_per_s_recheck"] = dense_again
        point["decode_speedup"] = point["decode_tokens_per_s"] / dense_again
        point["stock_reload"] = stock_reload_ok(model, check_x)
        point["config"] = {"num_hidden_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
                           "num_attention_heads": model.config.num_attention_heads,
                           "num_key_value_heads": model.config.num_key_value_heads,
                           "intermediate_size": model.config.intermediate_size}
        result["points"].append(point)
        finish(result, args)  # partial results (JSON and plot) survive an interruption
        print(f"{kind:6s} {target:.1f} {name:34s} ratio {point['ratio']:.3f} ppl {point['perplexity']:10.2f} "
              f"decode {point['decode_tokens_per_s']:.1f} tok/s (dense {dense_again:.1f}) "
              f"reload {point['stock_reload']} [{seconds:.0f} s]", flush=True)
        del model

    def width_cfg(plan):
        return StructuredConfig(importance=args.width_importance, **plan)

    middle = targets[0]
    for target in targets:
        full = args.grid == "full" or target == middle
        if "width" in kinds:
            for heads in (args.width_heads.split(",") if full else args.width_heads.split(",")[:1]):
                plan = width_plan(d, target, heads)
                if plan:
                    run("width", target, f"heads {plan['heads_ratio']:.2f} mlp {plan['mlp_ratio']:.3f}",
                        [width_cfg(plan)])
        if "depth" in kinds:
            n = depth_plan(d, target)
            for criterion in (args.depth_criteria.split(",") if full else args.depth_criteria.split(",")[:1]):
                run("depth", target, f"{criterion} {n} blocks", [DepthPruningConfig(num_blocks=n, criterion=criterion)])
        if "hidden" in kinds:
            h = hidden_plan(d, target)
            run("hidden", target, f"hidden {h}", [HiddenPruningConfig(keep_hidden=h)])
        if "combo" in kinds:
            half = 1 - (1 - target) / 2  # each kind removes half of the parameters to go
            n = depth_plan(d, half)
            d_depth = {**d, "L": d["L"] - n}
            mlp = width_plan(d, half, "none")
            combos = args.combos.split(",") if full else args.combos.split(",")[:1]
            # The second kind's share is planned on the first kind's result, to land on the target.
            rel = target * llama_params(d)
            h_after_depth = hidden_plan({**d_depth, "V": d["V"]}, rel / llama_params(d_depth))
            d_mlp = {**d, "I": d["I"] - int(round(mlp["mlp_ratio"] * d["I"]))}
            n_after_mlp = depth_plan(d_mlp, rel / llama_params(d_mlp))
            h_after_mlp = hidden_plan(d_mlp, rel / llama_params(d_mlp))
            if "mlp+depth" in combos:
                run("combo", target, f"mlp {mlp['mlp_ratio']:.3f} + depth {n_after_mlp}",
                    [width_cfg(mlp), DepthPruningConfig(num_blocks=n_after_mlp)])
            if "mlp+hidden" in combos:
                run("combo", target, f"mlp {mlp['mlp_ratio']:.3f} + hidden {h_after_mlp}",
                    [width_cfg(mlp), HiddenPruningConfig(keep_hidden=h_after_mlp)])
            if "depth+hidden" in combos:
                run("combo", target, f"depth {n} + hidden {h_after_depth}",
                    [DepthPruningConfig(num_blocks=n), HiddenPruningConfig(keep_hidden=h_after_depth)])
    result["seconds"] = time.perf_counter() - start
    finish(result, args)
    print(f"wrote {args.output} and {args.plot}")


def finish(result: dict, args) -> None:
    best = {}
    for p in result["points"]:
        key = f"{p['kind']}@{p['target']}"
        if key not in best or p["perplexity"] < best[key]["perplexity"]:
            best[key] = p
    result["best"] = {k: {"variant": v["variant"], "ratio": v["ratio"], "perplexity": v["perplexity"],
                          "decode_tokens_per_s": v["decode_tokens_per_s"], "decode_speedup": v["decode_speedup"]}
                      for k, v in best.items()}
    write_json(Path(args.output), result)
    plot(result, Path(args.plot))


def markdown(result: dict) -> str:
    dense = result["dense"]
    best = {(v["variant"], k.split("@")[0], float(k.split("@")[1])) for k, v in result.get("best", {}).items()}
    lines = ["| target | kind | variant | params | x dense | ppl | decode tok/s | x dense (re-check) | stock reload |",
             "|---|---|---|---:|---:|---:|---:|---:|---|",
             f"| 1.0 | dense | - | {dense['params']:,} | 1.000 | {dense['perplexity']:.2f} | "
             f"{dense['decode_tokens_per_s']:.2f} | - | - |"]
    for p in sorted(result["points"], key=lambda p: (-p["target"], list(KINDS).index(p["kind"]), p["perplexity"])):
        mark = "**" if (p["variant"], p["kind"], p["target"]) in best else ""
        lines.append(f"| {p['target']:.1f} | {p['kind']} | {p['variant']} | {p['params']:,} | {p['ratio']:.3f} | "
                     f"{mark}{p['perplexity']:.2f}{mark} | {p['decode_tokens_per_s']:.2f} | "
                     f"{p['decode_speedup']:.2f} ({p['dense_decode_tokens_per_s_recheck']:.2f}) | "
                     f"{'yes' if p['stock_reload'] else 'NO'} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"width": "tab:blue", "depth": "tab:orange", "hidden": "tab:green", "combo": "tab:red"}
    dense = result["dense"]
    for kind, color in colors.items():
        pts = [p for p in result["points"] if p["kind"] == kind]
        if not pts:
            continue
        best = {}
        for p in pts:  # the best variant of the kind at each target, joined by a line
            if p["target"] not in best or p["perplexity"] < best[p["target"]]["perplexity"]:
                best[p["target"]] = p
        line = [dense, *sorted(best.values(), key=lambda p: -p["target"])]
        for ax, x in zip(axes, ("ratio", "decode_speedup")):
            ax.scatter([p[x] for p in pts], [p["perplexity"] for p in pts], color=color, label=kind, alpha=0.8)
            ax.plot([1.0 if p is dense else p[x] for p in line], [p["perplexity"] for p in line], color=color,
                    alpha=0.4, linewidth=1)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylabel(f"WikiText-2 perplexity (first {result['protocol']['max_windows']} windows)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].scatter([1.0], [dense["perplexity"]], color="black", marker="*", s=120, label="dense")
    axes[1].scatter([1.0], [dense["perplexity"]], color="black", marker="*", s=120, label="dense")
    axes[0].set_xlabel("parameters / dense")
    axes[1].set_xlabel("decode tokens/s / dense (batch 1, same process)")
    axes[0].legend()
    fig.suptitle(f"{result['protocol']['model']}: structured pruning without recovery")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
