#!/usr/bin/env bash
# The local stack of `make demo`: Prefect server + deployments, BentoML service, Streamlit UI.
# Every process listens on 127.0.0.1; PIDs go to .run/, logs to var/log/. `stack.sh down` stops
# exactly the processes this script started, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
BIN=$VENV/bin
PREFECT_PORT=${PREFECT_PORT:-4200}
SERVICE_PORT=${SERVICE_PORT:-3000}
UI_PORT=${UI_PORT:-8501}
export PREFECT_HOME=${PREFECT_HOME:-$PWD/var/prefect}
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_RUNNER_POLL_FREQUENCY=${PREFECT_RUNNER_POLL_FREQUENCY:-2}
# no page of the stack calls a host outside the machine: Prefect's v2 dashboard loads an analytics client
# (amplitude.com) whatever the analytics setting, so the classic dashboard is served; the API host and
# port are settings too, or the dashboard calls 127.0.0.1:4200 whatever port the server has
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_UI_V2_ENABLED=false
export PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$PREFECT_PORT
export BENTOML_DO_NOT_TRACK=true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export CXRLT_SERVICE_URL=http://127.0.0.1:$SERVICE_PORT
mkdir -p .run var/log
declare -A PORT_OF=([prefect-server]=$PREFECT_PORT [service]=$SERVICE_PORT [ui]=$UI_PORT)

start() {  # start NAME CMD...: run in the background unless already running
  local name=$1; shift
  if [ -f ".run/$name.pid" ] && kill -0 "$(cat ".run/$name.pid")" 2>/dev/null; then
    echo "  $name already running (pid $(cat ".run/$name.pid"))"; return
  fi
  if [ -n "${PORT_OF[$name]:-}" ] && (exec 3<>"/dev/tcp/127.0.0.1/${PORT_OF[$name]}") 2>/dev/null; then
    echo "error: port ${PORT_OF[$name]} (for $name) is taken by a process this project did not start here;" \
         "stop it, or choose another port (PREFECT_PORT, SERVICE_PORT, UI_PORT)" >&2
    exit 1
  fi
  nohup "$@" >"var/log/$name.log" 2>&1 &
  echo $! >".run/$name.pid"
  echo "  started $name (pid $!, log var/log/$name.log)"
}

wait_http() {  # wait_http NAME URL SECONDS
  local name=$1 url=$2 secs=$3
  for _ in $(seq "$secs"); do
    if curl -fsS "$url" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$(cat ".run/$name.pid")" 2>/dev/null; then
      echo "error: $name exited; last lines of var/log/$name.log:" >&2; tail -n 20 "var/log/$name.log" >&2; return 1
    fi
    sleep 1
  done
  echo "error: $name did not answer $url within ${secs}s (see var/log/$name.log)" >&2; return 1
}

stop() {  # stop NAME: TERM, then KILL after 15 s (a Prefect runner may ignore TERM while finishing)
  local f=".run/$1.pid"
  [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 15); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    echo "  stopped $1 (pid $pid)"
  fi
  rm -f "$f"
}

case "${1:-}" in
  prefect)
    start prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" --analytics-off
    wait_http prefect-server "http://127.0.0.1:$PREFECT_PORT/api/health" 120
    start prefect-deployments "$BIN/python" -m pipelines.serve --name demo
    # the deployment exists once the serve process has registered it
    for _ in $(seq 60); do
      "$BIN/prefect" deployment inspect 'train-eval/demo' >/dev/null 2>&1 && break; sleep 1
    done ;;
  serve)
    OMP_WAIT_POLICY=PASSIVE start service "$BIN/bentoml" serve service.service:CXRService --host 127.0.0.1 --port "$SERVICE_PORT"
    wait_http service "http://127.0.0.1:$SERVICE_PORT/readyz" 180
    start ui "$BIN/streamlit" run ui/app.py --server.headless true --server.address 127.0.0.1 \
      --server.port "$UI_PORT" --browser.gatherUsageStats false --client.toolbarMode viewer --runner.magicEnabled false \
      --server.maxUploadSize 20
    wait_http ui "http://127.0.0.1:$UI_PORT/_stcore/health" 60 ;;
  down)
    for n in ui service prefect-deployments prefect-server; do stop "$n"; done ;;
  urls)
    echo "  service   http://127.0.0.1:$SERVICE_PORT   (POST /predict, GET /readyz, docs at /docs)"
    echo "  UI        http://127.0.0.1:$UI_PORT"
    echo "  Prefect   http://127.0.0.1:$PREFECT_PORT   (flow runs: /runs)" ;;
  *) echo "usage: scripts/stack.sh prefect|serve|down|urls" >&2; exit 2 ;;
esac
