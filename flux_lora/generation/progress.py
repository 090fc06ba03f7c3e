"""Denoising progress in the prediction logs, as Replicate's web page and clients read it.

diffusers draws its tqdm bar in place with carriage returns; cog keeps those bytes, so a client that
splits the logs on newlines (replicate-javascript's `parseProgressFromLogs`) reads `0/N`. Here the
same tqdm bar writes to `StepLog`, which turns every redraw into one newline-terminated line:
` 50%|█████     | 14/28 [00:01<00:01, 11.2it/s]`.

The bar advances once per denoising step, the only per-step hook the pipelines offer without
changing their call; so it is also where a cancelled prediction stops: between two steps, never in
the middle of a LoRA swap or a cache write.
"""

from __future__ import annotations

import functools
import io
import re
import sys
import threading
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

if TYPE_CHECKING:
    from flux_lora.generation.pipelines import Pipelines

_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")  # ANSI codes, other controls


class StepLog(io.TextIOBase):
    """The file diffusers' tqdm bars write to: each redraw becomes one clean log line."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out  # None: sys.stderr at write time (cog swaps in its per-prediction writer)
        self._last = ""
        self.cancel: threading.Event | None = None  # the running prediction's; set by predict.py

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        out = self._out or sys.stderr
        for part in re.split(r"[\r\n]", text):
            line = _CONTROL.sub("", part).rstrip()
            if line and line != self._last:  # a redraw with nothing new (tqdm's refresh) is one line
                out.write(line + "\n")
                self._last = line
        out.flush()
        return len(text)

    def new_bar(self) -> None:
        self._last = ""  # a new bar's first line is never a repeat

    def stop_if_cancelled(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            self.cancel = None
            from cog import CancelationException  # BaseException: no `except Exception` swallows it

            raise CancelationException("prediction cancelled")


class StepBar(tqdm):
    """diffusers' denoising bar; after each step (outside tqdm's lock) a cancelled prediction stops."""

    def __init__(self, *args: Any, steps: StepLog, **kwargs: Any) -> None:
        steps.stop_if_cancelled()  # cancelled while fetching LoRAs: stop before the first step
        self.steps = steps
        steps.new_bar()
        super().__init__(*args, file=steps, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self.steps.stop_if_cancelled()
        return shown


def step_bar(steps: StepLog, iterable: Any = None, total: int | None = None) -> StepBar:
    """What DiffusionPipeline.progress_bar does, with our bar: a line (and a cancel check) per step.

    leave=False: closing clears the bar (an empty line, dropped) instead of drawing 100% a second time."""
    return StepBar(iterable, total=total, steps=steps, ascii=False, mininterval=0, miniters=1, leave=False)


def log_progress(pipelines: Pipelines) -> StepLog:
    """Every entry point (plain and go_fast) draws its steps as StepBar lines into one StepLog."""
    steps = StepLog()
    for source in (pipelines, pipelines.fast):
        if source is None:
            continue
        for table in (source.text2img, source.img2img, source.inpaint):
            for pipe in table.values():
                # diffusers builds its tqdm here; no option picks the class
                pipe.progress_bar = functools.partial(step_bar, steps)
    return steps
