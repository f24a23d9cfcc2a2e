#!/usr/bin/env bash
# Team mode on this machine: PostgreSQL (deploy/team/postgres.sh) and an MLflow tracking server on 127.0.0.1:5000 backed by
# it, with artifacts under .team/artifacts (the shared path). Point mlnb at it with
#   registry.tracking_uri: http://127.0.0.1:5000   and   train.tracking_uri: http://127.0.0.1:5000
# Stop with `make team-down`. Settings: MLNB_TEAM_PORT (5000), MLNB_TEAM_DIR (.team).
set -euo pipefail
cd "$(dirname "$0")/../.."
port=${MLNB_TEAM_PORT:-5000}
dir=${MLNB_TEAM_DIR:-.team}
bash deploy/team/postgres.sh
mkdir -p "$dir/artifacts"
if [ -f "$dir/mlflow.pid" ] && kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null; then
  echo "MLflow server already running (pid $(cat "$dir/mlflow.pid")) on http://127.0.0.1:$port"; exit 0
fi
nohup .venv/bin/mlflow server --host 127.0.0.1 --port "$port" --workers 2 \
  --backend-store-uri postgresql://mlnb:mlnb@127.0.0.1:5432/mlnb \
  --artifacts-destination "$PWD/$dir/artifacts" >"$dir/mlflow.log" 2>&1 &
echo $! >"$dir/mlflow.pid"
for _ in $(seq 120); do
  if .venv/bin/python -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "http://127.0.0.1:$port/health" 2>/dev/null; then
    echo "MLflow tracking server on http://127.0.0.1:$port (PostgreSQL backend, artifacts in $dir/artifacts, log $dir/mlflow.log)"; exit 0
  fi
  kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null || { echo "mlflow server exited; see $dir/mlflow.log" >&2; tail -20 "$dir/mlflow.log" >&2; exit 1; }
  sleep 0.5
done
echo "mlflow server did not become healthy in 60 s; see $dir/mlflow.log" >&2; exit 1
