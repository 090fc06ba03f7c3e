# Sourced by the scripts: create .venv with the project installed, once (about a minute).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/flux-lora ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "==> installing into .venv (first run only: about a minute to a few, one line per package)"
  [ -d .venv ] || "$PYTHON" -m venv .venv
  # pip's own lines show progress; its exit status is kept (pipefail), only known chatter is filtered out.
  .venv/bin/python -m pip install --disable-pip-version-check --progress-bar off -e '.[dev]' 2>&1 \
    | { grep --line-buffered -v -e "is ignored" -e "^Requirement already satisfied" -e "^  Using cached" || true; }
  .venv/bin/flux-lora --help >/dev/null
  touch .venv/.installed
fi
export PATH="$PWD/.venv/bin:$PATH"
