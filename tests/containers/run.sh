#!/usr/bin/env bash
# The container images, built and run (make test-containers; make test runs
# it): builds the three images from a local Debian base (no registry needed)
# with binaries and the extension built by the host's toolchain, starts the
# compose stack with the emulator, records an event through polar-meterd in
# its container, sees it delivered to the emulator's container, and checks
# /readyz, the sidecar's non-root user and read-only root filesystem, and the
# database login's least privilege. Tears everything down, and writes the
# image sizes to docker/IMAGES.md. Installs podman and podman-compose itself.
# Skips, saying why, only where no container can run at all.
set -euo pipefail
cd "$(dirname "$0")/../.."
step() { printf '\n==> containers: %s\n' "$*"; }
PROJECT=pm-test
BASE=localhost/polar-meter-base:bookworm
export PM_BASE_IMAGE=$BASE PM_ARTIFACTS=prebuilt PM_IMAGE_PREFIX=localhost/polar-meter PM_TAG=test
# Ports below the ephemeral range (32768-60999), free whatever connections are open.
export PM_PG_PORT=25499 PM_API_PORT=25787 PM_EMULATOR_PORT=25788 PM_ADMIN_PORT=25797
export CONTAINERS_CONF=$PWD/tests/containers/containers.conf
COMPOSE=(podman-compose -p $PROJECT -f docker/compose.yaml -f docker/compose.emulator.yaml)

step "podman"
if ! command -v podman >/dev/null || ! command -v podman-compose >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman podman-compose debootstrap uidmap runc >/dev/null
fi
if ! podman info >/dev/null 2>&1; then
    echo "SKIPPED: no container engine can run here: $(podman info 2>&1 | tail -n 1)"
    exit 0
fi

step "a local Debian bookworm base image ($BASE)"
if ! podman image exists $BASE; then
    root=$(mktemp -d)
    debootstrap --variant=minbase --include=ca-certificates bookworm "$root" http://deb.debian.org/debian >/dev/null
    # What a container never reads: package caches, documentation, manuals, locales.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
        "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
    tar -C "$root" -c . | podman import - $BASE >/dev/null
    rm -rf "$root"
fi

step "binaries and the extension, built by the host's toolchain (profile perf)"
cargo build -q -p polar-meterd -p polar-emulator --profile perf
rm -rf docker/dist && mkdir -p docker/dist/bin docker/dist/extension
cp target/perf/polar-meterd target/perf/polar-emulator docker/dist/bin/
strip docker/dist/bin/*
cargo pgrx package -p polar_meter --profile perf --pg-config /usr/lib/postgresql/15/bin/pg_config \
    --out-dir docker/dist/extension >/dev/null

cleanup() {
    "${COMPOSE[@]}" down -v >/dev/null 2>&1 || true
    rm -rf docker/dist
}
trap cleanup EXIT

step "build the images"
"${COMPOSE[@]}" build

step "start the stack with the emulator"
"${COMPOSE[@]}" up -d
ready() { curl -fsS "http://127.0.0.1:$PM_API_PORT/readyz" 2>/dev/null; }
for i in $(seq 120); do ready >/dev/null && break; sleep 1; done
ready || { "${COMPOSE[@]}" logs; echo "polar-meterd never became ready" >&2; exit 1; }
echo "readyz: $(ready)"

step "an event through polar-meterd reaches the emulator"
pg() { podman exec -u postgres ${PROJECT}_postgres_1 psql -X -qtA -h /var/run/postgresql -U postgres -d polar_meter -c "$1"; }
pg "SELECT id FROM meter.upsert_organization('acme', 'Acme Inc', 'billing@acme.io')"
KEY=$(pg "SELECT key FROM meter.create_api_key('acme', 'containers')")
TS=$(date -u -d '-1 minute' +%Y-%m-%dT%H:%M:%SZ)
ANSWER=$(curl -fsS -X POST "http://127.0.0.1:$PM_API_PORT/api/v1/meter" -H "Authorization: Bearer $KEY" \
    -H 'Idempotency-Key: containers-1' -H 'Content-Type: application/json' \
    -d "{\"event_name\":\"api.request\",\"event_timestamp\":\"$TS\",\"metadata\":{\"tokens\":12}}")
echo "$ANSWER" | grep -q '"status":"recorded"' || { echo "not recorded: $ANSWER" >&2; exit 1; }
delivered() { curl -fsS "http://127.0.0.1:$PM_EMULATOR_PORT/__admin/events" | grep -q '"external_customer_id":"acme"'; }
for i in $(seq 60); do delivered && break; sleep 1; done
delivered || { "${COMPOSE[@]}" logs polar-meterd; echo "the event never reached the emulator" >&2; exit 1; }
[ "$(pg "SELECT polar_status FROM meter.meter_event")" = sent ] || { echo "the event is not marked sent" >&2; exit 1; }
echo "delivered once and marked sent"

step "the sidecar runs as a non-root user on a read-only root filesystem"
uid=$(podman exec ${PROJECT}_polar-meterd_1 id -u)
[ "$uid" = 10001 ] || { echo "polar-meterd runs as uid $uid" >&2; exit 1; }
if podman exec ${PROJECT}_polar-meterd_1 touch /probe 2>/dev/null; then
    echo "the sidecar's root filesystem is writable" >&2
    exit 1
fi
[ "$(podman inspect -f '{{.State.Health.Status}}' ${PROJECT}_polar-meterd_1)" != unhealthy ] || { echo "healthcheck says unhealthy" >&2; exit 1; }
podman exec ${PROJECT}_polar-meterd_1 polar-meterd ready && echo "uid 10001, read-only, healthcheck passes"

step "metrics are on the admin port, not on the API's"
# Read whole first: grep -q leaving a pipe early would fail curl (pipefail).
metrics=$(curl -fsS "http://127.0.0.1:$PM_ADMIN_PORT/metrics")
grep -q '^polar_meter_events_total' <<<"$metrics" || { echo "no metrics on the admin port" >&2; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PM_API_PORT/metrics")
[ "$code" = 404 ] || { echo "the API port answered /metrics with $code" >&2; exit 1; }
echo "/metrics on :$PM_ADMIN_PORT only"

step "the database login polar_meterd has least privilege"
denied=$(podman exec -e PGPASSWORD=polar-meterd-dev ${PROJECT}_postgres_1 \
    psql -X -qtA -h 127.0.0.1 -U polar_meterd -d polar_meter -c "SELECT count(*) FROM meter.api_key" 2>&1 || true)
echo "$denied" | grep -q "permission denied" || { echo "polar_meterd could read meter.api_key: $denied" >&2; exit 1; }
echo "polar_meterd cannot read the tables"

step "image sizes"
echo "| image | size |"
echo "|---|---|"
for i in postgres meterd emulator; do
    echo "| \`polar-meter/$i\` | $(podman image inspect -f '{{.Size}}' localhost/polar-meter/$i:test | awk '{printf "%.0f MB", $1/1e6}') |"
done
echo "containers: all checks passed"
