"""``hfprune push``."""

from __future__ import annotations

import logging

from hfprune.hub import push_to_hub

logger = logging.getLogger(__name__)


def _cmd_push(args) -> int:
    url = push_to_hub(args.model, args.repo, private=args.private, token=args.token, exist_ok=args.exist_ok,
                      commit_message=getattr(args, "commit_message", None))
    logger.info("Model available at %s", url)
    return 0


def add_cli(subparsers):
    """Add the ``push`` subcommand to an argparse ``subparsers`` object; returns the parser.
    The parser's ``func`` default takes the parsed args and returns an exit code."""
    parser = subparsers.add_parser(
        "push", help="upload a pruned model directory to the Hugging Face Hub",
        description="Create a Hub model repo and upload a pruned model directory (writes a model card if missing).",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="saved model directory")
    parser.add_argument("--repo", required=True, metavar="USER/NAME", help="target repo id")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    parser.add_argument("--exist-ok", action="store_true", help="upload into an existing repo")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.set_defaults(func=_cmd_push)
    return parser
