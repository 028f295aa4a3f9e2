# Sourced by scripts/demo.sh and scripts/test.sh: make .venv and install modelyard with the given extras.
# Usage: . scripts/setup_env.sh EXTRAS   (e.g. "cpu,torch,demo")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${MODELYARD_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
# torch is pinned in the extras: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install --quiet -e "$ROOT[$1]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
