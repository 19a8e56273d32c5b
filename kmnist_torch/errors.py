"""Every error and warning a user acts on, in one place, importable without numpy or torch (so
the command lines' catalog verbs start at once).

Each error class carries ``exit_code``: what a command line of the package exits with when the
error ends it (one ``error:`` line on stderr, no traceback). The other exit codes are fixed by
convention: 0 success, 2 a bad command line (argparse), 128 + the signal's number after a
signal stopped the command: 130 Ctrl-C (SIGINT), 143 SIGTERM.

| error | raised when | exit code |
| --- | --- | --- |
| :class:`DataFilesError` | files a dataset needs are missing, damaged or stale | 1 |
| :class:`ArchiveError` | ``kkanji.tar`` is unsafe or damaged | 1 |
| :class:`DownloadError` | no URL produced the expected file | 1 |
| :class:`FormatError` | a file is not what its format promises | 1 |
| :class:`LockTimeout` | another process held a folder's lock too long | 1 |
| :class:`RecipeError` | bad values in a recipe | 1 |
| :class:`TrainError` | a run cannot start or continue as asked | 1 |
| :class:`DivergedError` | a run's loss or weights stopped being finite | 1 |
| :class:`ModelFileError` | a model file or checkpoint cannot be used | 1 |
| :class:`ImageError` | an image given to ``predict`` cannot be read | 1 |
| :class:`ExportError` | a model cannot be exported as asked | 1 |
| :class:`RunFolderError` | a run folder's files are malformed or not where they belong | 1 |
| :class:`SettingError` | a ``KMNIST_TORCH_*`` setting is outside its range | 1 |
| :class:`WriteError` | a write failed: disk or quota full, file-size limit, I/O error | 74 |
"""

from __future__ import annotations

INTERRUPTED = 130  # exit code after Ctrl-C: 128 + SIGINT (2), as shells report it
TERMINATED = 143  # exit code after SIGTERM (a scheduler's stop): 128 + SIGTERM (15)
USAGE = 2  # exit code of a bad command line, as argparse gives it


class UserError(Exception):
    """Base of the errors a user can act on: a command line prints ``error: <message>`` and
    exits with ``exit_code`` instead of showing a traceback."""

    exit_code = 1


class DataFilesError(UserError, RuntimeError):
    """Files a dataset needs are missing, damaged, stale, or could not be downloaded."""


class ArchiveError(DataFilesError):
    """``kkanji.tar`` is unsafe (a member outside ``kkanji2/U+XXXX/*.png``, a link, a device),
    damaged (truncated, not a tar) or holds something other than 64x64 grayscale PNGs."""


class DownloadError(UserError, RuntimeError):
    """No URL produced a file with the expected size and checksums."""


class FormatError(UserError, ValueError):
    """A file on disk is not what its format promises (wrong magic, shape, dtype or length)."""


class LockTimeout(UserError, TimeoutError):
    """Another process held a folder's lock for longer than we were willing to wait."""


class RecipeError(UserError, ValueError):
    """Bad values in a recipe; ``problems`` lists ``(field, what is wrong)``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("bad recipe: " + "; ".join(f"{k} {msg}" for k, msg in problems))


class TrainError(UserError, RuntimeError):
    """A run cannot start or continue as asked (for example, its output folder is taken)."""


class DivergedError(TrainError):
    """A run's loss or weights stopped being finite (NaN or infinity): it stops at that step,
    keeping its last good checkpoint, and writes nothing from the non-finite weights."""


class ModelFileError(UserError, ValueError):
    """A model file or checkpoint cannot be used: damaged, foreign, or with metadata that does
    not describe its weights."""


class ImageError(UserError, ValueError):
    """An image file that cannot be read: missing, a folder, damaged, not an image, too big."""


class ExportError(UserError, RuntimeError):
    """The model cannot be exported as asked, or the export does not match the model."""


class RunFolderError(UserError, ValueError):
    """A run folder cannot be used as it is: its ``results.json`` is malformed, too large or
    not a regular file, or a link stands where ``evaluate`` writes."""


class SettingError(UserError, ValueError):
    """A ``KMNIST_TORCH_*`` environment variable holds a value outside its documented range."""


class WriteError(UserError, OSError):
    """A file could not be written because the write itself failed: the disk is full (ENOSPC),
    the quota is exceeded (EDQUOT), the file-size limit was reached (EFBIG) or the disk failed
    (EIO). The message names the file, the cause and what was kept; ``errno`` is the cause's.
    Exit code 74 (``EX_IOERR`` of sysexits.h), so a job script tells it from a bad input (1):
    once space is freed, the same command (``train`` with ``--resume``) continues."""

    exit_code = 74


class UncheckedContentWarning(UserWarning):
    """A file was used after checking only its size and format: no published checksum exists
    for it (an extracted training-images idx file, a legacy processed ``.pt``)."""


class KKanjiWarning(UserWarning):
    """The data was used although not everything could be verified (``verify=False``)."""
