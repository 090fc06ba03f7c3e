#!/usr/bin/env bash
# The demo: the real cog server on the tiny random FLUX, a txt2img then an img2img prediction over
# HTTP, images saved under outputs/. Real weights in ./weights are used as they are if present.
source "$(dirname "$0")/_venv.sh"
PORT=${PORT:-5055}
export FLUX_LORA_WEIGHTS=${FLUX_LORA_WEIGHTS:-$PWD/weights}
if [ ! -f "$FLUX_LORA_WEIGHTS/FLUX.1-dev/model_index.json" ] || [ ! -f "$FLUX_LORA_WEIGHTS/falcon-nsfw/config.json" ]; then
  echo "==> building the tiny store in $FLUX_LORA_WEIGHTS"
  flux-lora make-tiny "$FLUX_LORA_WEIGHTS" >/dev/null
fi
mkdir -p outputs
echo "==> starting flux-lora serve on 127.0.0.1:$PORT (log: outputs/server.log)"
flux-lora serve --host 127.0.0.1 --port "$PORT" >outputs/server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
python scripts/demo_client.py "http://127.0.0.1:$PORT" outputs
echo "==> next: 'source .venv/bin/activate' puts flux-lora on your PATH; README.md, 'Use it', goes on from here"
