"""Error types. Every `LalmExportError` is a user error: the CLI prints its message alone
(one line, no traceback) and exits non-zero."""

from __future__ import annotations


class LalmExportError(Exception):
    """Base of the errors a user can fix (bad path, bad flag, mismatched adapter, ...)."""


class UnknownFamilyError(LalmExportError, ValueError):
    """A family or architecture name that the registry does not hold."""


class OptionsError(LalmExportError, ValueError):
    """Contradictory or out-of-range options."""


class ModelLoadError(LalmExportError, OSError):
    """A model path or id that cannot be loaded."""


class CorruptWeightsError(LalmExportError, ValueError):
    """A weights file that is missing, truncated or not safetensors."""


class AdapterMismatchError(LalmExportError, ValueError):
    """An adapter (or full-weights folder) that does not fit the model it is loaded into."""


class OutputExistsError(LalmExportError, FileExistsError):
    """The output folder exists and is not empty."""


class OutputPathError(LalmExportError, OSError):
    """An output path that cannot be written: under a file, or in a folder without write permission."""


class ParityError(LalmExportError):
    """The exported graph disagrees with the eager module beyond tolerance."""


class ExportError(LalmExportError):
    """A step of the export that cannot be done for this model, with what to use instead."""
