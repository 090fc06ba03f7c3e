"""`flux-lora serve`: the real cog HTTP server (coglet) on one of the two variants.

cog's Go CLI normally writes `.cog/openapi_schema.json` at build time; coglet validates inputs
against it (422) only when it is there, so we write it first, then hand the process to coglet.

coglet (0.23.1) answers a prediction before its slot is back in the pool (the slot returns when the
worker's "idle" message arrives on another channel), so with one slot a client that sends its next
request as soon as it has the answer gets `409 At capacity` now and then. With MAX_CONCURRENCY slots
that request finds a free one; predict.py still runs one prediction at a time on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from flux_lora.serving.schema import PREDICT_FILE, PREDICTORS, write_schema

# cog's prediction slots: the same number as cog.yaml's `concurrency.max` (baked into built images as
# COG_MAX_CONCURRENCY). Small, because on Replicate it is also how many requests the platform may
# queue on one container instead of another.
MAX_CONCURRENCY = 2


def serve(predictor: str, host: str = "127.0.0.1", port: int = 5000, upload_url: str | None = None) -> int:
    """Write the schema into the working directory, then exec coglet (signals go straight to it)."""
    workdir = Path.cwd()
    write_schema(predictor, workdir)
    env = dict(os.environ, PORT=str(port), COG_PREDICT_TYPE_STUB=f"{PREDICT_FILE}:{PREDICTORS[predictor]}")
    env.setdefault("COG_MAX_CONCURRENCY", str(MAX_CONCURRENCY))  # an operator's value wins, as in an image
    # predict.py imports flux_lora: make the project importable from any working directory.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PREDICT_FILE.parent), env.get("PYTHONPATH")) if p)
    # coglet spawns its worker with the `python` on PATH: make that this interpreter.
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    argv = [sys.executable, "-m", "cog.server.http", "--host", host]
    if upload_url:
        argv += ["--upload-url", upload_url]
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> bool:
    """Wait until the cog server at `url` has finished setup (its /health-check status is READY: it
    answers 200 while setting up too). False when `proc` exited first or `timeout` passed."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            if requests.get(f"{url}/health-check", timeout=2).json().get("status") == "READY":
                return True
        except (requests.ConnectionError, requests.Timeout, ValueError):
            pass
        time.sleep(0.5)
    return False
