"""The ``nfnets`` command: thin subcommands over the library functions.

Each subcommand is one module of this package with ``add_arguments(parser)`` and
``run(args) -> int``, so tests call it in-process. Mistakes in what the user gave (a bad flag
combination, a file of the wrong kind: ``nfnets.errors``' UsageError, DataError,
CheckpointError) print one line and exit with status 2. So does FileNotFoundError: nfnets
raises it, with a message naming the flag or path, for every path the user names that does
not exist (the builtin type, which Python callers of the library expect). A run that fails
on its own (RunFailed, e.g. a diverging loss) prints one line and exits with 1. Any other
exception is a bug and keeps its traceback (exit 1); ``NFNETS_DEBUG=1`` shows the traceback
of the mapped ones too. Library modules never import this package.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from ..errors import CheckpointError, DataError, RunFailed, UsageError

# What the user can fix: one line, exit status 2. Exactly these; a bare ValueError is a bug.
USER_ERRORS = (UsageError, DataError, CheckpointError, FileNotFoundError)

# name: (module of this package, one-line help). Modules are imported only when used, so
# `nfnets --help` stays fast.
COMMANDS = {
    "train": ("train", "train a model with the paper's recipe (default: digits)"),
    "eval": ("eval", "top-1/top-5 of a checkpoint on an image folder"),
    "predict": ("predict", "top-k classes of images"),
    "info": ("info", "parameters, FLOPs and recipe facts of a model"),
    "list": ("list_models", "list model names"),
    "convert": ("convert", "convert DeepMind's F*_haiku.npz to safetensors"),
    "export": ("export", "export a fused model to ONNX"),
    "plot": ("plot", "draw the training curves of a run as PNG files"),
    "prepare": ("prepare", "write a dataset (folder, wds:, hf:) as WebDataset shards"),
    "spp": ("spp", "signal propagation plots of a model (at init or trained), vs batch norm"),
}


def _module(name: str):
    return importlib.import_module(f"nfnets.cli.{COMMANDS[name][0]}")


def build_parser() -> argparse.ArgumentParser:
    """The full ``nfnets`` parser (subcommand modules are imported here)."""
    parser = argparse.ArgumentParser(
        prog="nfnets",
        description="Normalizer-Free Networks (NFNets) in PyTorch: models, AGC, the training "
        "recipe, official weights.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        module = _module(name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse, importing only the module of the chosen subcommand when possible."""
    if argv and argv[0] in COMMANDS and argv[0] not in ("-h", "--help"):
        module = _module(argv[0])
        parser = argparse.ArgumentParser(prog=f"nfnets {argv[0]}",
                                         description=COMMANDS[argv[0]][1])
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        args.command, args._run = argv[0], module.run
        return args
    return build_parser().parse_args(argv)


def _version() -> str:
    from .. import __version__

    return f"nfnets {__version__}"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, without the Python file and line that raised them."""
    text = " ".join(str(message).split())
    print(f"nfnets: warning: {text}", file=file or sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nfnets`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    previous = warnings.showwarning
    if not os.environ.get("NFNETS_DEBUG"):
        warnings.showwarning = _show_warning
    try:
        return _run(args)
    finally:
        warnings.showwarning = previous


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as err:
        if os.environ.get("NFNETS_DEBUG"):
            raise
        print(f"nfnets {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        if os.environ.get("NFNETS_DEBUG"):
            raise
        print(f"nfnets {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nfnets {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`nfnets list | head`): stop quietly, as Unix tools do, and keep
        # Python from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
