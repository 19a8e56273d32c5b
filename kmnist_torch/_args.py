"""The command-line options every command that reads data shares, written once: where the
data is (``--root``), whether to fetch it (``--download``), whether to check it
(``--no-verify``) and where to compute (``--device``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

ROOT_HELP = "data folder (default: $KMNIST_TORCH_ROOT or ~/.cache/kmnist_torch)"


def add_data_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    root_help: str = ROOT_HELP,
    download: bool | None = True,
    device_help: str | None = "torch device (default: cuda if available)",
    verify: bool = True,
) -> None:
    """Add ``--root``, ``--download/--no-download`` (defaulting to ``download``; left out when
    None), ``--no-verify`` (when ``verify``) and ``--device`` (when ``device_help``)."""
    parser.add_argument("--root", default=None, help=root_help)
    if download is not None:
        parser.add_argument(
            "--download",
            action=argparse.BooleanOptionalAction,
            default=download,
            help=f"download missing files (default: {'yes' if download else 'no'})",
        )
    if verify:
        parser.add_argument(
            "--no-verify",
            dest="verify",
            action="store_false",
            help="do not check the files' checksums (your own re-encodings or subsets)",
        )
    if device_help is not None:
        parser.add_argument("--device", default=None, help=device_help)


def run_main(
    main: Callable[[list[str] | None], Any],
    argv: list[str] | None = None,
    status: Callable[[Any], int] = lambda result: 0,
    interrupted: str = "interrupted",
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Run a command's ``main`` the way every command line of the package ends: what a user
    can act on (missing or damaged files, a bad setting or argument, an unreadable path, and
    the command's own ``errors``) as one ``error:`` line and exit 1, Ctrl-C as exit 130; else
    ``status(result)``. Anything else is a bug, and keeps its traceback."""
    from .errors import DataFilesError, FormatError

    try:
        result = main(argv)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except (DataFilesError, FormatError, ValueError, OSError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return status(result)
