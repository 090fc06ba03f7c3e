"""Errors a user can act on. Their message is shown as is: no stack trace, no secrets."""

from __future__ import annotations

import functools
import re


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


# --------------------------------------------------------------------------- what the cog server shows

# A network failure in words, by the name of its class or a base class (requests, urllib3, the stdlib):
# users read the reason, never the class name.
_REASONS = {
    "SSLError": "TLS error",
    "ProxyError": "proxy error",
    "ConnectTimeout": "timed out connecting",
    "ReadTimeout": "timed out reading",
    "Timeout": "timed out",
    "TimeoutError": "timed out",
    "ChunkedEncodingError": "the connection broke off",
    "ProtocolError": "the connection broke off",
    "ReadTimeoutError": "timed out reading",
    "DecodeError": "undecodable response body",
    "ContentDecodingError": "undecodable response body",
    "TooManyRedirects": "too many redirects",
    "InvalidURL": "invalid URL",
    "InvalidSchema": "invalid URL",
    "MissingSchema": "invalid URL",
    "ConnectionError": "could not connect",
}


def plain_reason(exc: BaseException) -> str:
    """Why a request failed, in words ("could not connect"), for messages users read."""
    for cls in type(exc).__mro__:
        if cls.__name__ in _REASONS:
            return _REASONS[cls.__name__]
    return "network error"


MAX_SHOWN = 200  # longest unbroken run (a reference, a URL) a failure message echoes
_FIELD = re.compile(r"[a-z][a-z0-9_]*|COG_WEIGHTS")


class Failure(UserError):
    """A UserError as the cog server shows it: `str()` is the message, the type's name is the field.

    coglet (cog 0.23.1, unchanged at cog HEAD: crates/coglet-python/src/worker_bridge.rs and
    crates/coglet/src/predictor.rs) turns an exception escaping our async run() into the text
    `Prediction failed: Async prediction failed: {type(exc).__qualname__}: {exc}` (a sync run()
    would read `Prediction failed: Prediction failed: ...`). The prefix is coglet's own and cannot
    be changed from here; the type name is the one part we choose, so it names the field the user
    must fix instead of a Python class.
    """

    field = "error"

    @property
    def message(self) -> str:
        """`field: message`, as `flux-lora predict` prints it."""
        return str(self) if self.field == Failure.field else f"{self.field}: {self}"


@functools.cache
def _failure_type(field: str) -> type[Failure]:
    return type(field, (Failure,), {"field": field, "__qualname__": field, "__module__": __name__})


def shorten(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` with every unbroken run longer than `limit` cut to `limit` characters: "..." where the
    middle was, a closing quote or punctuation kept."""

    def cut(match: re.Match[str]) -> str:
        run = match[0]
        tail = run[-1] if run[-1] in "'\")]:,;." else ""
        return run[: limit - 3 - len(tail)] + "..." + tail

    return re.sub(rf"\S{{{limit + 1},}}", cut, text)


def for_cog(exc: UserError) -> Failure:
    """The exception run() raises for `exc`: named for its field, any long reference shortened."""
    if isinstance(exc, Failure):
        return exc
    field, sep, rest = str(exc).partition(": ")
    if not (sep and _FIELD.fullmatch(field)):
        field, rest = Failure.field, str(exc)
    return _failure_type(field)(shorten(rest))


class LoraError(UserError):
    """A LoRA file we cannot apply: wrong architecture, empty, unsupported variant, bad shapes."""
