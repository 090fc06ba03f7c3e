"""Benchmark: one large file over loopback, parallel ranged requests vs one stream vs curl.

    python scripts/bench_download.py [--size-mib 1024] [--connections 8] [--repeat 2]

Serves the file from the test fake (tests/fakes.py, a threaded Python http.server) on 127.0.0.1, so
the server's own speed bounds every column; curl (if installed) is the reference client. Prints a
table of seconds and MiB/s, with each time as a ratio of curl's (or of the single stream's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fakes import FakeServer  # noqa: E402

from flux_lora.weights.http import Downloader, DownloadPolicy, Target  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2, help="runs per method; the best is reported")
    args = parser.parse_args()
    size = args.size_mib * 1024**2
    data = os.urandom(1 << 20) * args.size_mib
    with FakeServer() as server, tempfile.TemporaryDirectory() as tmp:
        url = server.add_file("/big.bin", data)
        dest = Path(tmp) / "out.bin"
        big = max(size, 1) * 2
        methods = {
            f"parallel ranged x{args.connections}": DownloadPolicy(
                max_bytes=big, connections=args.connections, allow_private=True
            ),
            "single stream": DownloadPolicy(max_bytes=big, connections=1, allow_private=True),
        }
        results: dict[str, float] = {}
        for name, policy in methods.items():
            downloader = Downloader(policy)
            results[name] = min(
                timed(lambda d=downloader: d.download(Target(url, "bench"), dest)) for _ in range(args.repeat)
            )
            assert dest.stat().st_size == size, f"{name}: wrong size"
            dest.unlink()
        curl = shutil.which("curl")
        if curl:
            results["curl (one stream)"] = min(
                timed(lambda: subprocess.run([curl, "-sS", "-o", str(dest), url], check=True))
                for _ in range(args.repeat)
            )
            assert dest.stat().st_size == size
        reference = results.get("curl (one stream)") or results["single stream"]
        print(f"{args.size_mib} MiB over loopback, best of {args.repeat}, {os.cpu_count()} CPUs")
        print(f"{'method':<24} {'seconds':>8} {'MiB/s':>8} {'x reference time':>17}")
        for name, seconds in results.items():
            print(f"{name:<24} {seconds:>8.2f} {args.size_mib / seconds:>8.0f} {seconds / reference:>17.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
