"""``hfprune push``."""

from __future__ import annotations

import logging
from pathlib import Path

from hfprune.hub import check_repo_id, format_plan, push_to_hub, upload_plan

logger = logging.getLogger(__name__)


def _cmd_push(args) -> int:
    if getattr(args, "dry_run", False):
        check_repo_id(args.repo)
        if not (Path(args.model) / "config.json").is_file():
            raise FileNotFoundError(f"{args.model} is not a saved model directory (no config.json); pass the output "
                                    f"directory of `hfprune prune` or `save_pretrained`.")
        print(format_plan(upload_plan(args.model), args.model, args.repo))
        print("Dry run: nothing was uploaded.")
        return 0
    url = push_to_hub(args.model, args.repo, private=args.private, token=args.token, exist_ok=args.exist_ok,
                      commit_message=getattr(args, "commit_message", None))
    logger.info("Model available at %s", url)
    return 0


def add_cli(subparsers):
    """Add the ``push`` subcommand to an argparse ``subparsers`` object; returns the parser.
    The parser's ``func`` default takes the parsed args and returns an exit code."""
    parser = subparsers.add_parser(
        "push", help="upload a pruned model directory to the Hugging Face Hub",
        description="Create a Hub model repo and upload a pruned checkpoint: the files hfprune's save wrote (its "
                    "hfprune_manifest.json), or for other folders their model files only (config, safetensors, "
                    "tokenizer, README.md, reports); never hidden files or links leaving the folder. The list is "
                    "shown before the upload; a missing model card is generated (the folder is not written).",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="saved model directory")
    parser.add_argument("--repo", required=True, metavar="USER/NAME", help="target repo id")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    parser.add_argument("--exist-ok", action="store_true", help="upload into an existing repo")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the files that would be uploaded (and those left out, with why); upload nothing")
    parser.set_defaults(func=_cmd_push)
    return parser
