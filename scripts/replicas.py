"""Several `flux-lora serve` replicas on one machine sharing one store and one LoRA cache, as
Kubernetes runs them on a ReadWriteMany volume (docs/scaling-out.md; tests/test_replicas.py
checks what they guarantee). Ctrl-C stops them all.

    python scripts/replicas.py [--replicas 3] [--port 5100] [--store DIR] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flux_lora.serving.server import wait_ready


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--port", type=int, default=5100, help="first port; replica i listens on port + i")
    parser.add_argument("--store", type=Path, help="base-model store (default: a tiny one in a temp dir)")
    parser.add_argument("--cache", type=Path, help="shared LoRA cache (default: STORE/lora-cache)")
    parser.add_argument("--predictor", choices=["hotswap", "trained"], default="hotswap")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flux-replicas-"))
    if args.store is None:
        from flux_lora.generation.tiny import make_tiny_store

        args.store = make_tiny_store(work / "store")
    env = dict(os.environ, FLUX_LORA_WEIGHTS=str(args.store.resolve()))
    env["FLUX_LORA_CACHE"] = str((args.cache or args.store / "lora-cache").resolve())
    procs = []
    for i in range(args.replicas):
        home = work / f"replica-{i}"  # each replica writes its own .cog/ schema here
        home.mkdir()
        log = (home / "server.log").open("wb")
        argv = [sys.executable, "-m", "flux_lora", "serve", "--predictor", args.predictor, "--port", str(args.port + i)]
        procs.append(subprocess.Popen(argv, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT))
    urls = [f"http://127.0.0.1:{args.port + i}" for i in range(args.replicas)]
    try:
        for url, proc in zip(urls, procs, strict=True):
            print(f"{url}  {'ready' if wait_ready(url, proc, timeout=600) else 'not ready (see its server.log)'}")
        print(f"store {env['FLUX_LORA_WEIGHTS']}, LoRA cache {env['FLUX_LORA_CACHE']}, logs under {work}")
        print("Ctrl-C stops them")
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
