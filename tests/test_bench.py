"""The benchmark runs on the tiny store, so later changes to `Service` keep it working for the GPU day.

`scripts/bench.py --quick` on CPU: every row has a number, or says why it cannot apply on a CPU; rows come
in the order of ROWS; each setup stage prints its seconds as it ends; the fp8 mode that ran is in the
header, env.json and every go_fast row; the compiled go_fast transformers (dynamo's eager backend behind a
call counter) were compiled at setup, the rows after it compile nothing, and the adapter-cost row runs no
compiled graph. The rest (budget, retry, mode rule, real-shape buffers, adapter bypass) runs in-process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402

from flux_lora.generation import fast  # noqa: E402

NOT_ON_CPU = {  # rows that cannot apply on a CPU, each with its reason
    "setup: pin", "setup: warm-up", "resident GPU memory after setup", "bf16 slot switch dev <-> schnell",
    "compute floor: dev 28 steps at fp8 peak",
}
SETUP_ROWS = [*(f"setup: {stage}" for stage in bench.SETUP_STAGES), "setup: total", "resident GPU memory after setup"]


# In a process of its own: the benchmark compiles, and dynamo's caches and the go_fast fallback counter are
# per process (tests/test_compiled.py counts them from zero).
@pytest.mark.slow
def test_bench_quick_on_the_tiny_store(tmp_path: Path):
    env = {**os.environ, "FLUX_LORA_DEVICE": "cpu"}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--aten-gemm", "--steps", "2",
                           "--device", "cpu", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    rows = {row["name"]: row for row in lines}
    # Order: the setup rows, then ROWS in their order of value (the full run's own left out), none skipped.
    assert [row["name"] for row in lines] == SETUP_ROWS + [r.name for r in bench.ROWS if not r.full_only]
    for name, row in rows.items():
        if name in NOT_ON_CPU:
            assert row["seconds"] is None and row["error"].startswith("n/a"), row
        else:
            assert isinstance(row["seconds"], float) and row["error"] is None, row
    # The setup timeline: each stage's line, with its seconds, before any row.
    out = done.stdout.splitlines()
    first_row = next(i for i, line in enumerate(out) if line.startswith("row "))
    stages = [m.group(1) for line in out[:first_row] if (m := re.match(r"setup: (\S+) \d+\.\ds", line))]
    assert stages == ["build", "imports", "quantize", "reserve", "compile", "compile"], stages  # dev, schnell
    # The mode that ran: header, env.json, each go_fast row (and only those).
    go_fast_rows = {r.name for r in bench.ROWS if r.go_fast and not r.full_only}
    assert {name for name, row in rows.items() if row["go_fast"] and not name.startswith("setup")} == go_fast_rows
    assert all(rows[name]["go_fast"] == "fp8-weight-only, counting" for name in go_fast_rows)
    table = (tmp_path / "bench.md").read_text()
    assert "fp8 fp8-weight-only," in table and "gemm backends ATEN," in table and "torch " in table
    assert "steps 2 in every prediction" in table
    assert "| dev 28 steps go_fast, one LoRA |" in table
    assert json.loads((tmp_path / "env.json").read_text())["go_fast"]["fp8_ran"] == "fp8-weight-only"
    # Graphs compiled at setup, none after; compiled graphs ran in the go_fast rows, none in the adapter row.
    assert rows["setup: compile"]["recompiles"] > 0
    assert all(row["recompiles"] == 0 for name, row in rows.items() if not name.startswith(("setup", "resident")))
    assert rows["dev 28 steps go_fast, one LoRA"]["graph_calls"] > 0
    cost = rows[bench.ADAPTER_COST]
    assert cost["graph_calls"] == 0 and cost["recompiles"] == 0 and cost["without_adapters_s"] > 0, cost
    assert rows["go_fast determinism (same request twice)"]["max_pixel_diff"] == 0


def test_rows_come_in_order_of_value_and_quick_builds_only_what_its_rows_need():
    names = [row.name for row in bench.ROWS]
    assert names[:6] == [
        "dev 28 steps go_fast, one LoRA", "compute floor: dev 28 steps at fp8 peak", "LoRA switch: main (cached file)",
        "schnell 4 steps go_fast, no LoRA", bench.ADAPTER_COST, "dev 28 steps go_fast, no LoRA",
    ]
    quick_rows = bench.select_rows(True, None, set())
    quick = [row.name for row in quick_rows]
    assert quick[-2:] == ["go_fast determinism (same request twice)", "cold start: fp8 dev from the pre-quantized copy"]
    last_go_fast = max(i for i, row in enumerate(quick_rows[:-2]) if row.go_fast)
    assert last_go_fast < quick.index("dev 28 steps bf16, no LoRA") < quick.index(
        "diffusers FluxPipeline bf16, dev 28 steps (baseline)") < len(quick) - 2
    assert not any("compiled" in name for name in quick) and any("compiled" in name for name in names)
    assert bench.needed_models(bench.select_rows(True, None, set())) == ("dev", "schnell")
    assert bench.needed_models(bench.select_rows(False, "^dev", set())) == ("dev",)
    assert bench.select_rows(True, "switch", {"LoRA switch: extra"})[0].name == "LoRA switch: main (cached file)"


def test_rows_not_started_within_the_budget_are_skipped_and_each_row_ends_by_the_budget_and_its_grace():
    clock, limits = [0.0], {}

    def run(row: bench.Row, limit: int) -> bench.Result:
        limits[row.name] = limit
        clock[0] += 100  # every row takes 100 s
        return bench.Result(row.name, seconds=100.0)

    rows = [bench.Row(f"row {i}", lambda b: bench.Result()) for i in range(5)]
    results = list(bench.run_rows(rows, run, lambda: clock[0], budget=250, row_timeout=300))
    assert [r.name for r in results] == [r.name for r in rows]
    assert [r.error for r in results] == [None, None, None, bench.SKIPPED, bench.SKIPPED]
    grace = bench.LAST_ROW_GRACE
    assert limits == {"row 0": min(300, 250 + grace), "row 1": 150 + grace, "row 2": 50 + grace}


def test_a_failing_or_overrunning_row_is_recorded_and_the_next_one_runs():
    import time

    cpu = torch.device("cpu")
    failed = bench.run_row("divides", lambda: 1 / 0, cpu, limit=5)
    assert failed.seconds is None and failed.error == "ZeroDivisionError: division by zero"
    late = bench.run_row("sleeps", lambda: time.sleep(5), cpu, limit=1)
    assert late.seconds is None and late.error == "timeout after 1 s"
    assert bench.run_row("works", lambda: bench.Result(seconds=0.5), cpu, limit=5).seconds == 0.5


def test_a_setup_that_fails_with_inductor_is_set_up_again_with_the_eager_backend():
    tried = []

    def make(backend: str) -> str:
        tried.append(backend)
        if backend == "inductor":
            raise RuntimeError("InductorError: triton compilation failed\ntraceback...")
        return "service"

    assert bench.start_service(make, "inductor") == ("service", "eager",
                                                     "RuntimeError: InductorError: triton compilation failed")
    assert tried == ["inductor", "eager"]

    def out_of_memory(backend: str) -> str:
        tried.append(backend)
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # eager would only fail later
        bench.start_service(out_of_memory, "inductor")
    assert tried[-1] == "inductor"


def test_a_go_fast_row_that_ran_another_fp8_is_an_error_and_the_peak_is_the_gpus():
    hopper = fast.fp8_mode(torch.device("cuda"), capability=(9, 0))
    assert hopper is fast.Fp8Mode.DYNAMIC
    assert bench.fp8_error("fp8-dynamic", hopper) is None
    for ran in ("plain", "fp8-weight-only", "fp8-dynamic+plain"):  # a fallback, or one model's
        assert bench.fp8_error(ran, hopper) == f"go_fast ran {ran}, not fp8-dynamic as this device supports"
    assert bench.fp8_error("fp8-weight-only", fast.fp8_mode(torch.device("cpu"))) is None
    assert bench.fp8_peak("NVIDIA H100 80GB HBM3") == bench.fp8_peak("NVIDIA H200") == 1979.0
    assert bench.fp8_peak("NVIDIA H100 PCIe") == 1513.0 and bench.fp8_peak("NVIDIA A100-SXM4-80GB") is None


def test_modeled_seconds_fill_their_column_beside_the_measured_ones(tmp_path: Path):
    (tmp_path / "modeled.json").write_text(json.dumps({
        "dev 28 steps go_fast, one LoRA": {"H100": 2.4, "H200": 2.1}, "LoRA switch: main (cached file)": 0.05,
        bench.ADAPTER_COST: {"H100": 0.1},
    }))
    modeled = bench.load_modeled(tmp_path / "modeled.json", "NVIDIA H200")
    assert modeled == {"dev 28 steps go_fast, one LoRA": 2.1, "LoRA switch: main (cached file)": 0.05}
    (tmp_path / "bench.jsonl").write_text(
        bench.Result("dev 28 steps go_fast, one LoRA", seconds=2.5, modeled=2.1, go_fast="fp8-dynamic, inductor").line()
    )
    table = bench.write_table(tmp_path, "NVIDIA H200", {"fp8": "fp8-dynamic"}).read_text()
    assert "| dev 28 steps go_fast, one LoRA | 2.500 | 2.100 | <= 2.5 | fp8-dynamic, inductor |" in table


TINY = bench.Shapes(
    transformer=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
    t5=dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, feed_forward_proj="gated-gelu"),
    clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
    vae=dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
)


def test_the_real_shape_builder_leaves_no_buffer_uninitialised():
    """Built on the meta device then materialised, every buffer (CLIP's int64 position ids) holds what the
    classes themselves put there: `to_empty` alone left garbage ids, an IndexError on CPU, a device assert on CUDA."""
    cpu = torch.device("cpu")
    built = bench.real_shape_components(("dev", "schnell"), cpu, torch.float32, TINY)
    normal = TINY.build(("dev", "schnell"))
    assert built.keys() == normal.keys() == {"vae", "clip", "t5", "dev", "schnell"}
    compared = 0
    for part, module in built.items():
        got = dict(module.named_buffers(remove_duplicate=False))
        expected = dict(normal[part].named_buffers(remove_duplicate=False))
        assert got.keys() == expected.keys(), part
        for name, value in expected.items():
            assert got[name].dtype == value.dtype and torch.equal(got[name], value), f"{part}.{name}"
            compared += 1
        assert all(p.device == cpu for p in module.parameters()), part
    assert compared >= 1  # CLIP's position ids
    assert built["clip"](torch.tensor([[1, 2, 3]])).last_hidden_state.isfinite().all()
    assert set(bench.real_shape_components(("dev",), cpu, torch.float32, TINY)) == {"vae", "clip", "t5", "dev"}


def test_adapters_bypassed_runs_the_base_layers_alone_and_restores_every_layer():
    from flux_lora.lora.adapters import adapters_bypassed
    from flux_lora.lora.packed import Piece, wrap_linears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).requires_grad_(False)
    x = torch.randn(2, 8)
    base = model(x)
    layers = list(wrap_linears(model, ["0", "1"]).values())
    for layer in layers:
        layer.fill([Piece(torch.randn(2, 8), torch.randn(8, 2), 1.0)])
    layers[1].bypass = True  # one layer already off: it must stay off
    with_adapter = model(x)
    assert not torch.allclose(with_adapter, base)
    with adapters_bypassed(model):
        assert torch.equal(model(x), base)
    assert torch.equal(model(x), with_adapter)
    assert [layer.bypass for layer in layers] == [False, True]
    assert not any(p.requires_grad for p in model.parameters())


def test_the_unguarded_forward_is_the_one_behind_the_recompile_guard():
    from flux_lora.generation.tiny import tiny_transformer

    transformer = tiny_transformer(guidance_embeds=True).eval()
    plain = transformer.forward
    assert fast.unguarded_forward(transformer) == plain  # no guard: the forward itself (its decorator kept)
    fast.freeze_compiled(transformer, "tiny")
    assert transformer.forward != plain and fast.unguarded_forward(transformer) == plain
    inputs = fast.dummy_inputs(transformer, fast.WarmupShape(1, 16, 8), torch.device("cpu"), torch.float32)
    assert fast.unguarded_forward(transformer)(**inputs)[0].shape == (1, 16, 64)
