"""``nfnets plot``: draw a run's training curves as PNG files."""

from __future__ import annotations

import argparse

from .. import plots
from ..errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets plot``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="training run directory")


def run(args: argparse.Namespace) -> int:
    """``nfnets plot``: draw the curves and print the paths of the PNG files."""
    try:
        paths = plots.plot_run(args.run_dir)
    except ImportError as err:  # matplotlib is an optional dependency (the demo extra)
        raise UsageError(str(err)) from None
    for path in paths:
        print(path)
    return 0
