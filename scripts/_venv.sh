# Sourced by the scripts: create .venv with the project installed, once (about a minute).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/flux-lora ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "==> installing into .venv (first run only)"
  [ -d .venv ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored" || true
  .venv/bin/flux-lora --help >/dev/null
  touch .venv/.installed
fi
export PATH="$PWD/.venv/bin:$PATH"
