#!/usr/bin/env bash
# Builds polar-meterd as released in 0.3.0 into target/compat/, for the
# rolling-upgrade test (tests/e2e/tests/boundary.rs): a 0.3.0 sidecar must
# keep delivering against a database upgraded to this release.
#
# The source is the 0.3.0 release's commit of this repository (git archive;
# a shallow clone lacks it: git fetch --unshallow). It builds in the shared
# target directory, reusing every dependency already built; the workspace's
# own polar-meterd is relinked afterwards, since both are uplifted to
# target/<profile>/polar-meterd.
#   usage: scripts/compat-sidecar.sh [dev|perf]   (perf: for the paired benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."
RELEASE=0.3.0
COMMIT=1a2a11506c5e3226a1c199ed6030cfd5a17181a9
PROFILE=${1:-dev}
DIR=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
OUT=target/compat/polar-meterd-$RELEASE$([ "$PROFILE" = dev ] || echo "-$PROFILE")
if [ -x "$OUT" ] && "$OUT" --version 2>/dev/null | grep -q "^polar-meterd $RELEASE "; then
    exit 0
fi
if ! git cat-file -e "$COMMIT^{commit}" 2>/dev/null; then
    echo "compat-sidecar: commit $COMMIT (release $RELEASE) is not in this clone; run: git fetch --unshallow" >&2
    exit 1
fi
SRC=target/compat/src-$RELEASE
rm -rf "$SRC"
mkdir -p "$SRC"
git archive "$COMMIT" | tar -x -C "$SRC"
CARGO_TARGET_DIR="$PWD/target" cargo build --locked --manifest-path "$SRC/Cargo.toml" --profile "$PROFILE" -p polar-meterd
cp "target/$DIR/polar-meterd" "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
rm -rf "$SRC"
touch sidecar/src/main.rs
cargo build --profile "$PROFILE" -p polar-meterd
