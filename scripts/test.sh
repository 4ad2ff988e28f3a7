#!/usr/bin/env bash
# The project's checks, exactly as CI runs them: formatting, clippy with warnings denied, and
# every test (unit, property, and integration tests against real basaltd processes).
# Long simulations and soak runs are opt-in (see README); this run stays well under 40 minutes
# on 2 cores with a warm cache.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
