"""Connect to the address that was checked, not to a second DNS answer (no DNS rebinding).

`flux_lora.weights.http.check_url` resolves a host and refuses private answers; if the HTTP client then
resolved the name again to connect, a name answering a public address first and a private one next
would slip through. Inside `pinned(...)`, a connection that `PinnedAdapter` opens to that host and
port goes to the checked addresses (each in turn) instead; everything else about it is unchanged:
the Host header, TLS SNI and certificate hostname checks still use the name (urllib3 reads them from
`host`, we only swap the address the socket dials). Connections through a proxy dial the proxy, which
resolves the name itself: the check still refuses private answers, the pin cannot apply there.
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Pin:
    host: str  # lower case, IPv6 without brackets: as urllib3's pools name it
    port: int
    addresses: tuple[str, ...]


_PIN: contextvars.ContextVar[Pin | None] = contextvars.ContextVar("flux_lora_pin", default=None)


def host_port(url: str) -> tuple[str, int]:
    """The (host, port) a connection for `url` goes to, as urllib3 names them."""
    parts = urlsplit(url)
    return (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(parts.scheme, 443)


@contextlib.contextmanager
def pinned(url: str, addresses: Sequence[str]) -> Iterator[None]:
    """New connections to `url`'s host and port made in this block dial `addresses` (none: by name)."""
    host, port = host_port(url)
    token = _PIN.set(Pin(host, port, tuple(addresses)) if addresses else None)
    try:
        yield
    finally:
        _PIN.reset(token)


class _Pinned:
    """Mixed into urllib3's connections: dial the pinned addresses in place of resolving `host`."""

    _dns_host: str
    host: str
    port: int

    def _new_conn(self) -> socket.socket:
        pin = _PIN.get()
        if pin is None or (pin.host, pin.port) != (self.host.strip("[]").lower(), self.port):
            return super()._new_conn()  # type: ignore[misc]
        name, failure = self._dns_host, None
        try:
            for address in pin.addresses:
                self._dns_host = address  # only the socket's address: `host` (SNI, Host header) is restored below
                try:
                    return super()._new_conn()  # type: ignore[misc]
                except (NewConnectionError, ConnectTimeoutError) as exc:
                    failure = exc
        finally:
            self._dns_host = name
        assert failure is not None
        raise failure


class _PinnedHTTPConnection(_Pinned, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_Pinned, HTTPSConnection):
    pass


class _PinnedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


class PinnedAdapter(HTTPAdapter):
    """A requests adapter whose connections honour `pinned(...)` (mount it for http:// and https://)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _PinnedHTTPPool, "https": _PinnedHTTPSPool}
