//! Manifest decoding (registry PutManifest, every pull): arbitrary bytes never panic;
//! whatever decodes names only paths that stay inside a pull directory, and
//! re-encodes to a manifest that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapreg_proto::manifest::{check_relative_path, Manifest};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::decode(data) else {
        return;
    };
    for layer in &m.layers {
        if let Some(name) = &layer.name {
            assert!(check_relative_path(name).is_ok(), "layer {name:?}");
        }
        for f in &layer.files {
            assert!(check_relative_path(&f.path).is_ok(), "file {:?}", f.path);
        }
    }
    let again = Manifest::decode(&m.encode()).expect("a decoded manifest re-encodes");
    assert_eq!(again, m);
    let _ = m.chunk_digests();
    let _ = m.total_size();
});
