"""What every command line shares, written once: the options of the commands that read data
(where the data is, ``--root``; whether to fetch it, ``--download``; whether to check it,
``--no-verify``; where to compute, ``--device``), :class:`Parser` (no abbreviated flags),
and :func:`run_main`, the one way a command ends (its exit code, errors as one line, SIGINT and
SIGTERM as :class:`Stopped`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from ._io import started
from .errors import INTERRUPTED, UserError

# What asks a command to stop: Ctrl-C, and what a scheduler (Slurm, Kubernetes) sends first.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Parser(argparse.ArgumentParser):
    """Every command line's parser: flags are never abbreviated (``--epoch 1`` is an error, not
    ``--epochs 1``), in its sub-commands' parsers too (they are made of this class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


class Stopped(KeyboardInterrupt):
    """A command was stopped by ``signum`` (SIGINT or SIGTERM); it exits with ``exit_code``,
    128 + the signal's number, as a shell reports a process the signal ended."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum
        self.name = signal.Signals(signum).name


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside: SIGINT and SIGTERM raise :class:`Stopped` in the main thread, so ``finally``
    blocks and atomic writes clean up as after Ctrl-C (a trainer's own handler takes over while
    it trains, to stop after the step). The previous handlers come back afterwards; outside the
    main thread nothing changes (signals reach only the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_stopped) for s in STOP_SIGNALS}
    try:
        started()  # a signal held back while the command was starting raises Stopped now
        yield
    finally:
        for s, handler in previous.items():  # None: set outside Python; the default is closest
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


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
        interrupted: the line printed after Ctrl-C or SIGTERM.

    Returns:
        The exit status. What a user can act on (a
        :class:`~kmnist_torch.errors.UserError`, an unreadable path, a bad value) is one
        ``error:`` line and the error's ``exit_code`` (1 for ``OSError``/``ValueError``);
        SIGINT (Ctrl-C) is 130, SIGTERM 143 (128 + the signal), with no traceback. Anything
        else is a bug, and keeps its traceback.
    """
    try:
        with stop_on_signals():
            result = run(argv)
    except Stopped as exc:
        print(f"{exc.name}: {interrupted}", file=sys.stderr)
        return exc.exit_code
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


def output_problem(out: Path, suffixes: tuple[str, ...] | None = None) -> str | None:
    """Why ``out`` cannot be written as a file (before any work is done), or None."""
    if out.is_dir():
        return f"--out {out} is a folder; name a file in it"
    if suffixes is not None and out.suffix.lower() not in suffixes:
        return f"--out {out}: unknown image extension {out.suffix or '(none)'!r}; use one of " + (
            ", ".join(suffixes)
        )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"--out {out}: {parent} is a file, not a folder"
            if not os.access(parent, os.W_OK):
                return f"--out {out}: {parent} is not writable"
            break
    return None


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (``--threads``, ``--ways``, ...;
    argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value
