"""``hfprune flow``: prune -> recover -> save -> push from one recipe (:mod:`hfprune.workflows.flow`)."""

from __future__ import annotations

import sys


def add_cli(subparsers):
    """Add ``hfprune flow`` to an argparse ``subparsers`` object; returns the parser."""
    p = subparsers.add_parser(
        "flow", help="Prune, recover, save and push in one run, from a flow recipe.",
        description="Run the sections of a flow recipe (prune:, recover:, save:, push:; see "
                    "recipes/structured-flow-distill-push.yaml) on one model; every section is checked first.")
    p.add_argument("--recipe", required=True, help="Flow recipe YAML.")
    p.add_argument("--model", required=True, help="Dense model: local folder, Hub id or alias (smollm2-135m).")
    p.add_argument("--output", required=True, help="Output folder of the final checkpoint.")
    p.add_argument("--repo", default=None, help="Hub repo to push to (overrides push.repo; none: no push).")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace an earlier hfprune output in --output (a folder holding other files is refused).")
    p.set_defaults(func=_cmd_flow)
    return p


def _cmd_flow(args) -> int:
    from hfprune.recipes import read_recipe
    from hfprune.workflows.flow import run_flow

    result = run_flow(args.model, read_recipe(args.recipe), args.output, repo=args.repo, overwrite=args.overwrite,
                      progress=sys.stderr.isatty(), inputs=(args.recipe,))
    rec = result["recover"]
    lines = [str(result["prune"])]
    if rec is not None and rec["evals"]:
        lines.append(f"recovered {rec['steps']} steps in {rec['seconds']:.1f}s; perplexity "
                     f"{rec['evals'][0]['perplexity']:.3f} -> {rec['evals'][-1]['perplexity']:.3f}")
    elif rec is not None:
        lines.append(f"recovered {rec['steps']} steps in {rec['seconds']:.1f}s")
    lines.append(f"saved to {result['output']}")
    if result["url"]:
        lines.append(f"pushed to {result['url']}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
