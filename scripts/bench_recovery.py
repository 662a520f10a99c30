"""Recovery fine-tuning benchmark on SmolLM2-135M: Wanda 2:4, then full fine-tuning and LoRA under a
wall-clock budget each; how much of the perplexity gap do they close, and is the sparsity intact?

Protocol: fp32; Wanda 2:4 calibrated on C4 64 x 512 tokens seed 0 (hfprune.prune); perplexity on
WikiText-2 test, seqlen 2048, first ``--max-windows`` windows (32). Recovery trains on packed
256-token windows of the local C4 shard, *without* the documents the calibration windows came from
(found by replaying the calibration sampler, checked token for token), never on WikiText-2.
Each run gets ``--minutes`` of training wall clock (time in the periodic few-window evaluations is not
counted); the final perplexity is measured afterwards. Sparsity after recovery must equal the pruned
sparsity exactly: every decoder linear layer's zero pattern is compared position by position.
Periodic evaluations during training use ``--eval-windows`` windows (2) to stay cheap.

    .venv/bin/python scripts/bench_recovery.py      # ~30 min (idle machine) -> bench_out/recovery.json,
                                                    #            docs/img/recovery_loss.png
    .venv/bin/python scripts/bench_recovery.py --minutes 0.1 --max-windows 1 --eval-windows 0 --eval-seqlen 256 \\
        --seqlen 64 --batch-size 2 --nsamples 4 --calib-seqlen 64 --warmup 0 \\
        --out /tmp/recovery.json --plot /tmp/recovery.png         # smoke run
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import PROTOCOL, machine, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def calibration_with_docs(tok, docs: list[str], nsamples: int, seqlen: int, seed: int):
    """Calibration ids exactly as ``hfprune.core.calibration.sample_windows`` draws them, plus the indices
    of the documents they came from (``None`` when the sampler took the joined-text path)."""
    from hfprune.core.calibration import sample_windows

    ids = sample_windows(tok, docs, nsamples, seqlen, seed)
    encoded = tok(list(docs), add_special_tokens=True, verbose=False)["input_ids"]
    if not any(len(e) > seqlen for e in encoded):
        return ids, None
    rng = random.Random(seed)
    windows, used = [], set()
    while len(windows) < nsamples:
        i = rng.randint(0, len(docs) - 1)
        if len(encoded[i]) <= seqlen:
            continue
        start = rng.randint(0, len(encoded[i]) - seqlen - 1)
        windows.append(encoded[i][start:start + seqlen])
        used.add(i)
    import torch

    if not torch.equal(torch.tensor(windows, dtype=torch.long), ids):
        return ids, None  # the sampler changed: cannot tell which documents it used
    return ids, sorted(used)


def zero_patterns(model) -> dict:
    import torch

    from hfprune.arch import find_linears, get_blocks, get_spec

    spec = get_spec(model)
    out = {}
    for i, block in enumerate(get_blocks(model, spec)):
        for rel, module in find_linears(block).items():
            out[f"{spec.layers}.{i}.{rel}"] = (module.weight.detach() == 0).cpu()
    assert all(isinstance(v, torch.Tensor) for v in out.values())
    return out


def sparsity_check(model, pruned: dict) -> dict:
    """Every decoder linear layer: the zero pattern after recovery equals the pruned one."""
    import torch

    after = zero_patterns(model)
    mismatched = [n for n, m in pruned.items() if n not in after or not torch.equal(after[n], m)]
    zeros_before = sum(int(m.sum()) for m in pruned.values())
    zeros_after = sum(int(m.sum()) for m in after.values())
    numel = sum(m.numel() for m in pruned.values())
    return {"layers_checked": len(pruned), "layers_mismatched": mismatched, "exact": not mismatched,
            "sparsity_pruned": zeros_before / numel, "sparsity_after": zeros_after / numel}


def run_recovery(name, pruned_model, tok, train_docs, opts, eval_ids, patterns, teacher=None) -> dict:
    from hfprune.eval.perplexity import perplexity
    from hfprune.workflows.recovery import RecoveryArguments, recover

    lora = name.startswith("lora")
    model = copy.deepcopy(pruned_model)
    args = RecoveryArguments(
        seqlen=opts.seqlen, max_steps=opts.max_steps, max_minutes=opts.minutes,
        learning_rate=opts.lr_lora if lora else opts.lr_full, warmup_steps=opts.warmup,
        lr_scheduler_type=opts.scheduler, per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum, weight_decay=0.0, lora=lora, lora_r=opts.lora_r,
        lora_alpha=2 * opts.lora_r, lora_dropout=0.0, merge_lora=True, distill=teacher is not None,
        eval_dataset="wikitext2", eval_seqlen=opts.eval_seqlen, eval_max_windows=opts.eval_windows,
        eval_steps=opts.eval_steps, logging_steps=opts.logging_steps, seed=0)
    result = recover(model, tok, args, teacher=teacher, train_texts=train_docs)
    ppl = perplexity(model, tok, seqlen=opts.eval_seqlen, max_windows=opts.max_windows, token_ids=eval_ids,
                     progress=False)
    check = sparsity_check(model, patterns)
    if not check["exact"]:
        raise SystemExit(f"{name}: sparsity changed in {check['layers_mismatched'][:3]}")
    row = {k: result[k] for k in ("steps", "seconds", "stopped_by_time", "tokens_seen", "train_windows",
                                  "sparsity_before", "sparsity_after", "losses", "evals")}
    row.update(perplexity=ppl["perplexity"], eval_windows=ppl["windows"], sparsity_check=check,
               args={k: v for k, v in args.to_dict().items() if k not in ("model", "output", "overwrite", "teacher")})
    del model
    return row


def plot(rows: dict, dense: float, pruned: float, path: Path, seqlen: int, max_windows: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in rows.items():
        ax1.plot([e["step"] for e in row["losses"]], [e["loss"] for e in row["losses"]], label=name, marker=".")
        line, = ax2.plot([e["step"] for e in row["evals"]], [e["perplexity"] for e in row["evals"]], label=name,
                         marker="o")
        ax2.plot([row["steps"]], [row["perplexity"]], marker="*", ms=14, ls="", color=line.get_color(),
                 label=f"{name} final ({max_windows} windows)")
    ax1.set(xlabel="optimizer step", ylabel=f"train loss (C4, {seqlen}-token windows)", title="Training loss")
    ax2.axhline(dense, color="gray", ls="--", label=f"dense {dense:.2f}")
    ax2.axhline(pruned, color="red", ls=":", label=f"pruned {pruned:.2f}")
    ax2.set(xlabel="optimizer step", ylabel="WikiText-2 perplexity (few windows)", title="Eval perplexity")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M, Wanda 2:4, recovery fine-tuning")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="full,lora", help="comma list of full, lora")
    p.add_argument("--minutes", type=float, default=12.0, help="wall-clock budget per recovery run")
    p.add_argument("--max-steps", type=int, default=100_000, help="step cap (the time budget normally stops first)")
    p.add_argument("--max-windows", type=int, default=PROTOCOL["max_windows"], help="final eval windows")
    p.add_argument("--eval-windows", type=int, default=2, help="windows of the periodic evals during training")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--eval-seqlen", type=int, default=PROTOCOL["eval_seqlen"], help="eval window (protocol: 2048)")
    p.add_argument("--logging-steps", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=PROTOCOL["nsamples"])
    p.add_argument("--calib-seqlen", type=int, default=PROTOCOL["seqlen"])
    p.add_argument("--seqlen", type=int, default=256, help="training window")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr-full", type=float, default=1e-4)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--warmup", type=float, default=5, help="warmup steps")
    p.add_argument("--scheduler", default="constant_with_warmup",
                   help="constant_with_warmup: the run length is set by the clock, not by max_steps")
    p.add_argument("--distill", action="store_true", help="distil from the dense model (KL + LM loss)")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "recovery.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "recovery_loss.png")
    opts = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("bench_recovery")

    import hfprune
    from hfprune.data import load_texts
    from hfprune.eval.perplexity import eval_token_ids, perplexity

    t0 = time.perf_counter()
    tok = hfprune.load_tokenizer(PROTOCOL["model"])
    model = hfprune.load_model(PROTOCOL["model"], dtype=PROTOCOL["dtype"])
    docs = load_texts(PROTOCOL["calibration"], split="train")
    ids, used = calibration_with_docs(tok, docs, opts.nsamples, opts.calib_seqlen, PROTOCOL["seed"])
    if used is None:
        train_docs = docs
        data_note = ("calibration and training draw from the same C4 shard (the calibration documents could not "
                     "be identified); WikiText-2 is never trained on")
    else:
        used_set = set(used)
        train_docs = [d for i, d in enumerate(docs) if i not in used_set]
        data_note = (f"training uses the {len(train_docs)} C4 documents of the local shard ({len(docs)}) that no "
                     f"calibration window came from ({len(used)} excluded); WikiText-2 is never trained on")
    log.info(data_note)

    eval_ids = eval_token_ids(tok, PROTOCOL["eval_dataset"])
    ev = dict(seqlen=opts.eval_seqlen, max_windows=opts.max_windows, token_ids=eval_ids, progress=False)
    dense = perplexity(model, tok, **ev)["perplexity"]
    log.info("dense perplexity %.3f", dense)
    teacher = copy.deepcopy(model) if opts.distill else None

    config = hfprune.PruningConfig.from_dict({"method": "wanda", "pattern": "2:4"})
    report = hfprune.prune(model, tok, config, calibration=ids, progress=False)
    pruned = perplexity(model, tok, **ev)["perplexity"]
    patterns = zero_patterns(model)
    log.info("pruned perplexity %.3f (sparsity %.4f, %.1fs)", pruned, report.sparsity, report.prune_seconds)

    rows = {}
    for name in [r.strip() for r in opts.runs.split(",") if r.strip()]:
        if name not in ("full", "lora"):
            raise SystemExit(f"Unknown run {name!r}: use full and/or lora.")
        key = "full_ft" if name == "full" else "lora"
        row = run_recovery(name, model, tok, train_docs, opts, eval_ids, patterns, teacher)
        gap = pruned - dense
        row["gap_closed"] = (pruned - row["perplexity"]) / gap if gap > 0 else None
        rows[key] = row
        log.info("%s: perplexity %.3f after %d steps (%.0fs), gap closed %.3f, sparsity exact %s", key,
                 row["perplexity"], row["steps"], row["seconds"], row["gap_closed"] or float("nan"),
                 row["sparsity_check"]["exact"])

    out = {
        "protocol": {**PROTOCOL, "nsamples": opts.nsamples, "seqlen": opts.calib_seqlen,
                     "max_windows": opts.max_windows, "eval_seqlen": opts.eval_seqlen, "method": "wanda",
                     "pattern": "2:4", "train_dataset": "c4 (local shard, first 1000 docs)",
                     "train_seqlen": opts.seqlen, "batch_size": opts.batch_size, "grad_accum": opts.grad_accum,
                     "minutes_per_run": opts.minutes, "distill": opts.distill, "scheduler": opts.scheduler},
        "data_note": data_note,
        "calibration_docs_excluded": len(used) if used is not None else 0,
        "dense_perplexity": dense,
        "pruned_perplexity": pruned,
        "pruned_sparsity": report.sparsity,
        "prune_seconds": report.prune_seconds,
        "runs": rows,
        "summary": {k: {"perplexity": r["perplexity"], "gap_closed": r["gap_closed"], "steps": r["steps"],
                        "sparsity_after": r["sparsity_check"]["sparsity_after"],
                        "sparsity_exact": r["sparsity_check"]["exact"]} for k, r in rows.items()},
        "total_seconds": time.perf_counter() - t0,
        "machine": machine(),
    }
    write_json(opts.out, out)
    if rows:
        plot(rows, dense, pruned, opts.plot, opts.seqlen, opts.max_windows)
    print(f"dense {dense:.3f}  pruned {pruned:.3f}  (wikitext2, {opts.max_windows} x {opts.eval_seqlen})")
    for k, s in out["summary"].items():
        gap = "n/a" if s["gap_closed"] is None else f"{s['gap_closed']:.3f}"
        print(f"{k:8s} {s['perplexity']:.3f}  gap closed {gap}"
              f"  steps {s['steps']}  sparsity {s['sparsity_after']:.4f} exact={s['sparsity_exact']}")
    print(f"wrote {opts.out} and {opts.plot} in {out['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
