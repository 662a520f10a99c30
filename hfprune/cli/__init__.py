"""The ``hfprune`` command line (argparse and printing live only in this package)."""

from hfprune.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
