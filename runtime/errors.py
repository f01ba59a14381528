"""Errors of the runtime. `RuntimeUserError` is what a user can fix: the CLI prints its
message alone and exits non-zero."""


class RuntimeUserError(Exception):
    """Base of the runtime's user errors."""


class BundleError(RuntimeUserError):
    """A bundle folder that is missing, incomplete, tampered with or of an unknown format."""


class AudioError(RuntimeUserError):
    """An audio file that cannot be used (unreadable, empty, NaN, ...)."""


class ProviderError(RuntimeUserError):
    """An execution provider that was asked for and is not available."""
