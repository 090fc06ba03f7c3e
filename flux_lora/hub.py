"""What went wrong talking to the Hugging Face Hub: one classification for the base-model store and the LoRA cache.

huggingface_hub raises typed errors for the Hub's answers, but lets its HTTP client's connection errors
through untyped, and its `LocalEntryNotFoundError` ("no network and nothing cached") subclasses
`EntryNotFoundError`, so a plain `except EntryNotFoundError` reads an outage as a missing file. Callers
turn a `HubFailure` into their own user-facing error; nothing here knows about fields or models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from flux_lora.errors import plain_reason

# The HTTP client huggingface_hub 2.x runs on (and the names it had before): its errors are connection failures.
_CLIENT_MODULES = {"httpx", "httpx2", "httpcore", "httpcore2"}
_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@dataclass(frozen=True)
class HubFailure:
    """`kind`: gated, repo (not found), revision, entry (file not found), denied (401/403 untyped),
    unreachable (no connection, timeout, offline mode, 5xx/429), http (another status) or other (local I/O,
    invalid names). `detail` is one line naming the exception, with any token masked."""

    kind: str
    status: int | None
    detail: str


def scrub(text: str) -> str:
    """The first line of an error message with any Hub token from the environment masked."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    for name in _TOKEN_VARS:
        secret = os.environ.get(name)
        if secret:
            line = line.replace(secret, "***")
    return line


def hub_failure(exc: BaseException) -> HubFailure | None:
    """Classify an exception raised by a huggingface_hub call; None when it is not a Hub or network failure."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) if response is not None else None
    detail = scrub(str(exc)).strip() or plain_reason(exc)  # no class names in what users read
    if isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled | TimeoutError | ConnectionError):
        kind = "unreachable"  # checked before EntryNotFoundError, which LocalEntryNotFoundError subclasses
    elif type(exc).__module__.split(".")[0] in _CLIENT_MODULES:
        kind = "unreachable"
    elif isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError, its base class
        kind = "gated"
    elif isinstance(exc, RepositoryNotFoundError):
        kind = "repo"
    elif isinstance(exc, RevisionNotFoundError):
        kind = "revision"
    elif isinstance(exc, EntryNotFoundError):
        kind = "entry"
    elif isinstance(exc, HfHubHTTPError):
        if status in (401, 403):
            kind = "denied"
        elif status is None or status >= 500 or status in (408, 429):
            kind = "unreachable"
        else:
            kind = "http"
    elif isinstance(exc, OSError | ValueError):
        kind = "other"
    else:
        return None
    return HubFailure(kind, status, detail)
