"""What a run on the GPU machine runs with: versions, the GPU, and whether torchao's compiled kernels loaded.

Why: the packages there are a mix of the image's and the wheels carried in `.whl/`, and torchao falls
back quietly when its C++/CUDA extension does not load (its fp8 matmuls go through torch._scaled_mm
either way), so the first command of a device call prints this, and scripts/bench.py writes the same
dict to its env.json. Also printed: the versions there of the packages scripts/wheelhouse.py could only
take on trust (a carried wheel needs them, their version there was never recorded), and whether
pillow writes WebP (the default output format).

    python scripts/gpu_env.py
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import runpy
from pathlib import Path

PACKAGES = (
    "torch", "torchao", "diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub",
    "tokenizers", "sentencepiece", "pillow", "cog", "coglet", "triton",
)  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torchao_extension() -> dict:
    """Which of torchao's `_C*.so` files torch loaded, and the reason torchao gave for skipping them."""
    if importlib.util.find_spec("torchao") is None:
        return {"installed": False}
    import torch
    import torchao

    files = sorted(p.name for p in Path(torchao.__file__).parent.glob("_C*.so"))
    loaded = sorted(Path(p).name for p in torch.ops.loaded_libraries if Path(p).name in files)
    errors = {}
    for name in set(files) - set(loaded):  # torchao only logs why; loading again gives the reason here
        try:
            torch.ops.load_library(str(Path(torchao.__file__).parent / name))
        except Exception as exc:  # any failure is the answer reported
            errors[name] = str(exc.__cause__ or exc).splitlines()[0][-300:]
    return {
        "files": files,
        "loaded": loaded,
        "all_loaded": bool(files) and loaded == files,
        "errors": errors,
        "skip_reason": getattr(torchao, "_skip_reason", None),
        # torchao's Float8Tensor picks mslk kernels only when that package is present, else torch._scaled_mm.
        "fp8_matmul": "mslk" if importlib.util.find_spec("mslk") else "torch._scaled_mm",
    }


def unverified_versions(wheels: Path, device_list: Path = ROOT / "scripts" / "device-packages.txt") -> dict:
    """Installed versions of what scripts/wheelhouse.py lists as unverified for the wheels in `wheels`."""
    wheelhouse = runpy.run_path(str(ROOT / "scripts" / "wheelhouse.py"))
    carried = [wheelhouse["read_wheel"](p) for p in sorted(wheels.glob("*.whl"))]
    report = wheelhouse["check"](carried, wheelhouse["read_device_packages"](device_list))
    return {name: _version(name) for name in sorted(report.unverified_names)}


def describe(wheels: Path = ROOT / ".whl") -> dict:
    """Python, package versions, torch's CUDA and GPU, torchao's extension status, the versions of the
    packages the carried wheels (`wheels`) need that were never recorded for the device, and pillow's WebP."""
    import torch
    from PIL import features

    info: dict = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "versions": {name: _version(name) for name in PACKAGES},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
        }
    info["torchao_extension"] = _torchao_extension()
    info["unverified"] = unverified_versions(wheels) if wheels.is_dir() else "no carried wheels here"
    info["pillow_webp"] = features.check("webp")
    return info


if __name__ == "__main__":
    print(json.dumps(describe(), indent=2))
