"""``nfnets list``: every model name."""

from __future__ import annotations

import argparse

from ..models import list_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``nfnets list`` takes no arguments."""


def run(args: argparse.Namespace) -> int:
    """Print every model name, one per line."""
    print("\n".join(list_models()))
    return 0
