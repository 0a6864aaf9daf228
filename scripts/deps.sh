#!/usr/bin/env bash
# Installs what polar-meter needs on a Debian machine, skipping what is there.
# Idempotent; run as root (CI is root). Used by `make up` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PGRX_VERSION=$(sed -n 's/^pgrx = "=\(.*\)"/\1/p' Cargo.toml)
APT_PKGS=(curl postgresql-15 postgresql-server-dev-15 postgresql-15-cron libclang-dev clang gcc sudo pkg-config prometheus)

missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "deps: apt installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Debian starts a default cluster on 5432; we run our own clusters and need no daemon.
if [ -d /etc/postgresql/15/main ] && command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster 15 main stop 2>/dev/null || true
fi

if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
    echo "deps: cargo install cargo-pgrx $PGRX_VERSION (a few minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi
if ! grep -qs "pg15 = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg15 "$PG_CONFIG"
fi
