"""Denoising progress in the prediction logs, as Replicate's web page and clients read it.

diffusers draws its tqdm bar in place with carriage returns; cog keeps those bytes, so a client that
splits the logs on newlines (replicate-javascript's `parseProgressFromLogs`) reads `0/N`. Here the
same tqdm bar writes to `StepLog`, which turns every redraw into one newline-terminated line:
` 50%|█████     | 14/28 [00:01<00:01, 11.2it/s]`.

The bar advances once per denoising step; a cancelled prediction stops between two steps through
diffusers' own per-step callback (`flux_lora.generation.pipelines.generate`), not here.
"""

from __future__ import annotations

import functools
import io
import re
import sys
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


class StepBar(tqdm):
    """diffusers' denoising bar, drawn as one log line per step."""

    def __init__(self, *args: Any, steps: StepLog, **kwargs: Any) -> None:
        steps.new_bar()
        super().__init__(*args, file=steps, **kwargs)


def step_bar(steps: StepLog, iterable: Any = None, total: int | None = None) -> StepBar:
    """What DiffusionPipeline.progress_bar does, with our bar: a line per step.

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
