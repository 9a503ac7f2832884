//! CRIU image parsing in the client: today that is `stats-dump` (the frozen time in
//! checkpoint reports, a protobuf entry behind two magics and a length). The client
//! does not parse inventory, pagemap or mm images: it streams them as bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(ms) = snapreg_client::criu::parse_freeze_ms(data) {
        assert!(ms >= 0.0);
    }
});
