//! End-to-end tests: one binary (one link step on a 2-core CI), real `snapreg`
//! processes on loopback, real `snapctl` runs, real CRIU.

mod support;

mod agent;
mod auth;
mod encryption;
mod errors;
mod faults;
mod gc;
mod lazy;
mod limits;
mod oci;
mod operations;
mod peers;
mod podman;
mod push_pull;
mod real_images;
mod replication;
mod restore_outcomes;
mod retention;
mod s3;
mod scheduler;
mod streaming;
mod weights;
mod writable_files;
