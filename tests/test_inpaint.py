"""The inpaint mask's polarity, as Replicate's models read it: white repaints, black keeps.

Held in latent space: the pipeline puts the input image's own latents back wherever the mask keeps
at its last step, so there they must be equal exactly. In pixels nothing can be exact on the tiny store:
its random VAE decoder mixes the whole latent (its mid block attends everywhere) into every pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flux_lora.generation.inputs import prepare_inputs
from flux_lora.generation.pipelines import generate, load_pipelines, pick_device
from flux_lora.request import build_request


def test_white_repaints_and_black_keeps(tiny_store: Path, tmp_path: Path) -> None:
    pipelines = load_pipelines(tiny_store, *pick_device("cpu"))
    source = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (320, 256, 3), dtype=np.uint8)).save(source)

    def latents(white: tuple[int, int, int, int] | None) -> torch.Tensor:
        """The final latents (channels, rows, columns) of an inpaint whose 64x80 mask is white in `white`."""
        mask = Image.new("L", (64, 80), 0)
        if white is not None:
            mask.paste(255, white)
        mask.save(tmp_path / "mask.png")
        request = build_request(prompt="a dog", image=str(source), mask=str(tmp_path / "mask.png"),
                                num_inference_steps=2, seed=3)
        cond = prepare_inputs(request)
        packed = generate(pipelines, request, cond, output_type="latent")[0]
        pipe = pipelines.get(request.key, request.mode)
        return pipe._unpack_latents(packed[None], cond.height, cond.width, pipe.vae_scale_factor)[0]

    kept = latents(None)  # all black: the input image's latents everywhere
    left = latents((0, 0, 32, 80))  # white on the left half: repaint it, keep the right
    half = kept.shape[-1] // 2
    assert torch.equal(left[..., half:], kept[..., half:]), "the black half keeps the input image"
    assert (left[..., :half] - kept[..., :half]).abs().mean() > 0.5, "the white half is repainted"
