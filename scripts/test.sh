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
# The replication codec's CUDA backend must keep compiling where there is no CUDA (it loads the
# driver at run time); its GPU tests print "skipped: no CUDA device" and pass on such machines.
# Only basalt-gpu is built with the feature, so this adds no RocksDB build; the CPU tests already
# ran above.
cargo clippy -p basalt-gpu --all-targets --features cuda -- -D warnings
cargo test -p basalt-gpu --features cuda --lib --test gpu
