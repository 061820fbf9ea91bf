"""Errors a user can cause. Each message names the problem and the fix; the CLI prints it in one line and exits 2."""


class Gpt2termError(Exception):
    """Base class of every error a user can cause and fix."""


class TokenizerUnavailable(Gpt2termError):
    pass


class CheckpointError(Gpt2termError):
    """A checkpoint or weights file that cannot be read, or does not fit the model."""


class InputError(Gpt2termError):
    """Bad input on the command line or in the app (empty prompt, bad setting, ...)."""


class StorageError(CheckpointError):
    """The disk refused a write (full, read-only, no permission); the message says what was kept intact."""


class ConfigError(InputError):
    """A model config with a wrong type or a size that cannot work (or would not fit in any machine's memory)."""
