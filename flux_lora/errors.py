"""Errors a user can act on. Their message is shown as is: no stack trace, no secrets."""


class UserError(Exception):
    """Base class: anything raised as a UserError reaches the user as its message alone."""


class WeightsError(UserError):
    """A LoRA reference could not be turned into a verified local weights file."""


class WeightsAuthError(WeightsError):
    """The source answered 401/403: a token is missing or lacks access."""


class WeightsNotFound(WeightsError):
    """The source answered 404, or the repo/archive holds no usable file."""


class WeightsTooLarge(WeightsError):
    """The download exceeds the configured maximum size."""


class NotALoraError(WeightsError):
    """The payload is not a safetensors file of LoRA-shaped tensors (HTML, pickle, truncated, full model)."""


class BlockedUrlError(WeightsError):
    """The URL points at a loopback, private, link-local or metadata address."""


class WeightsUnreachable(WeightsError):
    """The source could not be reached (no connection, timeout, outage): worth retrying later."""


class LocalFileRefused(WeightsError):
    """A local path (or file:// URL) where only remote references are accepted, e.g. a request field."""


class LoraError(UserError):
    """A LoRA file we cannot apply: wrong architecture, empty, unsupported variant, bad shapes."""
