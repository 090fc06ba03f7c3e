"""Cancelling a prediction: one token per run, which every stage checks at its own safe points.

predict.py runs each prediction in a context where a fresh `Token` is current (`context_with`); the
run's stages (LoRA fetch and downloads, adapters, denoising, safety, encoding) read it from there with
`check()` wherever stopping leaves nothing half-done: between downloaded pieces, before the adapters are
written, between denoising steps, before each checker and each image file. A read that may block for
long (a download from a stalled server) registers a waker (`on_cancel`) that unblocks it at once.

A cancelled run raises `Cancelled`, a BaseException like cog's own CancelationException, so that no
`except Exception` swallows it; `finally` blocks clean up (a download's partial file). Outside a
prediction (setup, the command line, cog's fetch of image URLs) the current token never cancels.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Cancelled(BaseException):
    """The prediction was cancelled: raised inside the run by the stage that noticed."""


class Token:
    """One run's cancel flag, and the wakers of whatever that run is blocked on right now."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._wakers: list[Callable[[], None]] = []

    def cancel(self) -> None:
        """Ask the run to stop (from any thread): it raises `Cancelled` at its next check."""
        with self._lock:
            self._event.set()
            wakers = list(self._wakers)
        for wake in wakers:
            try:
                wake()
            except Exception:  # a waker that fails leaves its read to the next check
                log.debug("cancel waker failed", exc_info=True)

    def check(self) -> None:
        """Raise `Cancelled` if the run was cancelled."""
        if self._event.is_set():
            raise Cancelled("prediction cancelled")

    def sleep(self, seconds: float) -> None:
        """Wait `seconds` (a retry's backoff), raising `Cancelled` as soon as the run is cancelled."""
        if self._event.wait(max(0.0, seconds)):
            raise Cancelled("prediction cancelled")

    @contextmanager
    def on_cancel(self, wake: Callable[[], None]) -> Iterator[None]:
        """Call `wake` (once, from the cancelling thread) if the run is cancelled inside this block."""
        with self._lock:
            self._wakers.append(wake)
        try:
            self.check()
            yield
        finally:
            with self._lock:
                self._wakers.remove(wake)


_CURRENT: contextvars.ContextVar[Token | None] = contextvars.ContextVar("flux_lora_cancel", default=None)
_NEVER = Token()  # outside a prediction: nothing cancels it


def current() -> Token:
    """The running prediction's token (outside a prediction: one that is never cancelled)."""
    return _CURRENT.get() or _NEVER


def check() -> None:
    """Raise `Cancelled` if the running prediction was cancelled: call it at a safe point of a stage."""
    current().check()


def context_with(token: Token) -> contextvars.Context:
    """A copy of the current context in which `token` is current: run a prediction in it (`ctx.run`)."""
    ctx = contextvars.copy_context()
    ctx.run(_CURRENT.set, token)
    return ctx
