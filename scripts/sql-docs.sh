#!/usr/bin/env bash
# Writes docs/sql-api.md from the installed extension: every public meter.*
# function, its signature, its result and its COMMENT. sql_docs.rs fails when
# the file differs from what the installed extension says, so the reference
# cannot drift from the code.
#   usage: scripts/sql-docs.sh [port] [database]   (a cluster with polar_meter installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${1:-55432}
DB=${2:-pm_template}
psql -h 127.0.0.1 -p "$PORT" -U postgres -X -q -At -d "$DB" -c "$(cat tests/e2e/sql/sql_api_reference.sql)" >docs/sql-api.md
echo "wrote docs/sql-api.md"
