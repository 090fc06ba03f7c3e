"""Where a LoRA comes from: one provider per kind of reference, picked through one registry.

Each provider owns what its source means: how messages describe it, how an unversioned reference is
pinned to what it names right now, and how its payload (a .safetensors file, or a tar of one) is
produced in the cache's staging folder. The cache (`cache.py`) keeps what every source shares: keys,
index, locks, staging, verification. Adding a source is a `refs.py` form plus one class here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from flux_lora.weights import hub, refs
from flux_lora.errors import NotALoraError, WeightsNotFound, WeightsTooLarge
from flux_lora.weights.http import Downloader, Target
from flux_lora.weights.refs import (
    CivitaiModelRef,
    CivitaiVersionRef,
    DataUri,
    HuggingFaceRef,
    LocalFile,
    ReplicateRef,
    Source,
    data_uri_bytes,
    redact_url,
)
from flux_lora.settings import Settings


@dataclass(frozen=True)
class Fetch:
    """What a provider may use: the downloader (size cap, address checks, retries) and the size cap."""

    downloader: Downloader
    max_bytes: int


class Provider:
    """A source fetched from a URL; subclasses say which URL, or produce the payload another way."""

    reads_disk = False  # a local file: only COG_WEIGHTS, the command line or FLUX_LORA_LOCAL_LORA_DIRS

    def describe(self, source: Source) -> str:
        """How messages name a source: never with a query string or token."""
        return redact_url(source.url)

    def shown(self, ref: str, source: Source) -> str:
        """The reference as the index, `weights list` and logs show it: never a query string."""
        return redact_url(ref.strip())

    def key(self, source: Source) -> str:
        return source.cache_key

    def in_place(self, source: Source) -> Path | None:
        """A file to use where it is, without caching a copy (a local .safetensors)."""
        return None

    def pin(self, source: Source, fetch: Fetch) -> Source:
        """The source pinned to what it names right now (a new version is a new cache key)."""
        return source

    def target(self, source: Source, fetch: Fetch) -> Target:
        return Target(
            source.url, self.describe(source), auth_hint="the URL may need a signature, or its signature expired",
            not_found_hint="check the URL",
        )

    def produce(self, source: Source, fetch: Fetch, staged: Path) -> Path:
        """The payload for `source`, written under `staged` (or a file of the user's, never moved)."""
        payload = staged / "payload"
        fetch.downloader.download(self.target(source, fetch), payload)
        return payload


class Replicate(Provider):
    """`owner/model[/version]`: Replicate's `_weights` redirects to the version's file; the token goes to
    Replicate only."""

    def describe(self, source: ReplicateRef) -> str:
        version = f" version {source.version}" if source.version else ""
        return f"Replicate model {source.owner}/{source.model}{version}"

    def pin(self, source: ReplicateRef, fetch: Fetch) -> Source:
        if source.version is not None:
            return source
        location = fetch.downloader.locate(self.target(source, fetch))  # `_weights` redirects to the latest file
        return replace(source, weights_url=location) if location else source

    def target(self, source: ReplicateRef, fetch: Fetch) -> Target:
        base = Settings.replicate_url()
        version = f"/versions/{source.version}" if source.version else ""
        url = source.weights_url or f"{base}/{source.owner}/{source.model}{version}/_weights"
        same_origin = urlsplit(url)[:2] == urlsplit(base)[:2]  # the token goes to Replicate only
        return Target(
            url, self.describe(source), _bearer(Settings.token("REPLICATE_API_TOKEN")) if same_origin else {},
            auth_hint="set REPLICATE_API_TOKEN to a token that can read this model",
            not_found_hint="check the owner, model and version names",
        )


class HuggingFace(Provider):
    """A Hub repo (at a branch, tag or commit), through huggingface_hub: see `hub.py`."""

    def describe(self, source: HuggingFaceRef) -> str:
        return f"huggingface.co/{source.repo}" + (f"/{source.filename}" if source.filename else "")

    def pin(self, source: HuggingFaceRef, fetch: Fetch) -> Source:
        if re.fullmatch(r"[0-9a-f]{40}", source.revision or ""):
            return source
        sha = hub.repo_sha(source.repo, source.revision, self.describe(source), source.filename)
        return replace(source, revision=sha) if sha else source

    def produce(self, source: HuggingFaceRef, fetch: Fetch, staged: Path) -> Path:
        return hub.download_lora(source.repo, source.revision, source.filename, staged, fetch.max_bytes,
                                 self.describe(source))


class CivitaiVersion(Provider):
    """A CivitAI model version, downloaded through `/api/download/models/<versionId>`."""

    def describe(self, source: CivitaiVersionRef) -> str:
        return f"CivitAI model version {source.version_id}"

    def target(self, source: CivitaiVersionRef, fetch: Fetch) -> Target:
        url = f"{Settings.civitai_url()}/api/download/models/{source.version_id}"
        return _civitai_download(url, self.describe(source), source.version_id, source.token)


class CivitaiModel(Provider):
    """A CivitAI model id (not a version id), resolved through the API to its version's primary SafeTensor."""

    def describe(self, source: CivitaiModelRef) -> str:
        return f"CivitAI model {source.model_id}"

    def target(self, source: CivitaiModelRef, fetch: Fetch) -> Target:
        base = Settings.civitai_url()
        what = self.describe(source)
        model = fetch.downloader.get_json(Target(
            f"{base}/api/v1/models/{source.model_id}", what, _civitai_auth(source.token),
            auth_hint="set CIVITAI_API_TOKEN to an API key that can read it",
            not_found_hint=(
                f"{source.model_id} is not a CivitAI model id; if it is a version id (modelVersionId), "
                f"use civitai.com/api/download/models/{source.model_id}"
            ),
        ))
        versions = model.get("modelVersions") if isinstance(model, dict) else None
        if not versions:
            raise WeightsNotFound(f"{what} has no versions")
        if source.version_id is None:
            version = versions[0]
        else:
            version = next((v for v in versions if v.get("id") == source.version_id), None)
            if version is None:
                ids = ", ".join(str(v.get("id")) for v in versions[:10])
                raise WeightsNotFound(f"{what} has no version {source.version_id} (its versions: {ids})")
        files = [
            f for f in version.get("files", []) if (f.get("metadata") or {}).get("format") == "SafeTensor"
        ]
        if not files:
            raise NotALoraError(f"{what} (version {version.get('id')}) has no SafeTensor file; "
                                "pickle checkpoints are never loaded")
        chosen = next((f for f in files if f.get("primary")), None) or next(
            (f for f in files if f.get("type") == "Model"), files[0])
        url = chosen.get("downloadUrl") or f"{base}/api/download/models/{version['id']}"
        return _civitai_download(url, f"{what} version {version.get('id')}", version.get("id"), source.token)


class Data(Provider):
    """A `data:[<type>][;base64],<data>` URI: the payload is in the reference itself."""

    def describe(self, source: DataUri) -> str:
        return "the data: URI"

    def shown(self, ref: str, source: DataUri) -> str:
        return source.uri[:40] + ("..." if len(source.uri) > 40 else "")

    def produce(self, source: DataUri, fetch: Fetch, staged: Path) -> Path:
        if len(source.uri.partition(",")[2]) > fetch.max_bytes * 4 // 3 + 4:
            raise WeightsTooLarge(f"the data: URI is over the {fetch.max_bytes}-byte limit")
        try:
            payload = data_uri_bytes(source.uri)
        except ValueError as exc:
            raise NotALoraError(str(exc)) from None
        dest = staged / "payload"
        dest.write_bytes(payload)
        return dest


class Local(Provider):
    """A file on this machine: a .safetensors is used in place; an archive is extracted into the cache,
    keyed by its identity on disk."""

    reads_disk = True

    def describe(self, source: LocalFile) -> str:
        return f"local file {source.path!r}"

    def shown(self, ref: str, source: LocalFile) -> str:
        return source.path

    def key(self, source: LocalFile) -> str:
        path = Path(source.path).expanduser().resolve()
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise WeightsNotFound(f"local LoRA file {source.path!r} does not exist") from None
        return f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}"

    def in_place(self, source: LocalFile) -> Path | None:
        if source.path.lower().endswith((".tar", ".tar.gz", ".tgz")):
            return None
        path = Path(source.path).expanduser()
        if not path.is_file():
            raise WeightsNotFound(f"local LoRA file {source.path!r} does not exist")
        return path

    def produce(self, source: LocalFile, fetch: Fetch, staged: Path) -> Path:
        return Path(source.path).expanduser()


_PROVIDERS: dict[type, Provider] = {
    ReplicateRef: Replicate(),
    HuggingFaceRef: HuggingFace(),
    CivitaiModelRef: CivitaiModel(),
    CivitaiVersionRef: CivitaiVersion(),
    refs.ReplicateDeliveryUrl: Provider(),
    refs.HttpUrl: Provider(),
    DataUri: Data(),
    LocalFile: Local(),
}


def provider(source: Source) -> Provider:
    """The one registry: which provider knows this kind of source."""
    return _PROVIDERS[type(source)]


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _civitai_auth(url_token: str | None) -> dict[str, str]:
    """CIVITAI_API_TOKEN, else the `?token=` the user put in the reference: always a header, never the URL."""
    return _bearer(Settings.token("CIVITAI_API_TOKEN")) or _bearer(url_token)


def _civitai_download(url: str, what: str, version_id: object, url_token: str | None = None) -> Target:
    return Target(
        url, what, _civitai_auth(url_token),
        auth_hint="this CivitAI model needs a login: set CIVITAI_API_TOKEN to your API key",
        not_found_hint=(
            f"{version_id} is not a CivitAI model version id; "
            f"if it is a model id, use civitai.com/models/{version_id}"
        ),
    )
