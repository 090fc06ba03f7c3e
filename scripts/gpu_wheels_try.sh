#!/usr/bin/env bash
# Try the install line of scripts/gpu_wheels.sh without a GPU: a throwaway CPython 3.12 venv made to
# look like the GPU machine (the versions scripts/device-packages.txt records, old releases of the
# small packages whose version there is unrecorded, and a metadata-only torch 2.11.0, since no torch
# 2.11 for 3.12 can be had here), then `pip install --no-index --find-links .whl ...`, `pip check` and
# the imports that need no torch. Needs the network (the look-alike base) and PYTHON312 (default python3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
line=$(bash scripts/gpu_wheels.sh | tail -1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
venv=$tmp/venv
"${PYTHON312:-python3.12}" -m venv "$venv"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir "$site/torch-2.11.0.dist-info"
printf 'Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0\n' >"$site/torch-2.11.0.dist-info/METADATA"
touch "$site/torch-2.11.0.dist-info/RECORD"
recorded=$(grep -E '^(transformers|huggingface-hub|tokenizers|accelerate|safetensors|sentencepiece|numpy)==' scripts/device-packages.txt)
# shellcheck disable=SC2086
"$venv/bin/pip" install -q --no-deps $recorded pyyaml requests charset-normalizer urllib3 certifi h11 filelock \
  fsspec packaging tqdm psutil pillow protobuf httpx httpcore idna sniffio typer==0.24.0 shellingham rich \
  markdown-it-py mdurl pygments annotated-doc anyio==4.10.0 hf-xet==1.2.0 click==8.2.1 typing_extensions==4.12.2 \
  regex==2024.11.6 2>&1 | { grep -v "is ignored" || true; }
# The machine's pip has no find-links of ours: only .whl may answer.
# shellcheck disable=SC2086
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$venv/bin/python" ${line#python3 }
"$venv/bin/pip" check
"$venv/bin/python" -c "import cog, coglet, diffusers, transformers, huggingface_hub, cog.server.http; \
print('imported: diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'hub', huggingface_hub.__version__)"
