"""Errors a user can cause and fix. Each carries a message that says what to do."""


class BucketServeError(Exception):
    """Base class: the CLI prints these as one line and exits with status 2."""


class InvalidRequestError(BucketServeError, ValueError):
    """A request or its parameters are invalid (empty prompt, too long, bad sampling values)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ConfigError(BucketServeError, ValueError):
    """The engine cannot be built as configured (KV budget too small, bad dtype, ...)."""


class ModelNotFoundError(BucketServeError, FileNotFoundError):
    """A model path does not exist or does not hold a model."""


class DeadlineUnreachableError(BucketServeError):
    """A request cannot meet its TTFT target behind the prompts ahead of it (``--reject-late``): refused
    at once (HTTP 429) rather than answered late."""
