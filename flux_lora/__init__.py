"""flux-lora: a Cog prediction server for FLUX.1 LoRA models (Replicate-compatible)."""

import logging as _logging
import os as _os

__version__ = "0.1.0"

# diffusers imports torchao at import time, which logs deprecation chatter from torch's pytree
# registry and missing optional CUDA kernels; none of it concerns this server.
for _noisy in ("torch.utils._pytree", "torchao"):
    _logging.getLogger(_noisy).setLevel(_logging.ERROR)

# Load sharded safetensors (the FLUX transformer, T5) with parallel workers; read by diffusers at import.
_os.environ.setdefault("HF_ENABLE_PARALLEL_LOADING", "yes")
