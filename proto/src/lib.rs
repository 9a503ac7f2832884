//! What the registry and the client agree on.
//!
//! - [`pb`]: the gRPC API (`snapreg.v1`), generated from `proto/snapreg/v1/registry.proto`.
//! - [`digest`]: BLAKE3 content addresses and their `blake3:<hex>` spelling.
//! - [`codec`]: the byte layout of a stored chunk object (header + raw or zstd payload).
//! - [`encryption`]: tenant keys and the layout of an encrypted chunk (convergent
//!   within a tenant; the registry stores and verifies the encrypted bytes).
//! - [`manifest`]: the snapshot manifest, schema version 1, with golden files under
//!   `tests/golden/` that every later version must keep decoding.
//! - [`reference`]: `repo/name:tag` and `repo/name@blake3:<hex>`.
//! - [`tags`]: hybrid logical clocks and the append-only tag-record rule.
//! - [`layout`]: where chunks, manifests, tag records and the layout-version object
//!   live in the object store.
//! - [`compat`]: the one function that decides whether a snapshot may restore on a host.
//! - [`credentials`]: bearer tokens and TLS material every gRPC connection uses.
//!
//! Invariants that span modules: a digest is always the BLAKE3 of *uncompressed*
//! chunk bytes (for an encrypted snapshot: of the encrypted bytes), or of a manifest's exact stored bytes; whoever receives bytes verifies
//! them against the digest they were asked for.

pub mod codec;
pub mod compat;
pub mod credentials;
pub mod digest;
pub mod encryption;
pub mod layout;
pub mod manifest;
pub mod reference;
pub mod tags;

mod error;

pub use digest::Digest;
pub use error::Error;

/// Deterministic incompressible bytes for the unit tests.
#[cfg(test)]
pub(crate) fn test_noise(n: usize) -> Vec<u8> {
    let mut x = 0x9E3779B97F4A7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Generated gRPC types and stubs for `snapreg.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("snapreg.v1");
}
