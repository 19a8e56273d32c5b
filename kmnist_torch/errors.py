"""Errors a user acts on, importable without numpy or torch (so the CLI's catalog commands
start at once)."""

from __future__ import annotations


class FormatError(ValueError):
    """A file on disk is not what its format promises (wrong magic, shape, dtype or length)."""
