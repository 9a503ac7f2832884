# Sourced by the scripts: one place for the settings both the demo and the tests use.
# The cargo target dir lives outside the clone so repeated CI runs reuse the RocksDB
# build (about 10 minutes on 2 cores).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/snapreg-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
SNAPREG_BIN="$CARGO_TARGET_DIR/debug"
export SNAPREG_BIN

# One compile of the C and C++ underneath (RocksDB most of all) for both README
# commands: `cargo clippy` (check mode) and `cargo build` run librocksdb-sys's build
# script as two different units, so on a fresh clone the demo's build and the test
# command's clippy each compiled RocksDB (measured: 31 min, then 24 min more). With
# the compiler behind ccache (cache in ~/.cache/ccache), the second compile of every
# file is a cache hit. install-build-deps.sh installs ccache.
if command -v ccache >/dev/null 2>&1; then
  export CC="${CC:-ccache gcc}" CXX="${CXX:-ccache g++}"
  export CCACHE_DIR="${CCACHE_DIR:-${HOME:-/root}/.cache/ccache}"
  export CCACHE_MAXSIZE="${CCACHE_MAXSIZE:-5G}"
fi
