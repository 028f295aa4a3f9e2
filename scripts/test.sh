#!/usr/bin/env bash
# Install the test dependencies and run the whole test suite. Every service the tests need
# (Redis, Celery workers, the GCS emulator, Flower) is started by the tests on free loopback ports.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# System packages some tests use: Chromium (tests/browser), iproute2 (the multi-host test),
# bubblewrap (the model-load sandbox: every convert runs in it).
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v ip >/dev/null || missing+=(iproute2)
command -v bwrap >/dev/null || missing+=(bubblewrap)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"; then :
  else echo "could not install ${missing[*]} with apt-get: those tests will be skipped" >&2; fi
fi
. scripts/setup_env.sh "cpu,torch,tf,test"
# Lint and the one-way dependency contract (pyproject.toml [tool.importlinter]) first: seconds, not minutes.
ruff check .
lint-imports
python -m pytest "$@"
