#!/usr/bin/env bash
# `make demo`: the whole system on the built-in synthetic demo, end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH=$PWD/$VENV/bin:$PATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 BENTOML_DO_NOT_TRACK=true
export PREFECT_HOME=${PREFECT_HOME:-$PWD/var/prefect}
export PREFECT_API_URL=http://127.0.0.1:${PREFECT_PORT:-4200}/api
export CXRLT_SERVICE_URL=http://127.0.0.1:${SERVICE_PORT:-3000}
export CXRLT_PREDICTION_LOG=${CXRLT_PREDICTION_LOG:-$PWD/var/predictions/predictions.jsonl}
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }
param() { python -c "import yaml,sys; d=yaml.safe_load(open('params.yaml')); print(d$1)"; }

step "1/6 synthetic demo data (CXR-LT 2024 layout) -> data/demo"
if [ -f data/demo/cxr-lt-2024/train_labeled.csv ]; then echo "  exists, kept"; else
  cxrlt demo-data --out data/demo --studies "$(param "['demo']['studies']")" --seed "$(param "['demo']['seed']")"
fi

step "2/6 DVC: version data/ (data.dvc) and push it to the local remote"
dvc add data -q
dvc push -q data.dvc
echo "  data version $(python -c "import yaml; print(yaml.safe_load(open('data.dvc'))['outs'][0]['md5'])")"

step "3/6 local Prefect server + deployments"
scripts/stack.sh prefect

step "4/6 prefect deployment run 'train-eval/demo' (dvc.yaml's stages per variant, register, promote)"
if ! prefect deployment run 'train-eval/demo' --watch --watch-timeout 3600; then  # ~3 min on 2 idle cores
  echo "error: the train-eval flow run failed; its error (var/log/prefect-deployments.log):" >&2
  grep -E "ERROR|Error:" var/log/prefect-deployments.log | tail -n 5 >&2; exit 1
fi
cxrlt registry list
dvc push -q   # the models (and prepared data) to the DVC remote beside the data

step "5/6 BentoML service (best model) + Streamlit UI"
scripts/stack.sh serve

step "6/6 send test studies to the service, then prefect deployment run 'drift-report/hourly'"
cxrlt send --manifest prepared/manifest --split test --studies 40
prefect deployment run 'drift-report/hourly' --watch --watch-timeout 600

step "done in $(( $(date +%s) - start ))s"
scripts/stack.sh urls
echo "  drift     reports/drift/drift.html"
echo "  try:      curl -F images=@<a demo jpg> $CXRLT_SERVICE_URL/predict"
echo "  stop:     make down"
