"""Exception hierarchy.

Every error spikearray raises on bad input is a :class:`SpikearrayError`. Messages follow one rule: say what
was wrong (quoting the bad value), what was expected, and how to fix it. Subclasses also derive from the
matching built-in exception (``FileNotFoundError``, ``ValueError``, ...) so generic ``except`` clauses still
work.
"""

from __future__ import annotations


class SpikearrayError(Exception):
    """Base class of every error raised by spikearray on bad input or state."""


class RecordingError(SpikearrayError, ValueError):
    """A recording cannot be opened or read as described."""


class RecordingNotFoundError(RecordingError, FileNotFoundError):
    """The path given for a recording (or its ``.meta``) does not exist."""


class MetaFileError(RecordingError):
    """A SpikeGLX ``.meta`` file is missing, unreadable or lacks a key."""


class FileSizeError(RecordingError):
    """The binary's size does not fit the declared channel count, dtype or ``.meta``."""


class EmptyRecordingError(RecordingError):
    """The recording holds no samples."""


class UnsupportedDtypeError(RecordingError, TypeError):
    """The sample type of a binary file is not one spikearray reads."""


class ProbeError(SpikearrayError, ValueError):
    """A probe file or object cannot be read, or does not fit the recording."""


class ProbeFormatError(ProbeError):
    """The probe file's format is unknown or its content is malformed."""


class ProbeMismatchError(ProbeError):
    """The probe's channels do not match the recording's channels."""


class SettingsError(SpikearrayError, ValueError):
    """A setting is unknown, of the wrong type or out of bounds."""


class DataError(SpikearrayError, ValueError):
    """The data themselves are unusable (NaN, inf, empty after a stage)."""


class OutputError(SpikearrayError):
    """An output folder or store cannot be written or read."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and ``overwrite`` was not requested."""


class IncompleteOutputError(OutputError):
    """An output store exists but was never completed (a crashed or killed run)."""


class DiskFullError(OutputError, OSError):
    """The filesystem holding an output has too little free space (``ENOSPC``) for what must be written.

    Attributes
    ----------
    path : str
        The file or folder being written.
    needed, free : int or None
        Bytes the write needed (an estimate where the size is not known exactly) and bytes free there.
    """

    def __init__(self, message: str, *, path: str = "", needed: int | None = None, free: int | None = None) -> None:
        super().__init__(message)
        self.path, self.needed, self.free = path, needed, free

    def __str__(self) -> str:  # OSError's own __str__ would show only errno/strerror
        return str(self.args[0]) if self.args else ""


class OutputLockedError(OutputError):
    """Another run (a live process) holds the lock of this output folder."""


class DamagedStoreError(OutputError):
    """A finished Zarr store on disk is damaged: a metadata file or a chunk is missing, cut short or unreadable."""


class DamagedCacheWarning(UserWarning):
    """A stage cache of an unfinished run was damaged and is recomputed (the warning names the file)."""


class MissingExtraError(SpikearrayError, ImportError):
    """An optional dependency (``spikearray[nwb]``, ``spikearray[interop]``) is not installed; the message names the
    ``pip install`` to run."""


class MetadataError(SpikearrayError, ValueError):
    """Metadata an export needs (NWB session start time, subject, ...) is neither given nor in the recording's
    files; the message names the argument to pass."""
