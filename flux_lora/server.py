"""`flux-lora serve`: the real cog HTTP server (coglet) on one of the two variants.

cog's Go CLI normally writes `.cog/openapi_schema.json` at build time; coglet validates inputs
against it (422) only when it is there, so we write it first, then hand the process to coglet.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flux_lora.schema import PREDICT_FILE, PREDICTORS, write_schema


def serve(predictor: str, host: str = "127.0.0.1", port: int = 5000, upload_url: str | None = None) -> int:
    """Write the schema into the working directory, then exec coglet (signals go straight to it)."""
    workdir = Path.cwd()
    write_schema(predictor, workdir)
    env = dict(os.environ, PORT=str(port), COG_PREDICT_TYPE_STUB=f"{PREDICT_FILE}:{PREDICTORS[predictor]}")
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
