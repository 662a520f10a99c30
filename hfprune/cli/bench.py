"""``hfprune bench``: one flag per :class:`~hfprune.eval.speed.SpeedConfig` field."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from hfprune.cli.flags import add_fields
from hfprune.eval.speed import SpeedConfig, benchmark_speed, check_models


def add_cli(subparsers):
    """Add ``hfprune bench`` to an argparse ``subparsers`` object; returns the parser."""
    parser = subparsers.add_parser(
        "bench", help="Measure inference speed of models side by side (prefill, decode, latency, memory).",
        description="Load every --model into one process and time requests round-robin (warm-up first, median over "
                    "repetitions): prefill and decode tokens/s, latency per batch size, peak memory. Structured "
                    "(smaller) models are faster everywhere; 2:4 / unstructured zeros run as dense here.",
        argument_default=argparse.SUPPRESS)
    add_fields(parser, SpeedConfig, default=argparse.SUPPRESS, show_default=True,
               flags={"models": ["--model"]},
               extra={"models": {"action": "append", "nargs": None, "metavar": "MODEL"}})
    parser.add_argument("--json", action="store_true", help="Print one JSON object (no table, no progress bar).")
    parser.add_argument("--output", help="Also write the JSON result to this file (not overwritten unless "
                                         "--overwrite).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace an existing --output file that hfprune wrote (never an input or a model's file).")
    parser.set_defaults(func=_cmd_bench)
    return parser


def _table(result: dict) -> str:
    batches = result["config"]["batch_sizes"]
    head = ["model", "params"] + [f"{what} b{b}" for b in batches for what in ("prefill tok/s", "decode tok/s",
                                                                               "latency s", "peak MB")]
    rows = [head]
    for e in result["models"]:
        row = [e["name"], f"{e['parameters'] / 1e6:.1f}M ({e['parameters_vs_first']:.3f}x)"]
        for b in batches:
            r = e[f"batch_{b}"]
            row += [f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}",
                    f"{r['latency_s']:.3f}", f"{r['peak_memory_bytes'] / 2**20:.0f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"device {result['device']}, {result['memory_method']}")
    return "\n".join(lines)


def _cmd_bench(ns) -> int:
    names = {f.name for f in dataclasses.fields(SpeedConfig)}
    config = SpeedConfig(**{k: v for k, v in vars(ns).items() if k in names})
    output = getattr(ns, "output", None)
    if output is not None:  # before any model is read: never an input, never a file hfprune did not write
        from hfprune.io import check_output_file
        from hfprune.models import command_inputs

        check_output_file(output, getattr(ns, "overwrite", False), command_inputs(config.models))
    check_models(config)   # every model's config is read before any weights are loaded
    as_json = getattr(ns, "json", False)
    result = benchmark_speed(config, progress=sys.stderr.isatty() and not as_json)
    if output is not None:
        from hfprune.fs import write_json_output

        result = write_json_output(output, result)  # printed as written
    sys.stdout.write((json.dumps(result) if as_json else _table(result)) + "\n")
    return 0
