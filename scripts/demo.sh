#!/usr/bin/env bash
# The first thing to run: builds basaltd and the demo, then starts a local 3-node cluster, writes
# keys, kills the leader, checks every acknowledged write and shows the killed node catching up.
# Extra arguments go to basalt-demo (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
# The same target selection as scripts/test.sh, so both share one build of RocksDB (a narrower
# selection resolves features differently and costs a second ~11-minute C++ build).
cargo build --workspace --all-targets
BASALTD="$CARGO_TARGET_DIR/debug/basaltd" exec "$CARGO_TARGET_DIR/debug/basalt-demo" "$@"
