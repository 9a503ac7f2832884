//! Generates the gRPC code from `proto/snapreg/v1/*.proto`.
//!
//! protoc comes from the vendored `protoc-bin-vendored` crate, never from the
//! developer's machine, so every checkout builds the same code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .bytes(".snapreg.v1")
        .compile_protos(&["proto/snapreg/v1/registry.proto"], &["proto"])?;
    Ok(())
}
