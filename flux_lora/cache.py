"""The LoRA weight cache: resolve a reference, download it once, verify it, keep it, evict by LRU.

Layout of the cache directory (shared by every process and thread that uses it):

    index.json            {cache_key: {ref, file, size, created, last_used}}: the LRU index, on disk
    index.lock            guards index.json (a file lock: processes and threads alike)
    files/<hash>.safetensors   verified LoRA files, one per cache key
    locks/<hash>.lock     one per cache key: held while that key downloads, so it downloads once
    tmp/<hash>.*          downloads in progress; renamed into files/ only after verification

A crash mid-download leaves only a tmp file, removed by the next fetch of that key, by `clear`, or
once it is an hour old and its key unlocked, whenever a cache opens or makes room; the index never
names a file that was not verified.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

from filelock import FileLock, Timeout

from flux_lora import triggers
from flux_lora.errors import (
    LocalFileRefused,
    NotALoraError,
    WeightsAuthError,
    WeightsError,
    WeightsNotFound,
    WeightsTooLarge,
    WeightsUnreachable,
)
from flux_lora.http import Downloader, DownloadPolicy, Target
from flux_lora.hub import HubFailure, hub_failure
from flux_lora.refs import (
    CivitaiModelRef,
    CivitaiVersionRef,
    DataUri,
    HttpUrl,
    HuggingFaceRef,
    LocalFile,
    ReplicateDeliveryUrl,
    ReplicateRef,
    Source,
    parse_ref,
    redact_url,
)
from flux_lora.settings import Settings
from flux_lora.weightfile import (
    choose_lora,
    extract_lora_from_tar,
    file_kind,
    verify_lora_file,
)

log = logging.getLogger(__name__)

__all__ = ["CacheEntry", "WeightCache", "WeightsError"]

STALE_TMP_SECONDS = 3600  # a partial download untouched this long, its key unlocked, was left by a crash


@dataclass(frozen=True)
class CacheEntry:
    """One cached, verified LoRA file."""

    key: str
    ref: str
    path: Path
    size: int
    created: float
    last_used: float


def _env_url(name: str, default: str) -> str:
    return (os.environ.get(name) or default).rstrip("/")


class WeightCache:
    """Turns LoRA references into verified local `.safetensors` files, cached on disk under LRU."""

    def __init__(self, root: Path, policy: DownloadPolicy, max_bytes: int, min_free_bytes: int,
                 local_dirs: Sequence[Path] = (), recheck_seconds: float = 0.0) -> None:
        self.root = Path(root)
        # Unversioned references are re-pinned (one small request) at most this often: a server that
        # gets the same `owner/model` on every prediction does not pay a round trip each time.
        self.recheck_seconds = recheck_seconds
        self._checked: dict[str, float] = {}  # cache key -> when its reference was last re-pinned (to index)
        self.policy = policy
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.local_dirs = tuple(Path(d).expanduser().resolve() for d in local_dirs)
        self.downloader = Downloader(policy)
        for sub in ("files", "locks", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._index_lock = FileLock(self.root / "index.lock")
        self._clean_stale_tmp()

    @classmethod
    def from_settings(cls, settings: Settings) -> WeightCache:
        return cls(settings.cache_dir, DownloadPolicy.from_settings(settings), settings.cache_max_bytes,
                   settings.cache_min_free_bytes,
                   settings.local_lora_dirs, settings.ref_recheck_seconds)

    # --- public API -------------------------------------------------------------------------------------

    def fetch(self, ref: str, allow_local: bool = False) -> Path:
        """The verified local `.safetensors` for `ref`: from the cache, or downloaded once and cached.

        Local paths and file:// URLs are read only with `allow_local` (COG_WEIGHTS, the command line) or
        when under a FLUX_LORA_LOCAL_LORA_DIRS folder: a request must not make the server read its disk.
        """
        source = parse_ref(ref)
        if isinstance(source, LocalFile) and not allow_local:
            self._check_local(source)
        if isinstance(source, LocalFile) and not _is_archive_path(source.path):
            path = Path(source.path).expanduser()
            if not path.is_file():
                raise WeightsNotFound(f"local LoRA file {source.path!r} does not exist")
            verify_lora_file(path, f"local file {source.path!r}")
            return path
        recent = self._recently_pinned(source.cache_key)
        if recent is not None:
            return recent
        try:
            pinned = self._pin(source)
        except WeightsUnreachable as exc:
            fallback = self._latest_for(source.cache_key)
            if fallback is None:
                raise
            log.warning("%s; serving the copy cached earlier, which may not be the newest version", exc)
            return fallback
        alias = source.cache_key if pinned != source else None
        source = pinned
        key = _key_of(source)
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        hit = self._touch(key)
        if hit is not None:
            return hit
        with FileLock(self.root / "locks" / f"{digest}.lock"):
            hit = self._touch(key)  # another process or thread may have finished it while we waited
            if hit is not None:
                return hit
            for stale in (self.root / "tmp").glob(f"{digest}.*"):  # left by a crash: we hold the key's lock
                shutil.rmtree(stale, ignore_errors=True)
            final = self.root / "files" / f"{digest}.safetensors"
            staged = self.root / "tmp" / f"{digest}.{os.getpid()}.{uuid.uuid4().hex}"
            try:
                self._make_room(0)
                words = self._produce(source, staged)
                os.replace(staged / "lora.safetensors", final)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            self._add(key, _shown_ref(ref, source), final, alias, words)
            return final

    def _pin(self, source: Source) -> Source:
        """An unversioned reference pinned to what it names right now (one small request), so that a newly
        pushed version is a new cache key, while an unchanged one is a hit without downloading."""
        pinned = self._resolve_pin(source)
        if pinned != source:  # the check's time goes in the index once the file is there (`_add`, `_touch`)
            self._checked[_key_of(pinned)] = time.time()
        return pinned

    def _recently_pinned(self, alias: str) -> Path | None:
        """The file an unversioned reference was pinned to by a check less than `recheck_seconds` ago, by any
        process or replica sharing this cache (the time of the check is kept in the index), or None."""
        if self.recheck_seconds <= 0:
            return None
        with self._index_lock:
            index = self._read_index()
        now = time.time()
        fresh = [
            k for k, v in index.items() if v.get("alias") == alias and now - v.get("checked", 0) < self.recheck_seconds
        ]
        return self._touch(max(fresh, key=lambda k: index[k]["checked"])) if fresh else None

    def _resolve_pin(self, source: Source) -> Source:
        if isinstance(source, ReplicateRef) and source.version is None:
            location = self.downloader.locate(self._target(source))  # `_weights` redirects to the latest file
            return replace(source, weights_url=location) if location else source
        if isinstance(source, HuggingFaceRef) and not re.fullmatch(r"[0-9a-f]{40}", source.revision or ""):
            from huggingface_hub import HfApi

            endpoint, token = _hub_access()
            try:
                sha = HfApi(endpoint=endpoint, token=token).model_info(source.repo, revision=source.revision).sha
            except Exception as exc:
                failure = hub_failure(exc)
                if failure is None:
                    raise
                raise _hub_error(failure, _describe(source), source, source.filename, token) from None
            return replace(source, revision=sha) if sha else source
        return source

    def _latest_for(self, alias: str) -> Path | None:
        """The newest cached file an unversioned reference was pinned to, for when its source is unreachable."""
        with self._index_lock:
            index = self._read_index()
        keys = [k for k, v in index.items() if v.get("alias") == alias]
        return self._touch(max(keys, key=lambda k: index[k]["created"])) if keys else None

    def _check_local(self, source: LocalFile) -> None:
        """Refuse a local path outside the allowed folders, before touching it (its existence stays unknown)."""
        path = Path(source.path).expanduser().resolve()  # symlinks and `..` resolved: no way out of a folder
        if any(path.is_relative_to(folder) for folder in self.local_dirs):
            return
        where = "" if not self.local_dirs else " outside FLUX_LORA_LOCAL_LORA_DIRS"
        raise LocalFileRefused(
            f"local file paths{where} are not accepted here; give a URL, a Replicate, Hugging Face or CivitAI "
            "reference, or a data: URI"
        )

    def trigger_words(self, path: Path) -> list[str]:
        """The trigger words of a LoRA `fetch` returned: kept in the index at download time for cached files
        (entries cached before this was kept have none), read from the header for a local file."""
        path = Path(path)
        if path.parent == self.root / "files":
            with self._index_lock:
                index = self._read_index()
            return next((list(v.get("trigger_words", [])) for v in index.values() if v["file"] == path.name), [])
        try:
            return triggers.from_metadata(verify_lora_file(path, str(path)).metadata)
        except WeightsError:
            return []

    def entries(self) -> list[CacheEntry]:
        """The cached files, most recently used first."""
        with self._index_lock:
            index = self._read_index()
        return sorted(
            (self._entry(key, value) for key, value in index.items()),
            key=lambda e: e.last_used,
            reverse=True,
        )

    def clear(self) -> int:
        """Remove every cached file (and leftover partial downloads); return how many files were removed."""
        with self._index_lock:
            index = self._read_index()
            removed = 0
            for value in index.values():
                path = self.root / "files" / value["file"]
                if path.exists():
                    path.unlink()
                    removed += 1
            for orphan in (self.root / "files").iterdir():
                orphan.unlink(missing_ok=True)
            for leftover in (self.root / "tmp").iterdir():
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
            self._write_index({})
        return removed

    # --- index ------------------------------------------------------------------------------------------

    def _read_index(self) -> dict[str, dict]:
        try:
            data = json.loads((self.root / "index.json").read_text())
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("LoRA cache index %s is corrupt; starting a new one", self.root / "index.json")
            return {}
        return data if isinstance(data, dict) else {}

    def _write_index(self, index: dict[str, dict]) -> None:
        tmp = self.root / f"index.json.{os.getpid()}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        os.replace(tmp, self.root / "index.json")

    def _entry(self, key: str, value: dict) -> CacheEntry:
        return CacheEntry(key, value["ref"], self.root / "files" / value["file"], value["size"],
                          value["created"], value["last_used"])

    def _touch(self, key: str) -> Path | None:
        """The cached path of `key` after marking it used, or None (dropping an entry whose file is gone)."""
        with self._index_lock:
            index = self._read_index()
            value = index.get(key)
            if value is None:
                return None
            path = self.root / "files" / value["file"]
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = -1
            if size != value["size"]:
                log.warning("cached LoRA %s is missing or changed on disk; fetching it again", value["ref"])
                del index[key]
                path.unlink(missing_ok=True)
                self._write_index(index)
                return None
            value["last_used"] = time.time()
            if key in self._checked:
                value["checked"] = self._checked.pop(key)
            self._write_index(index)
            log.info("LoRA %s: cached at %s", value["ref"], path)
            return path

    def _add(self, key: str, ref: str, path: Path, alias: str | None = None, words: Sequence[str] = ()) -> None:
        """Index a verified file; `alias` is the unversioned key it was pinned from (see `_latest_for`), `words`
        the trigger words read at download time."""
        now = time.time()
        with self._index_lock:
            index = self._read_index()
            index[key] = {"ref": ref, "file": path.name, "size": path.stat().st_size, "created": now,
                          "last_used": now}
            if words:
                index[key]["trigger_words"] = list(words)
            if alias is not None:
                index[key]["alias"] = alias
                index[key]["checked"] = self._checked.pop(key, now)
            self._write_index(index)
            self._evict(index, keep=key)

    # --- eviction ---------------------------------------------------------------------------------------

    def _free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def _make_room(self, incoming: int) -> None:
        self._clean_stale_tmp()
        with self._index_lock:
            self._evict(self._read_index(), keep=None, incoming=incoming)

    def _clean_stale_tmp(self) -> None:
        """Remove partial downloads a crashed process left (older than STALE_TMP_SECONDS, key not locked):
        they take disk space the byte budget does not see."""
        cutoff = time.time() - STALE_TMP_SECONDS
        for leftover in (self.root / "tmp").iterdir():
            try:
                if leftover.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            lock = FileLock(self.root / "locks" / f"{leftover.name.split('.')[0]}.lock", timeout=0)
            try:
                with lock:  # held by a live download of that key: not stale, just slow
                    if leftover.is_dir():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)
            except Timeout:
                continue
            log.info("removed a stale partial download %s from the LoRA cache", leftover.name)

    def _evict(self, index: dict[str, dict], keep: str | None, incoming: int = 0) -> None:
        """Drop least-recently-used entries until under the byte budget and above the free-disk floor.

        Called with the index lock held. `keep` (the entry just added) is never evicted.
        """
        by_age = sorted((k for k in index if k != keep), key=lambda k: index[k]["last_used"])
        total = sum(v["size"] for v in index.values()) + incoming
        changed = False
        while by_age and (total > self.max_bytes or self._free_bytes() - incoming < self.min_free_bytes):
            victim = by_age.pop(0)
            value = index.pop(victim)
            (self.root / "files" / value["file"]).unlink(missing_ok=True)
            total -= value["size"]
            changed = True
            log.info("evicted LoRA %s (%d bytes) from the cache", value["ref"], value["size"])
        if changed:
            self._write_index(index)

    # --- producing a verified file ------------------------------------------------------------------

    def _produce(self, source: Source, staged: Path) -> list[str]:
        """Leave the verified LoRA for `source` at `staged/lora.safetensors`; return its trigger words."""
        staged.mkdir(parents=True)
        out = staged / "lora.safetensors"
        what = _describe(source)
        words: list[str] = []
        if isinstance(source, HuggingFaceRef):
            self._from_hub(source, staged, out)
        elif isinstance(source, DataUri):
            words = self._unpack(_decode_data_uri(source.uri, self.policy.max_bytes, staged / "payload"), out, what)
        elif isinstance(source, LocalFile):
            words = self._unpack(Path(source.path).expanduser(), out, what)
        else:
            payload = staged / "payload"
            self.downloader.download(self._target(source), payload)
            words = self._unpack(payload, out, what)
        header = verify_lora_file(out, what)
        return list(dict.fromkeys([*words, *triggers.from_metadata(header.metadata)]))

    def _unpack(self, payload: Path, out: Path, what: str) -> list[str]:
        """Move a safetensors payload to `out`, or extract the LoRA from a tar/tar.gz payload into it; the
        trigger words of an archive's training config."""
        kind = file_kind(payload)
        if kind in ("tar", "gzip"):
            name, words = extract_lora_from_tar(payload, out, self.policy.max_bytes, what)
            log.info("%s: using %s from the archive", what, name)
            verify_lora_file(out, f"{what} ({name})")
            return words
        else:
            verify_lora_file(payload, what)
            if payload.parent == out.parent:
                os.replace(payload, out)
            else:  # a local file of the user's: copied, never moved
                shutil.copyfile(payload, out)
            return []

    def _target(self, source: Source) -> Target:
        """Where a Replicate, CivitAI or plain URL source downloads from."""
        what = _describe(source)
        if isinstance(source, ReplicateRef):
            base = _env_url("FLUX_LORA_REPLICATE_URL", "https://replicate.com")
            version = f"/versions/{source.version}" if source.version else ""
            path = f"/{source.owner}/{source.model}{version}"
            url = source.weights_url or f"{base}{path}/_weights"
            same_origin = urlsplit(url)[:2] == urlsplit(base)[:2]  # the token goes to Replicate only
            return Target(
                url, what, _bearer("REPLICATE_API_TOKEN") if same_origin else {},
                auth_hint="set REPLICATE_API_TOKEN to a token that can read this model",
                not_found_hint="check the owner, model and version names",
            )
        if isinstance(source, CivitaiModelRef):
            return self._civitai_model(source)
        if isinstance(source, CivitaiVersionRef):
            base = _env_url("FLUX_LORA_CIVITAI_URL", "https://civitai.com")
            url = f"{base}/api/download/models/{source.version_id}"
            return _civitai_download(url, what, source.version_id, source.token)
        if isinstance(source, ReplicateDeliveryUrl | HttpUrl):
            return Target(
                source.url, what, auth_hint="the URL may need a signature, or its signature expired",
                not_found_hint="check the URL",
            )
        raise AssertionError(f"no download target for {source!r}")

    def _civitai_model(self, source: CivitaiModelRef) -> Target:
        """Resolve a model id (not a version id) to its version's primary SafeTensor file."""
        base = _env_url("FLUX_LORA_CIVITAI_URL", "https://civitai.com")
        what = _describe(source)
        model = self.downloader.get_json(Target(
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

    def _from_hub(self, source: HuggingFaceRef, staged: Path, out: Path) -> None:
        """Download through huggingface_hub (HF_ENDPOINT, HF_TOKEN), choosing the file if not named."""
        from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url

        endpoint, token = _hub_access()
        what = _describe(source)
        api = HfApi(endpoint=endpoint, token=token)
        filename = source.filename
        try:
            sizes: dict[str, int | None] = {}
            if filename is None:
                files = [
                    f for f in api.list_repo_tree(source.repo, revision=source.revision, recursive=True)
                    if hasattr(f, "size")
                ]
                sizes = {f.path: f.size for f in files}

                def names_of(path: str) -> list[str] | None:
                    meta = api.parse_safetensors_file_metadata(source.repo, path, revision=source.revision)
                    return list(meta.tensors)

                filename = choose_lora(list(sizes), names_of, what)
                log.info("%s: using %s", what, filename)
            else:  # a named file: its size from a HEAD request, so the cap holds before any byte is fetched
                url = hf_hub_url(source.repo, filename, revision=source.revision, endpoint=endpoint)
                sizes[filename] = get_hf_file_metadata(url, token=token, endpoint=endpoint).size
            size = sizes.get(filename)
            if size is not None and size > self.policy.max_bytes:
                raise WeightsTooLarge(
                    f"{what}: {filename} is {size} bytes, over the {self.policy.max_bytes}-byte limit "
                    "(FLUX_LORA_MAX_DOWNLOAD_BYTES)"
                )
            local = hf_hub_download(
                source.repo, filename, revision=source.revision, local_dir=staged / "hub", endpoint=endpoint,
                token=token,
            )
        except Exception as exc:
            failure = hub_failure(exc)
            if failure is None:
                raise
            raise _hub_error(failure, what, source, filename, token) from None
        os.replace(local, out)


# --- helpers ---------------------------------------------------------------------------------------------


def _hub_access() -> tuple[str | None, str | None]:
    """The Hub endpoint and token (HF_ENDPOINT, HF_TOKEN), read at each call."""
    return os.environ.get("HF_ENDPOINT") or None, os.environ.get("HF_TOKEN") or None


def _hub_error(failure: HubFailure, what: str, source: HuggingFaceRef, filename: str | None,
               token: str | None) -> WeightsError:
    """The user's error for a failed Hub call on a LoRA reference."""
    if failure.kind == "gated":
        return WeightsAuthError(f"{what} is gated: accept its terms on the Hub and set HF_TOKEN")
    if failure.kind == "repo":
        hint = "" if token else "; if it is private or gated, set HF_TOKEN"
        return WeightsNotFound(f"{what}: repository not found{hint}")
    if failure.kind == "revision":
        return WeightsNotFound(f"{what}: revision {source.revision!r} not found")
    if failure.kind == "entry":
        return WeightsNotFound(f"{what}: file {filename!r} not found in the repository")
    if failure.kind == "denied":
        return WeightsAuthError(f"{what}: access denied (HTTP {failure.status}); set HF_TOKEN")
    if failure.kind == "unreachable":
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        return WeightsUnreachable(f"{what}: cannot reach the Hub at {endpoint} ({failure.detail})")
    if failure.kind == "http":
        return WeightsError(f"{what}: the Hub answered HTTP {failure.status}")
    return WeightsError(f"{what}: download failed ({failure.detail})")


def _bearer(env: str) -> dict[str, str]:
    token = os.environ.get(env)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _civitai_auth(url_token: str | None) -> dict[str, str]:
    """CIVITAI_API_TOKEN, else the `?token=` the user put in the reference: always a header, never the URL."""
    headers = _bearer("CIVITAI_API_TOKEN")
    return headers or ({"Authorization": f"Bearer {url_token}"} if url_token else {})


def _civitai_download(url: str, what: str, version_id: object, url_token: str | None = None) -> Target:
    return Target(
        url, what, _civitai_auth(url_token),
        auth_hint="this CivitAI model needs a login: set CIVITAI_API_TOKEN to your API key",
        not_found_hint=(
            f"{version_id} is not a CivitAI model version id; "
            f"if it is a model id, use civitai.com/models/{version_id}"
        ),
    )


def _key_of(source: Source) -> str:
    if isinstance(source, LocalFile):  # an archive: keyed by its content's identity on disk
        path = Path(source.path).expanduser().resolve()
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise WeightsNotFound(f"local LoRA file {source.path!r} does not exist") from None
        return f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}"
    return source.cache_key


def _is_archive_path(path: str) -> bool:
    return path.lower().endswith((".tar", ".tar.gz", ".tgz"))


def _describe(source: Source) -> str:
    """How messages name a source: never with a query string or token."""
    if isinstance(source, ReplicateRef):
        version = f" version {source.version}" if source.version else ""
        return f"Replicate model {source.owner}/{source.model}{version}"
    if isinstance(source, HuggingFaceRef):
        return f"huggingface.co/{source.repo}" + (f"/{source.filename}" if source.filename else "")
    if isinstance(source, CivitaiModelRef):
        return f"CivitAI model {source.model_id}"
    if isinstance(source, CivitaiVersionRef):
        return f"CivitAI model version {source.version_id}"
    if isinstance(source, ReplicateDeliveryUrl | HttpUrl):
        return redact_url(source.url)
    if isinstance(source, DataUri):
        return "the data: URI"
    return f"local file {source.path!r}"


def _shown_ref(ref: str, source: Source) -> str:
    """The reference as the index, `weights list` and logs show it: never a query string (tokens live there)."""
    if isinstance(source, DataUri):
        return source.uri[:40] + ("..." if len(source.uri) > 40 else "")
    if isinstance(source, LocalFile):
        return source.path
    return redact_url(ref.strip())


def _decode_data_uri(uri: str, max_bytes: int, dest: Path) -> Path:
    """Write the payload of a `data:[<type>][;base64],<data>` URI to `dest`."""
    header, sep, data = uri.partition(",")
    if not sep:
        raise NotALoraError("the data: URI has no ',' before its payload")
    if len(data) > max_bytes * 4 // 3 + 4:
        raise WeightsTooLarge(f"the data: URI is over the {max_bytes}-byte limit")
    try:
        payload = base64.b64decode(data, validate=False) if header.endswith(";base64") else unquote_to_bytes(data)
    except ValueError:
        raise NotALoraError("the data: URI is not valid base64") from None
    dest.write_bytes(payload)
    return dest
