//! Wall-clock time in unix milliseconds: lease expiries, node registrations and GC's
//! sweep-log names. Tag order uses the hybrid logical clock (`snapreg_proto::tags`),
//! never this.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}
