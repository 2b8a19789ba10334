"""The ``nfnets`` command: thin subcommands over the library functions.

Each subcommand lives beside the code it drives as a pair ``add_*_arguments(parser)`` /
``run_*(args) -> int``, so tests call it in-process. Mistakes in what the user gave (a bad flag
combination, a missing path, a file of the wrong kind) print one line and exit with status 2;
a run that fails on its own (e.g. a diverging loss) exits with 1. No traceback either way
(set NFNETS_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# name: (module, function prefix, one-line help). Modules are imported only when used, so
# `nfnets --help` stays fast.
COMMANDS = {
    "train": ("nfnets.train", "train", "train a model with the paper's recipe (default: digits)"),
    "eval": ("nfnets.evaluate", "eval", "top-1/top-5 of a checkpoint on an image folder"),
    "predict": ("nfnets.evaluate", "predict", "top-k classes of images"),
    "info": ("nfnets.commands", "info", "parameters, FLOPs and recipe facts of a model"),
    "list": ("nfnets.commands", "list", "list model names"),
    "convert": ("nfnets.commands", "convert",
                "convert DeepMind's F*_haiku.npz to safetensors"),
    "export": ("nfnets.commands", "export", "export a fused model to ONNX"),
    "plot": ("nfnets.plots", "plot", "draw the training curves of a run as PNG files"),
}


class UsageError(ValueError):
    """The user asked for something impossible (e.g. conflicting flags); exit status 2."""


class RunFailed(RuntimeError):
    """A run could not finish (e.g. repeated non-finite losses); exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    """The full ``nfnets`` parser (subcommand modules are imported here)."""
    parser = argparse.ArgumentParser(
        prog="nfnets",
        description="Normalizer-Free Networks (NFNets) in PyTorch: models, AGC, the training "
        "recipe, official weights.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, prefix, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, f"add_{prefix}_arguments")(command)
        command.set_defaults(_run=getattr(module, f"run_{prefix}"))
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse, importing only the module of the chosen subcommand when possible."""
    if argv and argv[0] in COMMANDS and argv[0] not in ("-h", "--help"):
        module_name, prefix, help_text = COMMANDS[argv[0]]
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"nfnets {argv[0]}", description=help_text)
        getattr(module, f"add_{prefix}_arguments")(parser)
        args = parser.parse_args(argv[1:])
        args.command, args._run = argv[0], getattr(module, f"run_{prefix}")
        return args
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nfnets`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        # Our input errors (UsageError, DataError, CheckpointError, bad model names or
        # options) are ValueErrors; NFNETS_DEBUG=1 shows the traceback anyway.
        if os.environ.get("NFNETS_DEBUG"):
            raise
        print(f"nfnets {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"nfnets {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nfnets {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
