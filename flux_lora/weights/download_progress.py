"""Download progress: a tqdm bar when stderr is a terminal, log lines every few seconds otherwise.

Replicate's clients read denoising progress from a prediction's logs with `PREDICTION_PROGRESS`,
which tqdm's default bar (`45%|████      | 12/27 [00:03<00:04]`) matches. A download must never pass
for denoising, so neither form here does: the bar starts with the file's name, has no `|`, and shows
sizes with units; the log lines start with "downloading".
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

PREDICTION_PROGRESS = r"^\s*(\d+)%\s*\|.+?\|\s*(\d+)\/(\d+)"  # Replicate's clients' pattern, for the tests
BAR_FORMAT = "{desc}: {percentage:.0f}% [{bar}] {n_fmt}B of {total_fmt}B, {rate_fmt}, {remaining} left"


class Progress:
    """One download's progress, updated from several threads."""

    def __init__(self, what: str, total: int | None, every: float = 5.0, stream: TextIO | None = None) -> None:
        self.what, self.total, self.every = what, total, every
        self.done_bytes = 0
        self.start = self.last = time.monotonic()
        self._lock = threading.Lock()
        stream = stream if stream is not None else sys.stderr
        self.bar: tqdm | None = None
        if stream.isatty():
            self.bar = tqdm(total=total, desc=f"downloading {what}", unit="B", unit_scale=True, unit_divisor=1024,
                            file=stream, bar_format=BAR_FORMAT if total else None, leave=False, mininterval=0.5)
        log.info("downloading %s (%s)", what, _mib(total) if total is not None else "size unknown")

    def add(self, n: int) -> None:
        with self._lock:
            self.done_bytes += n
            if self.bar is not None:
                self.bar.update(n)
                return
            now = time.monotonic()
            if now - self.last < self.every:
                return
            self.last = now
        rate = self.done_bytes / max(now - self.start, 1e-6)
        share = f" {100 * self.done_bytes / self.total:.0f}%" if self.total else ""
        log.info("downloading %s:%s %s at %s/s", self.what, share, _mib(self.done_bytes), _mib(int(rate)))

    def done(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elapsed = time.monotonic() - self.start
        rate = self.done_bytes / max(elapsed, 1e-6)
        size = _mib(self.done_bytes)
        log.info("downloaded %s: %s in %.1fs (%s/s)", self.what, size, elapsed, _mib(int(rate)))


def _mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"
