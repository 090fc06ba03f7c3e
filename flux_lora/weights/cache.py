"""The LoRA weight cache: resolve a reference, download it once, verify it, keep it, evict by LRU.

Layout of the cache directory (shared by every process and thread that uses it):

    index.json            {cache_key: {ref, file, size, created, last_used, aliases}}: the LRU index, on disk
    index.lock            guards index.json (a file lock: processes and threads alike)
    files/<hash>.safetensors   verified LoRA files, one per cache key
    locks/<hash>.lock     one per cache key: held while that key downloads, so it downloads once
    tmp/<hash>.*          downloads in progress; renamed into files/ only after verification

A crash mid-download leaves only a tmp file, removed by the next fetch of that key, by `clear`, or
once it is an hour old and its key unlocked, whenever a cache opens or makes room; the index never
names a file that was not verified.

A path `fetch` returned stays loadable until that process has read it and calls `release`, whatever
any process evicts meanwhile: the process keeps a shared lock (flock) on each file it fetched, and
eviction skips a file someone holds (it goes at a later eviction). On NFSv4, Linux maps flock to
NFS byte-range locks, so replicas on a ReadWriteMany volume see each other's holds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from flux_lora import cancel
from flux_lora.lora import triggers
from flux_lora.errors import LocalFileRefused, WeightsError, WeightsUnreachable
from flux_lora.weights.http import Downloader, DownloadPolicy
from flux_lora.weights.refs import LocalFile, Source, parse_ref
from flux_lora.settings import Settings
from flux_lora.weights.sources import Fetch, provider
from flux_lora.weights.weightfile import extract_lora_from_tar, file_kind, verify_lora_file

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


def _aliases(value: dict) -> dict[str, float]:
    """An index entry's unversioned keys and when each was last pinned to it (an index written before entries
    could have several kept one, as `alias` and `checked`)."""
    aliases = dict(value.get("aliases", {}))
    if "alias" in value:
        aliases.setdefault(value["alias"], value.get("checked", 0))
    return aliases


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
        self._fetch = Fetch(self.downloader, policy.max_bytes)
        self.downloads = 0  # files this process downloaded into the cache (a prediction's timings read it)
        for sub in ("files", "locks", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._index_lock = FileLock(self.root / "index.lock")
        self._held: dict[Path, int] = {}  # path -> descriptor holding a shared lock on it, until `release`
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
        cancel.check()  # a prediction cancelled between its LoRAs fetches no more
        source, path = self._offline_checks(ref, allow_local)
        if path is not None:
            return path
        kind = provider(source)
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
        key = kind.key(source)
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        hit = self._touch(key, alias)
        if hit is not None:
            return hit
        with FileLock(self.root / "locks" / f"{digest}.lock"):
            hit = self._touch(key, alias)  # another process or thread may have finished it while we waited
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
                self.downloads += 1
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            self._hold(final)  # before it is indexed: no eviction anywhere can have chosen it yet
            self._add(key, kind.shown(ref, source), final, alias, words)
            return final

    def check(self, ref: str, allow_local: bool = False) -> None:
        """Raise what `fetch` would raise without going to the network or the cache: the reference's form,
        the local-file rule, a local .safetensors that is missing or not a LoRA. Seconds before a setup."""
        self._offline_checks(ref, allow_local)

    def _offline_checks(self, ref: str, allow_local: bool) -> tuple[Source, Path | None]:
        """The parsed reference, and the verified file to use in place when it is a local .safetensors."""
        source = parse_ref(ref)
        kind = provider(source)
        if kind.reads_disk and not allow_local:
            self._check_local(source)
        path = kind.in_place(source)
        if path is not None:
            verify_lora_file(path, kind.describe(source))
        return source, path

    def _pin(self, source: Source) -> Source:
        """An unversioned reference pinned to what it names right now (one small request), so that a newly
        pushed version is a new cache key, while an unchanged one is a hit without downloading."""
        kind = provider(source)
        pinned = kind.pin(source, self._fetch)
        if pinned != source:  # the check's time goes in the index once the file is there (`_add`, `_touch`)
            self._checked[kind.key(pinned)] = time.time()
        return pinned

    def _recently_pinned(self, alias: str) -> Path | None:
        """The file an unversioned reference was pinned to by a check less than `recheck_seconds` ago, by any
        process or replica sharing this cache (the time of the check is kept in the index), or None."""
        if self.recheck_seconds <= 0:
            return None
        with self._index_lock:
            index = self._read_index()
        now = time.time()
        checks = {k: t for k, v in index.items() if (t := _aliases(v).get(alias)) is not None}
        fresh = [k for k, t in checks.items() if now - t < self.recheck_seconds]
        return self._touch(max(fresh, key=checks.__getitem__)) if fresh else None

    def _latest_for(self, alias: str) -> Path | None:
        """The newest cached file an unversioned reference was pinned to, for when its source is unreachable."""
        with self._index_lock:
            index = self._read_index()
        keys = [k for k, v in index.items() if alias in _aliases(v)]
        return self._touch(max(keys, key=lambda k: index[k]["created"])) if keys else None

    def _check_local(self, source: LocalFile) -> None:
        """Refuse a local path outside the allowed folders, before touching it (its existence stays unknown)."""
        path = Path(source.path).expanduser().resolve()  # symlinks and `..` resolved: no way out of a folder
        if any(path.is_relative_to(folder) for folder in self.local_dirs):
            return
        where = "a folder in FLUX_LORA_LOCAL_LORA_DIRS" if self.local_dirs else "FLUX_LORA_LOCAL_LORA_DIRS"
        raise LocalFileRefused(
            f"local file paths are not accepted by the server unless {where} holds them; give a URL, "
            "a Replicate, Hugging Face or CivitAI reference, or a data: URI"
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

    def _touch(self, key: str, alias: str | None = None) -> Path | None:
        """The cached path of `key` after marking it used, or None (dropping an entry whose file is gone).
        `alias`: the unversioned key just pinned to it, recorded as for a download (`_add`)."""
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
            self._hold(path)  # under the index lock: no eviction is between its check and the hold
            value["last_used"] = time.time()
            self._link(value, key, alias)
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
            self._link(index[key], key, alias)
            self._write_index(index)
            self._evict(index, keep=key)

    def _link(self, value: dict, key: str, alias: str | None) -> None:
        """Record in an index entry that the unversioned key `alias` was just pinned to it (and when), whichever
        spelling brought the file in first: every alias it has serves it within the recheck interval and
        while its source is unreachable."""
        if alias is None:
            return
        aliases = _aliases(value)
        aliases[alias] = self._checked.pop(key, time.time())
        value.pop("alias", None)
        value.pop("checked", None)
        value["aliases"] = aliases

    # --- holds and eviction -----------------------------------------------------------------------------

    def release(self) -> None:
        """The files this process fetched have been read: eviction may take them now."""
        while self._held:
            os.close(self._held.popitem()[1])

    def _hold(self, path: Path) -> None:
        """Keep `path` loadable for this process until `release`: a shared lock on the file, which eviction in
        every process sharing the cache respects."""
        fd = self._held.pop(path, None)
        if fd is not None and os.fstat(fd).st_ino != path.stat().st_ino:  # evicted, then fetched again
            os.close(fd)
            fd = None
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)
        self._held[path] = fd

    @staticmethod
    def _unlink_unless_held(path: Path) -> bool:
        """Remove `path` unless some process holds it (`_hold`); True when it is gone."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        else:
            path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

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
            value = index[victim]
            if not self._unlink_unless_held(self.root / "files" / value["file"]):
                log.info("LoRA %s is being read by a process: evicted later", value["ref"])
                continue
            del index[victim]
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
        kind = provider(source)
        what = kind.describe(source)
        words = self._unpack(kind.produce(source, self._fetch, staged), out, what)
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
            if payload.is_relative_to(out.parent):
                os.replace(payload, out)
            else:  # a local file of the user's: copied, never moved
                shutil.copyfile(payload, out)
            return []
