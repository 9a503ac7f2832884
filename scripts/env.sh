# Sourced by the scripts: one place for the settings both the demo and the tests use.
# The cargo target dir lives outside the clone so repeated CI runs reuse the RocksDB
# build (about 10 minutes on 2 cores).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/snapreg-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
SNAPREG_BIN="$CARGO_TARGET_DIR/debug"
export SNAPREG_BIN
