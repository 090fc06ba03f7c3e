"""One packed low-rank adapter per linear: every LoRA of a request side by side along the rank.

Why not peft's layers: peft gives each LoRA an adapter of its own and runs them one after another, each
with a down GEMM, an up GEMM, a scale and an add that rereads the layer's output. A compiled go_fast
transformer must hold its adapters before it is compiled, so with two reserved peft slots every linear
ran 4 LoRA GEMMs and two output-sized adds on every step, loaded or not: memory-bound work at FLUX's
widths (scripts/roofline.py models it: about +40% per fp8 step on an H100). Here each linear holds ONE
adapter of rank R: `lora_down` (R x in) and `lora_up` (out x R) with every LoRA's rows and columns side
by side, each LoRA's scale (its alpha/rank is already folded in at conversion) folded into its up
columns. The forward is one GEMM pair whatever the number of LoRAs, the add folded into the second
(`addmm` adds into the base output: no separate read-modify-write of it).

Two ways a model holds them:
- fixed (`fix(rank)`; go_fast's fp8 transformers, which are compiled): every linear holds R ranks from
  setup on, zeros where unused. A LoRA switch or a scale change writes into those tensors in place; no
  shape ever changes, so the compiled graphs never recompile, whatever the number, targets or ranks of
  the LoRAs up to R per layer. On an fp8 layer the down matrix is *folded into the base GEMM*: its R rows
  are quantized per row like the weight's and appended to it (`[W; A]`), so one fp8 GEMM reads the
  activations once and yields the output and the LoRA hidden state together: no second read of the
  input, no bf16 copy of it, no separate down GEMM (scripts/roofline.py: the overhead drops from ~1.22x
  to ~1.12x of an fp8 step on an H100). The up GEMM's result is added to the output by the op that reads
  it next (inductor fuses the add there), never by a separate pass over the output;
- sized (plain bf16 transformers, CLIP): each linear holds exactly the ranks of the LoRAs on it and
  nothing when none, so a layer without LoRA runs its base alone, bit-identical to the base model.

The same class and layout serve both, so there is one mechanism for every path. peft stays the reference
the tests compare against (tests/test_packed.py: several LoRAs at once equal peft's multi-adapter output).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Piece:
    """One LoRA's matrices for one layer: down (r x in), up (out x r), and the strength it runs at."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


class PackedLoraLinear(nn.Module):
    """A linear layer plus one packed adapter: `base_layer(x) + (x @ lora_down.T) @ lora_up.T`.

    The base layer keeps peft's attribute name (`base_layer`), so code that walks base weights (the
    LoRA name tables, the pinned host copy of a parked transformer) sees the same keys either way.
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("lora_down", None, persistent=False)
        self.register_buffer("lora_up", None, persistent=False)
        # Fixed fp8 layers: [W; A] as one float8 weight (and its bias padded with zeros); base_layer's weight
        # and bias are then views of their first rows, so the base weights are held once.
        self.register_buffer("lora_folded_weight", None, persistent=False)
        self.register_buffer("lora_folded_bias", None, persistent=False)
        self.fixed_rank: int | None = None  # set by `fix`: the rank budget of a compiled layer
        self.used = 0  # ranks holding a LoRA now (fixed: the rest are zeros)
        self.bypass = False  # `adapters_bypassed`: run the base alone (the benchmark's baseline)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # diffusers reads `.weight.dtype` off linears it calls
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.lora_up
        if up is None or self.bypass:
            return self.base_layer(x)
        if self.lora_folded_weight is not None:  # one fp8 GEMM: [output | LoRA hidden state]
            both = F.linear(x, self.lora_folded_weight, self.lora_folded_bias)
            out, hidden = both[..., : self.out_features], both[..., self.out_features :]
        else:
            out, hidden = self.base_layer(x), F.linear(x.to(up.dtype), self.lora_down)
        # The add is left to the compiler, which fuses it into whatever reads the output next.
        return out + F.linear(hidden.to(up.dtype), up).to(out.dtype)

    def adapter_dtype(self) -> torch.dtype:
        """Adapters compute in the activations' dtype, also on an fp8 layer (whose weight is float8 storage)."""
        dtype = self.base_layer.weight.dtype
        return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.bfloat16

    def fix(self, rank: int) -> None:
        """Hold `rank` ranks from now on, all zeros (call before compiling the model). On an fp8 layer the
        down matrix is folded into the base weight (`rank` a multiple of 16: fp8 GEMMs need it)."""
        options = dict(device=self.base_layer.weight.device, dtype=self.adapter_dtype())
        self.lora_up = torch.zeros(self.out_features, rank, **options)
        self.fixed_rank, self.used = rank, 0
        weight = self.base_layer.weight
        if not _is_float8(weight):
            self.lora_down = torch.zeros(rank, self.in_features, **options)
            return
        zeros = type(weight)(  # qdata 0 with scale 1: from_hp(zeros) would divide 0 by a 0 scale
            torch.zeros(rank, self.in_features, dtype=weight.qdata.dtype, device=weight.qdata.device),
            torch.ones(rank, *weight.scale.shape[1:], dtype=weight.scale.dtype, device=weight.scale.device),
            list(weight.block_size), weight.mm_config, weight.act_quant_kwargs, weight.kernel_preference,
            dtype=weight.dtype,
        )
        self.lora_folded_weight = torch.cat([weight, zeros])
        self.base_layer.weight = nn.Parameter(self.lora_folded_weight[: self.out_features], requires_grad=False)
        bias = self.base_layer.bias
        if bias is not None:
            self.lora_folded_bias = torch.cat([bias.detach(), bias.new_zeros(rank)])
            self.base_layer.bias = nn.Parameter(self.lora_folded_bias[: self.out_features], requires_grad=False)

    def _write_down(self, start: int, down: torch.Tensor) -> None:
        """Rows `start:` of the down matrix: quantized per row into the folded weight, else copied."""
        if self.lora_folded_weight is None:
            assert self.lora_down is not None
            self.lora_down[start : start + down.shape[0]].copy_(down)
            return
        folded = self.lora_folded_weight
        rows = slice(self.out_features + start, self.out_features + start + down.shape[0])
        quantized = _quantize_rows(down.to(device=folded.qdata.device, dtype=folded.dtype), folded)
        folded.qdata[rows].copy_(quantized.qdata)
        folded.scale[rows].copy_(quantized.scale)

    def _zero_down(self, start: int, stop: int) -> None:
        if self.lora_folded_weight is None:
            assert self.lora_down is not None
            self.lora_down[start:stop].zero_()
        else:
            self.lora_folded_weight.qdata[self.out_features + start : self.out_features + stop].zero_()

    def fill(self, pieces: Sequence[Piece]) -> None:
        """Hold exactly `pieces`, side by side in order (the caller checked they fit)."""
        rank = sum(p.rank for p in pieces)
        if self.fixed_rank is None:
            if not pieces:
                self.lora_down = self.lora_up = None
            else:
                device, dtype = self.base_layer.weight.device, self.adapter_dtype()
                self.lora_down = torch.cat([p.down for p in pieces]).to(device, dtype)
                self.lora_up = torch.cat([p.up.float() * p.scale for p in pieces], dim=1).to(device, dtype)
            self.used = rank
            return
        assert self.lora_up is not None and rank <= self.fixed_rank
        start = 0
        for piece in pieces:
            stop = start + piece.rank
            self._write_down(start, piece.down)
            self.lora_up[:, start:stop].copy_(piece.up.float() * piece.scale)
            start = stop
        if self.used > rank:  # what the previous LoRAs held beyond the new ones: back to zeros
            self._zero_down(rank, self.used)
            self.lora_up[:, rank : self.used].zero_()
        self.used = rank

    def rescale(self, pieces: Sequence[Piece]) -> None:
        """The same LoRAs at new scales: only their up columns are written (sized: rebuilt)."""
        if self.fixed_rank is None:
            self.fill(pieces)
            return
        assert self.lora_up is not None
        start = 0
        for piece in pieces:
            self.lora_up[:, start : start + piece.rank].copy_(piece.up.float() * piece.scale)
            start += piece.rank

    def clear(self) -> None:
        """No LoRA: sized layers drop their tensors, fixed ones go back to zeros."""
        if self.fixed_rank is None:
            self.lora_down = self.lora_up = None
        elif self.used:
            assert self.lora_up is not None
            self._zero_down(0, self.used)
            self.lora_up[:, : self.used].zero_()
        self.used = 0


def _is_float8(weight: torch.Tensor) -> bool:
    """A torchao float8 weight quantized per row: the one layout the down matrix can be folded into."""
    qdata, block_size = getattr(weight, "qdata", None), getattr(weight, "block_size", None)
    return (
        qdata is not None and qdata.dtype.itemsize == 1 and qdata.dim() == 2 and block_size is not None
        and list(block_size) == [1, weight.shape[1]]
    )


def _quantize_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`rows` quantized as torchao quantizes `like`'s rows (float8, one scale per row)."""
    from torchao.quantization import PerRow

    return type(like).from_hp(
        rows, float8_dtype=like.qdata.dtype, granularity=PerRow(), mm_config=like.mm_config,
        act_quant_kwargs=like.act_quant_kwargs, kernel_preference=like.kernel_preference,
        hp_value_lb=1e-12,  # an all-zero row gets a tiny scale, not 0/0
    )


def wrap_linears(model: nn.Module, names: Sequence[str]) -> dict[str, PackedLoraLinear]:
    """Put a PackedLoraLinear around each named linear of `model` (once: wrapped layers are kept)."""
    out: dict[str, PackedLoraLinear] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if not isinstance(layer, PackedLoraLinear):
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"{name} is a {type(layer).__name__}, not a linear layer")
            layer = PackedLoraLinear(layer)
            setattr(parent, child, layer)
        out[name] = layer
    return out


def packed_layers(model: nn.Module) -> list[PackedLoraLinear]:
    return [m for m in model.modules() if isinstance(m, PackedLoraLinear)]


@contextmanager
def adapters_bypassed(model: nn.Module) -> Iterator[None]:
    """Run `model`'s linears without their adapters (the benchmark's no-adapter baseline); restored on exit."""
    layers = packed_layers(model)
    before = [layer.bypass for layer in layers]
    for layer in layers:
        layer.bypass = True
    try:
        yield
    finally:
        for layer, bypass in zip(layers, before, strict=True):
            layer.bypass = bypass
