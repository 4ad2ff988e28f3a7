#!/usr/bin/env bash
# The project's checks, exactly as CI runs them: formatting, clippy with warnings denied, and
# every test (unit, property, and integration tests against real basaltd processes).
# About a minute with a warm build cache; a cold one adds the RocksDB build (~11 minutes on 2
# cores). Anything long (simulation sweeps, soak runs) must stay opt-in to keep CI lean.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
