#!/usr/bin/env bash
# Wheels for the GPU machine, which reaches no registry: download scripts/gpu-wheels.txt's pins for
# CPython 3.12 on manylinux x86-64 into the git-ignored .whl/, check that every requirement of what is
# carried is carried or preinstalled there (scripts/device-packages.txt), that it all stays under
# 60 MiB, and print the one install line. Needs the network here, pip and `packaging` (PYTHON, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
rm -rf .whl
mkdir .whl
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
sed -e 's/#.*//' -e '/^[[:space:]]*$/d' scripts/gpu-wheels.txt \
  | xargs "$PYTHON" -m pip download --quiet --progress-bar off --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --abi cp312 "${platforms[@]}" --dest .whl 2>&1 \
  | { grep -v "is ignored" || true; }
exec "$PYTHON" scripts/wheelhouse.py .whl scripts/device-packages.txt
