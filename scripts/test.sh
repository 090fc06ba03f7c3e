#!/usr/bin/env bash
# The test command: lint, then the whole suite (offline, tiny model, loopback servers only).
source "$(dirname "$0")/_venv.sh"
echo "==> ruff"
ruff check .
echo "==> pytest"
exec pytest "$@"
