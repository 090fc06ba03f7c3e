#!/usr/bin/env bash
# The first GPU call, whole: install the carried wheels (.whl/, from scripts/gpu_wheels.sh), print the
# environment, then the quick benchmark inside 540 s of the call (docs/benchmarks.md):
#
#   run(carry=[".whl"], timeout_s=600, command="bash scripts/gpu_first_call.sh")
#
# Rows not started by 540 s are recorded as "skipped: budget"; the last one started has until about 585 s.
# What comes back in $OUT: env.json, bench.jsonl (each row as it ends), bench.md (the table), bench.log.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?the device tool sets OUT}"
export PYTHONUNBUFFERED=1
pins=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' scripts/gpu-wheels.txt)  # what gpu_wheels.sh downloaded
# shellcheck disable=SC2086  # one pin per word
python3 -m pip install -q --no-index --find-links .whl --no-cache-dir --no-compile $pins
python3 scripts/gpu_env.py
echo "installed and checked in ${SECONDS} s"
# --budget counts from bench.py's start: what the install took comes off the call's 540 s.
# --modeled: the cost model's step times (scripts/roofline.py) beside the measured ones, to correct the model.
python3 scripts/bench.py --quick --aten-gemm --budget $((540 - SECONDS)) --modeled scripts/roofline.json \
  --out "$OUT" 2>&1 | tee "$OUT/bench.log"
