//! Generates the Rust types of the CRIU image records snapctl reads and writes, from
//! CRIU's own `.proto` files vendored under `proto/criu/` (see its README.md).
//!
//! protoc and its `google/protobuf/descriptor.proto` (imported by CRIU's opts.proto)
//! come from the vendored `protoc-bin-vendored` crate, never from the developer's
//! machine, so every checkout builds the same code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/criu");
    let include = protoc_bin_vendored::include_path()?;
    prost_build::Config::new().compile_protos(
        &[
            "proto/criu/img-streamer.proto",
            "proto/criu/mm.proto",
            "proto/criu/pagemap.proto",
            "proto/criu/stats.proto",
        ],
        &[std::path::Path::new("proto/criu"), include.as_path()],
    )?;
    Ok(())
}
