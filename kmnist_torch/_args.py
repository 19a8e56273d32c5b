"""What every command line shares, written once: the options of the commands that read data
(where the data is, ``--root``; whether to fetch it, ``--download``; whether to check it,
``--no-verify``; where to compute, ``--device``), and :func:`run_main`, the one way a command
ends (its exit code, errors as one line)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from .errors import INTERRUPTED, UserError

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
    run: Callable[[list[str] | None], Any],
    argv: list[str] | None = None,
    status: Callable[[Any], int] = lambda result: 0,
    interrupted: str = "interrupted",
) -> int:
    """Run a command the way every command line of the package ends.

    Args:
        run: the command: parses ``argv``, does the work, returns its result.
        argv: the arguments (None: ``sys.argv[1:]``).
        status: the exit status of a result (default: 0 for any).
        interrupted: the line printed after Ctrl-C.

    Returns:
        The exit status. What a user can act on (a
        :class:`~kmnist_torch.errors.UserError`, an unreadable path, a bad value) is one
        ``error:`` line and the error's ``exit_code`` (1 for ``OSError``/``ValueError``);
        Ctrl-C is 130. Anything else is a bug, and keeps its traceback.
    """
    try:
        result = run(argv)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return INTERRUPTED
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return status(result)
