"""flux-lora: a Cog prediction server for FLUX.1 LoRA models (Replicate-compatible)."""

import logging as _logging
import os as _os
import re as _re

__version__ = "0.1.0"

# diffusers imports torchao at import time, which logs deprecation chatter from torch's pytree
# registry and missing optional CUDA kernels; none of it concerns this server.
for _noisy in ("torch.utils._pytree", "torchao"):
    _logging.getLogger(_noisy).setLevel(_logging.ERROR)


class _Drop(_logging.Filter):
    """Drops one library's records that match a known message: ones that say nothing a user of this server
    can act on, printed at every start. Everything else those loggers say still shows."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = _re.compile(pattern)

    def filter(self, record: _logging.LogRecord) -> bool:
        return not self.pattern.match(str(record.msg))


for _name, _pattern in {
    # torchao 0.18 has no NF4Tensor/uintx classes, which diffusers 0.42 registers for torch.load; go_fast is fp8.
    "diffusers.quantizers.torchao.torchao_quantizer": r"Unable to import `torchao` Tensor objects",
    # torchvision is kept out on purpose (NOTES.md: it drags in CUDA torch); the PIL processors serve.
    "transformers.utils.import_utils": r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back",
    # diffusers warns at every .to(dtype) of a model, even when its list of float32 modules is empty.
    "diffusers.models.modeling_utils": r"There are modules in \w+ that should be kept in float32: \[\]\.",
}.items():
    _logging.getLogger(_name).addFilter(_Drop(_pattern))

# Load sharded safetensors (the FLUX transformer, T5) with parallel workers; read by diffusers at import.
_os.environ.setdefault("HF_ENABLE_PARALLEL_LOADING", "yes")

# oneDNN (CPU matmuls) and torch's ideep conv cache keep one compiled primitive per input shape,
# without bound in practice: every new size/batch a server sees grew its memory for good (measured
# with scripts/soak.py: +60% over 200 varied requests, flat with these). Only CPU ops are affected.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
_os.environ.setdefault("LRU_CACHE_CAPACITY", "1")

# Setup logs one record per stage as it ends (build, pin, quantize, reserve, compile, warm-up, ...), on this
# logger, carrying `stage` and `seconds`: a cold start that stalls shows the last stage it finished, and
# scripts/bench.py prints them as its setup timeline.
SETUP_LOGGER = "flux_lora.setup"


def log_setup_stage(stage: str, seconds: float, detail: str = "") -> None:
    """One setup stage has ended: `seconds` it took; `detail` says what it covered."""
    _logging.getLogger(SETUP_LOGGER).info(
        "setup: %s %.1fs%s", stage, seconds, f" {detail}" if detail else "", extra={"stage": stage, "seconds": seconds}
    )
