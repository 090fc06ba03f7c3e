"""The packed adapter against peft, the reference it replaces (flux_lora/lora/packed.py).

Three LoRAs of different targets, ranks and scales at once in one adapter per linear must compute what
peft's three separate adapters compute, on a plain transformer (sized to the LoRAs) and on a reserved one
(the compiled go_fast layout); on an fp8 transformer, where the down matrices are folded into the base
weights in float8, what peft computes on the same rounded numbers. Scale changes and switches write in
place: no tensor of a reserved transformer changes its shape or storage.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lora_samples as S
import pytest
import torch

from flux_lora.generation import fast
from flux_lora.generation.fast import Fp8Mode, WarmupShape
from flux_lora.generation.tiny import tiny_transformer
from flux_lora.lora.adapters import LoraManager, Wanted
from flux_lora.lora.formats import ModelNames, convert_lora, read_lora
from flux_lora.lora.packed import PackedLoraLinear, Piece, adapters_bypassed, packed_layers

SCALES = (0.8, -0.5, 1.3)


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_transformer(True).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def files(base: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three LoRAs: attention only (rank 2), MLPs only (rank 3), everything (rank 5); two formats."""
    folder = tmp_path_factory.mktemp("loras")
    loras = [
        S.as_peft(S.random_lora(base, 1, rank=2, only=("img_attn", "txt_attn")), base),
        S.as_kohya(S.random_lora(base, 2, rank=3, only=("img_mlp", "txt_mlp", "linear1"))),
        S.as_peft(S.random_lora(base, 3, rank=5), base),
    ]
    return [S.save(lora, folder / f"{i}.safetensors") for i, lora in enumerate(loras)]


def call(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    inputs = fast.dummy_inputs(model, WarmupShape(2, 64, 8), torch.device("cpu"), dtype)
    with torch.inference_mode():
        return model(**inputs)[0].float()


def wanted(files: list[Path], scales: tuple[float, ...] = SCALES) -> list[Wanted]:
    pairs = enumerate(zip(files, scales, strict=True))
    return [Wanted(f"loras[{i}]", path, scale, path.stem) for i, (path, scale) in pairs]


def with_peft(model: torch.nn.Module, files: list[Path], scales: tuple[float, ...] = SCALES,
              round_down: bool = False) -> torch.nn.Module:
    """`model` with each LoRA as a peft adapter of its own, all active at their scales (diffusers' API).
    `round_down`: the down matrices rounded to float8 per row first, as folding into fp8 weights rounds them."""
    names = ModelNames.of(model, None)
    adapters = []
    for index, path in enumerate(files):
        sd = dict(convert_lora(read_lora(path)[0], names).transformer)
        if round_down:
            sd = {key: _fp8_rounded(value) if key.endswith("lora_A.weight") else value for key, value in sd.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_lora_adapter(sd, prefix=None, adapter_name=f"a{index}")
        adapters.append(f"a{index}")
    model.set_adapters(adapters, list(scales))
    return model


def _fp8_rounded(down: torch.Tensor) -> torch.Tensor:
    from torchao.quantization import Float8Tensor, PerRow

    return Float8Tensor.from_hp(down, granularity=PerRow(), hp_value_lb=1e-12).dequantize()


def dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of an fp8 model holding the float8 weights' exact values."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, torch.nn.Linear) and hasattr(module.weight, "dequantize"):
            module.weight = torch.nn.Parameter(module.weight.dequantize(), requires_grad=False)
    return plain


def test_three_loras_in_one_sized_adapter_equal_three_peft_adapters(base, files):
    ours = copy.deepcopy(base)
    manager = LoraManager({"dev": ours}, None)
    manager.apply("dev", wanted(files))
    reference = call(with_peft(copy.deepcopy(base), files))
    torch.testing.assert_close(call(ours), reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(call(ours), call(base), atol=1e-3)
    layer = ours.get_submodule("transformer_blocks.0.attn.to_q")
    assert layer.lora_down.shape[0] == 2 + 5  # attention: the first and the third LoRA side by side
    assert ours.get_submodule("transformer_blocks.0.ff.net.2").lora_down.shape[0] == 3 + 5


def test_the_same_in_bf16(base, files):
    half = copy.deepcopy(base).to(torch.bfloat16)
    ours = copy.deepcopy(half)
    LoraManager({"dev": ours}, None).apply("dev", wanted(files))
    reference = call(with_peft(copy.deepcopy(half), files), torch.bfloat16)
    effect = (reference - call(half, torch.bfloat16)).abs().mean()
    assert (call(ours, torch.bfloat16) - reference).abs().mean() < 0.05 * effect


def test_a_reserved_adapter_computes_the_same(base, files):
    ours = copy.deepcopy(base)
    manager = LoraManager({"dev": ours}, None, max_rank=16)
    assert manager.reserve("dev") == 16
    manager.apply("dev", wanted(files))
    torch.testing.assert_close(call(ours), call(with_peft(copy.deepcopy(base), files)), rtol=1e-4, atol=1e-5)
    assert all(layer.lora_down.shape[0] == 16 for layer in packed_layers(ours))  # unused rank: zeros


def test_folded_into_fp8_weights_it_computes_peft_on_the_same_rounded_numbers(base, files):
    fp8, mode = fast.quantized_copy(base, Fp8Mode.WEIGHT_ONLY)
    assert mode is Fp8Mode.WEIGHT_ONLY
    reference_base = dequantized(fp8)
    manager = LoraManager({"dev": fp8}, None, max_rank=16)
    manager.reserve("dev")
    folded = [layer for layer in packed_layers(fp8) if layer.lora_folded_weight is not None]
    assert len(folded) == fast.quantized_linears(fp8) > 0
    without = call(reference_base)
    torch.testing.assert_close(call(fp8), without, rtol=1e-5, atol=1e-6)  # zero rows fold to nothing
    manager.apply("dev", wanted(files))
    rounded = call(with_peft(copy.deepcopy(reference_base), files, round_down=True))
    torch.testing.assert_close(call(fp8), rounded, rtol=1e-4, atol=1e-5)
    # against unrounded down matrices: the LoRAs' effect within a few percent
    exact = call(with_peft(reference_base, files))
    assert (call(fp8) - exact).abs().mean() < 0.05 * (exact - without).abs().mean()


def fp8_base_only(model: torch.nn.Module) -> torch.nn.Module:
    """`model` as if it had no adapters: its base layers alone."""
    plain = copy.deepcopy(model)
    for layer in packed_layers(plain):
        layer.bypass = True
    return plain


def test_each_loras_effect_is_what_it_adds_alone():
    """One layer, three pieces side by side: the packed output minus the base is the sum of each piece's own."""
    torch.manual_seed(1)
    layer = PackedLoraLinear(torch.nn.Linear(24, 40))
    pieces = [Piece(torch.randn(r, 24), torch.randn(40, r), s) for r, s in ((2, 0.5), (4, -1.0), (3, 2.0))]
    x = torch.randn(7, 24)
    base = layer.base_layer(x)
    alone = []
    for piece in pieces:
        layer.fill([piece])
        alone.append(layer(x) - base)
        expected = piece.scale * (x @ piece.down.T) @ piece.up.T
        torch.testing.assert_close(alone[-1], expected, rtol=1e-5, atol=1e-5)
    layer.fill(pieces)
    torch.testing.assert_close(layer(x) - base, sum(alone), rtol=1e-5, atol=1e-5)
    with adapters_bypassed(layer):
        assert torch.equal(layer(x), base)
    layer.clear()
    assert layer.lora_down is None and torch.equal(layer(x), base)  # no LoRA: the base alone, bit for bit


def _storage(model: torch.nn.Module) -> dict[str, tuple[int, tuple[int, ...]]]:
    out = {}
    for name, tensor in model.named_buffers():
        if "lora_" in name:
            inner = getattr(tensor, "qdata", tensor)
            out[name] = (inner.data_ptr(), tuple(tensor.shape))
    return out


@pytest.mark.parametrize("fp8", [False, True], ids=["plain", "fp8"])
def test_scale_changes_and_switches_write_in_place(base, files, fp8):
    model = fast.quantized_copy(base, Fp8Mode.WEIGHT_ONLY)[0] if fp8 else copy.deepcopy(base)
    manager = LoraManager({"dev": model}, None, max_rank=16)
    manager.reserve("dev")
    manager.apply("dev", wanted(files))
    before, loads, first = _storage(model), manager.loads, call(model)
    manager.apply("dev", wanted(files, (0.1, 0.2, 0.3)))  # scales only
    assert _storage(model) == before and manager.loads == loads
    assert not torch.allclose(call(model), first)
    manager.apply("dev", wanted(files[1:], (1.0, 1.0)))  # a switch: fewer LoRAs
    manager.apply("dev", wanted(files))
    assert _storage(model) == before
    torch.testing.assert_close(call(model), first)
    manager.apply("dev", [])
    assert _storage(model) == before
    torch.testing.assert_close(call(model), call(fp8_base_only(model)), rtol=0, atol=0)  # zeros add exact zeros
