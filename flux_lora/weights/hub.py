"""The Hugging Face Hub: LoRA lookups and downloads, and what went wrong, for the base-model store and the LoRA cache.

huggingface_hub raises typed errors for the Hub's answers, but lets its HTTP client's connection errors
through untyped, and its `LocalEntryNotFoundError` ("no network and nothing cached") subclasses
`EntryNotFoundError`, so a plain `except EntryNotFoundError` reads an outage as a missing file. Callers
turn a `HubFailure` into their own user-facing error; nothing here knows about fields or models.
The endpoint and token come from `Settings` at each call (HF_ENDPOINT, HF_TOKEN).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from flux_lora import cancel
from flux_lora.errors import (
    WeightsAuthError,
    WeightsError,
    WeightsNotFound,
    WeightsTooLarge,
    WeightsUnreachable,
    plain_reason,
)
from flux_lora.settings import Settings
from flux_lora.weights.weightfile import choose_lora

log = logging.getLogger(__name__)

# The HTTP client huggingface_hub 2.x runs on (and the names it had before): its errors are connection failures.
_CLIENT_MODULES = {"httpx", "httpx2", "httpcore", "httpcore2"}


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
    for secret in Settings.hub_secrets():
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


# --- LoRAs on the Hub (the weight cache's Hugging Face source) ----------------------------------------------


def hub_access() -> tuple[str | None, str | None]:
    """The Hub endpoint and token (HF_ENDPOINT, HF_TOKEN), read at each call."""
    return Settings.hub_endpoint(), Settings.token("HF_TOKEN")


def hub_error(failure: HubFailure, what: str, revision: str | None, filename: str | None,
              token: str | None) -> WeightsError:
    """The user's error for a failed Hub call on a LoRA reference."""
    if failure.kind == "gated":
        return WeightsAuthError(f"{what} is gated: accept its terms on the Hub and set HF_TOKEN")
    if failure.kind == "repo":
        hint = "" if token else "; if it is private or gated, set HF_TOKEN"
        return WeightsNotFound(f"{what}: repository not found{hint}")
    if failure.kind == "revision":
        return WeightsNotFound(f"{what}: revision {revision!r} not found")
    if failure.kind == "entry":
        return WeightsNotFound(f"{what}: file {filename!r} not found in the repository")
    if failure.kind == "denied":
        return WeightsAuthError(f"{what}: access denied (HTTP {failure.status}); set HF_TOKEN")
    if failure.kind == "unreachable":
        endpoint = Settings.hub_endpoint() or "https://huggingface.co"
        return WeightsUnreachable(f"{what}: cannot reach the Hub at {endpoint} ({failure.detail})")
    if failure.kind == "http":
        return WeightsError(f"{what}: the Hub answered HTTP {failure.status}")
    return WeightsError(f"{what}: download failed ({failure.detail})")


def _raise(exc: Exception, what: str, revision: str | None, filename: str | None, token: str | None) -> NoReturn:
    failure = hub_failure(exc)
    if failure is None:
        raise exc
    raise hub_error(failure, what, revision, filename, token) from None


def repo_sha(repo: str, revision: str | None, what: str, filename: str | None) -> str | None:
    """The commit a branch or tag names now (one small request)."""
    from huggingface_hub import HfApi

    endpoint, token = hub_access()
    try:
        return HfApi(endpoint=endpoint, token=token).model_info(repo, revision=revision).sha
    except Exception as exc:
        _raise(exc, what, revision, filename, token)


@functools.cache
def _cancellable_bar() -> type:
    """huggingface_hub's own progress bar, which also stops a cancelled prediction's download: the library
    updates it after each chunk it writes (`flux_lora.cancel`)."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class CancellableBar(hub_tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            cancel.check()
            return super().update(n)

    return CancellableBar


def download_lora(repo: str, revision: str | None, filename: str | None, staged: Path, max_bytes: int,
                  what: str) -> Path:
    """Download through huggingface_hub (HF_ENDPOINT, HF_TOKEN), choosing the file if not named."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url

    endpoint, token = hub_access()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        sizes: dict[str, int | None] = {}
        if filename is None:
            files = [f for f in api.list_repo_tree(repo, revision=revision, recursive=True) if hasattr(f, "size")]
            sizes = {f.path: f.size for f in files}

            def names_of(path: str) -> list[str] | None:
                meta = api.parse_safetensors_file_metadata(repo, path, revision=revision)
                return list(meta.tensors)

            filename = choose_lora(list(sizes), names_of, what)
            log.info("%s: using %s", what, filename)
        else:  # a named file: its size from a HEAD request, so the cap holds before any byte is fetched
            url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
            sizes[filename] = get_hf_file_metadata(url, token=token, endpoint=endpoint).size
        size = sizes.get(filename)
        if size is not None and size > max_bytes:
            raise WeightsTooLarge(
                f"{what}: {filename} is {size} bytes, over the {max_bytes}-byte limit (FLUX_LORA_MAX_DOWNLOAD_BYTES)"
            )
        return Path(hf_hub_download(repo, filename, revision=revision, local_dir=staged / "hub", endpoint=endpoint,
                                    token=token, tqdm_class=_cancellable_bar()))
    except Exception as exc:
        _raise(exc, what, revision, filename, token)


def token_configured() -> bool:
    """Whether a Hub token is set (HF_TOKEN or a saved login): decides what a gated refusal means."""
    from huggingface_hub import get_token

    return get_token() is not None


def download_snapshot(repo_id: str, endpoint: str, folder: Path, allow: list[str], ignore: list[str]) -> str:
    """Fetch a base model's files into `folder` (resumable) at the commit `repo_id` names now; return it.

    The commit is resolved first: snapshot_download would otherwise hide an access error behind a
    partial local folder, and the commit goes in the store's completion marker. Errors pass through
    untranslated: the store turns them into its own messages with `hub_failure`.
    """
    from huggingface_hub import HfApi, snapshot_download

    revision = HfApi(endpoint=endpoint).repo_info(repo_id).sha
    snapshot_download(repo_id, revision=revision, local_dir=folder, allow_patterns=allow, ignore_patterns=ignore,
                      endpoint=endpoint)
    return revision
