"""The cost model of the real-shape graphs (scripts/roofline.py): the packed adapter's targets, and fp8 layouts.

One real-width double and one single FLUX.1-dev block in fp8-dynamic, captured on the meta device through
the compile path serving uses: the packed adapter at the default rank budget must stay within 1.15x of the
no-adapter step on an H100 with at most 2 LoRA GEMMs per linear (the folded base GEMM and the up GEMM), and
every `_scaled_mm` in those graphs must have a layout cuBLAS accepts (fp8 on meta tensors: this CPU build
of torch cannot make fake CUDA tensors run a linear); a wrong layout must be caught.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from flux_lora.lora.adapters import DEFAULT_MAX_RANK

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def roofline():
    spec = importlib.util.spec_from_file_location("roofline", ROOT / "scripts" / "roofline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["roofline"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_packed_adapter_meets_its_targets_in_the_cost_model(roofline):
    rows, problems = roofline.model_rows([f"packed {DEFAULT_MAX_RANK}"])
    assert problems == []
    by = {(row.name, row.gpu): row for row in rows}
    base, packed = by["no adapters", "H100"], by["packed", "H100"]
    assert 60 < base.ms_per_step < 130  # the fp8 blocks of one 1024x1024 dev step, ~92 ms by hand
    assert packed.ms_per_step / base.ms_per_step <= 1.15
    linears = roofline.DOUBLE_BLOCKS * 14 + roofline.SINGLE_BLOCKS * 6
    assert base.lora_gemms_per_step == 0 and packed.lora_gemms_per_step <= 2 * linears
    assert by["packed", "H200"].overhead < packed.overhead  # more bandwidth, less LoRA cost


def test_the_layout_check_catches_a_row_major_b_and_odd_widths(roofline):
    """Graphs written by hand: tracing would already refuse them (torch's meta kernel checks the same rules)."""
    from torch import fx

    def problems(b: torch.Tensor) -> list[str]:
        graph = fx.Graph()
        values = (torch.empty(64, 32, dtype=torch.float8_e4m3fn, device="meta"), b,
                  torch.empty(64, 1, device="meta"), torch.empty(1, b.shape[1], device="meta"))
        args = []
        for name, value in zip(("a", "b", "scale_a", "scale_b"), values, strict=True):
            node = graph.placeholder(name)
            node.meta["val"] = value
            args.append(node)
        out = graph.call_function(torch.ops.aten._scaled_mm.default, tuple(args))
        out.meta["val"] = torch.empty(64, b.shape[1], dtype=torch.bfloat16, device="meta")
        graph.output(out)
        return roofline.scaled_mm_problems(fx.GraphModule(torch.nn.Module(), graph))

    fp8 = dict(dtype=torch.float8_e4m3fn, device="meta")
    assert problems(torch.empty(48, 32, **fp8).t()) == []  # column-major 32 x 48
    assert any("B must be column-major" in p for p in problems(torch.empty(32, 48, **fp8)))
    assert any("multiples of 16" in p for p in problems(torch.empty(40, 32, **fp8).t()))


def test_the_modeled_rows_are_the_benchmarks_and_the_file_the_first_gpu_call_reads(roofline):
    import json

    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = sys.modules.setdefault("bench", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(bench)
    names = {row.name for row in bench.ROWS}
    assert set(roofline.BENCH_ROWS) <= names
    modeled = json.loads((ROOT / "scripts" / "roofline.json").read_text())
    assert set(modeled) == set(roofline.BENCH_ROWS)
    assert all(set(gpus) == {"H100", "H200"} for gpus in modeled.values())
    assert "--modeled scripts/roofline.json" in (ROOT / "scripts" / "gpu_first_call.sh").read_text()
