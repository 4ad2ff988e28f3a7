# Shared setup for Basalt's scripts: sourced, not run.
#
# - Installs libclang (RocksDB's Rust bindings are generated with bindgen) if it is missing, using
#   apt-get on Debian/Ubuntu; as root directly, otherwise through sudo.
# - As root, installs iproute2 (`ip`) if it is missing: the Jepsen runner's partition tests put
#   nodes in network namespaces with it. Without root those tests are skipped, so nothing is needed.
# - Points CARGO_TARGET_DIR at a cache outside the checkout, so a fresh clone reuses the
#   RocksDB build (about 11 minutes cold on 2 cores) instead of starting over.

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/basalt/target}"

# True if libclang's C library (what bindgen loads) is present: `libclang.so*` or
# `libclang-<version>.so*`. Not `libclang-cpp.so*`, the C++ interface, which some images carry
# without the C library and which bindgen cannot use. An unmatched glob stays literal and fails -e.
have_libclang() {
    local f
    for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
        /usr/lib/*-linux-gnu/libclang.so* /usr/lib/*-linux-gnu/libclang-[0-9]*.so*; do
        [ -e "$f" ] && return 0
    done
    return 1
}

if ! have_libclang; then
    echo "basalt: installing libclang-dev (needed to build RocksDB's bindings)" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    if command -v apt-get >/dev/null 2>&1; then
        $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-dev >/dev/null
    else
        echo "basalt: please install libclang (e.g. libclang-dev) and re-run" >&2
        exit 1
    fi
fi

if [ "$(id -u)" -eq 0 ] && ! command -v ip >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "basalt: installing iproute2 (the Jepsen runner partitions nodes with \`ip netns\`)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null ||
        echo "basalt: could not install iproute2; the partition tests will be skipped" >&2
fi
