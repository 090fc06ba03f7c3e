"""Safe, fast HTTP downloads of weight files with requests.

- Every URL, and every redirect target, must resolve to a public address unless private ones are
  allowed (`FLUX_LORA_ALLOW_PRIVATE_URLS`: all of them, or listed host:port pairs): a reference cannot
  reach loopback, the LAN or a cloud metadata service. The connection then goes to the address that
  was checked (`flux_lora.weights.pinned`), never to a second DNS answer.
- Credentials travel in headers, only to the origin they were meant for (dropped on a redirect to
  another host), and URLs are shown without their query string: tokens never reach logs or errors.
- Files are fetched with parallel ranged requests when the server supports ranges, as one stream
  otherwise; transient failures (timeouts, resets, 429/5xx) are retried a bounded number of times
  with urllib3's `Retry` backoff (and a bounded Retry-After), resuming where the data stopped; a byte
  cap bounds every download.
- Progress: `flux_lora.weights.download_progress` (a tqdm bar on a terminal, log lines otherwise).
- A cancelled prediction (`flux_lora.cancel`) stops its download at once: each read returns what has
  arrived, a cancel shuts the socket under a read that waits on a stalled server, and a retry's wait
  ends with the cancel; the caller's `finally` removes the partial file.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import os
import re
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import HTTPError, MaxRetryError
from urllib3.util.retry import Retry

from flux_lora import cancel
from flux_lora.errors import (
    BlockedUrlError,
    NotALoraError,
    WeightsAuthError,
    WeightsError,
    WeightsNotFound,
    WeightsTooLarge,
    WeightsUnreachable,
    plain_reason,
)
from flux_lora.weights.download_progress import Progress
from flux_lora.weights.pinned import PinnedAdapter, host_port, pinned
from flux_lora.weights.refs import redact_url

if TYPE_CHECKING:
    from flux_lora.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK = 1 << 20
MAX_REDIRECTS = 10
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")  # also holds Alibaba's metadata address


@dataclass(frozen=True)
class DownloadPolicy:
    """Limits and tuning of downloads (from Settings)."""

    max_bytes: int = 2 * 1024**3
    connections: int = 8
    timeout: float = 60.0
    allow_private: bool = False
    retries: int = 4  # attempts after the first
    backoff: float = 0.5  # seconds, doubled per attempt (urllib3's Retry: the first retry goes at once)
    part_bytes: int = 16 * 1024**2  # smallest ranged part: smaller files go as one stream
    allow_hosts: frozenset[str] = frozenset()  # "host:port" pairs allowed although private

    @classmethod
    def from_settings(cls, settings: Settings) -> DownloadPolicy:
        return cls(max_bytes=settings.max_download_bytes, connections=settings.download_connections,
                   timeout=settings.download_timeout, allow_private=settings.allow_private_urls,
                   allow_hosts=frozenset(settings.private_url_exceptions))


@dataclass(frozen=True)
class Target:
    """What to fetch and how to talk about it: `what` names it in messages (never a token)."""

    url: str
    what: str
    auth: dict[str, str] = field(default_factory=dict, repr=False)  # sent only to the url's own origin
    auth_hint: str = "the server refused access"
    not_found_hint: str = ""


class _Transient(Exception):
    """A failure worth retrying; `final` is the user error to raise when retries run out."""

    def __init__(self, final: WeightsError, response: requests.Response | None = None) -> None:
        super().__init__(str(final))
        self.final = final
        self.response = response  # an answer whose Retry-After is honoured (bounded)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (a seam tests replace to play a public host)."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)]


def check_url(url: str, allow_private: bool, allow_hosts: frozenset[str] = frozenset()) -> list[str]:
    """Refuse non-http(s) URLs and, unless allowed, hosts resolving to non-public addresses.

    Returns the addresses checked, for the connection to dial (`flux_lora.weights.pinned`); none when every
    private host is allowed (the client then resolves the name itself). A host:port in `allow_hosts`
    is dialled at its own addresses, private or not.
    """
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise BlockedUrlError(f"{redact_url(url)}: the port is not a number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BlockedUrlError(f"{redact_url(url)}: only http and https URLs can be downloaded")
    if allow_private:
        return []
    host, port = host_port(url)
    try:
        addresses = resolve_host(parts.hostname, port)
    except (socket.gaierror, UnicodeError):
        raise WeightsError(f"{redact_url(url)}: cannot resolve host {parts.hostname!r}") from None
    if not addresses:
        raise WeightsError(f"{redact_url(url)}: cannot resolve host {parts.hostname!r}")
    if f"{host}:{port}" in allow_hosts:
        return addresses
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast or (ip.version == 4 and ip in _CGNAT):
            raise BlockedUrlError(
                f"{redact_url(url)}: host {parts.hostname!r} resolves to a non-public address ({ip}); "
                "set FLUX_LORA_ALLOW_PRIVATE_URLS=1 to allow private networks"
            )
    return addresses


def _status_error(status: int, target: Target) -> WeightsError:
    if status in (401, 403):
        return WeightsAuthError(f"{target.what}: access denied (HTTP {status}); {target.auth_hint}")
    if status in (404, 410):
        hint = f"; {target.not_found_hint}" if target.not_found_hint else ""
        return WeightsNotFound(f"{target.what}: not found (HTTP {status}){hint}")
    if status == 416:
        return NotALoraError(f"{target.what}: the server holds an empty file")
    if status in RETRY_STATUSES:
        return WeightsUnreachable(f"{target.what}: the server answered HTTP {status}")
    return WeightsError(f"{target.what}: the server answered HTTP {status}")


class Downloader:
    """Downloads for one cache: a byte cap, bounded retries, ranged parallel parts, host checks."""

    def __init__(self, policy: DownloadPolicy, user_agent: str = "flux-lora-cog") -> None:
        self.policy = policy
        self.user_agent = user_agent
        self._local = threading.local()

    def _session(self) -> requests.Session:
        """One session per thread: requests sessions are not safe to share between threads."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = self.user_agent
            session.trust_env = True
            adapter = PinnedAdapter(max_retries=0)  # retries are ours (`_retrying`): they resume downloads
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    # --- requests with checked redirects -------------------------------------------------------------

    def _request(self, target: Target, url: str, headers: dict[str, str],
                 follow: bool = True) -> tuple[requests.Response, str]:
        """GET `url` following redirects by hand, checking each hop; auth only on the target's origin.

        With `follow` False a redirect is returned as the answer (its Location unvisited).
        """
        for _ in range(MAX_REDIRECTS + 1):
            addresses = check_url(url, self.policy.allow_private, self.policy.allow_hosts)
            sent = dict(headers)
            if _origin(url) == _origin(target.url):
                sent.update(target.auth)
            try:
                with pinned(url, addresses):
                    response = self._session().get(
                        url, headers=sent, stream=True, allow_redirects=False,
                        timeout=(min(self.policy.timeout, 30.0), self.policy.timeout),
                    )
            except requests.Timeout:
                raise _Transient(WeightsUnreachable(f"{target.what}: timed out")) from None
            except requests.RequestException as exc:
                reason = plain_reason(exc)
                raise _Transient(WeightsUnreachable(f"{target.what}: connection failed ({reason})")) from None
            if follow and response.is_redirect and "Location" in response.headers:
                url = urljoin(url, response.headers["Location"])
                response.close()
                continue
            if response.status_code in RETRY_STATUSES:
                response.close()
                raise _Transient(_status_error(response.status_code, target), response)
            if response.status_code >= 400:
                response.close()
                raise _status_error(response.status_code, target)
            return response, url
        raise WeightsError(f"{target.what}: too many redirects")

    def _retrying(self, target: Target, attempt: Callable[[], T]) -> T:
        """Run `attempt`, retrying transient failures as urllib3's `Retry` counts and spaces them.

        The attempts are ours (a retry resumes a download where its data stopped); `Retry` keeps the
        count, the exponential backoff and a server's Retry-After (at most 30 s).
        """
        retry = Retry(total=self.policy.retries, backoff_factor=self.policy.backoff, backoff_max=8.0,
                      retry_after_max=30)
        token = cancel.current()
        while True:
            token.check()
            try:
                return attempt()
            except _Transient as exc:
                try:
                    retry = retry.increment(error=exc)
                except MaxRetryError:
                    attempts = self.policy.retries + 1
                    raise type(exc.final)(f"{exc.final} (after {attempts} attempts)") from None
                log.info("%s: %s; retrying", target.what, exc.final)
                # Retry.sleep's wait (a server's Retry-After, else the backoff), cut short by a cancel.
                after = retry.get_retry_after(exc.response.raw) if exc.response is not None else None
                token.sleep(after if after is not None else retry.get_backoff_time())

    def get_json(self, target: Target) -> object:
        """A small JSON document (an API answer)."""

        def attempt() -> object:
            response, _ = self._request(target, target.url, {"Accept": "application/json"})
            with response:
                body = response.raw.read(16 * 1024**2 + 1, decode_content=True)
            if len(body) > 16 * 1024**2:
                raise WeightsError(f"{target.what}: the API answer is too large")
            try:
                return requests.compat.json.loads(body)
            except ValueError:
                raise WeightsError(f"{target.what}: the API did not answer JSON") from None

        return self._retrying(target, attempt)

    def locate(self, target: Target) -> str | None:
        """Where `target` redirects to (one request, its body unread), or None when it answers itself."""

        def attempt() -> str | None:
            response, url = self._request(target, target.url, {"Accept-Encoding": "identity"}, follow=False)
            with response:
                if response.is_redirect and "Location" in response.headers:
                    return urljoin(url, response.headers["Location"])
                return None

        return self._retrying(target, attempt)

    # --- downloads -------------------------------------------------------------------------------------

    def download(self, target: Target, dest: Path) -> int:
        """Write the file at `target` to `dest` (created or truncated); return its size in bytes."""

        # The first request asks for the head of the file: a small file arrives whole in this one answer,
        # a large one continues as the first part of the parallel download.
        head = 2 * self.policy.part_bytes
        first_range = f"bytes=0-{head - 1}" if self.policy.connections > 1 else "bytes=0-"

        def probe() -> tuple[requests.Response, str]:
            return self._request(target, target.url, {"Range": first_range, "Accept-Encoding": "identity"})

        response, final_url = self._retrying(target, probe)
        total, ranged = self._size_of(response, target)
        parallel = ranged and total is not None and total > head and self.policy.connections > 1
        if total is not None and total > self.policy.max_bytes:
            response.close()
        self._check_size(total, target)
        progress = Progress(target.what, total)
        if parallel:
            assert total is not None
            self._parallel(target, final_url, dest, total, head, response, progress)
        else:
            self._single(target, final_url, dest, total, ranged, response, progress)
        progress.done()
        return dest.stat().st_size

    def _size_of(self, response: requests.Response, target: Target) -> tuple[int | None, bool]:
        """(total size or None, whether ranges work) from the answer to a `Range: bytes=0-` request."""
        if response.headers.get("Content-Type", "").lower().startswith("text/html"):
            response.close()
            raise NotALoraError(f"{target.what}: the server sent an HTML page (a login or error page?), "
                                "not a weights file")
        if response.status_code == 206:
            match = re.fullmatch(r"bytes\s+0-\d+/(\d+)", response.headers.get("Content-Range", ""))
            if match:
                return int(match.group(1)), True
        length = response.headers.get("Content-Length")
        return (int(length) if length and length.isdigit() else None), False

    def _check_size(self, size: int | None, target: Target) -> None:
        if size is not None and size > self.policy.max_bytes:
            raise WeightsTooLarge(
                f"{target.what} is {size} bytes, over the {self.policy.max_bytes}-byte limit "
                "(FLUX_LORA_MAX_DOWNLOAD_BYTES)"
            )

    def _stream_into(self, response: requests.Response, fd: int, offset: int, limit: int | None,
                     target: Target, progress: Progress) -> int:
        """Copy a response body to `fd` at `offset`; return the bytes written (stops at `limit`).

        Each read returns what has arrived (up to CHUNK), so a slow source is checked for a cancel often;
        a cancel shuts the socket (urllib3's `shutdown`), which wakes a read waiting on a stalled one.
        """
        written = 0
        token = cancel.current()
        try:
            with token.on_cancel(response.raw.shutdown):
                while chunk := response.raw.read1(CHUNK, decode_content=True):
                    token.check()
                    if limit is not None and written + len(chunk) > limit:
                        chunk = chunk[: limit - written]
                    os.pwrite(fd, chunk, offset + written)
                    written += len(chunk)
                    progress.add(len(chunk))
                    if offset + written > self.policy.max_bytes:
                        raise WeightsTooLarge(
                            f"{target.what} is over the {self.policy.max_bytes}-byte limit "
                            "(FLUX_LORA_MAX_DOWNLOAD_BYTES)"
                        )
                    if limit is not None and written >= limit:
                        break
                token.check()  # the body ended, or a cancel shut the socket under the read
        except (requests.RequestException, HTTPError) as exc:
            token.check()  # the read broke because a cancel shut its socket
            reason = plain_reason(exc)
            raise _Transient(WeightsError(f"{target.what}: the download broke off ({reason})")) from None
        finally:
            response.close()
        return written

    def _single(self, target: Target, url: str, dest: Path, total: int | None, ranged: bool,
                first: requests.Response | None, progress: Progress) -> None:
        """One stream; a retry resumes with a range when the server has them, else starts over."""
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        done = 0
        pending = [first]
        try:

            def attempt() -> None:
                nonlocal done
                response = pending.pop() if pending and pending[0] is not None else None
                pending.clear()
                if response is None:
                    if not ranged:
                        progress.add(-done)
                        done = 0
                        os.ftruncate(fd, 0)
                    headers = {"Accept-Encoding": "identity"}
                    if ranged:
                        headers["Range"] = f"bytes={done}-"
                    response, _ = self._request(target, url, headers)
                    if ranged and response.status_code != 206:
                        response.close()
                        raise _Transient(WeightsError(f"{target.what}: the server stopped honouring ranges"))
                done += self._stream_into(response, fd, done, None, target, progress)
                if total is not None and done < total:
                    broke = f"{target.what}: the download broke off at {done} of {total} bytes"
                    raise _Transient(WeightsError(broke))

            self._retrying(target, attempt)
        finally:
            os.close(fd)

    def _parallel(self, target: Target, url: str, dest: Path, total: int, head: int,
                  first: requests.Response, progress: Progress) -> None:
        """Ranged parts in parallel threads, each written at its offset and retried on its own.

        Part 0 is the answer to the first request (bytes 0..head-1); the rest is split evenly.
        """
        rest = total - head
        parts = min(self.policy.connections - 1, max(1, rest // self.policy.part_bytes))
        bounds = [(0, head)]
        bounds += [(head + i * rest // parts, head + (i + 1) * rest // parts) for i in range(parts)]
        pending = {0: first}
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, total)
        stop = threading.Event()

        def fetch(start: int, end: int) -> None:
            done = 0

            def attempt() -> None:
                nonlocal done
                if stop.is_set():
                    raise WeightsError(f"{target.what}: cancelled")
                response = pending.pop(start, None) if done == 0 else None
                if response is None:
                    headers = {"Range": f"bytes={start + done}-{end - 1}", "Accept-Encoding": "identity"}
                    response, _ = self._request(target, url, headers)
                expected = f"bytes {start + done}-{end - 1}/"
                content_range = response.headers.get("Content-Range", "")
                if response.status_code != 206 or not content_range.startswith(expected):
                    response.close()
                    wrong = f"{target.what}: the server answered a range request wrongly"
                    raise _Transient(WeightsError(wrong))
                done += self._stream_into(response, fd, start + done, end - start - done, target, progress)
                if done < end - start:
                    raise _Transient(WeightsError(f"{target.what}: a ranged part broke off"))

            try:
                self._retrying(target, attempt)
            except BaseException:
                stop.set()
                raise

        try:
            with ThreadPoolExecutor(max_workers=len(bounds), thread_name_prefix="flux-lora-dl") as pool:
                # Each part runs in the caller's context: the prediction's cancel token reaches it.
                futures = [pool.submit(contextvars.copy_context().run, fetch, start, end) for start, end in bounds]
                for future in futures:
                    future.result()
        finally:
            os.close(fd)
            for response in pending.values():
                response.close()
