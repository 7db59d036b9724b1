"""What every entry point shares: a parser whose help is the module docstring (with its
examples), and logging to stderr."""

from __future__ import annotations

import argparse
import logging


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser for ``python -m PROG`` that shows ``doc`` verbatim in ``--help``."""
    return argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
