"""Cost model of one FLUX.1-dev denoising step at real shapes, read off the compiled graphs' own ops.

    python scripts/roofline.py            # the table: H100 and H200, each adapter design
    python scripts/roofline.py --json     # rows {name, gpu, rank, ms_per_step, lora_gemms_per_step, overhead}
    python scripts/roofline.py --dynamic --designs "packed 128" --bench-json scripts/roofline.json  # bench --modeled

No GPU and no weights: one real-width double block and one single block (FLUX.1-dev: 3072 wide, 24 heads
of 128) are built on the meta device, quantized to fp8-dynamic as go_fast quantizes them on Hopper
(torchao; only its hardware check is waived, nothing runs), given the adapters of each design, and
captured by torch.compile with the options serving compiles them with (`fast.compile_transformer`:
dynamo, fullgraph, dynamic shapes with --dynamic, then AOTAutograd with inductor's decompositions) by a backend that
records the ATen graph inductor would receive instead of generating kernels. Every op is then costed:
- a GEMM (mm, addmm, bmm, _scaled_mm) or an attention call is one kernel:
  max(FLOPs / peak of its dtype, bytes / HBM bandwidth); an addmm whose C is a matrix (not a bias row) is
  a copy of C into the output first, then the GEMM reading it (what ATen does on CUDA);
- views cost nothing;
- every other op (pointwise, reductions, casts, cat, copies) is fused as inductor fuses: a connected run
  of them is one kernel per reduction in it (at least one), reading what enters the run once and writing
  what leaves it once;
- every kernel pays a fixed launch/tail cost (KERNEL_US).
A step is 19 double + 38 single blocks at 4096 image + 512 text tokens (1024x1024); the embedders and the
final layer (under 1% of the FLOPs) are left out. Designs: no adapters; the two peft slots of rank 64 the
compiled path reserved before (main, extra: 4 LoRA GEMMs per linear); the packed adapter
(flux_lora/lora/packed.py) at total rank R: its down matrix folded into the fp8 base GEMM, so a linear's
LoRA GEMMs are that shared GEMM and the up GEMM, whose output the next fused kernel adds.

`--check-layouts` also checks every `_scaled_mm` of the captured fp8 graphs against cuBLAS's rules
(row-major A, column-major B, K and N multiples of 16, float32 row-wise scales): a layout error found on
CPU instead of on the GPU.

The constants are achievable rates, not datasheet peaks (NOTES.md, issue #22): correct them from the
first GPU table (docs/benchmarks.md prints modeled beside measured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch
from torch import fx, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_lora.generation import fast  # noqa: E402
from flux_lora.lora.packed import wrap_linears  # noqa: E402

# --------------------------------------------------------------------------- constants


@dataclass(frozen=True)
class Gpu:
    """Achievable rates of one GPU: dense GEMM TFLOP/s by dtype, attention TFLOP/s, HBM TB/s."""

    name: str
    fp8_tflops: float  # torch._scaled_mm, row-wise scales (datasheet dense: 1979)
    bf16_tflops: float  # cuBLAS bf16 GEMM (datasheet dense: 989; ~800 measured on large squares)
    attention_tflops: float  # SDPA flash/cuDNN attention, bf16, head dim 128
    hbm_tbps: float  # achievable stream bandwidth (datasheet: H100 SXM 3.35, H200 4.8)


GPUS = (
    Gpu("H100", fp8_tflops=1300.0, bf16_tflops=700.0, attention_tflops=500.0, hbm_tbps=3.0),
    Gpu("H200", fp8_tflops=1300.0, bf16_tflops=700.0, attention_tflops=500.0, hbm_tbps=4.3),
)
KERNEL_US = 2.0  # fixed cost per kernel: launch gap and tail, microseconds
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38
DIM, HEADS, HEAD_DIM = 3072, 24, 128
IMAGE_TOKENS, TEXT_TOKENS = 4096, 512  # 1024x1024, dev's max_sequence_length
SLOT_RANK = 64  # the two peft slots' rank the compiled path reserved before the packed adapter
PACKED_RANKS = (16, 64, 128, 256)
# Serving compiles with dynamic shapes; the graph's ops are the same with static ones, which trace 5x faster
# (--dynamic traces as serving does: the same table, 2026-12-02).
DYNAMIC = False

EXTERN = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten._scaled_mm.default",
          "roofline.attention.default"}
GEMMS = EXTERN - {"roofline.attention.default"}
FREE = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand", "alias",
        "slice", "select", "split", "split_with_sizes", "unbind", "as_strided", "detach", "getitem", "sym_size",
        "lift_fresh_copy"}
REDUCTIONS = {"amax", "amin", "sum", "mean", "var_mean", "max", "min", "any", "all", "_softmax"}


# --------------------------------------------------------------------------- building and capturing


@torch.library.custom_op("roofline::attention", mutates_args=())
def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Stands for SDPA's fused attention kernel in the captured graph (on meta, SDPA would decompose)."""
    raise RuntimeError("the cost model's attention op only traces")


@_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(query)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _attention(query, key, value)


def real_blocks() -> tuple[nn.Module, nn.Module]:
    """One double and one single FLUX.1-dev block on the meta device, block linears in fp8-dynamic."""
    import torchao.quantization.quant_api as quant_api
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from torchao.quantization import quantize_

    with torch.device("meta"):
        double = FluxTransformerBlock(dim=DIM, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
        single = FluxSingleTransformerBlock(dim=DIM, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
    config = fast.torchao_config(fast.Fp8Mode.DYNAMIC)
    # torchao asks the (absent) GPU for compute capability >= 8.9; meta tensors run nothing.
    with mock.patch.object(quant_api, "_check_hardware_support", lambda *args: None):
        for block in (double, single):
            block.to(torch.bfloat16).eval().requires_grad_(False)
            quantize_(block, config, filter_fn=lambda m, fqn: fast._quantizable(m, "transformer_blocks.0." + fqn))
    return double, single


def block_inputs(block: nn.Module) -> dict:
    """A step's inputs for `block` at 1024x1024 (meta tensors)."""

    def empty(*size: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(*size, device="meta", dtype=dtype)

    tokens = IMAGE_TOKENS + TEXT_TOKENS
    rotary = (empty(tokens, HEAD_DIM, dtype=torch.float32), empty(tokens, HEAD_DIM, dtype=torch.float32))
    return dict(hidden_states=empty(1, IMAGE_TOKENS, DIM), encoder_hidden_states=empty(1, TEXT_TOKENS, DIM),
                temb=empty(1, DIM), image_rotary_emb=rotary, joint_attention_kwargs={})


def _linear_names(block: nn.Module) -> list[str]:
    return [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]


def with_packed(block: nn.Module, rank: int) -> nn.Module:
    """The packed adapter at `rank` on every linear, as `LoraManager.reserve` gives a compiled transformer."""
    for layer in wrap_linears(block, _linear_names(block)).values():
        layer.fix(rank)
    return block


def with_two_slots(block: nn.Module, rank: int = SLOT_RANK) -> nn.Module:
    """Two peft adapters (main, extra) on every linear, tensor scalings: the compiled path before packing."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = _linear_names(block)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for slot in ("main", "extra"):
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), block,
                                    adapter_name=slot)
    for module in block.modules():
        if hasattr(module, "lora_A") and hasattr(module, "set_adapter"):
            module.set_adapter(["main", "extra"], inference_mode=True)
            for slot in ("main", "extra"):  # peft's prepare_model_for_compiled_hotswap: scalings as tensors
                module.scaling[slot] = torch.tensor(1.0, device="meta")
    return block.to(torch.bfloat16)


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _sdpa):
        yield


def capture(block: nn.Module, inputs: dict) -> list[tuple[fx.GraphModule, fx.GraphModule]]:
    """(dynamo graph, ATen graph inductor would get) for `block`, compiled as serving compiles its blocks."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    graphs: list[tuple[fx.GraphModule, fx.GraphModule]] = []

    def backend(dynamo_gm: fx.GraphModule, example_inputs: list) -> Callable:
        def record(aten_gm: fx.GraphModule, aten_inputs: list) -> Callable:
            graphs.append((dynamo_gm, aten_gm))
            return aten_gm.forward

        return aot_autograd(fw_compiler=record, decompositions=select_decomp_table())(dynamo_gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, dynamic=DYNAMIC, backend=backend)
    with _fused_attention(), torch.no_grad():
        compiled(**inputs)
    return graphs


def lora_gemms(dynamo_gm: fx.GraphModule) -> int:
    """Matmuls that take a LoRA weight (dynamo names graph inputs after their module path: `lora_A`,
    `lora_down`...)."""
    lora = {n for n in dynamo_gm.graph.nodes if n.op in ("placeholder", "get_attr") and "lora" in n.name.lower()}

    def reads_lora(node: fx.Node) -> bool:
        return any(a in lora or (a.op == "call_method" and a.args and a.args[0] in lora) or (
            a.op == "call_function" and _is_transpose(a) and a.args[0] in lora) for a in node.all_input_nodes)

    matmuls = {torch._C._nn.linear, torch.nn.functional.linear, torch.addmm, torch.mm, torch.matmul}
    return sum(n.op == "call_function" and n.target in matmuls and reads_lora(n) for n in dynamo_gm.graph.nodes)


def _is_transpose(node: fx.Node) -> bool:
    return node.target in (torch.t, torch.transpose) or getattr(node.target, "__name__", "") in ("t", "transpose")


# --------------------------------------------------------------------------- costing


def _hint(value: object) -> int:
    if isinstance(value, torch.SymInt):
        return int(value.node.hint) if value.node.hint is not None else int(value.node.shape_env.size_hint(
            value.node.expr))
    return int(value)


def _tensor(node: object) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _bytes(node: object) -> int:
    value = _tensor(node)
    if value is None:
        return 0
    return math.prod(_hint(s) for s in value.shape) * value.element_size()


def _shape(node: object) -> list[int]:
    value = _tensor(node)
    return [_hint(s) for s in value.shape] if value is not None else []


def _op(node: fx.Node) -> str:
    return str(node.target)


def _short(node: fx.Node) -> str:
    return _op(node).removeprefix("aten.").split(".")[0]


@dataclass
class Kernel:
    kind: str  # "gemm", "attention", "fused"
    flops: float
    bytes: int
    dtype: str  # fp8 | bf16 for GEMMs

    def seconds(self, gpu: Gpu) -> float:
        if self.kind == "attention":
            peak = gpu.attention_tflops
        else:
            peak = gpu.fp8_tflops if self.dtype == "fp8" else gpu.bf16_tflops
        compute = self.flops / (peak * 1e12)
        return max(compute, self.bytes / (gpu.hbm_tbps * 1e12)) + KERNEL_US * 1e-6


def _gemm_flops(node: fx.Node) -> float:
    name = _op(node)
    if name == "aten.bmm.default":
        (b, m, k), (_, _, n) = _shape(node.args[0]), _shape(node.args[1])
        return 2.0 * b * m * n * k
    a, b = (node.args[1], node.args[2]) if name == "aten.addmm.default" else (node.args[0], node.args[1])
    (m, k), (_, n) = _shape(a), _shape(b)
    return 2.0 * m * n * k


def _root(node: object) -> object:
    """The producer behind a chain of views."""
    while isinstance(node, fx.Node) and node.op == "call_function" and _short(node) in FREE:
        node = node.args[0]
    return node


def kernels(gm: fx.GraphModule) -> list[Kernel]:
    """The kernels of one captured graph, as the module docstring says inductor would launch them."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    out: list[Kernel] = []
    fusible = [n for n in nodes if _op(n) not in EXTERN and _short(n) not in FREE and _tensor(n) is not None]
    parent = {n: n for n in fusible}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in fusible:
        for arg in node.all_input_nodes:
            root = _root(arg)
            if root in parent:
                parent[find(root)] = find(node)
    for node in nodes:
        name = _op(node)
        if name == "aten.addmm.default" and len(_shape(node.args[0])) == 2 and _shape(node.args[0])[0] > 1:
            # ATen's addmm with a matrix C (not a bias row) first copies C into its output: one more pass.
            out.append(Kernel("fused", 0.0, 2 * _bytes(node), "bf16"))
        if name in GEMMS:
            inputs = node.args[:3] if name == "aten.addmm.default" else node.args[:2]
            reads = sum(_bytes(a) for a in inputs) + (sum(_bytes(a) for a in node.args[2:5] if name ==
                                                          "aten._scaled_mm.default"))
            dtype = "fp8" if name == "aten._scaled_mm.default" else "bf16"
            out.append(Kernel("gemm", _gemm_flops(node), reads + _bytes(node), dtype))
        elif name == "roofline.attention.default":
            b, h, s, d = _shape(node.args[0])
            s_kv = _shape(node.args[1])[2]
            flops = 4.0 * b * h * s * s_kv * d
            out.append(Kernel("attention", flops, sum(_bytes(a) for a in node.args[:3]) + _bytes(node), "bf16"))
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in fusible:
        groups.setdefault(find(node), []).append(node)
    for members in groups.values():
        inside = set(members)
        read = {(_root(a), a) for n in members for a in n.all_input_nodes if _root(a) not in inside}
        reads = sum(_bytes(a) for _, a in read)
        writes = sum(_bytes(n) for n in members if any(u not in inside and _short(u) not in FREE or
                                                       _escapes(u, inside) for u in n.users))
        count = max(1, sum(_short(n) in REDUCTIONS for n in members))
        for index in range(count):
            out.append(Kernel("fused", 0.0, (reads + writes) if index == 0 else 0, "bf16"))
    return out


def _escapes(node: fx.Node, inside: set[fx.Node]) -> bool:
    """A view of a run's value that is read outside the run (or is the graph's output)."""
    if node.op == "output":
        return True
    if _short(node) not in FREE:
        return node not in inside
    return any(_escapes(user, inside) for user in node.users)


# --------------------------------------------------------------------------- fp8 layouts


def _contiguous(shape: list[int], stride: list[int]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def scaled_mm_problems(gm: fx.GraphModule) -> list[str]:
    """What cuBLAS would refuse in the graph's `_scaled_mm` calls (the checks torch's CUDA kernel makes)."""
    problems = []
    for node in gm.graph.nodes:
        if _op(node) != "aten._scaled_mm.default":
            continue
        a, b, scale_a, scale_b = (_tensor(arg) for arg in node.args[:4])
        (m, k), (k2, n) = _shape(node.args[0]), _shape(node.args[1])
        stride_a, stride_b = [_hint(s) for s in a.stride()], [_hint(s) for s in b.stride()]
        where = f"{node.name} ({m}x{k} @ {k2}x{n})"
        if a.dtype.itemsize != 1 or b.dtype.itemsize != 1:
            problems.append(f"{where}: inputs must be float8, got {a.dtype} and {b.dtype}")
        if not (stride_a[1] == 1 and (stride_a[0] > stride_a[1] or m == 1)):
            problems.append(f"{where}: A must be row-major, got strides {stride_a}")
        if not (stride_b[0] == 1 and (stride_b[1] > 1 or n == 1)):
            problems.append(f"{where}: B must be column-major, got strides {stride_b}")
        if k % 16 or n % 16:
            problems.append(f"{where}: K and N must be multiples of 16")
        for label, arg, scale, shape in (("scale_a", node.args[2], scale_a, [m, 1]),
                                         ("scale_b", node.args[3], scale_b, [1, n])):
            got, strides = _shape(arg), [_hint(s) for s in scale.stride()]
            if scale.dtype != torch.float32 or got != shape or not _contiguous(got, strides):
                problems.append(f"{where}: {label} must be contiguous float32 {shape}, got {scale.dtype} {got}")
    return problems


# --------------------------------------------------------------------------- the model


@dataclass
class Row:
    name: str
    gpu: str
    rank: int
    ms_per_step: float
    lora_gemms_per_step: int
    overhead: float  # ms over the no-adapter row of the same GPU
    kernels_per_step: int


@dataclass
class Captured:
    """One block under one design: its kernels, its LoRA GEMMs, what cuBLAS would refuse in it."""

    kernels: list[Kernel]
    lora_gemms: int
    linears: int
    layout_problems: list[str]


def capture_design(design: Callable[[nn.Module], nn.Module]) -> tuple[Captured, Captured]:
    """The double and the single block under `design`, captured."""
    out = []
    for block in real_blocks():
        linears = len(_linear_names(block))
        graphs = capture(design(block), block_inputs(block))
        out.append(Captured([k for _, gm in graphs for k in kernels(gm)], sum(lora_gemms(d) for d, _ in graphs),
                            linears, [p for _, gm in graphs for p in scaled_mm_problems(gm)]))
    return out[0], out[1]


DESIGNS: dict[str, tuple[int, Callable[[nn.Module], nn.Module]]] = {
    "no adapters": (0, lambda block: block),
    "two slots": (2 * SLOT_RANK, with_two_slots),
    **{f"packed {rank}": (rank, lambda block, r=rank: with_packed(block, r)) for rank in PACKED_RANKS},
}


def model_rows(designs: list[str] | None = None) -> tuple[list[Row], list[str]]:
    """The modeled step per design (the no-adapter row always) and GPU, and every layout problem found."""
    names = ["no adapters", *(d for d in (designs or DESIGNS) if d != "no adapters")]
    rows: list[Row] = []
    problems: list[str] = []
    for key in names:
        rank, design = DESIGNS[key]
        double, single = capture_design(design)
        problems += [f"{key}: {p}" for p in double.layout_problems + single.layout_problems]
        gemms = DOUBLE_BLOCKS * double.lora_gemms + SINGLE_BLOCKS * single.lora_gemms
        count = DOUBLE_BLOCKS * len(double.kernels) + SINGLE_BLOCKS * len(single.kernels)
        for gpu in GPUS:
            seconds = DOUBLE_BLOCKS * sum(k.seconds(gpu) for k in double.kernels) + SINGLE_BLOCKS * sum(
                k.seconds(gpu) for k in single.kernels)
            rows.append(Row(key.split()[0] if key.startswith("packed") else key, gpu.name, rank,
                            round(seconds * 1e3, 2), gemms, 0.0, count))
    base = {row.gpu: row.ms_per_step for row in rows if row.name == "no adapters"}
    for row in rows:
        row.overhead = round(row.ms_per_step - base[row.gpu], 2)
    return rows, problems


def table(rows: list[Row]) -> str:
    base = {row.gpu: row.ms_per_step for row in rows if row.name == "no adapters"}
    lines = ["| design | GPU | rank | ms per step | vs no adapters | LoRA GEMMs per step | kernels per step |",
             "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r.gpu, r.ms_per_step)):
        lines.append(f"| {row.name} | {row.gpu} | {row.rank or '-'} | {row.ms_per_step:.1f} | "
                     f"{row.ms_per_step / base[row.gpu]:.2f}x | {row.lora_gemms_per_step} | {row.kernels_per_step} |")
    return "\n".join(lines)


# The benchmark's rows the model speaks for (scripts/bench.py, ROWS), in transformer-block steps: the model
# times the 57 blocks only (the text encoders, the VAE, the safety checkers and the rest are not in it).
# go_fast's fp8 transformers always hold their adapters, a LoRA loaded or not: those rows are the packed step.
BENCH_ROWS = {
    "dev 28 steps go_fast, one LoRA": 28,
    "dev 28 steps go_fast, no LoRA": 28,
    "schnell 4 steps go_fast, no LoRA": 4,
    "adapter cost: one dev step, one LoRA vs bypassed (eager)": 1,
}


def bench_modeled(rows: list[Row]) -> dict[str, dict[str, float]]:
    """{bench row: {GPU: seconds}} for `bench.py --modeled`, from the packed step at the default rank budget."""
    from flux_lora.lora.adapters import DEFAULT_MAX_RANK

    step = {r.gpu: r.ms_per_step / 1e3 for r in rows if r.name == "packed" and r.rank == DEFAULT_MAX_RANK}
    return {name: {gpu: round(steps * s, 4) for gpu, s in step.items()} for name, steps in BENCH_ROWS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--designs", nargs="+", choices=list(DESIGNS), help="model only these (default: all)")
    parser.add_argument("--check-layouts", action="store_true", help="exit 1 if a _scaled_mm layout is refused")
    parser.add_argument("--bench-json", type=Path, help="also write the benchmark's modeled rows (bench --modeled)")
    parser.add_argument("--dynamic", action="store_true", help="trace with dynamic shapes, as serving compiles")
    args = parser.parse_args(argv)
    global DYNAMIC
    DYNAMIC = args.dynamic
    rows, problems = model_rows(args.designs)
    print(json.dumps([asdict(row) for row in rows], indent=1) if args.json else table(rows))
    if args.bench_json:
        args.bench_json.write_text(json.dumps(bench_modeled(rows), indent=1, sort_keys=True) + "\n")
    for problem in problems:
        print(f"layout: {problem}", file=sys.stderr)
    return 1 if args.check_layouts and problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
