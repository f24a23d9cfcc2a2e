#!/usr/bin/env bash
# A local PostgreSQL for team mode and its tests: installs Debian's `postgresql` if missing, starts the newest cluster,
# and makes sure the login role `mlnb` (password `mlnb`, may create databases) and its database `mlnb` exist.
# Idempotent: run it as often as you like (root, or a user with sudo).
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  $SUDO apt-get install -y --no-install-recommends postgresql >/dev/null \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends postgresql >/dev/null; }
fi
version=$(ls /etc/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
  $SUDO pg_ctlcluster "$version" main start
fi
as_postgres() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
for _ in $(seq 30); do as_postgres pg_isready -q && break; sleep 1; done
as_postgres psql -qtAc "SELECT 1 FROM pg_roles WHERE rolname = 'mlnb'" | grep -q 1 \
  || as_postgres psql -qc "CREATE ROLE mlnb LOGIN CREATEDB PASSWORD 'mlnb'"
as_postgres psql -qtAc "SELECT 1 FROM pg_database WHERE datname = 'mlnb'" | grep -q 1 || as_postgres createdb -O mlnb mlnb
echo "PostgreSQL $version on 127.0.0.1:5432: role mlnb, database mlnb (postgresql://mlnb:mlnb@127.0.0.1:5432/mlnb)"
