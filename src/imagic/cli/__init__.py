"""The `imagic` command: parse, call the public API, print. No algorithm and no check lives here.

One file per command group: edit.py (edit, generate, info), bench.py (the benchmarks),
shapes.py (the embedded model's training and evaluation); options.py declares the options
they share.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import ImagicError
from . import bench, edit, shapes


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (and exit status 2, like argparse)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        if message.startswith("argument --eta: expected one argument"):
            # argparse reads "--eta -0.5,0.5" as --eta followed by an option named -0.5,0.5
            message += " (for a list that starts below 0 write --eta=-0.5,0.5)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(
        prog="imagic",
        description="Edit one real image to match a text (Imagic, Kawar et al., CVPR 2023).",
    )
    parser.add_argument("--version", action="version", version=f"imagic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for group in (edit, bench, shapes):
        group.register(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"imagic: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a bad argument (status 2, one line)
        return int(done.code or 0)
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        if getattr(args, "quiet", True):
            diffusers_logging.disable_progress_bar()
            transformers_logging.disable_progress_bar()  # its "Loading weights" bar
        return args.func(args)
    except ImagicError as err:
        print(f"imagic: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imagic: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        import torch  # loaded by now: only a model's work runs out of memory

        if not isinstance(err, torch.OutOfMemoryError):
            raise
        print(f"imagic: error: the GPU ran out of memory ({str(err).splitlines()[0]}); "
              "--low-memory needs about half as much, and --cuda-graphs off less than on",
              file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = previous
