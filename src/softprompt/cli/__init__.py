"""The `softprompt` command line: parse arguments, call one function of the core, print."""

from softprompt.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
