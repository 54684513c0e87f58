"""The `imagic` command: parse, call the public API, print. No algorithm and no check lives here.

One file per command group: edit.py (edit, generate, info), batch.py (many edits), bench.py
(the benchmarks), shapes.py (the embedded model's training and evaluation), ui.py (the web
page); options.py declares the options they share.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings

from ..errors import ImagicError
from . import batch, bench, edit, shapes, ui


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
    for group in (edit, batch, bench, shapes, ui):
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
    except OSError as err:  # a full disk, no permission, a read-only file system, ...
        print(f"imagic: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"imagic: error: {RAM}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        import torch  # loaded by now: only a model's work runs out of memory

        first_line = (str(err).splitlines() or [""])[0]
        if "DefaultCPUAllocator: can't allocate memory" in first_line:  # torch's MemoryError
            print(f"imagic: error: {RAM} ({first_line.split('DefaultCPUAllocator: ')[-1]})",
                  file=sys.stderr)
            return 1
        if not isinstance(err, torch.OutOfMemoryError):
            raise
        print(f"imagic: error: the GPU ran out of memory ({first_line}); "
              "--low-memory needs about half as much, and --cuda-graphs off less than on",
              file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = previous


RAM = ("ran out of memory (RAM); --low-memory needs less, and so do fewer η and seeds at once "
       "or a smaller model")
# errors that only writing gives, and what to do about each
WRITE_ERRORS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EFBIG: "a limit on the size of one file (ulimit -f, or the file system's) was reached",
    errno.EROFS: "the file system is read-only; write elsewhere",
}
HINTS = {**WRITE_ERRORS, errno.EACCES: "check the permissions or write elsewhere",
         errno.EPERM: "check the permissions or write elsewhere"}


def describe_os_error(err: OSError) -> str:
    """One line: what failed on which file, and what to do ("could not write imagic-out/grid.png:
    No space left on device; free some space or write elsewhere")."""
    reason = err.strerror or (str(err).splitlines() or [type(err).__name__])[0]
    if err.filename is not None:
        verb = "could not write " if err.errno in WRITE_ERRORS else ""
        reason = f"{verb}{os.fsdecode(err.filename)}: {reason}"
    hint = HINTS.get(err.errno)
    return f"{reason}; {hint}" if hint else reason
