#!/usr/bin/env bash
# The test command: lint, the stages' import layers, then the whole suite (offline, tiny model, loopback servers only).
source "$(dirname "$0")/_venv.sh"
echo "==> ruff"
ruff check .
echo "==> import layers"
lint-imports --no-cache >/dev/null || lint-imports --no-cache
echo "==> pytest (two workers; tests/conftest.py gives each whole files, the longest first)"
exec pytest -n 2 "$@"
