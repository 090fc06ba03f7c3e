"""Parse a LoRA reference (`replicate_weights`, `extra_lora`, `COG_WEIGHTS`) into a typed source.

Pure rules: no network, no filesystem, no torch. Each accepted form becomes one small frozen
dataclass; the cache resolves it. `cache_key` is stable across processes and never holds a URL's
query string in clear (signed URLs carry credentials), only its hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from urllib.parse import parse_qs, unquote, unquote_to_bytes, urlsplit, urlunsplit

from flux_lora.errors import UserError

ACCEPTED_FORMS = (
    "a Replicate model (owner/model, owner/model/version, owner/model/versions/version, or the same "
    "behind https://replicate.com/), a https://replicate.delivery/... .tar URL, "
    "huggingface.co/owner/repo[/file.safetensors] (also .../resolve/<rev>/<path> and .../blob/<rev>/<path>), "
    "civitai.com/models/<id>[/<slug>][?modelVersionId=<v>], civitai.com/api/download/models/<versionId>, "
    "an http(s) URL to a .safetensors, .tar or .tar.gz file, a data: URI, or a local file path"
)
_FILE_SUFFIXES = (".safetensors", ".tar", ".tar.gz", ".tgz")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_REPLICATE = re.compile(rf"({_NAME})/({_NAME})(?:/(?:versions/)?([A-Za-z0-9]+))?/?")
_REPLICATE_HOSTS = {"replicate.com", "www.replicate.com"}
_HF_HOSTS = {"huggingface.co", "www.huggingface.co", "hf.co"}
_CIVITAI_HOSTS = {"civitai.com", "www.civitai.com"}
_BARE_HOSTS = tuple(sorted(_REPLICATE_HOSTS | _HF_HOSTS | _CIVITAI_HOSTS | {"replicate.delivery"}))


class RefError(UserError):
    """The text is not a LoRA reference this server understands."""


def _query_hash(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16] if query else ""


def redact_url(url: str) -> str:
    """The URL without its query string or credentials: safe to log and to show in errors."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:  # a malformed host or port: cut by hand rather than show it whole
        head = re.split(r"[?#]", url, maxsplit=1)[0]
        return re.sub(r"//[^/]*@", "//", head) + ("?…" if head != url else "")
    return urlunsplit((parts.scheme, host, parts.path, "…" if parts.query else "", ""))


def shown(ref: str) -> str:
    """A reference as logs and errors may show it: no query strings, credentials or data: payloads."""
    if ref.startswith("data:"):
        return f"data: URI ({len(ref)} characters)"
    return redact_url(ref)


@dataclass(frozen=True)
class ReplicateRef:
    """A Replicate model; its weights come from `{replicate}/{owner}/{model}[/versions/{v}]/_weights`."""

    owner: str
    model: str
    version: str | None = None
    weights_url: str | None = None  # where `_weights` redirected when resolved (the latest version's file)

    @property
    def cache_key(self) -> str:
        key = f"replicate:{self.owner}/{self.model}" + (f"/versions/{self.version}" if self.version else "")
        return key + (f"@{redact_url(self.weights_url).removesuffix('?…')}" if self.weights_url else "")


@dataclass(frozen=True)
class ReplicateDeliveryUrl:
    """A tar (or safetensors) served by Replicate's delivery CDN."""

    url: str

    @property
    def cache_key(self) -> str:
        return _url_key("replicate-delivery", self.url)


@dataclass(frozen=True)
class HuggingFaceRef:
    """A Hub model repo, at a revision, optionally naming the file (else the selection rule picks it)."""

    repo: str
    revision: str | None = None
    filename: str | None = None

    @property
    def cache_key(self) -> str:
        return f"hf:{self.repo}@{self.revision or 'main'}" + (f"/{self.filename}" if self.filename else "")


@dataclass(frozen=True)
class CivitaiModelRef:
    """A CivitAI model page: its id is a *model* id, resolved to a version through the API."""

    model_id: int
    version_id: int | None = None
    token: str | None = field(default=None, repr=False, compare=False)  # from a `?token=` in the URL

    @property
    def cache_key(self) -> str:
        return f"civitai:model/{self.model_id}" + (f"/version/{self.version_id}" if self.version_id else "")


@dataclass(frozen=True)
class CivitaiVersionRef:
    """A CivitAI model *version*, downloaded through `/api/download/models/<versionId>`."""

    version_id: int
    token: str | None = field(default=None, repr=False, compare=False)  # from a `?token=` in the URL

    @property
    def cache_key(self) -> str:
        return f"civitai:version/{self.version_id}"


@dataclass(frozen=True)
class HttpUrl:
    """Any other http(s) URL; the query string is kept (signed URLs need it) but not in the key."""

    url: str

    @property
    def cache_key(self) -> str:
        return _url_key("url", self.url)


@dataclass(frozen=True)
class DataUri:
    """A `data:` URI holding a safetensors file or a tar of one."""

    uri: str

    @property
    def cache_key(self) -> str:
        return "data:sha256:" + hashlib.sha256(self.uri.encode()).hexdigest()


def data_uri_bytes(uri: str) -> bytes:
    """The payload of a `data:[<type>][;base64],<data>` URI, decoded as urllib (and so cog) decodes one; a
    ValueError says in words what is wrong with it."""
    header, sep, data = uri.partition(":")[2].partition(",")
    if not sep:
        raise ValueError("the data: URI has no ',' before its payload")
    payload = unquote_to_bytes(data)
    if not header.endswith(";base64"):
        return payload
    try:
        return base64.decodebytes(payload)
    except binascii.Error:
        raise ValueError("the data: URI is not valid base64 (cut short or mis-copied?)") from None


@dataclass(frozen=True)
class LocalFile:
    """A file on this machine (a .safetensors is used in place; an archive is extracted to the cache)."""

    path: str

    @property
    def cache_key(self) -> str:
        return f"file:{self.path}"


Source = (
    ReplicateRef | ReplicateDeliveryUrl | HuggingFaceRef | CivitaiModelRef | CivitaiVersionRef | HttpUrl
    | DataUri | LocalFile
)


def _url_key(kind: str, url: str) -> str:
    parts = urlsplit(url)
    query = _query_hash(parts.query)
    return f"{kind}:{redact_url(url).removesuffix('?…')}" + (f"?sha256={query}" if query else "")


def _error(text: str, why: str = "") -> RefError:
    shown = redact_url(text.strip())  # what the user typed, minus any token or password in it
    shown = shown if len(shown) <= 120 else shown[:117] + "..."
    return RefError(f"unrecognised LoRA reference {shown!r}{why}; accepted: {ACCEPTED_FORMS}")


def parse_ref(text: str) -> Source:
    """The typed source `text` refers to, or RefError with one message listing the accepted forms."""
    ref = text.strip()
    if not ref:
        raise _error(text, " (empty)")
    if ref.startswith("data:"):
        return DataUri(ref)
    if ref.startswith("file://"):
        return LocalFile(unquote(urlsplit(ref).path))
    lowered = ref.lower()
    if lowered.startswith(_BARE_HOSTS) and lowered.split("/", 1)[0] in _BARE_HOSTS:
        ref = "https://" + ref
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", ref):
        try:
            return _parse_url(ref, text)
        except ValueError:  # urllib: a malformed host or port
            raise _error(text, " (malformed URL)") from None
    if ref.startswith(("/", "./", "../", "~")) or lowered.endswith(_FILE_SUFFIXES):
        return LocalFile(ref)
    match = _REPLICATE.fullmatch(ref)
    if match:
        return ReplicateRef(match.group(1), match.group(2), match.group(3))
    raise _error(text)


def _parse_url(url: str, text: str) -> Source:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise _error(text, f" (scheme {parts.scheme!r} is not http or https)")
    host = (parts.hostname or "").lower()
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if host in _REPLICATE_HOSTS:
        match = _REPLICATE.fullmatch("/".join(s for s in segments if s != "_weights"))
        if match:
            return ReplicateRef(match.group(1), match.group(2), match.group(3))
        raise _error(text, " (a Replicate URL names owner/model[/versions/version])")
    if host == "replicate.delivery" or host.endswith(".replicate.delivery"):
        return ReplicateDeliveryUrl(url)
    if host in _HF_HOSTS:
        return _parse_hf(segments, text)
    if host in _CIVITAI_HOSTS:
        return _parse_civitai(segments, parts.query, text)
    if PurePosixPath(parts.path).suffix.lower() in PICKLE_SUFFIXES:
        suffix = PurePosixPath(parts.path).suffix
        raise RefError(
            f"LoRA reference {redact_url(url)!r} is a pickle checkpoint ({suffix}); "
            "only .safetensors files (or .tar archives of one) are accepted, pickles are never loaded"
        )
    return HttpUrl(url)


def _parse_hf(segments: list[str], text: str) -> HuggingFaceRef:
    if segments[:1] in (["datasets"], ["spaces"]):
        raise _error(text, " (only Hugging Face model repos hold LoRAs here)")
    if len(segments) < 2:
        raise _error(text, " (a Hugging Face reference names owner/repo)")
    repo = f"{segments[0]}/{segments[1]}"
    rest = segments[2:]
    if not rest:
        return HuggingFaceRef(repo)
    if rest[0] in ("resolve", "blob", "tree") and len(rest) >= 2:
        path = "/".join(rest[2:]) or None
        if rest[0] != "tree" and path is None:
            raise _error(text, " (a resolve/blob URL names a file)")
        return HuggingFaceRef(repo, rest[1], path if rest[0] != "tree" else None)
    path = "/".join(rest)
    if not path.lower().endswith(".safetensors"):
        raise _error(text, " (a Hugging Face file must be a .safetensors)")
    return HuggingFaceRef(repo, None, path)


def _parse_civitai(segments: list[str], query: str, text: str) -> CivitaiModelRef | CivitaiVersionRef:
    params = parse_qs(query)
    token = params.get("token", [""])[0] or None  # an API key pasted into the URL: sent as a header
    if len(segments) >= 2 and segments[0] == "models" and segments[1].isdigit():
        version = params.get("modelVersionId", [""])[0]
        if version and not version.isdigit():
            raise _error(text, " (modelVersionId must be a number)")
        return CivitaiModelRef(int(segments[1]), int(version) if version else None, token)
    if segments[:3] == ["api", "download", "models"] and len(segments) == 4 and segments[3].isdigit():
        return CivitaiVersionRef(int(segments[3]), token)
    raise _error(text, " (use civitai.com/models/<id> or civitai.com/api/download/models/<id>)")
