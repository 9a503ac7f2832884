//! Podman checkpoint archive import (`snapctl push --podman-archive`): a hostile tar
//! (plain, gzip or zstd) never panics, and every file it would put in a snapshot has
//! a relative path that stays inside the pull directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapreg_proto::manifest::check_relative_path;

fuzz_target!(|data: &[u8]| {
    let input = std::io::Cursor::new(data.to_vec());
    let Ok(index) = snapreg_client::podman::read_archive(input, "fuzz.tar") else {
        return;
    };
    for m in &index.members {
        if let Some(file) = &m.file {
            assert!(check_relative_path(file).is_ok(), "{file:?}");
        }
    }
});
