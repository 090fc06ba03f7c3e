"""The benchmark runs on the tiny store, so later changes to `Service` keep it working for the GPU day.

`scripts/bench.py --quick` on CPU: every row has a number, or says why it cannot apply on a CPU; the
compiled go_fast transformers (dynamo's eager backend) were compiled at setup and the LoRA switches
after it compile nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_ON_CPU = {"resident GPU memory after setup", "bf16 slot switch dev <-> schnell",
              "compute floor: dev 28 steps at fp8 peak"}


# In a process of its own: the benchmark compiles, and dynamo's caches and the go_fast fallback counter are
# per process (tests/test_compiled.py counts them from zero).
@pytest.mark.slow
def test_bench_quick_on_the_tiny_store(tmp_path: Path):
    env = {**os.environ, "FLUX_LORA_DEVICE": "cpu"}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--device", "cpu",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["name"]: row for row in map(json.loads, (tmp_path / "bench.jsonl").read_text().splitlines())}
    for name, row in rows.items():
        if name in NOT_ON_CPU:
            assert row["seconds"] is None and row["error"].startswith("n/a on cpu"), row
        else:
            assert isinstance(row["seconds"], float) and row["error"] is None, row
    assert rows["setup: compile"]["recompiles"] > 0  # graphs were compiled at setup...
    switches = [row for name, row in rows.items() if name.startswith("LoRA switch")]
    assert len(switches) == 3 and all(row["recompiles"] == 0 for row in switches)  # ...and never after
    assert rows["go_fast determinism (same request twice)"]["max_pixel_diff"] == 0
    assert "diffusers FluxPipeline bf16 compiled" not in " ".join(rows)  # the full run's only
    table = (tmp_path / "bench.md").read_text()
    assert "| dev 28 steps go_fast, one LoRA |" in table and "torch " in table
    assert json.loads((tmp_path / "env.json").read_text())["torch"]


def test_a_failing_or_overrunning_row_is_recorded_and_the_next_one_runs():
    import time

    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    cpu = torch.device("cpu")
    failed = bench.run_row("divides", lambda: 1 / 0, cpu, limit=5)
    assert failed.seconds is None and failed.error == "ZeroDivisionError: division by zero"
    late = bench.run_row("sleeps", lambda: time.sleep(5), cpu, limit=1)
    assert late.seconds is None and late.error == "timeout after 1 s"
    assert bench.run_row("works", lambda: bench.Result("works", seconds=0.5), cpu, limit=5).seconds == 0.5
