#!/usr/bin/env bash
# Every test suite, in the order CI runs them : format, lints, pure
# unit tests, then the extension installed into a throwaway cluster and the
# end-to-end suites against it. Prints a Postgres log tail on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
export PM_PG_PORT=${PM_PG_PORT:-55432}
PSQL=(psql -h 127.0.0.1 -p "$PM_PG_PORT" -U postgres -X -q -v ON_ERROR_STOP=1)

step() { printf '\n==> %s\n' "$*"; }
on_exit() {
    rc=$?
    if [ $rc -ne 0 ]; then
        step "FAILED (exit $rc); last lines of the test cluster's log:"
        scripts/cluster.sh log test
    fi
    scripts/cluster.sh stop test || true
    scripts/citus.sh stop >/dev/null 2>&1 || true
    exit $rc
}
trap on_exit EXIT

# PM_ONLY="<suite> ..." runs just those end-to-end suites (make fuzz uses it).
if [ -z "${PM_ONLY:-}" ]; then
step "format"
cargo fmt --all --check

step "released SQL is frozen (sql/released.sha256)"
# An upgrade script or install script that shipped in a release must never
# change: databases out there ran exactly those bytes. Add a line when releasing.
sha256sum --check --strict sql/released.sha256

step "clippy"
cargo clippy -p polar_meter_rules -p polar-meterd -p polar-emulator -p pm-e2e --all-targets -- -D warnings
cargo clippy -p polar_meter -- -D warnings

step "unit tests (pure rules, sidecar, emulator)"
cargo test -p polar_meter_rules -p polar-meterd -p polar-emulator

step "emulator conformance: Polar's official SDK (polar-sdk 1.0.2, PyPI) parses every answer"
cargo build -p polar-meterd -p polar-emulator
[ -x .pm/venv/bin/python ] || python3 -m venv .pm/venv || {
    apt-get install -y -q python3-venv && python3 -m venv .pm/venv
}
.pm/venv/bin/python -c 'import polar.v2026_04' 2>/dev/null || .pm/venv/bin/pip install -q 'polar-sdk==1.0.2'
target/debug/polar-emulator --listen 127.0.0.1:25480 --tokens polar_oat_conformance --rate-limit 40 >/dev/null 2>&1 &
EMU=$!
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:25480/v1/events/ && break; sleep 0.1; done
.pm/venv/bin/python tests/polar-emulator/conformance/sdk_conformance.py http://127.0.0.1:25480 polar_oat_conformance ||
    { kill $EMU; exit 1; }
kill $EMU

fi

step "install the extension"
cargo pgrx install -p polar_meter --pg-config "$PG_CONFIG" 2>&1 | tail -n 1
SHARE=$("$PG_CONFIG" --sharedir)/extension
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# Released install scripts, frozen, so sql_upgrade can create the extension
# at those versions and ALTER EXTENSION ... UPDATE them.
install -m 644 tests/upgrade/polar_meter--*.sql "$SHARE/"
# The upgrade script into this version is generated (scripts/upgrade-script.py)
# until the version is released; then it is frozen like the others.
if ! grep -q "polar_meter--[0-9.]*--$VERSION.sql" sql/released.sha256; then
    PREV=$(ls sql/polar_meter--*--"$VERSION".sql | sed -n 's/.*polar_meter--\(.*\)--.*/\1/p')
    scripts/upgrade-script.py "$PREV" "$VERSION" "$SHARE/polar_meter--$VERSION.sql" --check
fi

step "throwaway cluster on 127.0.0.1:$PM_PG_PORT"
scripts/cluster.sh destroy test
scripts/cluster.sh start test "$PM_PG_PORT" pm_cron
"${PSQL[@]}" -c "CREATE DATABASE pm_template" -c "CREATE DATABASE pm_cron"
"${PSQL[@]}" -d pm_template -c "CREATE EXTENSION polar_meter" 2>/dev/null
"${PSQL[@]}" -d pm_cron -c "CREATE EXTENSION pg_cron" -c "CREATE EXTENSION polar_meter"

step "isolation specs (extension/tests/isolation): concurrency, proven"
"${PSQL[@]}" -c "CREATE DATABASE pm_isolation TEMPLATE pm_template"
B=/usr/lib/postgresql/15/bin
ISOLATION=$(dirname "$("$PG_CONFIG" --pgxs)")/../test/isolation/pg_isolation_regress
SPECS=$(ls extension/tests/isolation/specs | sed 's/\.spec$//')
mkdir -p target/isolation
"$ISOLATION" --use-existing --bindir=$B --host=127.0.0.1 --port="$PM_PG_PORT" --user=postgres \
    --dbname=pm_isolation --inputdir=extension/tests/isolation --outputdir=target/isolation $SPECS || {
    cat target/isolation/regression.diffs 2>/dev/null
    exit 1
}
step "isolation specs fail when what they prove is broken (one mutant function each)"
extension/tests/isolation/mutations.sh "$PM_PG_PORT" pm_template

step "pg_regress goldens (extension/tests/pg_regress): what each SQL function answers"
extension/tests/pg_regress/run.sh "$PM_PG_PORT" pm_template pm_cron

step "the 0.3.0 sidecar, for the rolling-upgrade test (built from that release's commit)"
scripts/compat-sidecar.sh

step "end-to-end suites"
cargo build -p polar-meterd -p polar-emulator
if [ -n "${PM_ONLY:-}" ]; then
    for suite in $PM_ONLY; do
        [ "$suite" = citus ] || cargo test -p pm-e2e --test "$suite" -- --nocapture
    done
else
    cargo test -p pm-e2e
fi

# PM_ONLY runs Citus only when it names it; PM_SKIP_CITUS=1 skips it.
if { [ -z "${PM_ONLY:-}" ] && [ -z "${PM_SKIP_CITUS:-}" ]; } || [[ " ${PM_ONLY:-} " == *" citus "* ]]; then
    step "Citus: a coordinator and two workers, the extension distributed, the suites that matter most"
    # Servers started this late get ports below Linux's ephemeral range
    # (32768-60999), where a client connection's source port could hold them.
    CITUS_PORT=25460
    if ! ls "${CITUS_SRC:-../shared/citus}"/citus-*src*.tar.gz >/dev/null 2>&1 &&
        [ ! -f "$($PG_CONFIG --pkglibdir)/citus.so" ]; then
        # Not a pass: said loudly, and only where Citus cannot be had at all.
        echo "SKIPPED: Citus is not installed and CITUS_SRC=${CITUS_SRC:-../shared/citus} holds no source tarball"
    else
        scripts/citus.sh build
        scripts/citus.sh destroy
        scripts/citus.sh start $CITUS_PORT pm_citus
        # pg_cron lives on the coordinator only: its CREATE EXTENSION is kept
        # from the workers, polar_meter's is not (Citus needs it on every node).
        psql -h 127.0.0.1 -p $CITUS_PORT -U postgres -X -q -v ON_ERROR_STOP=1 -d pm_citus \
            -c "SET citus.enable_ddl_propagation = off" -c "CREATE EXTENSION pg_cron" -c "RESET citus.enable_ddl_propagation" \
            -c "CREATE EXTENSION polar_meter" -c "SELECT * FROM meter.citus_distribute()"
        # One database for every test (see citus.rs): one test at a time.
        PM_CITUS_PORT=$CITUS_PORT PM_CITUS_DB=pm_citus cargo test -p pm-e2e --test citus -- --test-threads=1 --nocapture
        scripts/citus.sh stop
    fi
fi

if [ -z "${PM_ONLY:-}" ] && [ -z "${PM_SKIP_CONTAINERS:-}" ]; then
    step "containers: images built, the compose stack run"
    tests/containers/run.sh
fi
