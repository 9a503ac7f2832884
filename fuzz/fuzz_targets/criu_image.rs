//! CRIU image parsing in the client: `stats-dump` (the frozen time in checkpoint
//! reports) and `pagemap-*.img` (device-memory segments and the zero-page plan of
//! pull-restore), both records behind magics and u32 length prefixes, decoded with
//! prost from CRIU's vendored .proto files (client/proto/criu). Never panics; the page
//! runs a pagemap yields lie end to end in its pages file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(ms) = snapreg_client::criu::parse_freeze_ms(data) {
        assert!(ms >= 0.0);
    }
    if let Some((_, runs)) = snapreg_client::zero_pages::page_runs(data) {
        let mut end = 0;
        for (_, len, offset) in runs {
            assert_eq!(offset, end);
            end = offset + len;
        }
    }
});
