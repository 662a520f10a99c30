"""Checkpoint size benchmark: SmolLM2-135M in bf16, saved dense, compressed sparse, and quantized.

The pruning method does not change the size of a checkpoint (only the pattern, the sparsity and
the number format do), so the fast, data-free magnitude pruning is used: 50 % unstructured
(per-row) and 2:4. Every variant is written with ``hfprune.io.save_pretrained`` (model card and
report included, tokenizer not) and measured:

* ``total_bytes``: every file of the checkpoint folder;
* ``pruned_bytes``: the bytes of the 210 decoder Linear weights alone (30 blocks x q/k/v/o/gate/up/
  down; every stored companion: values, bitmask / N:M index, scales, shapes), against their dense
  bf16 bytes (``pruned_ratio``);
* ``load_seconds``: stock ``AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)`` after
  ``import hfprune`` (one warm-up load of the dense checkpoint first, so imports are not counted);
* ``max_abs_logit_diff``: reloaded model vs the in-memory pruned model before saving, on a fixed
  128-token input (0 means bit-identical logits).

    .venv/bin/python scripts/bench_size.py                 # -> bench_out/size.json, bench_out/size.md
    .venv/bin/python scripts/bench_size.py --keep          # keep the checkpoints in bench_out/size_ckpts
    .venv/bin/python scripts/bench_size.py --ct            # add the compressed-tensors int4 export
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine, write_json  # noqa: E402

TARGETS = {  # (row, column): maximum ratio
    ("sparse-50", "pruned_ratio"): 0.57,
    ("sparse-2of4", "pruned_ratio"): 0.57,
    ("sparse-2of4-int8", "pruned_ratio"): 0.32,
    ("sparse-2of4", "total_ratio"): 0.66,
    ("sparse-2of4-int8", "total_ratio"): 0.46,
}

TEXT = ("The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building, and the "
        "tallest structure in Paris. Its base is square, measuring 125 metres (410 ft) on each side. ")


def _header(path: Path) -> dict:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n))


def measure(folder: Path, linear_modules: set[str]) -> dict:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    pruned = 0
    seen = set()
    for shard in folder.glob("*.safetensors"):
        for name, info in _header(shard).items():
            if name == "__metadata__":
                continue
            module, _, key = name.rpartition(".")
            if module in linear_modules and key.startswith("weight"):
                pruned += info["data_offsets"][1] - info["data_offsets"][0]
                seen.add(module)
    if seen != linear_modules:
        raise RuntimeError(f"{folder}: found {len(seen)} of the {len(linear_modules)} decoder Linear weights")
    return {"total_bytes": total, "pruned_bytes": pruned}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out", help="output folder for size.json / size.md")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (bench_out/size_ckpts)")
    parser.add_argument("--ct", action="store_true",
                        help="also time the compressed-tensors int4 export (about a minute more on 2 CPUs)")
    parser.add_argument("--variants", default=None,
                        help="comma list of variant names to (re)run; the others are kept from an existing size.json "
                             "(dense-bf16, the reference, always runs)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    import transformers

    import hfprune
    from hfprune.formats.base import compress_targets

    transformers.utils.logging.disable_progress_bar()
    from hfprune.io import save_pretrained

    torch.manual_seed(0)
    out = Path(args.out)
    ckpts = out / "size_ckpts"
    shutil.rmtree(ckpts, ignore_errors=True)
    ckpts.mkdir(parents=True)
    t0 = time.perf_counter()

    base = hfprune.load_model("smollm2-135m", dtype="bfloat16").eval()
    tok = hfprune.load_tokenizer("smollm2-135m")
    ids = tok(TEXT * 8, return_tensors="pt").input_ids[:, :128]
    assert ids.shape[1] == 128, ids.shape
    linear_modules = {n[: -len(".weight")] for n in compress_targets(base)}
    assert len(linear_modules) == 210, len(linear_modules)
    dense_linear_bytes = sum(base.get_submodule(m).weight.numel() * 2 for m in linear_modules)

    models, reports = {}, {}
    for key, pattern in (("50", "unstructured"), ("2of4", "2:4")):
        m = copy.deepcopy(base)
        reports[key] = hfprune.prune(m, config=hfprune.MagnitudeConfig(sparsity=0.5, pattern=pattern), progress=False)
        m.config.pruning_config["base_model"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
        models[key] = m
    del base
    with torch.no_grad():
        ref_logits = {k: m(ids).logits.float() for k, m in models.items()}
    print(f"loaded + pruned in {time.perf_counter() - t0:.1f}s", flush=True)

    variants = [  # name, model key, format, bits, group_size, label
        ("dense-bf16", "2of4", "dense", None, None, "dense bf16 (stock save_pretrained)"),
        ("sparse-50", "50", "sparse", None, None, "sparse 50 % unstructured, bf16 values + bitmask"),
        ("sparse-2of4", "2of4", "sparse", None, None, "sparse 2:4, bf16 values + pattern code (2.67 bits per group of 4)"),
        ("sparse-2of4-int8", "2of4", "sparse", 8, None, "sparse 2:4 + int8 (per-row scales)"),
        ("sparse-50-int4", "50", "sparse", 4, 128, "sparse 50 % + int4 (group 128)"),
    ]
    if args.ct:
        # group 128 does not divide SmolLM2's 576-wide inputs; 64 does (576 = 9 x 64, 1536 = 24 x 64)
        variants.append(("ct-2of4-int4", "2of4", "compressed-tensors", 4, 64,
                         "compressed-tensors pack-quantized int4 (group 64; zeros stored densely)"))

    all_names = [v[0] for v in variants]
    if args.variants:
        wanted = set(args.variants.split(",")) | {"dense-bf16"}
        unknown = wanted - {v[0] for v in variants}
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {[v[0] for v in variants]}")
        variants = [v for v in variants if v[0] in wanted]
    rows = []
    for name, key, fmt, bits, group, label in variants:
        folder = ckpts / name
        start = time.perf_counter()
        save_pretrained(models[key], folder, format=fmt, bits=bits, group_size=group, report=reports[key])
        save_s = time.perf_counter() - start
        row = {"name": name, "label": label, "pruned_model": "magnitude 50 %" if key == "50" else "magnitude 2:4",
               "format": fmt, "bits": bits, "group_size": group, "save_seconds": round(save_s, 2),
               **measure(folder, linear_modules)}
        rows.append(row)
        print(f"saved {name} in {save_s:.1f}s: {row['total_bytes'] / 1e6:.1f} MB", flush=True)

    # loads: one warm-up (imports, first-touch), then each checkpoint once
    AutoModelForCausalLM.from_pretrained(ckpts / "dense-bf16", dtype=torch.bfloat16)
    try:
        import compressed_tensors  # noqa: F401
        have_ct = True
    except ImportError:
        have_ct = False
    for row in rows:
        key = "50" if row["pruned_model"].endswith("50 %") else "2of4"
        if row["format"] == "compressed-tensors" and not have_ct:
            row["load_seconds"] = None
            row["max_abs_logit_diff"] = None
            row["note"] = "not loaded: stock from_pretrained needs the compressed-tensors package (not installed)"
            continue
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(ckpts / row["name"], dtype=torch.bfloat16).eval()
        row["load_seconds"] = round(time.perf_counter() - start, 3)
        with torch.no_grad():
            row["max_abs_logit_diff"] = float((model(ids).logits.float() - ref_logits[key]).abs().max())
        row["reloaded_dense"] = getattr(model.config, "quantization_config", None) is None
        del model

    if args.variants and (out / "size.json").is_file():  # keep the other variants of the previous run
        ran = {r["name"] for r in rows}
        previous = [r for r in json.loads((out / "size.json").read_text())["variants"] if r["name"] not in ran]
        order = all_names
        rows = sorted(rows + previous, key=lambda r: (r["name"] != "dense-bf16", order.index(r["name"])
                                                      if r["name"] in order else len(order)))
        for r in previous:
            r.setdefault("note", "from the previous full run")
    dense = next(r for r in rows if r["name"] == "dense-bf16")
    for row in rows:
        row["total_ratio"] = round(row["total_bytes"] / dense["total_bytes"], 4)
        row["pruned_ratio"] = round(row["pruned_bytes"] / dense_linear_bytes, 4)
    checks = []
    for (name, col), limit in TARGETS.items():
        value = next((r[col] for r in rows if r["name"] == name), None)
        if value is None:
            continue
        checks.append({"variant": name, "metric": col, "value": value, "target": limit, "ok": value <= limit})

    result = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct), bfloat16",
        "method_note": "magnitude pruning (data-free); checkpoint size depends on pattern, sparsity and number "
                       "format only, not on the pruning method",
        "pruned_tensors": "210 decoder Linear weights (30 blocks x q,k,v,o,gate,up,down); lm_head/embeddings "
                          "(tied) stay dense",
        "dense_linear_bf16_bytes": dense_linear_bytes,
        "logit_input": "fixed 128-token text, max abs logit diff vs the in-memory pruned bf16 model",
        "load": "stock AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16) after import hfprune, one run "
                "each after a warm-up load; 2 CPU threads shared with other jobs, so timings are noisy",
        "variants": rows,
        "targets": checks,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine(),
    }
    write_json(out / "size.json", result)
    (out / "size.md").write_text(markdown(result), encoding="utf-8")
    if not args.keep:
        shutil.rmtree(ckpts, ignore_errors=True)
    print(markdown(result))
    return 0 if all(c["ok"] for c in checks) else 1


def markdown(result: dict) -> str:
    lines = ["# Checkpoint sizes: SmolLM2-135M, bf16", "",
             f"{result['method_note']}. Pruned tensors: {result['pruned_tensors']} "
             f"(dense bf16: {result['dense_linear_bf16_bytes'] / 1e6:.1f} MB).", "",
             "| variant | checkpoint MB | x dense | pruned tensors MB | x dense bf16 | load s | max abs logit diff |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["variants"]:
        load = "n/a" if r.get("load_seconds") is None else f"{r['load_seconds']:.2f}"
        diff = "n/a" if r.get("max_abs_logit_diff") is None else f"{r['max_abs_logit_diff']:.4g}"
        lines.append(f"| {r['label']} | {r['total_bytes'] / 1e6:.1f} | {r['total_ratio']:.3f} | "
                     f"{r['pruned_bytes'] / 1e6:.1f} | {r['pruned_ratio']:.3f} | {load} | {diff} |")
    lines += ["", "| target | value | limit | ok |", "|---|---:|---:|---|"]
    for c in result["targets"]:
        lines.append(f"| {c['variant']} {c['metric']} | {c['value']:.3f} | {c['target']} | {'yes' if c['ok'] else 'NO'} |")
    notes = [r for r in result["variants"] if r.get("note")]
    lines += [""] + [f"- {r['name']}: {r['note']}" for r in notes]
    lines += [f"- {result['load']}.", f"- {result['logit_input']}.", f"- total run {result['total_seconds']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
