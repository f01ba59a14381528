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


class ContextLengthError(RuntimeUserError):
    """A prompt plus the tokens asked for that exceed the decoder's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context: int) -> None:
        self.prompt_tokens, self.max_new_tokens, self.context = prompt_tokens, max_new_tokens, context
        room = context - prompt_tokens
        fix = f"ask for at most {room} new tokens" if room > 0 else "shorten the prompt"
        super().__init__(
            f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: {prompt_tokens + max_new_tokens} "
            f"positions, more than the decoder's context of {context}; {fix}"
        )
