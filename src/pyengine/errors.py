"""The exceptions pyengine raises besides the built-in ones.

How errors from the C++ core arrive in Python (mapped in ``csrc/bindings/errors.cpp``):

==========================  =====================================================
core error                  Python exception
==========================  =====================================================
``pe::InvalidArgument``     ``ValueError``
``pe::IoError``             ``OSError`` with ``errno`` and ``filename`` set
``pe::CheckpointError``     :class:`CheckpointError`
``pe::DataError``           :class:`DataError`
==========================  =====================================================
"""

from __future__ import annotations


class PyengineError(Exception):
    """Base class of pyengine's own exceptions."""


class CheckpointError(PyengineError):
    """A checkpoint is missing, torn, corrupt, or not what the caller asked for."""


class DataError(PyengineError):
    """A dataset on disk is missing, torn, corrupt, or not what the caller asked for."""


class UnverifiedDataWarning(UserWarning):
    """A dataset was opened whose reads nothing checks: its files are in format version 1, which
    has no block checksums, so a corrupted byte would arrive as data. Re-write it (format 2),
    or open it with ``verify="open"`` to check everything once."""
