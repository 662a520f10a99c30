"""Time `hfprune eval --tasks` against the `lm_eval` command line on the same model, tasks and batch size.

Issue 30 measured 14 minutes for four full splits through lm-evaluation-harness itself and 20.3 minutes through
`hfprune eval --tasks` (on different machines). This script runs both, each in a fresh process under
``/usr/bin/time -v`` (wall seconds and peak RSS), one after the other, so the pair is one measurement when the
whole script runs inside one ``../shared/tools/quiet``:

* ``lm_eval``: ``lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --device cpu --include_path
  hfprune/eval/tasks --tasks T --batch_size B`` (the stock harness on hfprune's task configs and local splits);
* ``hfprune``: ``hfprune eval --model DIR --dtype float32 --tasks T --batch-size B --json``.

It checks that the accuracies agree (four decimals, as lm_eval prints them) and writes one JSON with both rows.

    python scripts/bench_zeroshot_paths.py --tasks piqa --batch-sizes 16,1 --output docs/results/zeroshot_paths.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common  # noqa: E402
BIN = Path(sys.executable).parent


def timed(cmd: list[str], log: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    row = _bench_common.timed(cmd, log, env=env, cwd=ROOT)
    rss = row["peak_rss_mb"]
    return {**row, "wall_s": round(row["wall_s"], 1), "peak_rss_mb": None if rss is None else round(rss),
            "command": " ".join(cmd)}


def lm_eval_metrics(folder: Path) -> dict:
    """``{task: {metric: value}}`` from the results JSON lm_eval writes under ``--output_path``."""
    found = sorted(folder.rglob("results_*.json"))
    if not found:
        raise SystemExit(f"lm_eval wrote no results under {folder}")
    res = json.loads(found[-1].read_text())["results"]
    return {t: {k.split(",")[0]: v for k, v in m.items() if isinstance(v, float) and "stderr" not in k}
            for t, m in res.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path("~/.cache/hfprune/smollm2-135m").expanduser()),
                    help="a local model folder both paths load (default: hfprune's converted SmolLM2-135M)")
    ap.add_argument("--tasks", default="piqa")
    ap.add_argument("--batch-sizes", default="16")
    ap.add_argument("--limit", type=int, default=None, help="first N documents per task (a smoke test; default: full)")
    ap.add_argument("--output", default=str(ROOT / "bench_out" / "zeroshot_paths.json"))
    args = ap.parse_args()
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"--model {args.model} is not a model folder (run `hfprune eval --model smollm2-135m` once "
                         f"to make the default one).")
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for batch in [b.strip() for b in args.batch_sizes.split(",") if b.strip()]:
            out = tmp / f"lmeval-{batch}"
            row = timed([str(BIN / "lm_eval"), "--model", "hf", "--model_args",
                         f"pretrained={args.model},dtype=float32", "--device", "cpu", "--include_path",
                         "hfprune/eval/tasks", "--tasks", args.tasks, "--batch_size", batch, "--output_path", str(out),
                         *(["--limit", str(args.limit)] if args.limit else [])],
                        tmp / f"lmeval-{batch}.log")
            theirs = lm_eval_metrics(out)
            rows.append({"path": "lm_eval", "batch_size": batch, **row, "metrics": theirs})
            print(json.dumps(rows[-1]), flush=True)
            js = tmp / f"hfprune-{batch}.json"
            row = timed([str(BIN / "hfprune"), "eval", "--model", args.model, "--dtype", "float32", "--tasks",
                         args.tasks, "--batch-size", batch, "--output", str(js),
                         *(["--limit", str(args.limit)] if args.limit else [])], tmp / f"hfprune-{batch}.log")
            mine = {t: {k: v for k, v in m.items() if isinstance(v, float) and "stderr" not in k and k != "sample_len"}
                    for t, m in json.loads(js.read_text())["zeroshot"]["tasks"].items()}
            rows.append({"path": "hfprune", "batch_size": batch, **row, "metrics": mine})
            print(json.dumps(rows[-1]), flush=True)
            same = all(round(mine[t][k], 4) == round(v, 4) for t, m in theirs.items() for k, v in m.items()
                       if k in mine.get(t, {}))
            rows[-1]["same_metrics_as_lm_eval"] = same
            rows[-1]["wall_ratio_to_lm_eval"] = round(rows[-1]["wall_s"] / rows[-2]["wall_s"], 3)
    result = {"what": "the same zero-shot tasks through the lm_eval command line and `hfprune eval --tasks`, fresh "
                      "processes one after the other", "tasks": args.tasks, "limit": args.limit, "model": Path(args.model).name,
              "torch_threads": torch.get_num_threads(), "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
