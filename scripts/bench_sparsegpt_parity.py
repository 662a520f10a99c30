"""SparseGPT parity with llm-compressor 0.14 on tiny random models of every family (issue 17).

For each model type of hfprune's architecture table (plus a few discovered ones), a tiny random
model is built from its config with a fixed seed and saved once with ``save_pretrained``; the
calibration and held-out token ids are saved to files, so both tools load identical weights and
see identical tokens. Then, 50 % unstructured:

* ``hf-ts``: hfprune SparseGPT, true-sequential order (each layer pruned from inputs that went
  through the already pruned layers of its block);
* ``hf-block``: hfprune SparseGPT, ``true_sequential=False`` (every layer of a block from the
  block's inputs before any of its layers is pruned);
* ``hf-default``: hfprune SparseGPT with the config's defaults (one of the two above);
* ``llmc``: llm-compressor's ``SparseGPTModifier`` through ``oneshot`` (sequential pipeline),
  run as a subprocess in ``.venv-llmc`` (transformers <= 5.17 there).

Compared on held-out windows (same tokens for all): every pruned layer's relative output error
on the dense model's inputs ``||(W - W')X|| / ||WX||`` ("local") and inside the pruned model
``||W X - W' X'|| / ||W X||`` ("in-model", ``X'`` the layer's input in the pruned model); the
final logits (relative error, KL(dense || pruned) per token) and perplexity; and the masks' and
weights' agreement with llm-compressor's.

Tokens: real text (C4 calibration windows, WikiText-2 held-out windows, SmolLM2's tokenizer)
with the ``--vocab - 1`` most frequent token ids renumbered 1.., all others mapped to 0, so the
tiny vocabulary keeps the text's token statistics. Random models are made less isotropic
than their initialisation: norm scales drawn log-normally and a few embedding channels scaled
up (the outlier features of trained LLMs), so the layer Hessians are far from diagonal.

    .venv/bin/python scripts/bench_sparsegpt_parity.py                  # all families
    .venv/bin/python scripts/bench_sparsegpt_parity.py --families llama,opt --workdir /tmp/sgp

Writes ``docs/results/sparsegpt_parity.json`` (``--output``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TABLE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "phi", "opt", "gpt2",
         "gpt_neox"]
DISCOVERED = ["olmo2", "granite", "cohere"]
LLMC_REGEX = r"re:.*layers.*proj$"


# ------------------------------------------------------------------------------------------ llmc child
def llmc_child(workdir: Path, families: list[str], sparsity: float) -> None:
    """Runs in .venv-llmc: prune every family's saved dense model with llm-compressor's SparseGPT."""
    import datasets
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(workdir / "calib_ids.pt")
    tok = AutoTokenizer.from_pretrained(workdir / "tokenizer")  # only so oneshot has a processor; data are ids
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    for fam in families:
        fdir = workdir / fam
        meta = json.loads((fdir / "targets.json").read_text())
        out = fdir / "llmc.safetensors"
        status = fdir / "llmc.json"
        try:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(fdir / "dense", dtype=torch.float32)
            recipe = SparseGPTModifier(sparsity=sparsity, mask_structure="0:0", targets=meta["llmc_targets"],
                                       block_size=128, dampening_frac=0.01)
            start = time.perf_counter()
            oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
                    max_seq_length=ids.shape[1], pipeline="sequential", shuffle_calibration_samples=False)
            seconds = time.perf_counter() - start
            mods = dict(model.named_modules())
            save_file({n: mods[n].weight.detach().contiguous() for n in meta["names"]}, str(out))
            status.write_text(json.dumps({"ok": True, "seconds": seconds}))
        except Exception as err:  # recorded per family; the others still run
            import traceback

            status.write_text(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}",
                                          "trace": traceback.format_exc()[-3000:]}))


# ------------------------------------------------------------------------------------------ hfprune side
def remap_tokens(calib, evals, vocab: int):
    """Renumber the ``vocab - 1`` most frequent ids (over both sets) to 1.., everything else to 0."""
    import torch

    counts = torch.bincount(torch.cat([calib.reshape(-1), evals.reshape(-1)]))
    order = torch.argsort(counts, descending=True, stable=True)[: vocab - 1]
    table = torch.zeros(counts.numel(), dtype=torch.long)
    table[order] = torch.arange(1, order.numel() + 1)
    return table[calib], table[evals]


def make_tokens(args):

    import hfprune
    from hfprune.config import CalibrationConfig
    from hfprune.core.calibration import get_calibration_ids
    from hfprune.eval.perplexity import eval_token_ids

    tok = hfprune.load_tokenizer("smollm2-135m")
    tok.save_pretrained(Path(args.workdir) / "tokenizer")
    calib = get_calibration_ids(CalibrationConfig(dataset="c4", nsamples=args.nsamples, seqlen=args.seqlen,
                                                  seed=0), tok)
    stream = eval_token_ids(tok, "wikitext2").reshape(-1)
    n = args.eval_windows * args.seqlen
    evals = stream[:n].reshape(args.eval_windows, args.seqlen)
    return remap_tokens(calib, evals, args.vocab)


def tiny_sizes(args) -> dict[str, int]:
    from hfprune.arch.tiny import TINY_SIZES

    h, heads = args.hidden, 4
    sizes = {}
    for key, value in TINY_SIZES.items():
        if value == 64:  # widths
            sizes[key] = h
        elif value == 128:  # MLP widths
            sizes[key] = 2 * h
        elif key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            sizes[key] = args.layers
        elif value == 16 and "head" in key:
            sizes[key] = h // heads
    sizes["vocab_size"] = args.vocab
    return sizes


def make_realistic(model, seed: int) -> None:
    """Norm scales log-normal (sigma 0.7) and 3 % of the embedding channels scaled 6x, in place."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 1 or not any(t in name.split(".")[-2] for t in ("norm", "ln")):
                continue
            if not name.endswith("weight"):
                continue
            s = torch.exp(0.7 * torch.randn(p.shape, generator=g))
            if bool((p == 1).all()):
                p.copy_(s)
            elif bool((p == 0).all()):  # Gemma-style (1 + w) scales
                p.copy_(s - 1)
        emb = model.get_input_embeddings().weight
        k = max(1, int(0.03 * emb.shape[1]))
        dims = torch.randperm(emb.shape[1], generator=g)[:k]
        emb[:, dims] *= 6.0


def build_family(fam: str, args, fdir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import hfprune
    from hfprune.arch.tiny import tiny_config
    from hfprune.core.engine import select_targets

    cfg = tiny_config(fam, tiny_sizes(args))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(cfg, key, None) is not None:
            setattr(cfg, key, 0)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    make_realistic(model, args.seed)
    model.save_pretrained(fdir / "dense")
    targets = select_targets(model, hfprune.SparseGPTConfig(sparsity=args.sparsity))
    names = [n for block in targets for n in block]
    blocks = [i for i, block in enumerate(targets) for _ in block]
    rel = sorted({n.split(f".{i}.", 1)[1] for i, block in enumerate(targets) for n in block})
    mods = dict(model.named_modules())
    brief = [n for n in mods if re.fullmatch(r".*layers.*proj", n) and n in set(names)]
    all_brief = [n for n, m in mods.items() if re.fullmatch(r".*layers.*proj", n) and hasattr(m, "weight")]
    if sorted(all_brief) == sorted(names):
        llmc_targets = [LLMC_REGEX]
    else:  # families whose layer names do not end in "proj" (OPT fc1/fc2, GPT-2, GPT-NeoX, Phi)
        llmc_targets = ["re:.*\\.(" + "|".join(re.escape(r) for r in rel) + ")$"]
    meta = {"names": names, "blocks": blocks, "llmc_targets": llmc_targets, "brief_regex_matches": len(brief),
            "params": sum(p.numel() for p in model.parameters())}
    (fdir / "targets.json").write_text(json.dumps(meta))
    return meta


def hf_prune(fam: str, fdir: Path, variant: str, args, calib) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    import hfprune

    model = AutoModelForCausalLM.from_pretrained(fdir / "dense", dtype=torch.float32).eval()
    kw = {} if variant == "hf-default" else {"true_sequential": variant == "hf-ts"}
    config = hfprune.SparseGPTConfig(sparsity=args.sparsity, **kw)
    start = time.perf_counter()
    hfprune.prune(model, config=config, calibration=calib, progress=False)
    seconds = time.perf_counter() - start
    meta = json.loads((fdir / "targets.json").read_text())
    mods = dict(model.named_modules())
    save_file({n: mods[n].weight.detach().contiguous() for n in meta["names"]}, str(fdir / f"{variant}.safetensors"))
    return {"seconds": seconds, "true_sequential": config.true_sequential}


def evaluate(fdir: Path, variants: list[str], evals) -> dict:
    """Per-layer and logit errors of every variant against the dense model, on held-out windows."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    meta = json.loads((fdir / "targets.json").read_text())
    names = meta["names"]

    def run(model):
        mods = dict(model.named_modules())
        ins, outs, hooks = {}, {}, []
        for n in names:
            def hook(mod, args, out, n=n):
                ins.setdefault(n, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
                outs.setdefault(n, []).append(out.detach().reshape(-1, out.shape[-1]))
            hooks.append(mods[n].register_forward_hook(hook))
        logits = []
        with torch.no_grad():
            for w in evals.split(4):
                logits.append(model(input_ids=w, use_cache=False).logits.float())
        for h in hooks:
            h.remove()
        return {n: torch.cat(v) for n, v in ins.items()}, {n: torch.cat(v) for n, v in outs.items()}, torch.cat(logits)

    def ppl(logits):
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), evals[:, 1:].reshape(-1))
        return float(torch.exp(nll))

    dense = AutoModelForCausalLM.from_pretrained(fdir / "dense", dtype=torch.float32).eval()
    d_in, d_out, d_logits = run(dense)
    d_mods = dict(dense.named_modules())
    result = {"dense_ppl": ppl(d_logits), "variants": {}}
    weights = {v: load_file(str(fdir / f"{v}.safetensors")) for v in variants if (fdir / f"{v}.safetensors").exists()}
    for v, sd in weights.items():
        model = AutoModelForCausalLM.from_pretrained(fdir / "dense", dtype=torch.float32).eval()
        mods = dict(model.named_modules())
        with torch.no_grad():
            for n, w in sd.items():
                mods[n].weight.copy_(w)
        p_in, p_out, p_logits = run(model)
        local, in_model, sparsity = {}, {}, {}
        for n in names:
            y = d_out[n]
            bias = getattr(d_mods[n], "bias", None)
            bias = bias.detach() if bias is not None else None
            y0 = y - bias if bias is not None else y  # W X without the bias
            # The layer's own W' on the dense inputs: the module's output on d_in minus the bias.
            with torch.no_grad():
                y_local = mods[n](d_in[n])
            y_local0 = y_local - bias if bias is not None else y_local
            local[n] = float((y0 - y_local0).norm() / y0.norm())
            in_model[n] = float((y - p_out[n]).norm() / y.norm())
            sparsity[n] = float((sd[n] == 0).float().mean())
        logp_d = F.log_softmax(d_logits, -1)
        logp_p = F.log_softmax(p_logits, -1)
        kl = float((logp_d.exp() * (logp_d - logp_p)).sum(-1).mean())
        result["variants"][v] = {
            "ppl": ppl(p_logits), "kl": kl,
            "logit_rel_err": float((d_logits - p_logits).norm() / d_logits.norm()),
            "local_err_mean": sum(local.values()) / len(local),
            "in_model_err_mean": sum(in_model.values()) / len(in_model),
            "in_model_err_last_block": _mean([in_model[n] for n, b in zip(names, meta["blocks"])
                                              if b == meta["blocks"][-1]]),
            "sparsity_min": min(sparsity.values()), "sparsity_max": max(sparsity.values()),
            "local_err": local, "in_model_err": in_model,
        }
    if "llmc" in weights:
        for v in weights:
            if v == "llmc":
                continue
            same = total = 0
            wdiff = wnorm = 0.0
            for n in names:
                a, b = weights[v][n], weights["llmc"][n]
                same += int(((a == 0) == (b == 0)).sum())
                total += a.numel()
                wdiff += float((a - b).pow(2).sum())
                wnorm += float(b.pow(2).sum())
            result["variants"][v]["mask_agreement_with_llmc"] = same / total
            result["variants"][v]["weight_rel_diff_to_llmc"] = (wdiff / wnorm) ** 0.5
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(TABLE + DISCOVERED))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(REPO / "bench_out" / "sparsegpt_parity"))
    parser.add_argument("--llmc-python", default=str(REPO / ".venv-llmc" / "bin" / "python"))
    parser.add_argument("--no-llmc", action="store_true", help="hfprune variants only")
    parser.add_argument("--output", default=str(REPO / "docs" / "results" / "sparsegpt_parity.json"))
    parser.add_argument("--append", action="store_true", help="add/replace these families in an existing --output")
    parser.add_argument("--llmc-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    families = [f for f in args.families.split(",") if f]
    if args.llmc_child:
        llmc_child(workdir, families, args.sparsity)
        return

    import torch
    import transformers

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    workdir.mkdir(parents=True, exist_ok=True)
    calib, evals = make_tokens(args)
    torch.save(calib, workdir / "calib_ids.pt")
    torch.save(evals, workdir / "eval_ids.pt")
    variants = ["hf-default", "hf-ts", "hf-block"]
    rows, built = {}, []
    for fam in families:
        fdir = workdir / fam
        fdir.mkdir(exist_ok=True)
        for stale in fdir.glob("*.safetensors"):
            stale.unlink()
        (fdir / "llmc.json").unlink(missing_ok=True)
        try:
            meta = build_family(fam, args, fdir)
        except Exception as err:
            rows[fam] = {"error": f"build: {type(err).__name__}: {err}"}
            continue
        rows[fam] = {"params": meta["params"], "llmc_targets": meta["llmc_targets"], "layers": len(meta["names"]),
                     "hf": {}}
        for v in variants:
            try:
                rows[fam]["hf"][v] = hf_prune(fam, fdir, v, args, calib)
            except Exception as err:
                rows[fam]["hf"][v] = {"error": f"{type(err).__name__}: {err}"}
        built.append(fam)
        print(f"[{fam}] hfprune done", flush=True)
    if not args.no_llmc and built:
        cmd = [args.llmc_python, str(Path(__file__).resolve()), "--llmc-child", "--workdir", str(workdir),
               "--families", ",".join(built), "--sparsity", str(args.sparsity)]
        subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL if not os.environ.get("VERBOSE") else None)
    for fam in built:
        fdir = workdir / fam
        status = fdir / "llmc.json"
        if status.exists():
            rows[fam]["llmc"] = {k: v for k, v in json.loads(status.read_text()).items() if k != "trace"}
        rows[fam]["eval"] = evaluate(fdir, variants + ["llmc"], evals)
        print(f"[{fam}] evaluated", flush=True)

    result = {"command": " ".join(sys.argv), "settings": {k: v for k, v in vars(args).items() if k != "llmc_child"},
              "torch": torch.__version__, "transformers": transformers.__version__, "families": rows}
    out = Path(args.output)
    if args.append and out.exists():
        old = json.loads(out.read_text())
        if old.get("settings", {}).get("families") and {k: v for k, v in old["settings"].items() if k not in (
                "families", "append", "output")} != {k: v for k, v in result["settings"].items() if k not in (
                "families", "append", "output")}:
            raise SystemExit(f"{out} was written with other settings; drop --append or use the same flags.")
        result["command"] = old["command"] + " ; " + result["command"]
        result["families"] = {**old["families"], **rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict) -> str:
    lines = ["| family | variant | KL | logit rel err | ppl (dense) | local err | in-model err | mask = llmc |",
             "|---|---|---|---|---|---|---|---|"]
    for fam, row in result["families"].items():
        if "error" in row:
            lines.append(f"| {fam} | - | {row['error'][:80]} | | | | | |")
            continue
        ev = row["eval"]
        for v, r in ev["variants"].items():
            agree = r.get("mask_agreement_with_llmc")
            lines.append(f"| {fam} | {v} | {r['kl']:.4f} | {r['logit_rel_err']:.4f} | {r['ppl']:.1f} "
                         f"({ev['dense_ppl']:.1f}) | {r['local_err_mean']:.4f} | {r['in_model_err_mean']:.4f} | "
                         f"{'' if agree is None else f'{agree:.4f}'} |")
        if "llmc" in row and not row["llmc"].get("ok"):
            lines.append(f"| {fam} | llmc | {row['llmc'].get('error', '')[:100]} | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
