#!/usr/bin/env bash
# Install the test dependencies and run the whole test suite. Every service the tests need
# (Redis, Celery workers, the GCS emulator) is started by the tests on free loopback ports.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/setup_env.sh "cpu,torch,tf,test"
python -m pytest "$@"
