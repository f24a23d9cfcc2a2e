#!/usr/bin/env bash
# Stop the team-mode MLflow server started by up.sh (PostgreSQL keeps running: `pg_ctlcluster 15 main stop` stops it).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${MLNB_TEAM_DIR:-.team}
if [ -f "$dir/mlflow.pid" ]; then
  pid=$(cat "$dir/mlflow.pid")
  pkill -TERM -P "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true
  rm -f "$dir/mlflow.pid"; echo "stopped the MLflow server (pid $pid)"
else
  echo "no MLflow server started from $dir"
fi
