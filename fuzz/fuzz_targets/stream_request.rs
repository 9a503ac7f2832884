//! CRIU image-streamer requests (client/src/criu_stream.rs), as a restore reads them
//! from CRIU's socket: a stream of length-prefixed `img_streamer_request_entry`
//! messages. Never panics; every name accepted is a plain file name, so a served
//! file can never be looked up outside the snapshot.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use snapreg_client::criu_stream::{parse_filename, read_request};

fn plain(name: &str) {
    assert!(
        !name.is_empty() && !name.contains('/') && !name.contains('\0'),
        "{name:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(name) = parse_filename(data) {
        plain(&name);
    }
    // The socket path; the socket buffer holds what the fuzzer's inputs hold.
    let data = &data[..data.len().min(64 << 10)];
    let (mut criu, mut streamer) = UnixStream::pair().expect("socketpair");
    criu.write_all(data).expect("write");
    drop(criu);
    while let Ok(Some(name)) = read_request(&mut streamer) {
        plain(&name);
    }
});
