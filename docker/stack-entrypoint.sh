#!/usr/bin/env bash
# The roles of the stack image (compose.yaml names one per container):
#   prefect-server   Prefect's API and dashboard (PREFECT_API_DATABASE_CONNECTION_URL: its database)
#   worker           the train-eval and drift-report deployments, run by this process (pipelines.serve)
#                    in the project mounted at CXRLT_PROJECT_DIR, with the DVC cache and remote on volumes
#   ui               the web app (CXRLT_SERVICE_URL: the prediction service)
#   anything else    run as a command (cxrlt, dvc, prefect, bash ...)
set -euo pipefail
role=${1:-ui}
case "$role" in
  prefect-server)
    shift
    exec prefect server start --host "${PREFECT_SERVER_HOST:-0.0.0.0}" --port "${PREFECT_SERVER_PORT:-4200}" \
      --analytics-off "$@" ;;
  worker)
    shift
    cd "${CXRLT_PROJECT_DIR:-/project}"
    # DVC's cache and remote are volumes of their own; the settings go to .dvc/config.local (not committed)
    if [ -n "${CXRLT_DVC_CACHE:-}" ]; then dvc config --local cache.dir "$CXRLT_DVC_CACHE"; fi
    if [ -n "${CXRLT_DVC_REMOTE:-}" ]; then
      dvc remote add --local --force --default containers "$CXRLT_DVC_REMOTE"
    fi
    exec python -m pipelines.serve --name "${CXRLT_DEPLOYMENT:-demo}" "$@" ;;
  ui)
    shift
    exec streamlit run /app/ui/app.py --server.headless true --server.address "${UI_HOST:-0.0.0.0}" \
      --server.port "${UI_PORT:-8501}" --browser.gatherUsageStats false --client.toolbarMode viewer \
      --runner.magicEnabled false "$@" ;;
  *)
    exec "$@" ;;
esac
